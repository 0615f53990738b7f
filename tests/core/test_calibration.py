from __future__ import annotations

import logging

import numpy as np
import onnx.parser
import pytest

from dsopt.errors import UsageError
from dsopt.quant.calibration import (
    BINS,
    CalibrationData,
    Probe,
    collect_ranges,
    entropy_range,
    mse_range,
    percentile_range,
)

MODEL = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
  h = Relu (x)
  y = Mul (h, x)
}""")


def _samples(count, rows=3, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows + i % 2, 4)).astype(np.float32)} for i in range(count)]


def test_folder_of_npz_is_read_one_file_at_a_time(tmp_path):
    samples = _samples(5)
    for i, sample in enumerate(samples):
        np.savez(tmp_path / f"{i:03d}.npz", **sample)
    data = CalibrationData.load(tmp_path, MODEL)
    assert len(data) == 5
    first, second = list(data), list(data)  # re-iterable
    for a, b, c in zip(first, second, samples, strict=True):
        np.testing.assert_array_equal(a["x"], c["x"])
        np.testing.assert_array_equal(b["x"], c["x"])


def test_stacked_npz_has_one_sample_per_leading_index(tmp_path):
    stacked = np.random.default_rng(1).standard_normal((6, 2, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=stacked)
    data = CalibrationData.load(tmp_path / "calib.npz", MODEL)
    rows = list(data)
    assert len(rows) == 6 and rows[3]["x"].shape == (2, 4)
    np.testing.assert_array_equal(rows[3]["x"], stacked[3])
    assert len(list(data.limited(2))) == 2


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros((2, 2, 4), np.float32)}, "not an input of the model"),
        ({"x": np.zeros((2, 2, 4), np.float64)}, "float64 but the model expects float"),
        ({"x": np.zeros((2, 2, 5), np.float32)}, "axis 1"),
        ({"x": np.zeros((2, 4), np.float32)}, "rank 1"),
    ],
)
def test_bad_samples_name_the_file_and_array(tmp_path, arrays, message):
    np.savez(tmp_path / "calib.npz", **arrays)
    with pytest.raises(UsageError, match=message) as info:
        CalibrationData.load(tmp_path / "calib.npz", MODEL)
    assert "calib.npz" in info.value.message


def test_missing_or_empty_calibration_paths(tmp_path):
    with pytest.raises(UsageError, match="holds no .npz"):
        CalibrationData.load(tmp_path, MODEL)
    with pytest.raises(UsageError, match="not a .npz file"):
        CalibrationData.load(tmp_path / "nope.npz", MODEL)


def test_synthetic_calibration_warns(caplog):
    with caplog.at_level(logging.WARNING):
        data = CalibrationData.synthetic(MODEL, count=3, shapes={"x": [2, 4]})
    assert len(list(data)) == 3
    assert "synthetic" in caplog.text and "--calib" in caplog.text


def test_minmax_ranges_are_the_extremes_over_all_samples():
    samples = _samples(7)
    stats, facts = collect_ranges(MODEL, ["x", "h", "y"], CalibrationData.from_feeds(samples))
    everything = np.concatenate([s["x"].ravel() for s in samples])
    relu = np.maximum(everything, 0)
    assert stats["x"].minimum == pytest.approx(everything.min())
    assert stats["x"].maximum == pytest.approx(everything.max())
    assert stats["h"].low == 0.0 and stats["h"].high == pytest.approx(relu.max())
    assert stats["y"].minimum == pytest.approx((relu * everything).min())
    assert facts["samples"] == 7 and facts["passes"] == 1 and facts["peak_rss_mb"] > 0


def test_percentile_and_entropy_clip_a_lone_outlier():
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal((64, 4)).astype(np.float32)} for _ in range(4)]
    samples[2]["x"][0, 0] = 1000.0
    data = CalibrationData.from_feeds(samples)
    minmax, _ = collect_ranges(MODEL, ["x"], data)
    percentile, facts = collect_ranges(MODEL, ["x"], data, method="percentile", percentile=99.9)
    entropy, _ = collect_ranges(MODEL, ["x"], data, method="entropy")
    assert minmax["x"].high == 1000.0
    assert facts["passes"] == 2 and percentile["x"].histogram.sum() == 4 * 64 * 4
    assert percentile["x"].high < 50.0 and entropy["x"].high < 100.0
    assert percentile["x"].low < 0.0 < percentile["x"].high


def test_percentile_range_of_a_uniform_histogram():
    hist = np.full(BINS, 10, np.int64)
    low, high = percentile_range(hist, -1.0, 1.0, 99.0)
    assert low == pytest.approx(-0.98, abs=2e-3) and high == pytest.approx(0.98, abs=2e-3)


def test_entropy_keeps_the_whole_range_of_a_uniform_tensor():
    hist = np.full(BINS, 10, np.int64)
    low, high = entropy_range(hist, 0.0, 4.0)
    assert low == 0.0 and high == pytest.approx(4.0, rel=0.02)


def _expected_squared_error(values, low, high, levels=256):
    step = (high - low) / (levels - 1)
    q = np.clip(np.round((values - low) / step), 0, levels - 1)
    return float(np.mean((q * step + low - values) ** 2))


@pytest.mark.parametrize("signed", [True, False])
def test_mse_range_beats_minmax_on_a_heavy_tail_and_keeps_a_uniform_range(signed):
    rng = np.random.default_rng(5)
    values = rng.standard_t(3, 200_000) if signed else np.abs(rng.standard_t(3, 200_000))
    low, high = float(values.min()), float(values.max())
    hist, _ = np.histogram(values, bins=BINS, range=(low, high))
    chosen = mse_range(hist, low, high)
    error = _expected_squared_error(values, *chosen)
    tops = np.linspace(high / 64, high, 64)
    best = min(_expected_squared_error(values, -t if signed else 0.0, t) for t in tops)
    assert error <= 1.05 * best  # the histogram's estimate finds the true optimum
    assert error < 0.9 * _expected_squared_error(values, low, high)
    uniform = np.full(BINS, 10, np.int64)
    assert mse_range(uniform, 0.0, 4.0)[1] == pytest.approx(4.0, rel=0.01)


def test_exact_zeros_do_not_pull_the_entropy_threshold_down():
    rng = np.random.default_rng(6)
    dense = np.abs(rng.standard_normal((64, 4))).astype(np.float32)
    sparse = dense.copy()
    sparse[rng.random(sparse.shape) < 0.8] = 0.0  # mostly exact zeros, as after a Relu
    sparse[0, 0] = dense.max()  # the same range
    ranges = []
    for values in (dense, sparse):
        data = CalibrationData.from_feeds([{"x": values}])
        stats, _ = collect_ranges(MODEL, ["x"], data, method="entropy")
        ranges.append(stats["x"].high)
        assert stats["x"].histogram.sum() == np.count_nonzero(values)  # zeros left out
    assert ranges[1] > 0.5 * ranges[0]


def test_mask_fill_values_are_flagged():
    samples = [{"x": np.array([[0.5, -3.4e38, 1.0, 2.0]], np.float32)}]
    stats, _ = collect_ranges(MODEL, ["x", "h"], CalibrationData.from_feeds(samples))
    assert stats["x"].mask_like and not stats["h"].mask_like


def test_unknown_method_is_a_usage_error():
    with pytest.raises(UsageError, match="methods: minmax, percentile, entropy, mse"):
        collect_ranges(MODEL, ["x"], CalibrationData.from_feeds(_samples(1)), method="kl")


# -- tensors inside If/Loop/Scan bodies ----------------------------------------------------
def _vi(name, shape=None, elem=onnx.TensorProto.FLOAT):
    return onnx.helper.make_tensor_value_info(name, elem, shape)


def _if_model():
    """y = If(c): then Neg(Relu(x)), else Sigmoid(x) * 2; a Loop-free model."""
    make = onnx.helper.make_node
    then = onnx.helper.make_graph(
        [make("Relu", ["x"], ["t_relu"]), make("Neg", ["t_relu"], ["t_out"])],
        "then", [], [_vi("t_out", [2, 3])],
    )  # fmt: skip
    other = onnx.helper.make_graph(
        [make("Sigmoid", ["x"], ["e_sig"]), make("Mul", ["e_sig", "two"], ["e_out"])],
        "else", [], [_vi("e_out", [2, 3])],
    )  # fmt: skip
    graph = onnx.helper.make_graph(
        [make("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [_vi("c", [], onnx.TensorProto.BOOL), _vi("x", [2, 3])],
        [_vi("y", [2, 3])],
        [onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _loop_model(nested_if: bool = False, varying: bool = False):
    """y = Loop(n, s=x): s <- s * k + 1 (outer k); the body optionally holds an If on c."""
    make = onnx.helper.make_node
    nodes = [
        make("Identity", ["cond"], ["cond_out"]),
        make("Mul", ["s", "k"], ["l_mul"]),
        make("Add", ["l_mul", "one"], ["s_next"]),
    ]
    outputs = [_vi("cond_out", [], onnx.TensorProto.BOOL), _vi("s_next", [4])]
    if nested_if:
        then = onnx.helper.make_graph(
            [make("Relu", ["s_next"], ["i_relu"])], "then", [], [_vi("i_relu", [4])]
        )
        other = onnx.helper.make_graph(
            [make("Neg", ["s_next"], ["i_neg"])], "else", [], [_vi("i_neg", [4])]
        )
        nodes.append(make("If", ["c"], ["branch"], then_branch=then, else_branch=other))
        outputs.append(_vi("branch", [4]))
    if varying:  # a body value that grows with the iteration: onnxruntime cannot stack it
        nodes += [
            make("Unsqueeze", ["i", "zero"], ["i1"]),
            make("Add", ["i1", "one_i"], ["stop"]),
            make("Slice", ["s_next", "zero", "stop"], ["grow"]),
            make("Sigmoid", ["grow"], ["grow_sig"]),
        ]
    body = onnx.helper.make_graph(
        nodes,
        "body",
        [
            _vi("i", [], onnx.TensorProto.INT64),
            _vi("cond", [], onnx.TensorProto.BOOL),
            _vi("s", [4]),
        ],
        outputs,
    )
    loop_outputs = ["y"] + (["ys"] if nested_if else [])
    graph = onnx.helper.make_graph(
        [make("Loop", ["n", "", "x"], loop_outputs, body=body), make("Relu", ["y"], ["z"])],
        "g",
        [_vi("n", [], onnx.TensorProto.INT64), _vi("c", [], onnx.TensorProto.BOOL), _vi("x", [4])],
        [_vi("z", [4])],
        [
            onnx.numpy_helper.from_array(np.array(0.5, np.float32), "k"),
            onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
            onnx.numpy_helper.from_array(np.array([1], np.int64), "one_i"),
        ],
    )  # fmt: skip
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _loop_states(x, n):
    states, s = [], x
    for _ in range(n):
        s = s * np.float32(0.5) + np.float32(1.0)
        states.append(s)
    return np.stack(states)


def test_probe_returns_the_tensors_of_the_branch_that_ran():
    model = _if_model()
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    feeds = [{"c": np.array(True), "x": x}, {"c": np.array(False), "x": x}]
    with Probe(model, ["t_relu", "e_sig", "y"]) as probe:
        taken, other = list(probe.stream(feeds))
    assert set(taken) == {"t_relu", "y"} and set(other) == {"e_sig", "y"}
    np.testing.assert_allclose(taken["t_relu"], np.maximum(x, 0))
    np.testing.assert_allclose(other["e_sig"], 1 / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_allclose(other["y"], 2 / (1 + np.exp(-x)), rtol=1e-6)
    assert len(model.graph.output) == 1  # the caller's model is untouched
    stats, _ = collect_ranges(model, ["t_relu", "e_sig"], CalibrationData.from_feeds(feeds))
    assert stats["t_relu"].low == 0.0 and stats["e_sig"].maximum < 1.0


def test_probe_stacks_loop_body_tensors_over_the_iterations():
    model = _loop_model()
    x = np.arange(4, dtype=np.float32)
    feeds = [{"n": np.array(3), "c": np.array(True), "x": x}]
    with Probe(model, ["l_mul", "s_next", "s", "z"]) as probe:
        (values,) = list(probe.stream(feeds))
    states = _loop_states(x, 3)
    np.testing.assert_allclose(values["s_next"], states)  # iterations x shape
    np.testing.assert_allclose(values["l_mul"], states - 1.0)
    np.testing.assert_allclose(values["s"], np.concatenate([x[None], states[:-1]]))
    np.testing.assert_allclose(values["z"], np.maximum(states[-1], 0))


def test_probe_reaches_an_if_nested_in_a_loop():
    model = _loop_model(nested_if=True)
    x = np.linspace(-4, 1, 4, dtype=np.float32)
    feeds = [{"n": np.array(2), "c": np.array(c), "x": x} for c in (True, False)]
    with Probe(model, ["i_relu", "i_neg"]) as probe:
        taken, other = list(probe.stream(feeds))
    states = _loop_states(x, 2)
    assert set(taken) == {"i_relu"} and set(other) == {"i_neg"}
    np.testing.assert_allclose(taken["i_relu"], np.maximum(states, 0))
    np.testing.assert_allclose(other["i_neg"], -states)


def test_loop_tensors_of_varying_shape_are_dropped_with_one_warning(caplog):
    model = _loop_model(varying=True)
    feeds = [{"n": np.array(3), "c": np.array(True), "x": np.ones(4, np.float32)}] * 2
    with caplog.at_level(logging.WARNING), Probe(model, ["grow_sig", "l_mul", "z"]) as probe:
        results = list(probe.stream(feeds))
    assert [set(r) for r in results] == [{"z"}, {"z"}]
    assert caplog.text.count("cannot stack") == 1
    stats, _ = collect_ranges(model, ["grow_sig", "l_mul", "z"], CalibrationData.from_feeds(feeds))
    assert set(stats) == {"z"}


def test_probe_stacks_scan_body_tensors():
    make = onnx.helper.make_node
    body = onnx.helper.make_graph(
        [make("Add", ["acc", "row"], ["acc_next"]), make("Relu", ["acc_next"], ["row_out"])],
        "body", [_vi("acc", [3]), _vi("row", [3])], [_vi("acc_next", [3]), _vi("row_out", [3])],
    )  # fmt: skip
    graph = onnx.helper.make_graph(
        [make("Scan", ["init", "xs"], ["final", "ys"], body=body, num_scan_inputs=1,
              scan_output_axes=[0])],
        "g", [_vi("init", [3]), _vi("xs", [5, 3])], [_vi("final", [3]), _vi("ys", [5, 3])],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    xs = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    with Probe(model, ["acc_next", "ys"]) as probe:
        (values,) = list(probe.stream([{"init": np.zeros(3, np.float32), "xs": xs}]))
    np.testing.assert_allclose(values["acc_next"], np.cumsum(xs, axis=0), rtol=1e-5)
    np.testing.assert_allclose(values["ys"], np.maximum(values["acc_next"], 0))
