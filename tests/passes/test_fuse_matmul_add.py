from __future__ import annotations

import numpy as np
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsopt.ir import Module
from dsopt.passes import FuseMatmulAdd
from dsopt.rewrite import explain
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/fuse-matmul-add")
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
W = "float[2, 3] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5}"


def parse(text: str, header: str = HEADER) -> onnx.ModelProto:
    return onnx.parser.parse_model(header + text.replace("WEIGHT", W))


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FuseMatmulAdd(), case)


@pytest.mark.parametrize(
    ("case", "expected", "after"),
    [
        ("row_bias", {"matmul-add": 1}, ["Gemm"]),
        ("bias_first_full_matrix", {"matmul-add": 1}, ["Gemm"]),
        ("constant_node_bias", {"matmul-add": 1}, ["Constant", "Gemm"]),
        ("rank3_kept", {"matmul-add": 1, "skipped-rank": 1}, ["MatMul", "Add", "Gemm"]),
    ],
)
def test_golden_stats(case, expected, after):
    path = next(p for p in GOLDEN if p.name.startswith(case + "."))
    rewritten, result = apply_pass(FuseMatmulAdd(), onnx.parser.parse_model(path.read_text()))
    assert fired(result.stats) == expected
    assert op_types(rewritten.graph) == after


def test_stats_names():
    _, result = apply_pass(
        FuseMatmulAdd(), parse("g (float[2] x) => (float[2] y) { y = Relu (x) }")
    )
    assert set(result.stats) == {"matmul-add", "skipped-rank"}


NEAR_MISSES = {
    "rank-3": """
        g (float[2, 4, 2] a) => (float[2, 4, 3] y) <WEIGHT, float[3] b = {1.0, 2.0, 3.0}> {
          t = MatMul (a, w)
          y = Add (t, b)
        }""",
    "unknown-rank": """
        g (float[2, 4, 2] a, int64[K] s) => (float[M, 3] y)
          <WEIGHT, float[3] b = {1.0, 2.0, 3.0}> {
          r = Reshape (a, s)
          t = MatMul (r, w)
          y = Add (t, b)
        }""",
    "non-constant-weight": """
        g (float[4, 2] a, float[2, 3] w) => (float[4, 3] y) <float[3] b = {1.0, 2.0, 3.0}> {
          t = MatMul (a, w)
          y = Add (t, b)
        }""",
    "non-constant-bias": """
        g (float[4, 2] a, float[3] b) => (float[4, 3] y) <WEIGHT> {
          t = MatMul (a, w)
          y = Add (t, b)
        }""",
    "bias-grows-the-product": """
        g (float[1, 2] a) => (float[4, 3] y) <WEIGHT, float[4, 3] b = {
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0, 2.0, 3.0}> {
          t = MatMul (a, w)
          y = Add (t, b)
        }""",
    "bias-grows-rank": """
        g (float[4, 2] a) => (float[1, 4, 3] y) <WEIGHT, float[1, 1, 3] b = {1.0, 2.0, 3.0}> {
          t = MatMul (a, w)
          y = Add (t, b)
        }""",
    "shared-intermediate": """
        g (float[4, 2] a) => (float[4, 3] y, float[4, 3] z)
          <WEIGHT, float[3] b = {1.0, 2.0, 3.0}> {
          t = MatMul (a, w)
          y = Add (t, b)
          z = Relu (t)
        }""",
    "intermediate-is-graph-output": """
        g (float[4, 2] a) => (float[4, 3] y, float[4, 3] t) <WEIGHT, float[3] b = {1.0, 2.0, 3.0}> {
          t = MatMul (a, w)
          y = Add (t, b)
        }""",
}


@pytest.mark.parametrize("text", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_are_kept(text):
    feeds = None
    if "int64[K] s" in text:  # the Reshape target is an input: feed a valid one
        feeds = {"a": np.ones((2, 4, 2), np.float32), "s": np.array([8, 2], np.int64)}
    _, result = check_pass(FuseMatmulAdd(), parse(text), feeds=feeds)
    assert not result.changed, fired(result.stats)


def test_rank_skips_are_counted_once_per_matmul():
    _, result = apply_pass(FuseMatmulAdd(), parse(NEAR_MISSES["rank-3"]))
    assert fired(result.stats) == {"skipped-rank": 1}
    _, result = apply_pass(FuseMatmulAdd(), parse(NEAR_MISSES["unknown-rank"]))
    assert fired(result.stats) == {"skipped-rank": 1}
    reasons = explain(Module.from_proto(parse(NEAR_MISSES["rank-3"])), FuseMatmulAdd())
    assert reasons == {"matmul-add": ["MatMul: MatMul input rank is 3, Gemm needs 2"]}


# a Gemm result is 2-D, so Gemm -> MatMul -> Add reaches the rule far more often
_FUSABLE = st.one_of(
    strategies.models(containing=("MatMul", "Add")),
    strategies.models(containing=("Gemm", "MatMul", "Add")),
)


@given(model=_FUSABLE)
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    rewritten, result = check_pass(FuseMatmulAdd(), model)
    count = result.stats["matmul-add"]
    assert op_types(rewritten.graph).count("Gemm") == op_types(model.graph).count("Gemm") + count
    assert (
        op_types(rewritten.graph).count("MatMul") == op_types(model.graph).count("MatMul") - count
    )
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
