"""`--precision` presets: which passes run, and static int8's fallback when it misses its bound."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dsopt
from dsopt.errors import UsageError
from dsopt.precision import precision_passes


def test_calibration_data_turns_on_smoothing_and_gptq():
    assert precision_passes("int8-dynamic", calibrated=False).startswith("quantize-dynamic")
    assert precision_passes("int8-dynamic", calibrated=True).startswith(
        "smooth-activations,quantize-dynamic"
    )
    assert precision_passes("int8", calibrated=True).startswith(
        "upgrade-opset{to=13},quantize-static"
    )
    assert "method=gptq" in precision_passes("int4", calibrated=True, block_size=64)
    assert "gptq" not in precision_passes("int4", calibrated=False)
    with pytest.raises(UsageError, match="--block-size applies to --precision int4"):
        precision_passes("int8", calibrated=True, block_size=32)


def _mlp(outlier: float) -> onnx.ModelProto:
    """x -> MatMul -> MatMul -> MatMul; the middle input's channel 0 is `outlier` times larger
    (and read by a small weight row), so one per-tensor activation scale loses the others."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.3
    w1[:, 0] *= outlier
    w2 = rng.standard_normal((32, 32)).astype(np.float32) * 0.3
    w2[0] /= outlier
    w3 = rng.standard_normal((32, 8)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["g"]),
        helper.make_node("MatMul", ["g", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(count)]


def _ops(result: dsopt.OptimizeResult) -> set[str]:
    return {n.op_type for n in result.model.graph.node}


def test_static_int8_that_misses_its_bound_falls_back_to_dynamic(caplog):
    result = dsopt.optimize(_mlp(1000.0), precision="int8", calibration=_feeds(8), check=True)
    assert "QuantizeLinear" not in _ops(result)  # static Q/DQ replaced
    assert "DynamicQuantizeLinear" in _ops(result) or "MatMulInteger" in _ops(result)
    assert result.report.notes and "int8 static -> int8-dynamic" in result.report.notes[0]
    assert "output 'y'" in result.report.notes[0]
    assert "using int8-dynamic" in caplog.text
    stages = [p.name for p in result.report.passes]
    assert "smooth-activations" in stages and "quantize-static" not in stages
    assert result.equivalence.ok  # the dynamic result (outliers smoothed away) meets it


def test_static_int8_within_its_bound_stays_static():
    result = dsopt.optimize(_mlp(1.0), precision="int8", calibration=_feeds(8), check=True)
    assert "QuantizeLinear" in _ops(result) and not result.report.notes
    assert "notes" not in result.report.to_dict()
    assert result.equivalence.ok
