from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from dsopt.ir import Module
from dsopt.pass_infra import PassContext, verify_model
from dsopt.passes import Sparsify2to4
from dsopt.passes.sparsify_2to4 import CAPABILITY, METADATA_KEY, mask_2to4
from dsopt.plugin import PluginHost
from dsopt.testing import apply_pass, check_pass, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/sparsify-2to4")


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(Sparsify2to4(), case)


def _assert_2to4(original: np.ndarray, masked: np.ndarray, axis: int) -> None:
    """Every group of 4 along `axis` keeps <= 2 nonzeros: the 2 largest magnitudes."""
    groups = np.moveaxis(original, axis, -1).reshape(-1, 4)
    kept = np.moveaxis(masked, axis, -1).reshape(-1, 4)
    assert ((kept != 0).sum(axis=1) <= 2).all()
    for row, out in zip(groups, kept, strict=True):
        survivors = out != 0
        np.testing.assert_array_equal(out[survivors], row[survivors])  # kept values unchanged
        if survivors.any():
            assert np.abs(row[survivors]).min() >= np.abs(row[~survivors]).max(initial=0.0)
        assert np.abs(row[~survivors]).sum() <= np.sort(np.abs(row))[:2].sum() + 1e-12


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)),
    axis=st.integers(0, 2),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_mask_keeps_the_two_largest(shape, axis, seed, ties):
    rng = np.random.default_rng(seed)
    shape = list(shape)
    shape[axis] *= 4
    weight = rng.standard_normal(shape).astype(np.float32)
    if ties:
        weight = np.round(weight)  # many equal magnitudes and zeros
    _assert_2to4(weight, mask_2to4(weight, axis), axis)


@st.composite
def matmul_chains(draw: st.DrawFn) -> onnx.ModelProto:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    width = first = 4 * draw(st.integers(3, 6))
    nodes, inits, x = [], [], "x"
    layers = draw(st.integers(1, 3))
    for i in range(layers):
        out = 4 * draw(st.integers(3, 6)) if i < layers - 1 else 8
        op = draw(st.sampled_from(["MatMul", "Gemm", "GemmT"]))
        shape = (out, width) if op == "GemmT" else (width, out)
        w = (rng.standard_normal(shape) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        attrs = {"transB": 1} if op == "GemmT" else {}
        op_type = "MatMul" if op == "MatMul" else "Gemm"
        nodes.append(helper.make_node(op_type, [x, f"w{i}"], [f"h{i}"], **attrs))
        x, width = f"h{i}", out
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, first])],
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [4, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@given(model=matmul_chains())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_chains_meet_the_pattern_and_bound(model):
    rewritten, result = check_pass(Sparsify2to4(), model)
    assert result.stats["weights"] == len(model.graph.initializer)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            axis = 1 if any(a.name == "transB" and a.i for a in node.attribute) else 0
            _assert_2to4(before[node.input[1]], after[node.input[1]], axis)
    meta = {p.key: p.value for p in rewritten.metadata_props}
    assert set(meta[METADATA_KEY].split(",")) == set(before)


@given(model=strategies.models(containing=("MatMul",)))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_random_graphs_stay_valid(model):
    rewritten, result = apply_pass(Sparsify2to4(conv=True), model)
    if verify_model(model) is None:
        assert verify_model(rewritten) is None
    again = apply_pass(Sparsify2to4(conv=True), rewritten)[1]
    assert not again.changed
    if not result.changed:
        assert (
            rewritten.SerializeToString() == Module.from_proto(model).to_proto().SerializeToString()
        )


def test_conv_over_input_channels_and_skips():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 8, 3, 3] x, float[4, 2] wb) => (float[1, 2, 3, 3] y, float[4, 2] z) {
      y = Conv (x, w)
      z = MatMul (wb, s)
    }""")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 8, 1, 1)).astype(np.float32)
    model.graph.initializer.extend(
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones((2, 2), np.float32), "s")]
    )
    _, result = apply_pass(Sparsify2to4(), model)
    assert not result.changed and result.stats["skipped-k"] == 1  # conv off by default
    rewritten, result = check_pass(Sparsify2to4(conv=True), model)
    assert result.stats["weights"] == 1
    _assert_2to4(w, numpy_helper.to_array(rewritten.graph.initializer[0]), 1)
    _, result = apply_pass(Sparsify2to4(conv=True, exclude="n0"), model)
    assert result.stats["weights"] == 1  # unnamed nodes are not excluded


def test_cuda_and_jetson_declare_the_capability():
    host = PluginHost(autoload=False)
    for name in ("cuda", "cuda-sm90", "jetson-orin"):
        target = host.targets.get(name)
        assert CAPABILITY in target.fused_ops, name
    model = next(
        onnx.parser.parse_model(p.read_text()) for p in GOLDEN if p.name.startswith("matmul")
    )
    ctx = PassContext(target="cuda", fused_ops=frozenset({CAPABILITY}))
    _, result = apply_pass(Sparsify2to4(), model, ctx)
    assert result.stats["target-sparse"] == 1
