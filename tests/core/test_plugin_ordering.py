"""Ordering constraints a plugin pass declares: `registry.add(P, after=..., before=...)`."""

from __future__ import annotations

import dataclasses
import types

import pytest

from dsopt import Pass, PassResult, PluginError, hookimpl
from dsopt.driver import build_pipeline, optimize
from dsopt.plugin import PluginHost
from tests.core.models import tiny


@dataclasses.dataclass(frozen=True)
class Marker(Pass):
    name = "marker"
    summary = "does nothing; marks a position"
    stage = "fuse"

    def run(self, module, ctx):
        return PassResult(False)


def _host(**placement):
    module = types.ModuleType("orderer")
    module.dsopt_register_passes = hookimpl(lambda registry: registry.add(Marker, **placement))
    return PluginHost(extra=[module], autoload=False)


def _names(host, target=None):
    pipeline, _ = build_pipeline(host, passes=None, target=target)
    return pipeline.names()


def test_after_a_pass():
    names = _names(_host(after="fuse-batch-norm"))
    assert names[names.index("fuse-batch-norm") + 1] == "marker"
    assert names.count("marker") == 1


def test_before_a_pass_runs_in_a_real_pipeline():
    host = _host(before="eliminate-dead")
    result = optimize(tiny(), host=host)
    ran = [r.name for r in result.report.passes if r.round == 0]
    assert ran[ran.index("marker") + 1] == "eliminate-dead"


def test_stage_slots():
    from dsopt.pipeline import STAGES

    host = _host(after="canonicalize")
    names = _names(host)
    stage = {n: host.get_pass(n).stage for n in names}
    i = names.index("marker")
    assert stage[names[i - 1]] == "canonicalize"  # right after the stage's last pass
    assert "canonicalize" not in [stage[n] for n in names[i + 1 :]]
    # before= a stage: before its first pass, or before the first pass of a later stage.
    host = _host(before="quantize")
    names = _names(host)
    rank = {n: STAGES.index(host.get_pass(n).stage) for n in names}
    i = names.index("marker")
    assert all(rank[n] < STAGES.index("quantize") for n in names[:i])
    assert i == len(names) - 1 or rank[names[i + 1]] >= STAGES.index("quantize")


def test_user_pipeline_is_left_alone():
    pipeline, _ = build_pipeline(
        _host(after="fuse-batch-norm"), passes="eliminate-dead", target=None
    )
    assert pipeline.names() == ["eliminate-dead"]


def test_bad_declarations_name_the_plugin():
    with pytest.raises(PluginError, match="plugin 'orderer'.*both after= and before="):
        _host(after="eliminate-dead", before="eliminate-dead")
    with pytest.raises(
        PluginError, match="plugin 'orderer': pass 'marker' is declared after= 'nope'"
    ):
        _names(_host(after="nope"))


@dataclasses.dataclass(frozen=True)
class Liar(Pass):
    """Declared exact, but turns Relu into Sigmoid."""

    name = "liar"
    summary = "claims exactness it does not have"

    def run(self, module, ctx):
        changed = False
        for node in module.graph.nodes:
            if node.op == "Relu":
                node.op = "Sigmoid"
                changed = True
        return PassResult(changed)


def test_exact_pass_that_changes_outputs_is_named_under_verify_each():
    module = types.ModuleType("liar-plugin")
    module.dsopt_register_passes = hookimpl(lambda registry: registry.add(Liar))
    host = PluginHost(extra=[module], autoload=False)
    with pytest.raises(PluginError, match="plugin 'liar-plugin': pass 'liar' declares exactness"):
        optimize(tiny(), passes="liar", verify="each", host=host)
    # Without --verify each the check does not run (it costs two onnxruntime runs per pass).
    optimize(tiny(), passes="liar", verify="end", host=host)


def test_honest_plugin_pass_passes_the_contract_check():
    pytest.importorskip("dsopt_example", reason="pip install -e plugins/dsopt-example")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Neg", ["x"], ["a"]),
            helper.make_node("Neg", ["a"], ["b"]),
            helper.make_node("Relu", ["b"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = optimize(model, passes="eliminate-double-negation", verify="each")
    assert result.report.passes[0].changed
