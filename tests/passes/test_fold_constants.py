from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import given, settings
from onnx import numpy_helper

from dsopt.ir import Module
from dsopt.pass_infra import graph_counts
from dsopt.passes import FoldConstants, SimplifyShapes
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden" / "fold-constants"
GOLDEN = golden_cases(GOLDEN_DIR)
LIGHT = sorted((Path(onnx.__file__).parent / "backend" / "test" / "data" / "light").glob("*.onnx"))


def golden(name: str) -> onnx.ModelProto:
    return onnx.parser.parse_model((GOLDEN_DIR / f"{name}.before.onnxtxt").read_text())


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FoldConstants(), case)


def test_chain_folds_in_one_run():
    rewritten, result = apply_pass(FoldConstants(), golden("chain_reshape_transpose_cast"))
    assert result.changed
    assert result.stats["folded"] == 5  # Reshape, Transpose, Cast, Cast, Mul
    assert [n.op_type for n in rewritten.graph.node if n.output[0] != "half"] == ["Add"]
    np.testing.assert_array_equal(
        initializers(rewritten)["g"], np.array([[1, 4], [2, 5], [3, 6]], np.float32) * 0.5
    )


def test_size_cap_keeps_generators_as_nodes():
    model = golden("size_cap")
    _, result = apply_pass(FoldConstants(), model)
    assert result.stats == {
        "folded": 1,
        "if-inlined": 0,
        "skipped-too-large": 1,
        "skipped-unsupported": 0,
    }
    # max_size_mb caps a growing result even when the growth budget would allow it.
    _, capped = apply_pass(FoldConstants(max_growth_bytes=2**40), model)
    assert capped.stats["skipped-too-large"] == 1
    rewritten, lifted = apply_pass(FoldConstants(max_size_mb=8.0, max_growth_bytes=2**40), model)
    assert lifted.stats["folded"] == 2 and lifted.stats["skipped-too-large"] == 0
    assert initializers(rewritten)["ones"].shape == (1024, 1024)


def test_size_cap_does_not_block_results_no_larger_than_inputs():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[600, 600] x) => (float[600, 600] y) <float[600, 600] w = {1}, float s = {2}> {
          ws = Mul (w, s)
          y = Add (x, ws)
        }""")
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.ones((600, 600), np.float32), "w")
    )
    _, result = apply_pass(FoldConstants(max_size_mb=0.5), model)
    assert result.stats["folded"] == 1  # 1.4 MiB out of 1.4 MiB in: nothing grows


def test_options_parse_from_pipeline_text():
    pass_ = FoldConstants.from_options({"max_size_mb": "4", "max-growth-bytes": "4096"})
    assert pass_ == FoldConstants(max_size_mb=4.0, max_growth_bytes=4096)
    assert pass_.describe() == "fold-constants{max_size_mb=4.0,max_growth_bytes=4096}"


def test_dtypes_are_exactly_what_the_op_produces():
    rewritten, result = apply_pass(FoldConstants(), golden("dtypes"))
    assert result.stats["folded"] == 5 and result.stats["skipped-unsupported"] == 0
    values = initializers(rewritten)
    assert values["hh"].dtype == np.float16
    assert values["qa"].dtype == np.int8 and values["qa"].tolist() == [3, -4, 127]
    assert values["positive"].dtype == np.bool_
    (b_node,) = [n for n in rewritten.graph.node if n.output[0] == "b"]
    b_value = numpy_helper.to_array(b_node.attribute[0].t)
    assert b_value.dtype == ml_dtypes.bfloat16  # onnxruntime cannot; the reference evaluator did
    assert b_value.astype(np.float32).tolist() == [1.5, -2.0, 100.0]
    assert "DequantizeLinear" in [n.op_type for n in rewritten.graph.node]  # kept for qdq


def test_nondeterministic_and_training_nodes_are_kept():
    rewritten, result = apply_pass(FoldConstants(), golden("kept_nodes"))
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("RandomNormal") == 1 and ops.count("RandomUniformLike") == 1
    assert ops.count("Dropout") == 1  # the training-mode one; the inference one folded
    assert result.stats["folded"] == 1


def test_graph_output_becomes_constant_node():
    rewritten, _ = check_pass(FoldConstants(), golden("kept_nodes"))
    (node,) = [n for n in rewritten.graph.node if n.output[0] == "d"]
    assert node.op_type == "Constant"
    assert [o.name for o in rewritten.graph.output] == ["y", "r", "d"]


def test_if_with_constant_condition_is_inlined_and_subgraphs_fold():
    rewritten, result = apply_pass(FoldConstants(), golden("subgraphs"))
    assert result.stats["if-inlined"] == 1
    assert result.stats["folded"] == 3  # n (graph output), k (inlined), kz (in a branch)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("If") == 1
    (branching,) = [n for n in rewritten.graph.node if n.op_type == "If"]
    then_graph = branching.attribute[0].g
    assert [n.op_type for n in then_graph.node] == ["Mul"]
    assert [t.name for t in then_graph.initializer] == ["kz"]


def test_unsupported_and_foreign_ops_are_skipped_without_crashing():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1, "my.domain" : 1]>
        g (float[2] x) => (float[2] y) <float[2] a = {1, 2}> {
          m = com.microsoft.NoSuchContribOp (a)
          f = my.domain.Custom (a)
          s = Add (m, f)
          y = Add (x, s)
        }""")
    rewritten, result = apply_pass(FoldConstants(), model)
    assert result.stats["skipped-unsupported"] == 1  # the contrib op was tried and failed
    assert not result.changed
    assert [n.op_type for n in rewritten.graph.node] == ["NoSuchContribOp", "Custom", "Add", "Add"]


def test_second_run_changes_nothing():
    for case in GOLDEN:
        model = onnx.parser.parse_model(case.read_text())
        once, _ = apply_pass(FoldConstants(), model)
        _, again = apply_pass(FoldConstants(), once)
        assert not again.changed, (case.name, again.stats)


@pytest.mark.parametrize("path", LIGHT, ids=lambda p: p.stem)
def test_light_models_stay_valid_and_small(path):
    model = onnx.load(path)
    pass_ = FoldConstants()
    rewritten, result = check_pass(pass_, model, feeds=strategies.random_feeds(model))
    before = graph_counts(Module.from_proto(model))["bytes"]
    after = graph_counts(Module.from_proto(rewritten))["bytes"]
    assert after <= before + result.stats["folded"] * pass_.max_size_mb * 2**20
    if path.stem == "light_densenet121":  # weights made by ConstantOfShape stay generated
        assert after <= before
        assert result.stats["skipped-too-large"] > 800


@given(model=strategies.models(containing=("ConstantOfShape", "Reshape")))
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    check_pass(FoldConstants(), model)


@given(model=strategies.models(containing=("Shape",), dynamic=False))
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property_after_simplify_shapes(model):
    # simplify-shapes turns static shape subgraphs into constants: lots of int64 folding
    # (Gather, Concat, ConstantOfShape, Expand, Range...) for fold-constants to do.
    simplified, _ = apply_pass(SimplifyShapes(), model)
    check_pass(FoldConstants(), simplified)
