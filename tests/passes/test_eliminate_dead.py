from __future__ import annotations

import pytest
from hypothesis import given, settings

from dsopt.passes import EliminateDead
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/eliminate-dead")


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(EliminateDead(), case)


def test_stats_count_removed_work():
    import onnx.parser

    model = onnx.parser.parse_model(GOLDEN[0].read_text())
    _, result = apply_pass(EliminateDead(), model)
    assert result.stats == {"nodes": 2, "initializers": 1, "functions": 0}


@given(model=strategies.models())
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    rewritten, _ = check_pass(EliminateDead(), model)
    assert [i.name for i in rewritten.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
