from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsopt.pass_infra import PassContext
from dsopt.passes.fuse_attention import FuseAttention
from dsopt.targets.onnxruntime import CONTRIB_OPS
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types
from dsopt.testing.golden import golden_cases, run_golden
from tests.core.attention_models import MASKS, NEAR_MISSES, SPELLINGS, Spec, build, feeds

GOLDEN_DIR = __file__.rsplit("/tests/", 1)[0] + "/tests/golden/fuse-attention"
GOLDEN = golden_cases(GOLDEN_DIR)
ORT = PassContext(fused_ops=CONTRIB_OPS)

#: The specs the golden inputs were printed from (`onnx.printer.to_text(build(spec))`);
#: `mha_*` and `kept_*` cases run with onnxruntime's contrib ops, `onnx_*` at opset 23.
GOLDEN_SPECS = {
    "mha_bert_legacy_additive": Spec(mask="additive"),
    "mha_sdpa_boolean_guard": Spec(spelling="sqrt-split", mask="boolean"),
    "mha_gpt2_fused_qkv_causal": Spec(spelling="div", mask="causal-bool", fused_qkv=True),
    "mha_dynamo_kt_reshape": Spec(spelling="dynamo-sdpa", mask="causal-where-add"),
    "onnx_bsd_additive": Spec(mask="additive", opset=23),
    "onnx_bnsh_kt_causal_trilu": Spec(spelling="bnsh-kt", mask="causal-trilu", opset=23),
    "kept_shared_scores": Spec(mask="additive", near_miss="extra-reader"),
}


def _ctx(name: str) -> PassContext | None:
    return dataclasses.replace(ORT) if name.startswith("mha") or name.startswith("kept") else None


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    name = case.name.split(".")[0]
    result = run_golden(FuseAttention(), case, ctx=_ctx(name))
    assert result.changed == (not name.startswith("kept")), fired(result.stats)


def _run(spec: Spec, ctx: PassContext | None):
    model = build(spec)
    return check_pass(FuseAttention(), model, feeds=feeds(model), ctx=ctx)


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("mask", MASKS)
def test_every_spelling_and_mask_fuses(spelling, mask):
    if not spelling.startswith("bnsh"):
        rewritten, result = _run(Spec(spelling=spelling, mask=mask), dataclasses.replace(ORT))
        assert fired(result.stats) == {"multi-head-attention": 1}
        assert "MultiHeadAttention" in op_types(rewritten.graph)
        assert "Softmax" not in op_types(rewritten.graph)
    rewritten, result = _run(Spec(spelling=spelling, mask=mask, opset=23), None)
    assert fired(result.stats) == {"attention-onnx": 1}
    assert "Softmax" not in op_types(rewritten.graph)


def test_fused_qkv_split_and_dropout():
    spec = Spec(fused_qkv=True, dropout=True, mask="boolean-inverted")
    rewritten, result = _run(spec, dataclasses.replace(ORT))
    assert fired(result.stats) == {"multi-head-attention": 1}
    assert op_types(rewritten.graph) == ["MatMul", "Split", "Where", "Expand", "MultiHeadAttention"]


def test_causal_flags():
    rewritten, _ = _run(Spec(mask="causal-const"), dataclasses.replace(ORT))
    (node,) = [n for n in rewritten.graph.node if n.op_type == "MultiHeadAttention"]
    assert {a.name: a for a in node.attribute}["unidirectional"].i == 1
    assert len(node.input) == 3  # no attention_bias: the causal pattern is the flag
    rewritten, _ = _run(Spec(mask="causal-trilu", opset=23), None)
    (node,) = [n for n in rewritten.graph.node if n.op_type == "Attention"]
    assert {a.name: a.i for a in node.attribute if a.type == a.INT}["is_causal"] == 1
    assert len(node.input) == 3


@pytest.mark.parametrize("near_miss", [m for m in NEAR_MISSES if m])
def test_near_misses_are_kept(near_miss):
    mask = "additive" if near_miss == "mask-shape" else None
    for opset, ctx in ((17, ORT), (23, None)):
        spec = Spec(mask=mask, near_miss=near_miss, opset=opset)
        _, result = _run(spec, dataclasses.replace(ctx) if ctx else None)
        assert not result.changed, fired(result.stats)


def test_needs_opset_23_or_the_target():
    _, result = _run(Spec(mask="additive"), None)
    assert not result.changed
    assert fired(result.stats) == {"skipped-no-target": 1}
    _, result = _run(Spec(mask="additive", opset=22), PassContext(fused_ops=frozenset()))
    assert not result.changed


def test_mha_skips_4d_layouts():
    _, result = _run(Spec(spelling="bnsh"), dataclasses.replace(ORT))
    assert fired(result.stats) == {"skipped-layout": 1}


def test_already_fused_nodes_are_counted_not_rewritten():
    rewritten, _ = apply_pass(
        FuseAttention(), build(Spec(mask="additive")), dataclasses.replace(ORT)
    )
    _, result = apply_pass(FuseAttention(), rewritten, dataclasses.replace(ORT))
    assert fired(result.stats) == {"fused-sites": 1}


@st.composite
def _specs(draw):
    spelling = draw(st.sampled_from(SPELLINGS))
    near_miss = draw(st.sampled_from(NEAR_MISSES))
    mask = draw(st.sampled_from(MASKS))
    if near_miss == "mask-shape" and mask not in ("additive", "boolean", "boolean-inverted"):
        mask = "additive"
    return Spec(
        batch=draw(st.integers(1, 3)),
        seq=draw(st.integers(1, 6)),
        heads=draw(st.integers(1, 3)),
        size=draw(st.integers(1, 5)),
        spelling=spelling,
        mask=mask,
        fused_qkv=not spelling.startswith("bnsh") and draw(st.booleans()),
        near_miss=near_miss,
        opset=draw(st.sampled_from((17, 23))),
        dropout=draw(st.booleans()),
    )


@given(spec=_specs(), seed=st.integers(0, 3))
@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True)
def test_property(spec, seed):
    model = build(spec, seed)
    ctx = dataclasses.replace(ORT) if spec.opset < 23 else None
    _, result = check_pass(FuseAttention(), model, feeds=feeds(model, seed), ctx=ctx)
    if spec.near_miss is not None:
        expected = {}
    elif spec.opset >= 23:
        expected = {"attention-onnx": 1}
    elif spec.spelling.startswith("bnsh"):
        expected = {}
    else:
        expected = {"multi-head-attention": 1}
    got = {k: v for k, v in fired(result.stats).items() if not k.startswith("skipped")}
    assert got == expected, (spec, result.stats)
