from __future__ import annotations

import numpy as np
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsopt.ir import Module
from dsopt.passes.merge_layout_chains import RULES, MergeLayoutChains
from dsopt.rewrite import explain
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/merge-layout-chains")
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


def parse(text: str, header: str = HEADER) -> onnx.ModelProto:
    return onnx.parser.parse_model(header + text)


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(MergeLayoutChains(), case)


@pytest.mark.parametrize(
    ("case", "expected", "after"),
    [
        ("transpose_pair", {"transpose-transpose": 2}, ["Transpose", "Identity"]),
        ("reshape_chain", {"reshape-reshape": 2, "reshape-flatten": 1}, ["Reshape"]),
        (
            "squeeze_unsqueeze",
            {"squeeze-unsqueeze": 1, "unsqueeze-squeeze": 1},
            ["Identity", "Identity", "Squeeze"],
        ),
        (
            "opset11_axes_attribute",
            {"unsqueeze-squeeze": 1, "reshape-reshape": 1},
            ["Identity", "Squeeze", "Constant", "Reshape"],
        ),
        ("kept", {}, ["Transpose", "Transpose", "Transpose", "Relu", "Transpose", "Add"]),
    ],
)
def test_golden_stats(case, expected, after):
    path = next(p for p in GOLDEN if p.name.startswith(case + "."))
    rewritten, result = apply_pass(MergeLayoutChains(), onnx.parser.parse_model(path.read_text()))
    assert fired(result.stats) == expected
    assert op_types(rewritten.graph) == after


def test_stats_names():
    _, result = apply_pass(
        MergeLayoutChains(), parse("g (float[2] x) => (float[2] y) { y = Relu (x) }")
    )
    assert set(result.stats) == {rule.name for rule in RULES}


@pytest.mark.parametrize(
    ("text", "stat", "after"),
    [
        (
            """g (float[2,3,4] x) => (float[24] y) <int64[1] s = {-1}> {
                 a = Squeeze (x)
                 y = Reshape (a, s)
               }""",
            "squeeze-reshape",
            ["Reshape"],
        ),
        (
            """g (float[2,3] x) => (float[3,2] y) <int64[1] ax = {0}, int64[2] s = {3, 0}> {
                 a = Unsqueeze (x, ax)
                 y = Reshape (a, s)
               }""",
            "unsqueeze-reshape",
            ["Reshape"],
        ),
        (
            """g (float[N,3,4] x) => (float[N,12] y) <int64[2] s = {-1, 12}> {
                 a = Flatten <axis = 2> (x)
                 y = Reshape (a, s)
               }""",
            "flatten-reshape",
            ["Reshape"],
        ),
        (
            """g (float[2,3,4] x) => (float[1,6,4] y) <int64[2] s = {6, 4}, int64[1] ax = {0}> {
                 a = Reshape (x, s)
                 y = Unsqueeze (a, ax)
               }""",
            "reshape-unsqueeze",
            ["Reshape"],
        ),
        (
            """g (float[2,3,4] x) => (float[6,4] y) <int64[3] s = {6, 1, 4}, int64[1] ax = {1}> {
                 a = Reshape (x, s)
                 y = Squeeze (a, ax)
               }""",
            "reshape-squeeze",
            ["Reshape"],
        ),
        (
            """g (float[N,3,4] x) => (float[N,3,4] y) {
                 a = Transpose (x)
                 y = Transpose (a)
               }""",
            "transpose-transpose",
            ["Identity"],
        ),
    ],
    ids=[
        "squeeze-all",
        "unsqueeze-copy-dim",
        "flatten",
        "reshape-unsqueeze",
        "reshape-squeeze",
        "default-perms",
    ],
)
def test_single_rules(text, stat, after):
    rewritten, result = check_pass(MergeLayoutChains(), parse(text))
    assert fired(result.stats) == {stat: 1}
    assert op_types(rewritten.graph) == after


def test_allowzero_target_is_kept_verbatim():
    text = """g (float[2,0,3] x) => (float[0,6] y) <int64[2] s = {0, 6}, int64[3] s1 = {6, 0, 1}> {
                a = Reshape <allowzero = 1> (x, s1)
                y = Reshape <allowzero = 1> (a, s)
              }"""
    rewritten, result = check_pass(MergeLayoutChains(), parse(text))
    assert fired(result.stats) == {"reshape-reshape": 1}
    (node,) = rewritten.graph.node
    assert node.attribute[0].name == "allowzero" and node.attribute[0].i == 1


NEAR_MISSES = {
    "shared-intermediate": """
        g (float[2,3,4] x) => (float[4,3,2] y, float[3,4,2] z) {
          t = Transpose <perm = [1, 2, 0]> (x)
          y = Transpose <perm = [1, 0, 2]> (t)
          z = Relu (t)
        }""",
    "intermediate-is-graph-output": """
        g (float[2,3,4] x) => (float[2,3,4] y, float[4,3,2] t) {
          t = Transpose (x)
          y = Transpose (t)
        }""",
    "dynamic-second-shape": """
        g (float[2,3,4] x, int64[2] s) => (float[A,B] y) <int64[2] s1 = {6, 4}> {
          a = Reshape (x, s1)
          y = Reshape (a, s)
        }""",
    "copy-dim-of-dynamic-intermediate": """
        g (float[2,3,4] x, int64[2] s) => (float[A,12] y) <int64[2] s2 = {0, 12}> {
          a = Reshape (x, s)
          y = Reshape (a, s2)
        }""",
    "unsqueeze-squeeze-other-axes": """
        g (float[2,1,3] x) => (float[1,2,3] y) <int64[1] a0 = {0}, int64[1] a2 = {2}> {
          a = Unsqueeze (x, a0)
          y = Squeeze (a, a2)
        }""",
    "squeeze-without-axes-then-unsqueeze": """
        g (float[2,1,3] x) => (float[2,1,3] y) <int64[1] a1 = {1}> {
          a = Squeeze (x)
          y = Unsqueeze (a, a1)
        }""",
    "reshape-squeeze-dynamic-output": """
        g (float[N,3,4] x) => (float[N,12] y) <int64[3] s = {0, 1, 12}, int64[1] ax = {1}> {
          a = Reshape (x, s)
          y = Squeeze (a, ax)
        }""",
}


@pytest.mark.parametrize("text", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_are_kept(text):
    feeds = None
    if "int64[2] s)" in text:  # the Reshape target is an input: feed a valid one
        feeds = {"x": np.ones((2, 3, 4), np.float32), "s": np.array([2, 12], np.int64)}
    _, result = check_pass(MergeLayoutChains(), parse(text), feeds=feeds)
    assert not result.changed, fired(result.stats)


def test_reasons():
    reasons = explain(
        Module.from_proto(parse(NEAR_MISSES["dynamic-second-shape"])), MergeLayoutChains()
    )
    assert reasons["reshape-reshape"][0] == "Reshape: the Reshape shape is not constant"
    reasons = explain(
        Module.from_proto(parse(NEAR_MISSES["unsqueeze-squeeze-other-axes"])), MergeLayoutChains()
    )
    assert reasons["unsqueeze-squeeze"][0] == "Unsqueeze: axes [0] and [2] differ"


_CHAINS = st.one_of(
    strategies.models(containing=("Transpose", "Transpose")),
    strategies.models(containing=("Reshape", "Reshape")),
    strategies.models(containing=("Squeeze", "Reshape")),
    strategies.models(containing=("Unsqueeze", "Squeeze")),
    strategies.models(containing=("Reshape", "Flatten")),
    strategies.models(containing=("Flatten", "Reshape", "Unsqueeze")),
    strategies.models(containing=("Transpose", "Reshape")),
)


@given(model=_CHAINS)
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    rewritten, result = check_pass(MergeLayoutChains(), model)
    count = sum(result.stats[rule.name] for rule in RULES)
    before = sum(op_types(model.graph).count(op) for op in LAYOUT_OPS)
    after = sum(op_types(rewritten.graph).count(op) for op in LAYOUT_OPS)
    identities = op_types(rewritten.graph).count("Identity") - op_types(model.graph).count(
        "Identity"
    )
    assert after + identities == before - count
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
