from __future__ import annotations

import logging

import numpy as np
import onnx.parser
import pytest

from dsopt.errors import UsageError
from dsopt.quant.calibration import (
    BINS,
    CalibrationData,
    collect_ranges,
    entropy_range,
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


def test_mask_fill_values_are_flagged():
    samples = [{"x": np.array([[0.5, -3.4e38, 1.0, 2.0]], np.float32)}]
    stats, _ = collect_ranges(MODEL, ["x", "h"], CalibrationData.from_feeds(samples))
    assert stats["x"].mask_like and not stats["h"].mask_like


def test_unknown_method_is_a_usage_error():
    with pytest.raises(UsageError, match="methods: minmax, percentile, entropy"):
        collect_ranges(MODEL, ["x"], CalibrationData.from_feeds(_samples(1)), method="kl")
