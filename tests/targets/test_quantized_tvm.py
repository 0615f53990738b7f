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
    _compile_and_compare(model, tmp_path, (2, 40), step=1e-5, rtol=1e-5)
