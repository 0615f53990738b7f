"""The whole default (lossless) pipeline keeps onnxruntime outputs equal on random graphs."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from onnx import TensorProto, helper, numpy_helper

import dsopt
from dsopt import numerics
from dsopt.testing import PROPERTY_EXAMPLES, strategies


def _check_default_pipeline(model: onnx.ModelProto) -> dsopt.OptimizeResult:
    result = dsopt.optimize(model, verify="each")
    optimized = result.module.to_proto()
    feeds = strategies.random_feeds(model)
    report = numerics.check_equivalence(model, optimized, inputs=[feeds], rtol=1e-4, atol=1e-5)
    assert report.ok, report.to_dict()
    assert [i.name for i in optimized.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in optimized.graph.output] == [o.name for o in model.graph.output]
    assert result.report.after["nodes"] <= result.report.before["nodes"]
    return result


@given(model=strategies.models())
@settings(max_examples=PROPERTY_EXAMPLES)
def test_default_pipeline_is_lossless_on_random_graphs(model):
    _check_default_pipeline(model)


@given(model=strategies.models(dynamic=False, max_ops=16))
@settings(max_examples=PROPERTY_EXAMPLES)
def test_default_pipeline_on_static_graphs_is_deterministic(model):
    first = _check_default_pipeline(model).module.to_proto().SerializeToString(deterministic=True)
    second = dsopt.optimize(model).module.to_proto().SerializeToString(deterministic=True)
    assert first == second


def _qat_export(channels: int = 16) -> onnx.ModelProto:
    """A conv + gemm net as PyTorch's QAT export writes it: Q -> DQ on every float weight."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def qdq(
        tensor: str, scale: float, zero: int, dtype=np.uint8, axis: int | None = None, size: int = 0
    ) -> str:
        s, z = f"{tensor}_scale", f"{tensor}_zero"
        scale_value = np.float32(scale) if axis is None else np.full(size, scale, np.float32)
        zero_value = np.asarray(zero, dtype) if axis is None else np.zeros(size, dtype)
        inits.extend(
            [numpy_helper.from_array(scale_value, s), numpy_helper.from_array(zero_value, z)]
        )
        attrs = {} if axis is None else {"axis": axis}
        nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tensor}_q"], **attrs))
        nodes.append(
            helper.make_node("DequantizeLinear", [f"{tensor}_q", s, z], [f"{tensor}_dq"], **attrs)
        )
        return f"{tensor}_dq"

    def weight(name: str, shape: tuple[int, ...], axis: int) -> str:
        inits.append(
            numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)
        )
        return qdq(name, 0.4 / 127, 0, np.int8, axis, shape[axis])

    x = qdq("x", 8 / 255, 128)
    nodes.append(helper.make_node("Conv", [x, weight("w1", (channels, 3, 3, 3), 0)], ["c1"]))
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"]))
    r1 = qdq("r1", 6 / 255, 0)
    nodes.append(
        helper.make_node("Conv", [r1, weight("w2", (channels, channels, 3, 3), 0)], ["c2"])
    )
    c2 = qdq("c2", 6 / 255, 128)
    nodes.append(helper.make_node("GlobalAveragePool", [c2], ["g"]))
    nodes.append(helper.make_node("Flatten", ["g"], ["f"]))
    f = qdq("f", 4 / 255, 128)
    nodes.append(helper.make_node("Gemm", [f, weight("w3", (channels, 10), 1)], ["y"]))
    graph = helper.make_graph(
        nodes,
        "qat_export",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_default_pipeline_imports_a_qat_export_with_int8_weights():
    model = _qat_export()
    result = _check_default_pipeline(model)
    optimized = result.module.to_proto()
    stored = {t.name: t.data_type for t in optimized.graph.initializer}
    assert not {"w1", "w2", "w3"} & set(stored)  # float weights folded into int8 ones
    int8_weights = [t for t in optimized.graph.initializer if t.data_type == TensorProto.INT8]
    sizes = sorted(numpy_helper.to_array(t).size for t in int8_weights)
    assert sizes == [10, 16, 160, 432, 2304]  # two zero-point vectors, three weights
    assert optimized.ByteSize() < model.ByteSize() / 3
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 7


@given(model=strategies.qdq_models(max_abs=8.0))
@settings(max_examples=max(1, PROPERTY_EXAMPLES // 4))
def test_default_pipeline_keeps_random_qdq_graphs_equal(model):
    optimized = dsopt.optimize(model).module.to_proto()
    onnx.checker.check_model(optimized, full_check=True)
    feeds = strategies.random_feeds(model)
    want, got = numerics.run_model(model, feeds), numerics.run_model(optimized, feeds)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
    report = numerics.check_equivalence(model, optimized, inputs=[feeds], rtol=1e-4, atol=1e-5)
    assert report.ok, report.to_dict()
