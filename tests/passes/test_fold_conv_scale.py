from __future__ import annotations

from pathlib import Path

import onnx.parser
import pytest
from hypothesis import given, settings

from dsopt.passes import FoldConvScale
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden" / "fold-conv-scale"
GOLDEN = golden_cases(GOLDEN_DIR)
FIRES = {"scale_first_operand": 1, "scalar_scale_no_bias": 1, "spatial_scale_kept": 0}


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    result = run_golden(FoldConvScale(), case)
    assert result.stats["conv-mul"] == FIRES[case.name.split(".")[0]]


def _model(scale: str, *, extra_output: bool = False, weight_input: bool = False):
    outputs = "float[1, 2, 3, 3] y" + (", float[1, 2, 3, 3] c" if extra_output else "")
    inputs = "float[1, 2, 3, 3] x" + (", float[2, 2, 1, 1] w" if weight_input else "")
    weight = "" if weight_input else "float[2, 2, 1, 1] w = {1.0, 2.0, 3.0, 4.0}, "
    return onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g ({inputs}) => ({outputs}) <{weight}{scale}> {{
          c = Conv (x, w)
          y = Mul (c, s)
        }}"""
    )


@pytest.mark.parametrize(
    "kwargs, scale",
    [
        ({}, "float[1, 2, 3, 3] s = {1.,2.,3.,4.,5.,6.,7.,8.,9.,1.,2.,3.,4.,5.,6.,7.,8.,9.}"),
        ({"extra_output": True}, "float[2, 1, 1] s = {2.0, 3.0}"),
        ({"weight_input": True}, "float[2, 1, 1] s = {2.0, 3.0}"),
    ],
    ids=["per-element", "graph-output", "weight-not-constant"],
)
def test_near_misses_are_left_alone(kwargs, scale):
    model = _model(scale, **kwargs)
    rewritten, result = apply_pass(FoldConvScale(), model)
    assert result.stats["conv-mul"] == 0
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", "Mul"]


def test_per_channel_scale_folds_and_matches():
    rewritten, result = check_pass(FoldConvScale(), _model("float[2, 1, 1] s = {2.0, -3.0}"))
    assert result.stats["conv-mul"] == 1
    assert [n.op_type for n in rewritten.graph.node] == ["Conv"]


@given(model=strategies.models(containing=("Conv", "Mul")))
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    check_pass(FoldConvScale(), model)
