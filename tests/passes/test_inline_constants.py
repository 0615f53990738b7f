from __future__ import annotations

import onnx.parser
import pytest
from hypothesis import given, settings

from dsopt.passes import InlineConstants
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/inline-constants")


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(InlineConstants(), case)


def test_all_constant_nodes_become_initializers():
    model = onnx.parser.parse_model(
        next(p for p in GOLDEN if p.name.startswith("constant_nodes")).read_text()
    )
    rewritten, result = apply_pass(InlineConstants(), model)
    assert result.stats == {"inlined": 2}
    assert [n.op_type for n in rewritten.graph.node] == ["Add", "Mul"]
    assert sorted(t.name for t in rewritten.graph.initializer) == ["c", "s"]


@given(model=strategies.models(containing=("Constant",)))
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    rewritten, _ = check_pass(InlineConstants(), model)
    outputs = {o.name for o in rewritten.graph.output}
    assert all(n.op_type != "Constant" or n.output[0] in outputs for n in rewritten.graph.node)
