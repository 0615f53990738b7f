"""Quantized models through TVM: legalize-quantized, then x86; the library matches onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import dsopt
from dsopt import numerics
from dsopt.backend import run_library
from tests.passes.test_legalize_quantized import mlp, quantized

pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm


def _output_scale(model: onnx.ModelProto) -> float:
    """The scale of the DequantizeLinear that produces the graph output."""
    out = model.graph.output[0].name
    node = next(n for n in model.graph.node if out in n.output)
    assert node.op_type == "DequantizeLinear"
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return float(init[node.input[1]])


def _compile_and_compare(model, tmp_path, shape, *, step, rtol=0.0):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    result = dsopt.compile(
        path,
        target="x86",
        outdir=tmp_path / "out",
        check=False,
    )
    rng = np.random.default_rng(0)
    for scale in (0.5, 1.0, 3.0):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        ref = numerics.run_model(model, {"x": x})["y"]
        got = run_library(result.outdir, result.manifest, {"x": x})["y"]
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=step * 1.0001)
    assert result.manifest["pipeline"].startswith("legalize-quantized,")  # the x86 default
    return result


def test_int8_qoperator_conv_net_on_x86(tmp_path):
    model = quantized("conv", "QOperator", True)
    assert {n.op_type for n in model.graph.node} >= {"QLinearConv", "QLinearAdd", "QGemm"}
    result = _compile_and_compare(model, tmp_path, (1, 3, 10, 10), step=_output_scale(model))
    stats = {
        k: v
        for record in result.report["passes"]
        if record["name"] == "legalize-quantized"
        for k, v in record["stats"].items()
    }
    assert stats["QLinearConv"] == 4


def test_matmul_nbits_mlp_on_x86(tmp_path):
    nbits = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    quantizer = nbits.MatMulNBitsQuantizer(mlp(), block_size=32, is_symmetric=False)
    quantizer.process()
    model = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 2
    result = _compile_and_compare(model, tmp_path, (2, 40), step=1e-5, rtol=1e-5)
    # asymmetric 4-bit blocks: the kernels read the 1-byte weights and subtract zero points
    assert result.manifest["tvm"]["schedules"]["dequantize_matmul"] == 2


def _batched_mlp(k: int, hidden: int, n: int) -> onnx.ModelProto:
    """x [2, 3, k] -> MatMul -> Add -> Relu -> MatMul -> y [2, 3, n] (batch dims on purpose)."""
    rng = np.random.default_rng(5)
    inits = [
        onnx.numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), name)
        for name, s in (("w1", (k, hidden)), ("b1", (hidden,)), ("w2", (hidden, n)))
    ]
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        onnx.helper.make_node("Add", ["m1", "b1"], ["a1"]),
        onnx.helper.make_node("Relu", ["a1"], ["r"]),
        onnx.helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "mlp",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, n])],
        inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "precision",
    ["int4", "int8-weights"],  # blocked int4 (K=200: the last block padded), per-channel int8
)
def test_weight_only_matmuls_keep_one_byte_weights_in_the_library(tmp_path, precision):
    k, hidden, n = 200, 256, 64
    model = _batched_mlp(k, hidden, n)
    passes = "quantize-weights{bits=4}" if precision == "int4" else "quantize-weights{bits=8}"
    quantized_model = dsopt.optimize(model, passes=passes).module.to_proto()
    onnx.save(quantized_model, tmp_path / "q.onnx")
    onnx.save(model, tmp_path / "f.onnx")
    libraries = {}
    for name in ("f", "q"):
        result = dsopt.compile(tmp_path / f"{name}.onnx", target="x86", outdir=tmp_path / name)
        libraries[name] = result
    q = libraries["q"]
    assert q.manifest["tvm"]["schedules"]["dequantize_matmul"] == 2
    assert q.manifest["tvm"]["schedules"]["fallback"] == 0
    sizes = {
        name: next(a["bytes"] for a in r.manifest["artifacts"] if a["role"] == "library")
        for name, r in libraries.items()
    }
    fp32_weights = 4 * (k * hidden + hidden * n)
    # the float library holds 4-byte weights, the quantized one 1 byte, or two 4-bit values
    # per byte (plus scales)
    saved = 7 / 8 if precision == "int4" else 3 / 4
    assert sizes["f"] - sizes["q"] > (saved - 0.1) * fp32_weights
    assert q.manifest["tvm"]["schedules"].get("int4_weights", 0) == (
        2 if precision == "int4" else 0
    )
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.standard_normal((2, 3, k)).astype(np.float32)
        ref = numerics.run_model(quantized_model, {"x": x})["y"]
        got = run_library(q.outdir, q.manifest, {"x": x})["y"]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _cnn() -> onnx.ModelProto:
    """Strided, plain, depthwise and 1x1 convs (NCHW) with Relu between."""
    rng = np.random.default_rng(6)
    shapes = {"w0": (32, 3, 3, 3), "w1": (32, 32, 3, 3), "w2": (32, 1, 3, 3), "w3": (48, 32, 1, 1)}
    inits = [
        onnx.numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), name)
        for name, s in shapes.items()
    ]
    make = onnx.helper.make_node
    nodes = [
        make("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], strides=[2, 2]),
        make("Relu", ["c0"], ["r0"]),
        make("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        make("Relu", ["c1"], ["r1"]),
        make("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=32),
        make("Conv", ["c2", "w3"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "cnn",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 32, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 48, 16, 16])],
        inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "passes", ["quantize-weights{bits=8}", "quantize-weights{bits=4,convs=true,block_size=16}"]
)
def test_weight_only_convs_read_integer_weights(tmp_path, passes):
    quantized_model = dsopt.optimize(_cnn(), passes=passes).module.to_proto()
    assert any(n.op_type == "DequantizeLinear" for n in quantized_model.graph.node)
    onnx.save(quantized_model, tmp_path / "q.onnx")
    result = dsopt.compile(tmp_path / "q.onnx", target="x86", outdir=tmp_path / "out")
    schedules = result.manifest["tvm"]["schedules"]
    assert schedules["dequantize_conv2d"] == 4 and schedules["fallback"] == 0
    rng = np.random.default_rng(2)
    for _ in range(2):
        x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        ref = numerics.run_model(quantized_model, {"x": x})["y"]
        got = run_library(result.outdir, result.manifest, {"x": x})["y"]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_int8_dynamic_library_passes_the_library_check(tmp_path):
    """Activation quantization is checked as a whole output (rounding ties may differ)."""
    onnx.save(_batched_mlp(200, 256, 64), tmp_path / "m.onnx")
    result = dsopt.compile(
        tmp_path / "m.onnx", target="x86", outdir=tmp_path / "out", precision="int8-dynamic"
    )
    assert result.manifest["library_verified"] is True
    assert result.report["library_check"]["ok"] is True
    ops = {n.op_type for n in onnx.load(result.outdir / "model.onnx").graph.node}
    assert "DynamicQuantizeLinear" in ops
