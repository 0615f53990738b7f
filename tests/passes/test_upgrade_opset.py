from __future__ import annotations

import onnx
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsopt.pass_infra import PassContext
from dsopt.passes.upgrade_opset import UpgradeOpset
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/upgrade-opset")
ORT_LIKE = 21


def opset_of(model: onnx.ModelProto) -> int:
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(UpgradeOpset(), case, PassContext(max_opset=ORT_LIKE))


@pytest.mark.parametrize(
    ("case", "opset"),
    [("gelu_spelling_opset13", 20), ("hard_swish_spelling_opset12", 14)],
)
def test_upgrades_to_the_lowest_opset_the_fusion_needs(case, opset):
    path = next(p for p in GOLDEN if p.name.startswith(case + "."))
    rewritten, result = apply_pass(
        UpgradeOpset(), onnx.parser.parse_model(path.read_text()), PassContext(max_opset=21)
    )
    assert result.changed and opset_of(rewritten) == opset == result.stats["to"]


def test_nothing_to_fuse_keeps_the_opset():
    path = next(p for p in GOLDEN if p.name.startswith("nothing_to_fuse"))
    model = onnx.parser.parse_model(path.read_text())
    rewritten, result = apply_pass(UpgradeOpset(), model, PassContext(max_opset=ORT_LIKE))
    assert not result.changed and opset_of(rewritten) == 13


def test_without_a_target_opset_nothing_changes():
    path = next(p for p in GOLDEN if p.name.startswith("gelu_spelling"))
    _, result = apply_pass(UpgradeOpset(), onnx.parser.parse_model(path.read_text()))
    assert not result.changed


def test_target_opset_below_what_the_fusion_needs_does_not_upgrade():
    path = next(p for p in GOLDEN if p.name.startswith("gelu_spelling"))
    model = onnx.parser.parse_model(path.read_text())
    _, result = apply_pass(UpgradeOpset(), model, PassContext(max_opset=19))
    assert not result.changed


def test_explicit_to_upgrades_unconditionally():
    path = next(p for p in GOLDEN if p.name.startswith("nothing_to_fuse"))
    model = onnx.parser.parse_model(path.read_text())
    rewritten, result = check_pass(UpgradeOpset(to=18), model)
    assert result.changed and opset_of(rewritten) == 18
    # ReduceMean's axes moved from an attribute to an input at opset 18
    (reduce,) = [n for n in rewritten.graph.node if n.op_type == "ReduceMean"]
    assert len(reduce.input) == 2 and not any(a.name == "axes" for a in reduce.attribute)


@given(model=strategies.models(opset=13), to=st.integers(14, 21))
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property_conversion_keeps_outputs(model, to):
    rewritten, result = check_pass(UpgradeOpset(to=to), model)
    if result.changed:
        assert opset_of(rewritten) == to
    else:
        assert result.stats.get("skipped-converter") == 1
