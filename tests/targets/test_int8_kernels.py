"""int8 kernels (AVX-512 VNNI) for quantized convs and matmuls: exact against onnxruntime."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import dsopt
from dsopt import numerics
from dsopt.backend import run_library
from dsopt.errors import UsageError

pytest.importorskip("tvm")

from dsopt import _tvm  # noqa: E402 - after the importorskip

pytestmark = pytest.mark.tvm

HAS_VNNI = "avx512vnni" in _tvm.host_cpu_features()["features"]
needs_vnni = pytest.mark.skipif(
    not HAS_VNNI, reason="this CPU has no AVX-512 VNNI: the int8 libraries cannot run here"
)
#: Each example costs a TVM compile (1-3 s on 2 cores).
EXAMPLES = 8

_TYPES = {
    "uint8": (TensorProto.UINT8, np.uint8, 0, 255),
    "int8": (TensorProto.INT8, np.int8, -128, 127),
}


def _array(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def qlinear_conv_model(
    rng: np.random.Generator,
    *,
    channels: int,
    out_channels: int,
    size: tuple[int, int],
    kernel: int,
    stride: int,
    pad: int,
    dilation: int,
    activation: str,
    weight: str,
    weight_zero_point: int,
    bias: bool,
) -> onnx.ModelProto:
    """QuantizeLinear -> QLinearConv -> DequantizeLinear, with random int weights and scales."""
    act_type, act_np, low, high = _TYPES[activation]
    w_type, w_np, w_low, w_high = _TYPES[weight]
    w = rng.integers(w_low, w_high + 1, (out_channels, channels, kernel, kernel)).astype(w_np)
    inits = [
        _array("xs", np.float32(rng.uniform(0.01, 0.05))),
        _array("xz", act_np(rng.integers(low, high + 1))),
        _array("w", w),
        _array("ws", rng.uniform(0.001, 0.01, out_channels).astype(np.float32)),
        _array("wz", np.full(out_channels, weight_zero_point, w_np)),
        _array("ys", np.float32(rng.uniform(0.05, 0.5))),
        _array("yz", act_np((low + high) // 2)),
    ]
    inputs = ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    if bias:
        inits.append(_array("b", rng.integers(-5000, 5000, out_channels).astype(np.int32)))
        inputs.append("b")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node(
            "QLinearConv",
            inputs,
            ["yq"],
            name="qconv",
            pads=[pad] * 4,
            strides=[stride] * 2,
            dilations=[dilation] * 2,
        ),  # fmt: skip
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    out = [(d + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for d in size]
    graph = helper.make_graph(
        nodes,
        "qconv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, *size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, *out])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def qlinear_matmul_model(
    rng: np.random.Generator, *, lead: list[int], k: int, n: int, activation: str, weight: str
) -> onnx.ModelProto:
    """QuantizeLinear -> QLinearMatMul (constant B) -> DequantizeLinear."""
    act_type, act_np, low, high = _TYPES[activation]
    w_type, w_np, w_low, w_high = _TYPES[weight]
    inits = [
        _array("as", np.float32(rng.uniform(0.01, 0.05))),
        _array("az", act_np(rng.integers(low, high + 1))),
        _array("b", rng.integers(w_low, w_high + 1, (k, n)).astype(w_np)),
        _array("bs", np.float32(0.004)),
        _array("bz", w_np(rng.integers(w_low, w_high + 1))),
        _array("ys", np.float32(rng.uniform(0.2, 1.0))),
        _array("yz", act_np((low + high) // 2)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["a", "as", "az"], ["aq"]),
        helper.make_node(
            "QLinearMatMul", ["aq", "as", "az", "b", "bs", "bz", "ys", "yz"], ["yq"], name="qmm"
        ),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qmm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [*lead, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _compile(model, tmp_path, int8="vnni", target="x86"):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    out = tmp_path / f"out-{int8}"
    shutil.rmtree(out, ignore_errors=True)
    return dsopt.compile(path, target=target, outdir=out, check=False, options={"int8": int8})


def _assert_exact(model, result, name, shape, rng):
    for scale in (0.5, 2.0, 8.0):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        want = numerics.run_model(model, {name: x})["y"]
        got = run_library(result.outdir, result.manifest, {name: x})["y"]
        np.testing.assert_array_equal(got, want)


conv_cases = st.fixed_dictionaries(
    {
        "channels": st.integers(1, 20),
        "out_channels": st.integers(1, 40),
        "size": st.tuples(st.integers(3, 12), st.integers(3, 30)),
        "kernel": st.sampled_from([1, 3, 5]),
        "stride": st.integers(1, 2),
        "pad": st.integers(0, 2),
        "dilation": st.integers(1, 2),
        "activation": st.sampled_from(["uint8", "int8"]),
        "weight": st.sampled_from(["int8", "uint8"]),
        "weight_zero_point": st.integers(0, 0),
        "bias": st.booleans(),
    }
).filter(lambda c: (c["size"][0] + 2 * c["pad"] - c["dilation"] * (c["kernel"] - 1)) >= 1)


@needs_vnni
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
@given(case=conv_cases, seed=st.integers(0, 2**16))
def test_qlinear_conv_int8_kernel_equals_onnxruntime(case, seed, tmp_path_factory):
    """Random QLinearConv shapes (ragged channels, widths, strides, dilation, uint8 weights)."""
    case = dict(case)
    if case["weight"] == "uint8":
        case["weight_zero_point"] = 128  # centered uint8 weights span 255: shifted kernels
        case["activation"] = "uint8"  # onnxruntime has no int8 x uint8 QLinearConv
    w = case["size"][1] + 2 * case["pad"] - case["dilation"] * (case["kernel"] - 1)
    if w < 1:
        return
    rng = np.random.default_rng(seed)
    model = qlinear_conv_model(rng, **case)
    result = _compile(model, tmp_path_factory.mktemp("int8"))
    schedules = result.manifest["tvm"]["schedules"]
    assert schedules["int8"] == "vnni"
    assert schedules["int8_conv2d"] == 1
    assert schedules["fallback"] == 0
    _assert_exact(model, result, "x", [1, case["channels"], *case["size"]], rng)


@needs_vnni
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    lead=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    k=st.integers(1, 70),
    n=st.integers(1, 40),
    activation=st.sampled_from(["uint8", "int8"]),
    weight=st.sampled_from(["int8", "uint8"]),
    seed=st.integers(0, 2**16),
)
def test_qlinear_matmul_int8_kernel_equals_onnxruntime(
    lead, k, n, activation, weight, seed, tmp_path_factory
):
    if weight == "uint8":
        activation = "uint8"  # onnxruntime has no int8 x uint8 QLinearMatMul
    rng = np.random.default_rng(seed)
    model = qlinear_matmul_model(rng, lead=lead, k=k, n=n, activation=activation, weight=weight)
    result = _compile(model, tmp_path_factory.mktemp("int8"))
    schedules = result.manifest["tvm"]["schedules"]
    assert schedules["int8_matmul"] == 1
    assert schedules["fallback"] == 0
    _assert_exact(model, result, "a", [*lead, k], rng)


@needs_vnni
def test_conv_net_uses_vpdpbusd_and_matches_the_float_path(tmp_path):
    from tests.passes.test_legalize_quantized import quantized

    model = quantized("conv", "QOperator", True)
    vnni = _compile(model, tmp_path, "vnni")
    plain = _compile(model, tmp_path, "float")
    assert vnni.manifest["tvm"]["schedules"]["int8_conv2d"] == 3  # the depthwise one stays float
    assert "int8_conv2d" not in plain.manifest["tvm"]["schedules"]
    objdump = shutil.which("objdump")
    if objdump:
        text = subprocess.run(
            [objdump, "-d", str(vnni.outdir / "model.so")], capture_output=True, text=True
        ).stdout
        assert "vpdpbusd" in text
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((1, 3, 10, 10)).astype(np.float32)
        want = numerics.run_model(model, {"x": x})["y"]
        for result in (vnni, plain):
            np.testing.assert_array_equal(
                run_library(result.outdir, result.manifest, {"x": x})["y"], want
            )


def test_vnni_on_a_target_without_it_is_a_usage_error(tmp_path):
    model = qlinear_matmul_model(
        np.random.default_rng(0), lead=[2], k=8, n=4, activation="uint8", weight="int8"
    )
    with pytest.raises(UsageError, match="x86-avx2.*VNNI"):
        _compile(model, tmp_path, "vnni", target="x86-avx2")
    with pytest.raises(UsageError, match="unknown int8 'fast'"):
        _compile(model, tmp_path, "fast")


def test_x86_vnni_target_builds_int8_kernels_even_on_other_hosts(tmp_path):
    """The named target compiles VNNI code wherever dsopt runs (it runs only on VNNI CPUs)."""
    model = qlinear_matmul_model(
        np.random.default_rng(1), lead=[3], k=9, n=20, activation="int8", weight="int8"
    )
    result = _compile(model, tmp_path, "auto", target="x86-vnni")
    assert result.manifest["tvm"]["schedules"]["int8_matmul"] == 1


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("kind", ["conv", "matmul"])
def test_packed_weights_reproduce_the_integer_product(kind, shifted):
    """The packed layouts with the zero-point and shift corrections give the exact product."""
    rng = np.random.default_rng(3)
    low, high = (-200, 56) if shifted else (-128, 128)  # shifted: spans 255, leaves int8
    if kind == "conv":
        w = rng.integers(low, high, (21, 6, 1, 1)).astype(np.float32)
        weight_kn = w.reshape(21, 6).T
    else:
        weight_kn = rng.integers(low, high, (6, 21)).astype(np.float32)
    split = _tvm._int8_weight(w if kind == "conv" else weight_kn, 0 if kind == "conv" else 1)
    assert split is not None
    w8, shift = split
    assert bool(shift.any()) == shifted
    x = rng.integers(0, 256, (5, 6)).astype(np.int64)
    zp = 77
    if kind == "conv":
        packed = _tvm._pack_conv_weight(w8, shifted)[:, :, 0, 0]  # [OB, IB, 16, 4]
    else:
        packed = _tvm._pack_matmul_weight(w8, shifted)  # [NB, KB, 16, 4]
    groups = packed.shape[1]
    xp = np.full((5, groups * 4), zp, np.int64)
    xp[:, :6] = x
    acc = np.einsum("mkg,bkog->mbo", xp.reshape(5, groups, 4), packed.astype(np.int64))
    per = 15 if shifted else 16
    cols = np.arange(21)
    got = acc[:, cols // per, cols % per] - zp * weight_kn.sum(axis=0).astype(np.int64)
    if shifted:
        got = got + shift * acc[:, cols // per, per]
    want = (x - zp) @ weight_kn.astype(np.int64)
    np.testing.assert_array_equal(got, want)


def test_weights_spanning_more_than_255_are_not_int8():
    assert _tvm._int8_weight(np.array([[-200.0, 100.0]]), 0) is None
    assert _tvm._int8_weight(np.array([[0.5, 1.0]]), 0) is None
