from __future__ import annotations

import math

import onnx
import pytest
from onnx import helper

from dsopt.attention import find_attention, scan_attention
from dsopt.ir import Module
from tests.core.attention_models import SPELLINGS, Spec, build


def _site(spec: Spec):
    sites = find_attention(Module.from_proto(build(spec)))
    assert len(sites) == 1
    return sites[0]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_heads_and_scale(spelling):
    site = _site(Spec(spelling=spelling, heads=3, size=5))
    assert (site.kind, site.num_heads, site.head_size) == ("decomposed", 3, 5)
    assert math.isclose(site.scale, 1 / math.sqrt(5), rel_tol=1e-6)
    assert site.layout == ("bnsh" if spelling.startswith("bnsh") else "bsd")
    assert site.k_transposed == (spelling == "bnsh-kt")
    assert site.nan_guard == (spelling in ("sqrt-split", "dynamo-sdpa"))
    assert site.mask is None and not site.causal
    assert site.output.name == "y" or site.layout == "bnsh"


def test_q_k_v_are_the_tensors_before_the_head_split():
    site = _site(Spec(fused_qkv=True))
    assert [t.name for t in (site.q, site.k, site.v)] == [f"split3_{i}" for i in range(3)]
    assert site.output.name == "y"


@pytest.mark.parametrize(
    ("mask", "kind", "attend", "causal"),
    [
        ("additive", "additive", True, False),
        ("boolean", "boolean", True, False),
        ("boolean-inverted", "boolean", False, False),
        ("causal-const", None, None, True),
        ("causal-bool", None, None, True),
        ("causal-trilu", None, None, True),
        ("causal-where-add", "additive", True, True),
    ],
)
def test_masks(mask, kind, attend, causal):
    site = _site(Spec(mask=mask))
    assert site.causal == causal
    if kind is None:
        assert site.mask is None
    else:
        assert (site.mask.kind, site.mask.attend) == (kind, attend)
        assert site.mask.tensor.name == "mask"
        assert site.mask.shape == (2, 1, 1, 4)
    if kind == "boolean":
        assert site.mask.fill < -1e38


@pytest.mark.parametrize(
    ("near_miss", "reason"),
    [
        ("softmax-axis", "softmax axis 2 is not the last"),
        ("scale-input", "not a Q·Kᵀ MatMul"),
        ("extra-reader", "has a reader outside the site"),
        ("probs-output", "is a graph output"),
        ("mask-shape", "does not broadcast into scores"),
    ],
)
def test_near_misses_say_why(near_miss, reason):
    mask = "additive" if near_miss == "mask-shape" else None
    sites, rejected = scan_attention(Module.from_proto(build(Spec(near_miss=near_miss, mask=mask))))
    assert sites == []
    assert len(rejected) == 1 and reason in rejected[0][1], rejected


def test_fused_nodes_are_reported():
    nodes = [
        helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=2, kv_num_heads=2),
        helper.make_node(
            "MultiHeadAttention", ["y", "k", "v"], ["z"], domain="com.microsoft", num_heads=2
        ),
    ]
    io = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 3, 4]) for n in "qkv"]
    graph = helper.make_graph(
        nodes, "g", io, [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 3, 4])]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    )
    sites = find_attention(Module.from_proto(model))
    assert [(s.kind, s.nodes[0].op, s.num_heads) for s in sites] == [
        ("fused", "Attention", 2),
        ("fused", "MultiHeadAttention", 2),
    ]
