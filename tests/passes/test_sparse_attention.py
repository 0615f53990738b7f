from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from dsopt.errors import UsageError
from dsopt.pass_infra import PassContext
from dsopt.passes.eliminate_dead import EliminateDead
from dsopt.passes.sparse_attention import SparseAttention
from dsopt.testing import apply_pass, check_pass, fired
from dsopt.testing.golden import golden_cases, run_golden
from tests.core.attention_models import Spec, build, feeds

GOLDEN_DIR = __file__.rsplit("/tests/", 1)[0] + "/tests/golden/sparse-attention"
GOLDEN = golden_cases(GOLDEN_DIR)
#: The passes each golden case runs (inputs printed from `build(spec)`, see GOLDEN_SPECS).
GOLDEN_PASSES = {
    "bert_additive_mask": SparseAttention(window=8, global_tokens=1, block=4),
    "gpt2_causal": SparseAttention(window=4, global_tokens=1, block=4),
}
GOLDEN_SPECS = {
    "bert_additive_mask": Spec(seq=4, mask="additive", batch=1, heads=1, size=2),
    "gpt2_causal": Spec(seq=4, mask="causal-bool", batch=1, heads=1, size=2, spelling="div"),
}


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    result = run_golden(GOLDEN_PASSES[case.name.split(".")[0]], case)
    assert result.stats["sites-rewritten"] == 1


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _pattern(s, w, g, causal):
    """The documented pattern, written independently of the pass."""
    allowed = np.zeros((s, s), bool)
    for i in range(s):
        for j in range(s):
            local = (i - w < j <= i) if causal else abs(i - j) <= w // 2
            ok = local or j < g or i < g
            allowed[i, j] = ok and (j <= i or not causal)
    return allowed


def _reference(x, weights, n, h, w, g, causal, mask=None):
    """numpy local-global attention of the `_dynamic` model."""
    q, k, v = (np.einsum("bsd,de->bse", x, wt) for wt in weights)
    b, s, _ = x.shape
    q, k, v = (t.reshape(b, s, n, h).transpose(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(h)
    if mask is not None:
        scores = scores + mask[:, None, None, :]
    scores = np.where(_pattern(s, w, g, causal), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, s, n * h)


def _dynamic(n=2, h=4, causal=False, mask=False, seed=0):
    """x (B, S, D) with symbolic B and S, torch-like head split/merge, optional mask."""
    rng = np.random.default_rng(seed)
    d = n * h
    weights = [rng.standard_normal((d, d)).astype(np.float32) / math.sqrt(d) for _ in range(3)]
    inits = [numpy_helper.from_array(wt, f"w{i}") for i, wt in enumerate(weights)]
    inits += [
        numpy_helper.from_array(np.array([0, 0, n, h], np.int64), "split"),
        numpy_helper.from_array(np.array([0, 0, d], np.int64), "merge"),
        numpy_helper.from_array(np.array(1 / math.sqrt(h), np.float32), "scale"),
    ]
    nodes = []
    for name, wt in zip("qkv", ("w0", "w1", "w2"), strict=True):
        nodes += [
            helper.make_node("MatMul", ["x", wt], [f"{name}3"]),
            helper.make_node("Reshape", [f"{name}3", "split"], [f"{name}r"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["qr"], ["q4"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["vr"], ["v4"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q4", "kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["scores"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d])]
    last = "scores"
    if mask == "expanded":  # transformers' dynamic export: ones(1,1,S,1) & mask, expanded
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", 1, 1, "S"]))
        nodes += [
            helper.make_node("Shape", ["x"], ["xs"]),
            helper.make_node("Slice", ["xs", "i1", "i2"], ["s1"]),
            helper.make_node("Concat", ["i11", "s1", "i1"], ["ones_shape"], axis=0),
            helper.make_node(
                "ConstantOfShape",
                ["ones_shape"],
                ["ones"],
                value=numpy_helper.from_array(np.array([1], np.bool_)),
            ),
            helper.make_node("And", ["ones", "mask"], ["both"]),
            helper.make_node("Slice", ["xs", "i0", "i1"], ["b1"]),
            helper.make_node("Concat", ["b1", "i1", "s1", "s1"], ["wide_shape"], axis=0),
            helper.make_node("Expand", ["both", "wide_shape"], ["wide"]),
            helper.make_node("Where", ["wide", "zero", "low"], ["bias"]),
            helper.make_node("Add", [last, "bias"], ["masked"]),
        ]
        inits += [
            numpy_helper.from_array(np.array(v, np.int64), n)
            for n, v in (("i0", [0]), ("i1", [1]), ("i2", [2]), ("i11", [1, 1]))
        ]
        inits += [
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(-10000.0, np.float32), "low"),
        ]
        last = "masked"
    elif mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 1, "S"]))
        nodes.append(helper.make_node("Add", [last, "mask"], ["masked"]))
        last = "masked"
    if causal:
        nodes += [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["len"], axis=0),
            helper.make_node("Concat", ["len", "len"], ["sq"], axis=0),
            helper.make_node(
                "ConstantOfShape",
                ["sq"],
                ["ones"],
                value=numpy_helper.from_array(np.array([1], np.bool_)),
            ),
            helper.make_node("Trilu", ["ones"], ["tri"], upper=0),
            helper.make_node("Where", ["tri", last, "neg"], ["causal"]),
        ]
        inits += [
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array(-np.inf, np.float32), "neg"),
        ]
        last = "causal"
    nodes += [
        helper.make_node("Softmax", [last], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v4"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o", "merge"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "dyn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model), weights


def _key_mask(rng, b, s):
    keep = rng.random((b, s)) < 0.7
    keep[:, 0] = True
    return np.where(keep, 0.0, -10000.0).astype(np.float32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_sparse_matches_numpy_reference_at_two_lengths(causal, mask):
    model, weights = _dynamic(causal=causal, mask=mask)
    sparse = SparseAttention(window=4, global_tokens=2, block=4)
    rewritten, result = apply_pass(sparse, model)
    assert fired(result.stats) == {"sites-rewritten": 1}
    rng = np.random.default_rng(1)
    for s in (11, 16):  # one length padded to the block, one not
        x = rng.standard_normal((2, s, 8)).astype(np.float32)
        feed = {"x": x}
        m = None
        if mask:
            m = feed["mask"] = _key_mask(rng, 2, s)
            feed["mask"] = m[:, None, None, :]
        got = _run(rewritten, feed)
        want = _reference(x, weights, 2, 4, 4, 2, causal, m)
        np.testing.assert_allclose(got, want, atol=2e-5)
        assert np.abs(_run(model, feed) - want).max() > 1e-3  # the pattern really is sparse


def test_causal_option():
    model, weights = _dynamic()
    rewritten, _ = apply_pass(SparseAttention(window=4, global_tokens=1, causal="true"), model)
    x = np.random.default_rng(2).standard_normal((1, 9, 8)).astype(np.float32)
    want = _reference(x, weights, 2, 4, 4, 1, True)
    np.testing.assert_allclose(_run(rewritten, {"x": x}), want, atol=2e-5)
    causal_model, _ = _dynamic(causal=True)
    _, result = apply_pass(SparseAttention(causal="false"), causal_model)
    assert fired(result.stats) == {"skipped-causal": 1}


def test_boolean_padding_mask_and_guard():
    spec = Spec(seq=9, mask="boolean", spelling="sqrt-split", heads=2, size=3)
    model = build(spec)
    check_pass(SparseAttention(window=32, global_tokens=2, block=16), model, feeds=feeds(model))


def test_calibration_reports_dropped_mass():
    model = build(Spec(seq=12, mask="additive"))
    data = [feeds(model, seed) for seed in range(3)]
    _, covered = apply_pass(SparseAttention(window=32), model, PassContext(calibration=data))
    assert covered.stats["dropped-mass"] == pytest.approx(0.0, abs=1e-9)
    _, narrow = apply_pass(
        SparseAttention(window=2, global_tokens=1, samples=2), model, PassContext(calibration=data)
    )
    assert 0.05 < narrow.stats["dropped-mass"] < 1.0
    assert narrow.stats["calibration-samples"] == 2


def test_cross_attention_and_rewritten_sites_are_kept():
    model = build(Spec(seq=6))
    rewritten, _ = apply_pass(SparseAttention(window=16), model)
    _, again = apply_pass(SparseAttention(window=16), rewritten)
    assert not again.changed  # the rank-5 blocks are not attention sites any more


@pytest.mark.parametrize(
    "options",
    [
        {"window": 0},
        {"global_tokens": -1},
        {"dilation": 0},
        {"causal": "maybe"},
        {"block": 2, "window": 8},
        {"samples": -1},
    ],
)
def test_option_validation(options):
    with pytest.raises(UsageError, match="sparse-attention"):
        apply_pass(SparseAttention(**options), build(Spec()))


@st.composite
def _covering(draw):
    spelling = draw(st.sampled_from(("legacy", "div", "sqrt-split", "bnsh", "bnsh-kt")))
    masks = (None, "additive", "boolean", "expanded", "causal-const", "causal-trilu")
    mask = draw(st.sampled_from(masks))
    if spelling.startswith("bnsh") and mask in ("additive", "boolean", "expanded"):
        mask = None
    spec = Spec(
        batch=draw(st.integers(1, 2)),
        seq=draw(st.integers(1, 9)),
        heads=draw(st.integers(1, 3)),
        size=draw(st.integers(1, 5)),
        spelling=spelling,
        mask=mask,
    )
    window = 2 * spec.seq + draw(st.integers(0, 3))
    block = draw(st.sampled_from((0, window, window // 2 + 1)))
    g = draw(st.integers(0, 3))
    return spec, SparseAttention(window=window, global_tokens=g, block=block)


@given(case=_covering(), seed=st.integers(0, 3))
@settings(max_examples=25, deadline=None, derandomize=True)
def test_property_covering_window_equals_dense(case, seed):
    spec, sparse = case
    model = build(spec, seed)
    _, result = check_pass(sparse, model, feeds=feeds(model, seed))
    assert result.stats["sites-rewritten"] == 1


@pytest.mark.parametrize("causal", [False, True])
def test_per_query_mask_matches_reference(causal):
    """A (B, 1, S, S) mask (transformers' expanded padding mask) is gathered blockwise."""
    spec = Spec(seq=10, heads=2, size=4)
    model = build(spec)
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [2, 1, 10, 10]))
    add = next(n for n in graph.node if n.op_type == "Softmax")
    add.input[0], old = "masked", add.input[0]
    graph.node.insert(
        list(graph.node).index(add), helper.make_node("Add", [old, "mask"], ["masked"])
    )
    model = onnx.shape_inference.infer_shapes(model)
    rng = np.random.default_rng(3)
    feed = feeds(model)
    keep = rng.random((2, 1, 10, 10)) < 0.7
    keep[..., 0] = True
    feed["mask"] = np.where(keep, 0.0, -10000.0).astype(np.float32)
    sparse = SparseAttention(window=4, global_tokens=2, block=4, causal=str(causal).lower())
    rewritten, result = apply_pass(sparse, model)
    assert result.stats["sites-rewritten"] == 1
    dense_probe = SparseAttention(window=64, global_tokens=2, block=32)
    covered, _ = apply_pass(dense_probe, model)
    np.testing.assert_allclose(_run(covered, feed), _run(model, feed), atol=2e-5)
    # reference: the dense model with the pattern folded into the mask
    pattern = _pattern(10, 4, 2, causal)
    feed_ref = dict(feed, mask=np.where(pattern, feed["mask"], -np.inf).astype(np.float32))
    np.testing.assert_allclose(_run(rewritten, feed), _run(model, feed_ref), atol=2e-5)


def test_expanded_padding_mask_is_recomputed_per_key():
    """transformers' (B, 1, S, S) broadcast of a key padding mask becomes (B, 1, 1, L)."""
    model = build(Spec(seq=10, mask="expanded", heads=2, size=4))
    feed = feeds(model)
    sparse = SparseAttention(window=4, global_tokens=2, block=4)
    rewritten, result = apply_pass(sparse, model)
    assert fired(result.stats) == {"sites-rewritten": 1, "masks-per-key": 1}
    assert not any(n.op_type == "GatherElements" for n in rewritten.graph.node)
    wide = next(n.output[0] for n in model.graph.node if n.op_type == "Expand")
    pruned, _ = apply_pass(EliminateDead(), rewritten)
    assert wide not in {o for n in pruned.graph.node for o in n.output}  # (B, 1, S, S) is gone
    # reference: the dense model with the pattern folded into its key mask
    keep = feed["mask"] & _pattern(10, 4, 2, False)[None, None]
    masked = onnx.load_from_string(model.SerializeToString())
    expand = next(n for n in masked.graph.node if n.op_type == "Expand")
    expand.input[0] = "full"
    masked.graph.input.append(helper.make_tensor_value_info("full", TensorProto.BOOL, None))
    want = _run(masked, dict(feed, full=keep))
    np.testing.assert_allclose(_run(rewritten, feed), want, atol=2e-5)


def test_mask_with_differing_rows_is_not_reduced():
    """A causal constant varies over queries: it keeps the blockwise (S, S) path."""
    model = build(Spec(seq=8, mask="causal-const"))
    _, result = apply_pass(SparseAttention(window=4, global_tokens=1, block=4), model)
    assert result.stats["sites-rewritten"] == 1
    assert result.stats["masks-per-key"] == 0


@pytest.mark.parametrize(
    "spec",
    [
        Spec(seq=10, mask="expanded", opset=17),  # -> com.microsoft MultiHeadAttention
        Spec(seq=10, mask="additive", opset=23),  # -> ONNX Attention, additive attn_mask
        Spec(seq=10, mask="causal-bool", opset=23),  # -> ONNX Attention, is_causal
    ],
    ids=["mha-expanded", "attention23-additive", "attention23-causal"],
)
def test_fused_attention_nodes_are_expanded(spec):
    """fuse-attention's single nodes (or a model that came fused) still become sparse."""
    from dsopt.passes.fuse_attention import FuseAttention
    from dsopt.targets.onnxruntime import CONTRIB_OPS

    model = build(spec)
    feed = feeds(model)
    fused, result = apply_pass(FuseAttention(), model, PassContext(fused_ops=CONTRIB_OPS))
    assert sum(v for k, v in result.stats.items() if not k.startswith("skipped")) == 1
    covering = SparseAttention(window=32, global_tokens=1, block=16)
    check_pass(covering, fused, feeds=feed)  # the window covers the sequence: dense result
    narrow = SparseAttention(window=4, global_tokens=2, block=4)
    from_fused, stats = apply_pass(narrow, fused)
    assert stats.stats["sites-rewritten"] == 1
    assert not any(n.op_type in ("Attention", "MultiHeadAttention") for n in from_fused.graph.node)
    from_decomposed, _ = apply_pass(narrow, model)
    np.testing.assert_allclose(_run(from_fused, feed), _run(from_decomposed, feed), atol=2e-5)
    assert np.abs(_run(from_fused, feed) - _run(model, feed)).max() > 1e-3  # really sparse


def test_unsupported_fused_node_is_skipped_with_reason():
    node = helper.make_node(
        "Attention", ["q", "k", "v"], ["y"], q_num_heads=2, kv_num_heads=1, domain=""
    )
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 6, 8]) for n in "qv"]
    io.insert(1, helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 6, 4]))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])
    graph = helper.make_graph([node], "g", io, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    _, result = apply_pass(SparseAttention(window=2), model)
    assert fired(result.stats) == {"skipped-fused": 1}


def test_key_mask_reducer_on_a_dynamic_broadcast_mask():
    """ConstantOfShape and a computed Expand target (symbolic B and S) reduce to one row."""
    import onnx_graphsurgeon as gs

    from dsopt.analysis import AnalysisManager, Shapes
    from dsopt.ir import Module
    from dsopt.key_mask import KeyMaskReducer

    model, _ = _dynamic(mask="expanded")
    module = Module.from_proto(model)
    graph = module.graph
    bias = next(t for name, t in graph.tensors().items() if name == "bias")
    names = set(graph.tensors())
    reducer = KeyMaskReducer(graph, names, AnalysisManager(module).get(Shapes))
    row = reducer.reduce(bias)
    assert row is not None and row is not bias
    graph.nodes.extend(reducer.nodes)
    graph.outputs = [bias, row]
    for t in graph.outputs:
        t.dtype, t.shape = np.float32, None
    probe = gs.export_onnx(graph.cleanup().toposort())
    probe.opset_import[0].version = 17
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 7, 8)).astype(np.float32)
    keep = rng.random((2, 1, 1, 7)) < 0.6
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    wide, one = session.run(None, {"x": x, "mask": keep})
    assert wide.shape == (2, 1, 7, 7) and one.shape == (2, 1, 1, 7)
    np.testing.assert_array_equal(one, wide[:, :, :1, :])
    assert (wide == -10000.0).any()
