from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import dsopt
from dsopt.cli import main
from dsopt.errors import UsageError
from dsopt.quant.calibration import CalibrationData
from dsopt.quant.error_report import tensor_errors
from tests.core.models import tiny


def _conv_net() -> onnx.ModelProto:
    """x -> stem conv -> 2 residual conv blocks -> pool -> fc; plus an output gate = Sigmoid(x)."""
    rng = np.random.default_rng(0)
    inits = []

    def weight(name, shape):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name))
        return name

    def conv(x, y, name, cin=8):
        return helper.make_node(
            "Conv", [x, weight(f"{name}_w", [8, cin, 3, 3]), weight(f"{name}_b", [8])], [y],
            name=name, pads=[1, 1, 1, 1],
        )  # fmt: skip

    nodes = [
        helper.make_node("Sigmoid", ["x"], ["gate"], name="gate"),
        conv("x", "s", "stem", cin=3),
        helper.make_node("Relu", ["s"], ["h0"], name="relu_stem"),
    ]
    for i in range(2):
        nodes += [
            conv(f"h{i}", f"a{i}", f"c{i}a"),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}a"),
            conv(f"r{i}", f"b{i}", f"c{i}b"),
            helper.make_node("Add", [f"b{i}", f"h{i}"], [f"s{i}"], name=f"add{i}"),
            helper.make_node("Relu", [f"s{i}"], [f"h{i + 1}"], name=f"relu{i}b"),
        ]
    nodes += [
        helper.make_node("GlobalAveragePool", ["h2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", weight("fc_w", [8, 5]), weight("fc_b", [5])], ["y"],
                         name="fc"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5]),
            helper.make_tensor_value_info("gate", TensorProto.FLOAT, [1, 3, 16, 16]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matmul_net() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
        for name, shape in (("w1", [64, 32]), ("b1", [32]), ("w2", [32, 16]))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "matmul_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(model: onnx.ModelProto, count: int) -> list[dict[str, np.ndarray]]:
    return list(CalibrationData.synthetic(model, count))


@pytest.fixture(scope="module")
def conv_int8():
    reference = _conv_net()
    feeds = _feeds(reference, 4)
    quantized = dsopt.optimize(reference, precision="int8", calibration=feeds).model
    return reference, quantized, feeds


def _run(model: onnx.ModelProto, feeds, name: str) -> list[np.ndarray]:
    """`name` per feed, the graph run as written: Q/DQ simulate int8 (no QLinearConv fusion)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return [session.run([name], feed)[0].astype(np.float64) for feed in feeds]


def test_output_sqnr_equals_an_independent_computation(conv_int8):
    reference, quantized, feeds = conv_int8
    report = tensor_errors(reference, quantized, feeds)
    expected, got = _run(reference, feeds, "y"), _run(quantized, feeds, "y")
    signal = sum(float(np.sum(e**2)) for e in expected)
    noise = sum(float(np.sum((g - e) ** 2)) for e, g in zip(expected, got, strict=True))
    y = next(t for t in report.tensors if t.name == "y")
    assert y.output and y.op_type == "Gemm" and report.samples == 4
    assert y.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)
    assert y.rel_l2_error == pytest.approx(math.sqrt(noise / signal), rel=1e-9)
    assert 0 < y.sqnr_db < 80 and 0.99 < y.cosine < 1.0
    assert y.max_abs_error == pytest.approx(
        max(float(np.max(np.abs(g - e))) for e, g in zip(expected, got, strict=True))
    )


def test_exactly_preserved_tensor_has_infinite_sqnr_and_sorts_last(conv_int8):
    reference, quantized, feeds = conv_int8
    report = tensor_errors(reference, quantized, feeds, limit=2)
    gate = report.tensors[-1]
    assert report.samples == 2
    assert gate.name == "gate" and gate.op_type == "Sigmoid"
    assert gate.sqnr_db == math.inf and gate.max_abs_error == 0.0 and gate.cosine == 1.0
    assert all(math.isfinite(t.sqnr_db) for t in report.tensors[:-1])
    sqnrs = [t.sqnr_db for t in report.tensors]
    assert sqnrs == sorted(sqnrs)
    # Intermediate activations match by name; an int8 island's tensors are compared where
    # the next op reads them, after their QuantizeLinear -> DequantizeLinear pair.
    by_name = {t.name: t for t in report.tensors}
    assert {"s", "h0", "a0", "r0", "b0", "s0", "h1", "p", "f"} <= set(by_name)
    assert by_name["r0"].compared != "r0"
    assert {w.name for w in report.weights} >= {"stem_w", "c0a_w", "c0b_w", "fc_w", "c0a_b"}


def test_damaged_weight_is_the_worst_weight_and_its_conv_the_worst_tensor(conv_int8):
    reference, quantized, feeds = conv_int8
    damaged = onnx.ModelProto()
    damaged.CopyFrom(quantized)
    reader = next(n for n in damaged.graph.node if n.name == "c0b")
    dequantize = next(n for n in damaged.graph.node if n.output[0] == reader.input[1])
    scale = next(t for t in damaged.graph.initializer if t.name == dequantize.input[1])
    scale.CopyFrom(numpy_helper.from_array(-3 * numpy_helper.to_array(scale), scale.name))
    report = tensor_errors(reference, damaged, feeds)
    assert report.weights[0].name == "c0b_w" and report.weights[0].node == "c0b"
    assert report.weights[0].dtype == "int8" and report.weights[0].sqnr_db < 0
    assert report.weights[1].sqnr_db > 30
    intact = tensor_errors(reference, quantized, feeds)
    assert {w.name: w.sqnr_db for w in intact.weights}["c0b_w"] > 30
    # The damage starts at c0b's output: it and what follows lose everything, upstream is intact.
    before = {t.name: t.sqnr_db for t in intact.tensors}
    after = {t.name: t.sqnr_db for t in report.tensors}
    assert report.tensors[0].name in ("b0", "s0", "h1") and report.tensors[0].sqnr_db < 0
    assert after["b0"] < 0 < 30 < before["b0"]
    assert all(after[name] == before[name] for name in ("s", "h0", "a0", "r0", "gate"))


def test_json_shape_and_worst_cap(conv_int8):
    reference, quantized, feeds = conv_int8
    data = tensor_errors(reference, quantized, feeds).to_dict(worst=3)
    text = json.dumps(data, allow_nan=False)
    assert set(data) == {
        "samples", "tensors_compared", "tensors", "outputs", "weights_compared", "weights",
    }  # fmt: skip
    assert len(data["tensors"]) == 3 and data["tensors_compared"] > 3
    assert len(data["weights"]) == 3 and data["weights_compared"] > 3
    assert {o["name"] for o in data["outputs"]} == {"y", "gate"}
    assert '"sqnr_db": "inf"' in text
    assert set(data["tensors"][0]) == {
        "name", "op_type", "compared", "output", "elements", "sqnr_db", "rel_l2_error",
        "cosine", "max_abs_error",
    }  # fmt: skip


def test_dynamic_int8_weights_match_their_dequantized_values():
    reference = _matmul_net()
    quantized = dsopt.optimize(reference, precision="int8-dynamic").model
    report = tensor_errors(reference, quantized, _feeds(reference, 2))
    constants = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    w1 = next(w for w in report.weights if w.name == "w1")
    assert w1.stored in constants and w1.dtype == "int8" and w1.op_type == "MatMulInteger"
    dequantized = constants[w1.stored].astype(np.float64) * constants["w1_scale"]
    original = numpy_helper.to_array(reference.graph.initializer[0]).astype(np.float64)
    noise = np.sum((dequantized - original) ** 2)
    assert w1.sqnr_db == pytest.approx(10 * math.log10(np.sum(original**2) / noise), rel=1e-6)
    assert {t.name for t in report.outputs} == {"y"}


def test_matmul_nbits_weights_decode_as_onnxruntime_computes_them():
    reference = _matmul_net()
    quantized = dsopt.optimize(reference, precision="int4", target="onnxruntime").model
    report = tensor_errors(reference, quantized, _feeds(reference, 1))
    assert {(w.name, w.op_type, w.dtype) for w in report.weights} == {
        ("w1", "MatMulNBits", "uint4"),
        ("w2", "MatMulNBits", "uint4"),
    }
    # onnxruntime's own decoding: MatMulNBits of the identity matrix is W [K, N].
    node = next(n for n in quantized.graph.node if n.name == "mm1")
    constants = [t for t in quantized.graph.initializer if t.name in node.input[1:]]
    probe = onnx.NodeProto()
    probe.CopyFrom(node)
    probe.input[:] = ["eye", *node.input[1:3]]  # the bias (if any) left out
    probe.output[:] = ["w"]
    eye = numpy_helper.from_array(np.eye(64, dtype=np.float32), "eye")
    graph = helper.make_graph(
        [probe], "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
        [eye, *constants],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=list(quantized.opset_import))
    decoded = ort.InferenceSession(model.SerializeToString()).run(["w"], {})[0]
    original = numpy_helper.to_array(reference.graph.initializer[0]).astype(np.float64)
    expected = 10 * math.log10(np.sum(original**2) / np.sum((decoded - original) ** 2))
    w1 = next(w for w in report.weights if w.name == "w1")
    assert w1.sqnr_db == pytest.approx(expected, rel=1e-6)


def test_reference_with_other_inputs_is_a_usage_error(conv_int8):
    _, quantized, _ = conv_int8
    with pytest.raises(UsageError, match="different inputs"):
        tensor_errors(tiny(), quantized, [{"x": np.zeros((1, 3), np.float32)}])


def test_cli_inspect_quant_prints_the_table_and_json(conv_int8, tmp_path, capsys):
    reference, quantized, feeds = conv_int8
    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(quantized, tmp_path / "q.onnx")
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in feeds]))
    args = ["inspect", str(tmp_path / "q.onnx"), "--quant", str(tmp_path / "ref.onnx")]
    assert main([*args, "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "quantization error" in out and "SQNR dB" in out and "c0b_w" in out
    assert main([*args, "--calib", str(tmp_path / "calib.npz"), "--samples", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["samples"] == 3 and data["tensors"][-1]["name"] == "gate"
    assert main([*args[:3], str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx" in capsys.readouterr().err
    onnx.save(tiny(), tmp_path / "tiny.onnx")
    assert main([*args[:3], str(tmp_path / "tiny.onnx")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("dsopt: error: the models have different inputs") and "Traceback" not in err
    )
    assert main(["inspect", str(tmp_path / "q.onnx"), "--samples", "2"]) == 2


def test_optimize_report_json_has_quant_error(tmp_path, capsys):
    reference = _conv_net()
    onnx.save(reference, tmp_path / "ref.onnx")
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in _feeds(reference, 6)]))
    report_path = tmp_path / "report.json"
    args = ["optimize", str(tmp_path / "ref.onnx"), "-o", str(tmp_path / "q.onnx")]
    calib = ["--precision", "int8", "--calib", str(tmp_path / "calib.npz")]
    assert main([*args, *calib, "--report", str(report_path)]) == 0
    quant_error = json.loads(report_path.read_text())["quant_error"]
    assert quant_error["samples"] == 4  # capped: the check's samples
    assert 0 < len(quant_error["tensors"]) <= 20 and quant_error["weights_compared"] >= 6
    assert {o["name"] for o in quant_error["outputs"]} == {"y", "gate"}
    assert main([*args, "--report", str(report_path)]) == 0
    assert "quant_error" not in json.loads(report_path.read_text())
    capsys.readouterr()


def test_optimize_api_reports_lossy_precision_only():
    reference = _matmul_net()
    assert dsopt.optimize(reference, precision="int8-dynamic").quant_error.samples == 1
    assert dsopt.optimize(reference, precision="fp16").quant_error is None
    assert dsopt.optimize(reference).quant_error is None
