from __future__ import annotations

import numpy as np
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from dsopt.ir import Module
from dsopt.passes import FoldBiasAdd
from dsopt.passes.fold_bias_add import RULES
from dsopt.rewrite import explain
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/fold-bias-add")
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
W = "float[3, 2, 1, 1] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}"


def parse(text: str, header: str = HEADER) -> onnx.ModelProto:
    return onnx.parser.parse_model(header + text.replace("WEIGHT", W))


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FoldBiasAdd(), case)


@pytest.mark.parametrize(
    ("case", "expected", "after"),
    [
        ("conv_channel_bias", {"conv-add": 1}, ["Conv"]),
        ("conv_no_bias_4d_bias_first", {"conv-add": 1}, ["Conv"]),
        ("conv1d_and_scalar", {"conv-add": 2}, ["Conv"]),
        ("gemm_bias_with_beta", {"gemm-add": 1}, ["Gemm"]),
        ("per_element_bias_kept", {}, ["Conv", "Add", "Gemm", "Add"]),
    ],
)
def test_golden_stats(case, expected, after):
    path = next(p for p in GOLDEN if p.name.startswith(case + "."))
    rewritten, result = apply_pass(FoldBiasAdd(), onnx.parser.parse_model(path.read_text()))
    assert fired(result.stats) == expected
    assert op_types(rewritten.graph) == after


def test_stats_list_every_rule():
    _, result = apply_pass(FoldBiasAdd(), parse("g (float[2] x) => (float[2] y) { y = Relu (x) }"))
    assert set(result.stats) == {r.name for r in RULES}


def test_gemm_without_c():
    model = parse("""
    g (float[4, 2] a) => (float[4, 3] y)
      <float[2, 3] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}, float[3] d = {0.5, -0.5, 0.25}> {
      t = Gemm <alpha = 2.0> (a, w)
      y = Add (d, t)
    }""")
    rewritten, result = check_pass(FoldBiasAdd(), model)
    assert fired(result.stats) == {"gemm-add": 1}
    (gemm,) = rewritten.graph.node
    assert len(gemm.input) == 3 and [a.name for a in gemm.attribute] == ["alpha"]


NEAR_MISSES = {
    "per-element-bias": """
        g (float[1, 2, 2, 2] x) => (float[1, 3, 2, 2] y)
          <WEIGHT, float[3, 2, 2] c = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
                                     7.0, 8.0, 9.0, 1.0, 2.0, 3.0}> {
          t = Conv (x, w)
          y = Add (t, c)
        }""",
    "bias-on-the-last-axis": """
        g (float[1, 2, 3, 3] x) => (float[1, 3, 3, 3] y) <WEIGHT, float[3] c = {1.0, 2.0, 3.0}> {
          t = Conv (x, w)
          y = Add (t, c)
        }""",
    "bias-on-the-batch-axis": """
        g (float[2, 2, 1, 1] x) => (float[2, 3, 1, 1] y)
          <WEIGHT, float[2, 1, 1, 1] c = {1.0, 2.0}> {
          t = Conv (x, w)
          y = Add (t, c)
        }""",
    "bias-grows-rank": """
        g (float[1, 2, 1, 1] x) => (float[1, 1, 3, 1, 1] y)
          <WEIGHT, float[1, 1, 3, 1, 1] c = {1.0, 2.0, 3.0}> {
          t = Conv (x, w)
          y = Add (t, c)
        }""",
    "non-constant-bias": """
        g (float[1, 2, 3, 3] x, float[3, 1, 1] c) => (float[1, 3, 3, 3] y) <WEIGHT> {
          t = Conv (x, w)
          y = Add (t, c)
        }""",
    "shared-intermediate": """
        g (float[1, 2, 3, 3] x) => (float[1, 3, 3, 3] y, float[1, 3, 3, 3] z)
          <WEIGHT, float[3, 1, 1] c = {1.0, 2.0, 3.0}> {
          t = Conv (x, w)
          y = Add (t, c)
          z = Relu (t)
        }""",
    "add-of-itself": """
        g (float[1, 2, 3, 3] x) => (float[1, 3, 3, 3] y) <WEIGHT> {
          t = Conv (x, w)
          y = Add (t, t)
        }""",
    "non-constant-conv-bias": """
        g (float[1, 2, 3, 3] x, float[3] b) => (float[1, 3, 3, 3] y)
          <WEIGHT, float[3, 1, 1] c = {1.0, 2.0, 3.0}> {
          t = Conv (x, w, b)
          y = Add (t, c)
        }""",
    "gemm-bias-along-rows": """
        g (float[3, 2] a) => (float[3, 3] y)
          <float[2, 3] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}, float[3, 1] d = {1.0, 2.0, 3.0}> {
          t = Gemm (a, w)
          y = Add (t, d)
        }""",
    "gemm-non-constant-c": """
        g (float[3, 2] a, float[3] c) => (float[3, 3] y)
          <float[2, 3] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}, float[3] d = {1.0, 2.0, 3.0}> {
          t = Gemm (a, w, c)
          y = Add (t, d)
        }""",
}


@pytest.mark.parametrize("text", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_are_kept(text):
    _, result = check_pass(FoldBiasAdd(), parse(text))
    assert not result.changed, fired(result.stats)


def test_explain_says_which_axis_varies():
    reasons = explain(Module.from_proto(parse(NEAR_MISSES["bias-on-the-last-axis"])), FoldBiasAdd())
    assert reasons["conv-add"] == ["Conv: bias [3] varies along spatial axes"]
    assert reasons["gemm-add"] == []


_FUSABLE = st.one_of(
    strategies.models(containing=("Conv", "Add")),
    strategies.models(containing=("ConvTranspose", "Add")),
    strategies.models(containing=("Gemm", "Add")),
)


@given(model=_FUSABLE)
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    rewritten, result = check_pass(FoldBiasAdd(), model)
    count = sum(result.stats.values())
    assert op_types(rewritten.graph).count("Add") == op_types(model.graph).count("Add") - count
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bias_then_batch_norm_folds_completely(group):
    """Paddle's ConvTranspose -> Add(bias) -> BN (PP-OCR det's head) becomes one ConvTranspose."""
    from dsopt.passes.fuse_batch_norm import FuseBatchNorm

    rng = np.random.default_rng(group)
    w = rng.standard_normal((4, 6 // group, 2, 2)).astype(np.float32)
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("ConvTranspose", ["x", "w"], ["t"], strides=[2, 2], group=group),
                helper.make_node("Add", ["t", "c"], ["a"]),
                helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["y"]),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 6, 6])],
            [
                numpy_helper.from_array(w, "w"),
                numpy_helper.from_array(rng.standard_normal((1, 6, 1, 1)).astype("f4"), "c"),
                *(
                    numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype("f4"), n)
                    for n in ("s", "b", "m", "v")
                ),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    folded, result = check_pass(FoldBiasAdd(), model)
    assert fired(result.stats) == {"conv-add": 1}
    fused, _ = check_pass(FuseBatchNorm(), folded)
    assert op_types(fused.graph) == ["ConvTranspose"]
