from __future__ import annotations

import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsopt.ir import Module
from dsopt.passes.fold_pad import RULES, FoldPad
from dsopt.rewrite import explain
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/fold-pad")
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
W = "float[2,2,1,1] w = {1.0, 0.5, -0.5, 2.0}"
PADS = "int64[8] sp = {0, 0, 1, 2, 0, 0, 2, 1}"


def parse(text: str, header: str = HEADER) -> onnx.ModelProto:
    return onnx.parser.parse_model(header + text.replace("WEIGHT", W).replace("PADS", PADS))


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FoldPad(), case)


@pytest.mark.parametrize(
    ("case", "expected", "after"),
    [
        ("pad_conv", {"pad-conv": 1}, ["Conv"]),
        ("pad_avgpool_opset18_axes", {"pad-avgpool": 1}, ["AveragePool"]),
        ("opset10_attribute_pads", {"pad-conv": 1}, ["Conv"]),
        (
            "kept",
            {},
            ["Pad", "Conv"] * 2
            + ["Pad", "AveragePool"] * 2
            + ["Pad", "Conv"]
            + ["Pad", "AveragePool"],
        ),
    ],
)
def test_golden_stats(case, expected, after):
    path = next(p for p in GOLDEN if p.name.startswith(case + "."))
    rewritten, result = apply_pass(FoldPad(), onnx.parser.parse_model(path.read_text()))
    assert fired(result.stats) == expected
    assert op_types(rewritten.graph) == after


def test_stats_names():
    _, result = apply_pass(FoldPad(), parse("g (float[2] x) => (float[2] y) { y = Relu (x) }"))
    assert set(result.stats) == {rule.name for rule in RULES}


@pytest.mark.parametrize(
    ("text", "stat", "pads"),
    [
        (
            """g (float[1,2,4,4] x) => (float[1,2,7,7] y) <WEIGHT, PADS, float zero = {0.0}> {
                 p = Pad (x, sp, zero)
                 y = Conv (p, w)
               }""",
            "pad-conv",
            [1, 2, 2, 1],
        ),
        (
            """g (float[1,2,4,4] x) => (float[1,2,5,5] y) <PADS> {
                 p = Pad (x, sp)
                 y = AveragePool <kernel_shape = [3, 3], count_include_pad = 1> (p)
               }""",
            "pad-avgpool",
            [1, 2, 2, 1],
        ),
        (  # a zero Pad changes nothing, whatever count_include_pad says
            """g (float[1,2,4,4] x) => (float[1,2,3,3] y) <int64[8] z = {0,0,0,0,0,0,0,0}> {
                 p = Pad (x, z)
                 y = AveragePool <kernel_shape = [2, 2]> (p)
               }""",
            "pad-avgpool",
            [0, 0, 0, 0],
        ),
        (
            """g (float[1,2,6] x) => (float[1,2,9] y) <float[2,2,2] w1 = {1.0, 2.0, 3.0, 4.0,
                 5.0, 6.0, 7.0, 8.0}, int64[6] p1 = {0, 0, 3, 0, 0, 0}> {
                 p = Pad (x, p1)
                 y = Conv <pads = [0, 1], dilations = [1]> (p, w1)
               }""",
            "pad-conv",
            [3, 1],
        ),
    ],
    ids=["conv-explicit-zero", "avgpool", "avgpool-zero-pad", "conv-1d-summed"],
)
def test_single_rules(text, stat, pads):
    rewritten, result = check_pass(FoldPad(), parse(text))
    assert fired(result.stats) == {stat: 1}
    (node,) = rewritten.graph.node
    assert list(next(a for a in node.attribute if a.name == "pads").ints) == pads


NEAR_MISSES = {
    "shared-intermediate": """
        g (float[1,2,4,4] x) => (float[1,2,7,7] y, float[1,2,7,7] z) <WEIGHT, PADS> {
          p = Pad (x, sp)
          y = Conv (p, w)
          z = Relu (p)
        }""",
    "intermediate-is-graph-output": """
        g (float[1,2,4,4] x) => (float[1,2,7,7] y, float[1,2,7,7] p) <WEIGHT, PADS> {
          p = Pad (x, sp)
          y = Conv (p, w)
        }""",
    "non-zero-pad-value": """
        g (float[1,2,4,4] x) => (float[1,2,7,7] y) <WEIGHT, PADS, float v = {0.5}> {
          p = Pad (x, sp, v)
          y = Conv (p, w)
        }""",
    "dynamic-pad-value": """
        g (float[1,2,4,4] x, float v) => (float[1,2,7,7] y) <WEIGHT, PADS> {
          p = Pad (x, sp, v)
          y = Conv (p, w)
        }""",
    "reflect-mode": """
        g (float[1,2,4,4] x) => (float[1,2,7,7] y) <WEIGHT, PADS> {
          p = Pad <mode = "reflect"> (x, sp)
          y = Conv (p, w)
        }""",
    "edge-mode": """
        g (float[1,2,4,4] x) => (float[1,2,7,7] y) <WEIGHT, PADS> {
          p = Pad <mode = "edge"> (x, sp)
          y = Conv (p, w)
        }""",
    "channel-dim-padded": """
        g (float[1,2,4,4] x) => (float[1,3,4,4] y) <int64[8] ch = {0, 1, 0, 0, 0, 0, 0, 0}> {
          p = Pad (x, ch)
          y = AveragePool <kernel_shape = [1, 1], count_include_pad = 1> (p)
        }""",
    "batch-dim-padded": """
        g (float[1,2,4,4] x) => (float[2,2,4,4] y) <WEIGHT, int64[8] b = {1, 0, 0, 0, 0, 0, 0, 0}> {
          p = Pad (x, b)
          y = Conv (p, w)
        }""",
    "negative-pads": """
        g (float[1,2,4,4] x) => (float[1,2,3,4] y)
          <WEIGHT, int64[8] n = {0, 0, -1, 0, 0, 0, 0, 0}> {
          p = Pad (x, n)
          y = Conv (p, w)
        }""",
    "auto-pad-same": """
        g (float[1,2,4,4] x) => (float[1,2,7,7] y) <WEIGHT, PADS> {
          p = Pad (x, sp)
          y = Conv <auto_pad = "SAME_UPPER"> (p, w)
        }""",
    "avgpool-excludes-pad": """
        g (float[1,2,4,4] x) => (float[1,2,6,6] y) <PADS> {
          p = Pad (x, sp)
          y = AveragePool <kernel_shape = [2, 2]> (p)
        }""",
    "avgpool-ceil-mode": """
        g (float[1,2,4,4] x) => (float[1,2,4,4] y) <PADS> {
          p = Pad (x, sp)
          y = AveragePool <kernel_shape = [2, 2], strides = [2, 2], count_include_pad = 1,
                           ceil_mode = 1> (p)
        }""",
    "avgpool-pad-not-below-kernel": """
        g (float[1,2,4,4] x) => (float[1,2,6,6] y) <PADS> {
          p = Pad (x, sp)
          y = AveragePool <kernel_shape = [2, 2], count_include_pad = 1> (p)
        }""",
    "maxpool": """
        g (float[1,2,4,4] x) => (float[1,2,6,6] y) <PADS> {
          p = Pad (x, sp)
          y = MaxPool <kernel_shape = [2, 2]> (p)
        }""",
    "pad-feeds-the-weight": """
        g (float[2,2,1,1] x, float[1,2,4,4] a) => (float[1,2,4,4] y)
          <int64[8] z = {0,0,0,0,0,0,0,0}> {
          p = Pad (x, z)
          y = Conv (a, p)
        }""",
}


@pytest.mark.parametrize("text", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_are_kept(text):
    _, result = check_pass(FoldPad(), parse(text))
    assert not result.changed, fired(result.stats)


def test_reasons():
    reasons = explain(Module.from_proto(parse(NEAR_MISSES["non-zero-pad-value"])), FoldPad())
    assert reasons["pad-conv"][0] == "Pad: Pad value is 0.5, not 0"
    reasons = explain(Module.from_proto(parse(NEAR_MISSES["channel-dim-padded"])), FoldPad())
    assert "pad the batch or channel dim" in reasons["pad-avgpool"][0]


_FOLDABLE = st.one_of(
    strategies.models(containing=("Pad", "Conv")),
    strategies.models(containing=("Pad", "AveragePool")),
    strategies.models(containing=("Pad", "Conv", "AveragePool")),
)


@given(model=_FOLDABLE)
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    rewritten, result = check_pass(FoldPad(), model)
    count = sum(result.stats[rule.name] for rule in RULES)
    assert op_types(rewritten.graph).count("Pad") == op_types(model.graph).count("Pad") - count
    for op in ("Conv", "AveragePool"):  # the Pad's constant inputs may go too
        assert op_types(rewritten.graph).count(op) == op_types(model.graph).count(op)
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
