from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs
import pytest

from dsopt import (
    Module,
    Pass,
    PassContext,
    PassError,
    PassManager,
    PassResult,
    UsageError,
    VerificationError,
)
from dsopt.analysis import Analysis, AnalysisManager, GraphView, TopologicalOrder
from tests.core.models import tiny


@dataclasses.dataclass(frozen=True)
class CountingPass(Pass):
    name = "count-nodes"
    summary = "reads the topological order"
    limit: int = 3

    def run(self, module, ctx):
        order = ctx.analyses.get(TopologicalOrder)
        return PassResult(False, {"nodes": len(order)})


@dataclasses.dataclass(frozen=True)
class RemoveRelu(Pass):
    name = "remove-relu"
    summary = "breaks the graph on purpose by dropping the Relu producing the output"

    def run(self, module, ctx):
        module.graph.nodes = [n for n in module.graph.nodes if n.op != "Relu"]
        return PassResult(True, {"removed": 1})


@dataclasses.dataclass(frozen=True)
class Crash(Pass):
    name = "crash"
    summary = "raises"

    def run(self, module, ctx):
        raise ZeroDivisionError("boom")


@dataclasses.dataclass(frozen=True)
class WrongReturn(Pass):
    name = "wrong-return"
    summary = "returns a dict"

    def run(self, module, ctx):
        return {"changed": False}


@dataclasses.dataclass(frozen=True)
class OldOnly(Pass):
    name = "old-only"
    summary = "declares opsets 1..9"
    opsets = (1, 9)

    def run(self, module, ctx):
        raise AssertionError("must not run on opset 17")


def test_report_records_every_pass_and_counts():
    module = Module.from_proto(tiny())
    report = PassManager([CountingPass()], verify="each").run(module, PassContext())
    (record,) = report.passes
    assert record.stats == {"nodes": 4}
    assert not record.changed
    assert report.before["nodes"] == 4 and report.after["nodes"] == 4
    assert report.verification == "ok (each)"


def test_verify_each_names_the_broken_pass():
    module = Module.from_proto(tiny())
    with pytest.raises(VerificationError, match="after pass 'remove-relu'"):
        PassManager([RemoveRelu()], verify="each", crash_dir=None).run(module, PassContext())


def test_verify_end_catches_it_too():
    module = Module.from_proto(tiny())
    with pytest.raises(VerificationError, match="after the pipeline"):
        PassManager([RemoveRelu()], verify="end").run(module, PassContext())


def test_crash_writes_reproducer_and_names_previous_passes(tmp_path):
    module = Module.from_proto(tiny())
    manager = PassManager([CountingPass(), Crash()], crash_dir=tmp_path)
    with pytest.raises(PassError) as info:
        manager.run(module, PassContext())
    message = info.value.message
    assert "pass 'crash' (#1) failed: ZeroDivisionError: boom" in message
    assert "count-nodes" in message
    (folder,) = tmp_path.glob("dsopt-crash-*")
    assert (folder / "input.onnx").is_file()
    assert (folder / "pipeline.txt").read_text().strip() == "count-nodes,crash"
    assert str(folder) in info.value.hint


def test_wrong_return_type_is_a_pass_error(tmp_path):
    with pytest.raises(PassError, match="must return PassResult"):
        PassManager([WrongReturn()], crash_dir=tmp_path).run(
            Module.from_proto(tiny()), PassContext()
        )


def test_opset_range_skips_with_reason():
    report = PassManager([OldOnly()]).run(Module.from_proto(tiny()), PassContext())
    assert report.passes[0].skipped == "opset 17 outside [1, 9]"


def test_bad_verify_mode():
    with pytest.raises(UsageError, match="--verify"):
        PassManager([], verify="sometimes")


def test_options_from_text_are_typed():
    assert CountingPass.from_options({"limit": "7"}).limit == 7
    with pytest.raises(UsageError, match="must be int"):
        CountingPass.from_options({"limit": "seven"})
    with pytest.raises(UsageError, match="has no option 'nope'"):
        CountingPass.from_options({"nope": "1"})
    assert CountingPass(limit=5).describe() == "count-nodes{limit=5}"
    assert CountingPass().describe() == "count-nodes"


class Dependent(Analysis[int]):
    def compute(self, module, am):
        return len(am.get(GraphView))


def test_analysis_cache_and_transitive_invalidation():
    module = Module.from_proto(tiny())
    am = AnalysisManager(module)
    assert am.get(Dependent) == 4
    assert am.get(Dependent) == 4
    assert am.hits == 1
    module.generation += 1
    am.invalidate(preserved=(Dependent,))  # Dependent kept, but GraphView dropped...
    assert not am.cached(GraphView)
    assert not am.cached(Dependent)  # ...so what depends on it goes too


def test_cycle_is_a_model_error():
    from dsopt import ModelError

    module = Module.from_proto(tiny())
    nodes = module.graph.nodes
    add = next(n for n in nodes if n.op == "Add")
    relu = next(n for n in nodes if n.op == "Relu")
    add.inputs[0] = relu.outputs[0]
    with pytest.raises(ModelError, match="cycle"):
        AnalysisManager(module).get(TopologicalOrder)
    assert isinstance(add.inputs[0], gs.Variable)


def test_match_subgraphs_finds_add_relu_chain():
    import networkx as nx

    from dsopt.analysis import match_subgraphs

    module = Module.from_proto(tiny())
    view = AnalysisManager(module).get(GraphView)
    pattern = nx.DiGraph()
    pattern.add_node("add", op="Add")
    pattern.add_node("act", op=("Relu", "Sigmoid"))
    pattern.add_edge("add", "act")
    matches = list(match_subgraphs(view, pattern))
    assert sorted(view.nodes[k]["op"] for m in matches for k, v in m.items() if v == "act") == [
        "Relu",
        "Sigmoid",
    ]


def test_verify_module_matches_verify_model_without_exporting_weights():
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from dsopt.ir import Module
    from dsopt.pass_infra import verify_model, verify_module

    weight = np.ones((64, 32, 3, 3), np.float32)  # 73 KB: stubbed in the structure proto
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 6, 6])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    module = Module.from_proto(model)
    structure = module.structure_proto()
    assert not structure.graph.initializer and structure.ByteSize() < 2000
    assert verify_module(module) is None is verify_model(model)
    # a wrong output shape is found on the structure too, as on the full model
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 63
    assert verify_module(Module.from_proto(model)) == verify_model(model) is not None
    # a weight whose data does not fill its dims is found without the checker seeing it
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 64
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    assert "declares dims [64, 32, 3, 3]" in verify_module(Module.from_proto(model))
