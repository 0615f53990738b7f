from __future__ import annotations

import numpy as np
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsopt.ir import Module
from dsopt.passes import FuseBatchNorm
from dsopt.passes.fuse_batch_norm import RULES
from dsopt.rewrite import explain
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/fuse-batch-norm")
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
BN_PARAMS = """float[3] s = {1.0, 2.0, 0.5}, float[3] sh = {0.0, 0.1, -0.2},
   float[3] mu = {0.5, -0.5, 1.0}, float[3] var = {1.0, 4.0, 0.25}"""


def parse(text: str, header: str = HEADER) -> onnx.ModelProto:
    return onnx.parser.parse_model(header + text.replace("BN_PARAMS", BN_PARAMS))


def golden(name: str):
    return next(p for p in GOLDEN if p.name.startswith(name + "."))


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FuseBatchNorm(), case)


@pytest.mark.parametrize(
    ("case", "expected", "after"),
    [
        ("conv_grouped_no_bias", {"conv-bn": 1}, ["Conv"]),
        ("conv_transpose_grouped", {"conv-bn": 1}, ["ConvTranspose"]),
        ("gemm_trans_b_alpha_beta", {"gemm-bn": 1}, ["Gemm"]),
        (
            "matmul_2d_becomes_gemm",
            {"matmul-bn": 1, "skipped-rank": 1},
            ["Gemm", "MatMul", "BatchNormalization"],
        ),
        ("opset8_spatial", {"conv-bn": 1}, ["Conv", "Relu", "BatchNormalization"]),
        ("shared_intermediate_kept", {}, ["Conv", "BatchNormalization", "Relu"]),
    ],
)
def test_golden_stats(case, expected, after):
    model = onnx.parser.parse_model(golden(case).read_text())
    rewritten, result = apply_pass(FuseBatchNorm(), model)
    assert fired(result.stats) == expected
    assert op_types(rewritten.graph) == after
    assert result.changed == any(result.stats[r.name] for r in RULES)


def test_stats_list_every_rule():
    model = parse("g (float[2, 3] x) => (float[2, 3] y) { y = Relu (x) }")
    _, result = apply_pass(FuseBatchNorm(), model)
    assert set(result.stats) == {r.name for r in RULES} | {"skipped-rank"}
    assert not result.changed


def test_conv_with_bias_and_constant_node_params():
    model = parse("""
    g (float[1, 2, 3, 3] x) => (float[1, 3, 3, 3] y)
      <float[3, 2, 1, 1] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}, float[3] b = {0.1, 0.2, 0.3},
       BN_PARAMS> {
      k = Constant <value = float[3] {1.0, 1.0, 2.0}> ()
      t = Conv (x, w, b)
      y = BatchNormalization (t, k, sh, mu, var)
    }""")
    rewritten, result = check_pass(FuseBatchNorm(), model)
    assert fired(result.stats) == {"conv-bn": 1}
    assert op_types(rewritten.graph) == ["Conv"]  # the orphaned Constant node goes too


def test_chain_of_two_is_fused_to_a_fixed_point():
    model = parse("""
    g (float[4, 3] a) => (float[4, 3] y)
      <float[3, 3] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5, 1.0, 0.0, 1.0}, BN_PARAMS> {
      t = Gemm (a, w)
      u = BatchNormalization (t, s, sh, mu, var)
      v = Gemm (u, w)
      y = BatchNormalization (v, s, sh, mu, var)
    }""")
    rewritten, result = check_pass(FuseBatchNorm(), model)
    assert fired(result.stats) == {"gemm-bn": 2}
    assert op_types(rewritten.graph) == ["Gemm", "Gemm"]


def test_fusion_inside_if_branch():
    model = parse("""
    g (float[2, 2] a, bool c) => (float[2, 3] y)
      <float[2, 3] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}, BN_PARAMS> {
      y = If (c) <then_branch = then_g () => (float[2, 3] p) {
        t = MatMul (a, w)
        p = BatchNormalization (t, s, sh, mu, var)
      }, else_branch = else_g () => (float[2, 3] q) {
        q = MatMul (a, w)
      }>
    }""")
    feeds = {"a": np.ones((2, 2), np.float32), "c": np.array(True)}
    rewritten, result = check_pass(FuseBatchNorm(), model, feeds=feeds)
    assert fired(result.stats) == {"matmul-bn": 1}
    then_g = rewritten.graph.node[0].attribute[0].g
    assert op_types(then_g) == ["Gemm"] and then_g.node[0].output[0] == "p"


NEAR_MISSES = {
    "shared-intermediate": """
        g (float[4, 2] a) => (float[4, 3] y, float[4, 3] t)
          <float[2, 3] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}, BN_PARAMS> {
          t = MatMul (a, w)
          y = BatchNormalization (t, s, sh, mu, var)
        }""",
    "non-constant-weight": """
        g (float[1, 2, 3, 3] x, float[3, 2, 1, 1] w) => (float[1, 3, 3, 3] y) <BN_PARAMS> {
          t = Conv (x, w)
          y = BatchNormalization (t, s, sh, mu, var)
        }""",
    "non-constant-bn-mean": """
        g (float[1, 2, 3, 3] x, float[3] m) => (float[1, 3, 3, 3] y)
          <float[3, 2, 1, 1] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}, BN_PARAMS> {
          t = Conv (x, w)
          y = BatchNormalization (t, s, sh, m, var)
        }""",
    "non-constant-conv-bias": """
        g (float[1, 2, 3, 3] x, float[3] b) => (float[1, 3, 3, 3] y)
          <float[3, 2, 1, 1] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}, BN_PARAMS> {
          t = Conv (x, w, b)
          y = BatchNormalization (t, s, sh, mu, var)
        }""",
    "matmul-3d": """
        g (float[2, 3, 2] a) => (float[2, 3, 3] y)
          <float[2, 3] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}, BN_PARAMS> {
          t = MatMul (a, w)
          y = BatchNormalization (t, s, sh, mu, var)
        }""",
    "matmul-weight-on-the-left": """
        g (float[2, 3] a) => (float[3, 3] y)
          <float[3, 2] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}, BN_PARAMS> {
          t = MatMul (w, a)
          y = BatchNormalization (t, s, sh, mu, var)
        }""",
    "bn-not-fed-by-conv": """
        g (float[1, 3, 2, 2] x) => (float[1, 3, 2, 2] y) <BN_PARAMS> {
          t = Relu (x)
          y = BatchNormalization (t, s, sh, mu, var)
        }""",
}


@pytest.mark.parametrize("text", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_are_kept(text):
    _, result = check_pass(FuseBatchNorm(), parse(text))
    assert not result.changed, fired(result.stats)


def test_training_mode_batch_norm_is_kept():
    model = parse(
        """
    g (float[1, 3, 2, 2] x) => (float[1, 3, 2, 2] y)
      <float[3, 3, 1, 1] w = {1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0}, BN_PARAMS> {
      t = Conv (x, w)
      y = BatchNormalization <training_mode = 1> (t, s, sh, mu, var)
    }"""
    )
    _, result = apply_pass(FuseBatchNorm(), model)  # batch statistics: no numeric oracle
    assert not result.changed
    assert explain(Module.from_proto(model), FuseBatchNorm())["conv-bn"] == [
        "Conv: BatchNormalization has training_mode=1"
    ]


def test_three_output_batch_norm_is_kept():
    model = parse(
        """
    g (float[1, 3, 2, 2] x) => (float[1, 3, 2, 2] y)
      <float[3, 3, 1, 1] w = {1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0}, BN_PARAMS> {
      t = Conv (x, w)
      y, m, v = BatchNormalization (t, s, sh, mu, var)
    }""",
        header='<ir_version: 7, opset_import: ["" : 13]>\n',
    )
    _, result = apply_pass(FuseBatchNorm(), model)
    assert not result.changed
    (reason,) = explain(Module.from_proto(model), FuseBatchNorm())["conv-bn"]
    assert "3 outputs (training mode)" in reason


def test_spatial_zero_is_kept():
    model = parse(
        """
    g (float[1, 3, 2, 2] x) => (float[1, 3, 2, 2] y)
      <float[3, 3, 1, 1] w = {1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0}, BN_PARAMS> {
      t = Conv (x, w)
      y = BatchNormalization <spatial = 0> (t, s, sh, mu, var)
    }""",
        header='<ir_version: 4, opset_import: ["" : 8]>\n',
    )
    _, result = apply_pass(FuseBatchNorm(), model)
    assert not result.changed


def test_explain_names_the_shared_intermediate():
    reasons = explain(Module.from_proto(parse(NEAR_MISSES["shared-intermediate"])), FuseBatchNorm())
    assert reasons["matmul-bn"] == ["MatMul: intermediate 't' is a graph output"]
    assert reasons["conv-bn"] == [] and reasons["gemm-bn"] == []


_FUSABLE = st.one_of(
    strategies.models(containing=("Conv", "BatchNormalization")),
    strategies.models(containing=("ConvTranspose", "BatchNormalization")),
    strategies.models(containing=("Gemm", "BatchNormalization")),
    strategies.models(containing=("MatMul", "BatchNormalization")),
)


@given(model=_FUSABLE)
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    rewritten, result = check_pass(FuseBatchNorm(), model)
    count = sum(result.stats[r.name] for r in RULES)
    bn_before = op_types(model.graph).count("BatchNormalization")
    assert op_types(rewritten.graph).count("BatchNormalization") == bn_before - count
    assert len(rewritten.graph.node) <= len(model.graph.node) - count
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
