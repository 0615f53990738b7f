from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsopt.passes import QuantizeDynamic
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/quantize-dynamic")


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(QuantizeDynamic(), case)


def _mlp(hidden: int = 64, inputs: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.2, (inputs, hidden)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (hidden, 8)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            onnx.helper.make_node("Relu", ["h"], ["r"]),
            onnx.helper.make_node("MatMul", ["r", "w2"], ["a"], name="fc2"),
            onnx.helper.make_node("MatMul", ["r", "w2"], ["b"], name="fc2_twin"),
            onnx.helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "mlp",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16, inputs])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16, 8])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_onnxruntime_fuses_the_chain_into_one_int8_kernel(tmp_path):
    rewritten, result = check_pass(QuantizeDynamic(), _mlp())
    assert result.stats == {"matmul": 3, "gemm": 0}
    # One DynamicQuantizeLinear per activation: fc2 and its twin share r's.
    assert op_types(rewritten.graph).count("DynamicQuantizeLinear") == 2
    weights = [onnx.numpy_helper.to_array(t) for t in rewritten.graph.initializer]
    assert {w.dtype for w in weights if w.ndim == 2} == {np.dtype(np.int8)}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "ort.onnx").graph.node)
    # Every MatMul runs on int8: fused into DynamicQuantizeMatMul, or MatMulInteger where an
    # activation's quantization is shared.
    assert ops["DynamicQuantizeMatMul"] >= 1
    # (onnxruntime merges the twin, which now computes the very same thing, with fc2.)
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulInteger"] >= 2
    assert ops["MatMul"] == 0
    # The twin reads the same int8 weight: stored once.
    assert sum(1 for w in weights if w.dtype == np.int8 and w.shape == (64, 8)) == 1


def test_min_elements_and_exclude_keep_float():
    _, small = apply_pass(QuantizeDynamic(min_elements=1000), _mlp())
    assert small.stats == {"matmul": 1, "gemm": 0}  # only the 32x64 weight
    _, named = apply_pass(QuantizeDynamic(exclude="fc1,fc2"), _mlp())
    assert named.stats == {"matmul": 1, "gemm": 0}


def test_weights_shrink_four_times():
    model = _mlp(hidden=1024, inputs=512)
    rewritten, _ = apply_pass(QuantizeDynamic(), model)
    assert model.ByteSize() / rewritten.ByteSize() > 3.9


@given(
    model=st.one_of(
        strategies.models(containing=("MatMul",)),
        strategies.models(containing=("Gemm",)),
    )
)
@settings(
    max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
def test_property(model):
    rewritten, result = check_pass(QuantizeDynamic(), model)
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
    if result.changed:
        assert "MatMulInteger" in op_types(rewritten.graph)


def _saturating_matmul(k: int = 256, n: int = 32) -> onnx.ModelProto:
    """MatMul whose int8 products saturate int16 pair sums: x near its maximum, |w| near 1."""
    w = np.where(np.random.default_rng(3).random((k, n)) < 0.5, 1.0, 0.9).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "saturating",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, n])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("reduce_range", [True, False])
def test_weights_fit_int16_pair_sums_unless_told_otherwise(reduce_range):
    model = _saturating_matmul()
    rewritten, _ = apply_pass(QuantizeDynamic(reduce_range=reduce_range), model)
    weights = [
        onnx.numpy_helper.to_array(t)
        for t in rewritten.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.dims
    ]
    peak = max(int(np.abs(w).max()) for w in weights)
    # 255 * 64 * 2 = 32640 fits int16 (onnxruntime's vpmaddubsw path); 255 * 127 * 2 does not
    assert (peak <= 64) if reduce_range else (peak == 127)
    if reduce_range:  # exact kernels on every x86 CPU: the result stays close to float
        x = np.random.default_rng(4).uniform(0.9, 1.0, (4, 256)).astype(np.float32)
        ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        got = ort.InferenceSession(rewritten.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, ref, rtol=2e-2)
