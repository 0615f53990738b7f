"""Calibration data and streaming range observers for static activation quantization.

Memory stays bounded by one sample's activations plus one histogram per tensor: samples are
read one file at a time and ranges are reduced as they stream past, never stored.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from dsopt.errors import UsageError
from dsopt.numerics import _input_specs, _Session, _validate_sample, random_inputs

__all__ = [
    "METHODS",
    "CalibrationData",
    "RangeStats",
    "collect_ranges",
    "entropy_range",
    "percentile_range",
]

logger = logging.getLogger(__name__)

Method = Literal["minmax", "percentile", "entropy"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy")

#: Histogram resolution of the percentile and entropy observers.
BINS = 2048
#: Tensors whose magnitude passes this are mask fill values (float-min, -1e9), not activations.
MASK_MAGNITUDE = 1e8


class CalibrationData:
    """Re-iterable calibration feeds, read lazily (one sample in memory at a time).

    Build with `load` (a folder of `.npz` files, one feed each; or one `.npz` whose arrays carry
    an extra leading axis over samples), `from_feeds`, or `synthetic` (random, warns).
    """

    def __init__(
        self, samples: Callable[[], Iterator[dict[str, np.ndarray]]], count: int, source: str
    ):
        self._samples = samples
        self.count = count
        self.source = source

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._samples()

    def __len__(self) -> int:
        return self.count

    def limited(self, count: int) -> CalibrationData:
        """The first `count` samples (all when `count` <= 0)."""
        if count <= 0 or count >= self.count:
            return self

        def first() -> Iterator[dict[str, np.ndarray]]:
            for index, sample in enumerate(self._samples()):
                if index >= count:
                    return
                yield sample

        return CalibrationData(first, count, self.source)

    @classmethod
    def from_feeds(cls, feeds: Sequence[Mapping[str, np.ndarray]]) -> CalibrationData:
        """Feeds already in memory (the Python API)."""
        frozen = [dict(f) for f in feeds]
        return cls(lambda: iter(frozen), len(frozen), "feeds")

    @classmethod
    def load(cls, path: str | Path, model: onnx.ModelProto) -> CalibrationData:
        """Reads `--calib PATH` for `model`, checking every sample against its inputs.

        Raises:
            UsageError: The path is missing or empty, or a sample lacks an input, has the wrong
                dtype or a shape the model cannot take (the message names the file and array).
        """
        root = Path(path)
        specs = _input_specs(model)
        if root.is_dir():
            files = sorted(root.glob("*.npz"))
            if not files:
                raise UsageError(f"--calib {root}: the folder holds no .npz files")

            def per_file() -> Iterator[dict[str, np.ndarray]]:
                for file in files:
                    sample = _read_npz(file)
                    _validate_sample(sample, specs, f"--calib {file}")
                    yield sample

            return cls(per_file, len(files), str(root))
        if root.suffix != ".npz" or not root.is_file():
            raise UsageError(
                f"--calib {root}: not a .npz file or a folder of .npz files",
                hint="save one feed per file with numpy.savez, or stack samples on a new first "
                "axis in one .npz",
            )
        stacked = _read_npz(root)
        counts = {name: (a.shape[0] if a.ndim else 0) for name, a in stacked.items()}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise UsageError(
                f"--calib {root}: arrays must share a leading sample axis, got "
                + ", ".join(f"{n} {list(stacked[n].shape)}" for n in counts),
                hint="stack the samples: numpy.savez(path, x=numpy.stack(samples))",
            )
        count = next(iter(counts.values()))
        _validate_sample({n: a[0] for n, a in stacked.items()}, specs, f"--calib {root}")

        def rows() -> Iterator[dict[str, np.ndarray]]:
            for index in range(count):
                yield {name: np.ascontiguousarray(a[index]) for name, a in stacked.items()}

        return cls(rows, count, str(root))

    @classmethod
    def synthetic(
        cls,
        model: onnx.ModelProto,
        count: int = 8,
        *,
        shapes: Mapping[str, Sequence[int]] | None = None,
        seed: int = 0,
    ) -> CalibrationData:
        """Random feeds from the model's input declarations; ranges from them are guesses."""
        logger.warning(
            "calibrating on %d synthetic random samples: activation ranges are guesses; pass "
            "--calib with real inputs for a faithful int8 model",
            count,
        )
        feeds = [
            random_inputs(model, shapes=dict(shapes or {}), seed=seed + i) for i in range(count)
        ]
        return cls(lambda: iter(feeds), count, "synthetic")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: np.asarray(archive[name]) for name in archive.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"--calib {path}: cannot read it ({e})") from e


@dataclasses.dataclass
class RangeStats:
    """What calibration learned about one tensor: its extremes and the range to quantize."""

    minimum: float
    maximum: float
    low: float
    high: float
    histogram: np.ndarray | None = None

    @property
    def mask_like(self) -> bool:
        """Holds fill values (float-min, -1e9 masks) that would blow up one scale."""
        return max(abs(self.minimum), abs(self.maximum)) >= MASK_MAGNITUDE


def collect_ranges(
    model: onnx.ModelProto,
    tensors: Iterable[str],
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    method: Method = "minmax",
    percentile: float = 99.999,
) -> tuple[dict[str, RangeStats], dict[str, Any]]:
    """Runs `model` over `data` in onnxruntime and reduces the range of each named tensor.

    Min-max needs one pass; percentile and entropy a second one that fills a histogram per
    tensor over the min-max range (so memory is one sample's tensors plus the histograms).
    Non-finite values are ignored.

    Returns:
        The stats per tensor (tensors never computed are absent) and run facts: samples,
        passes, peak resident memory in MB.
    """
    if method not in METHODS:
        raise UsageError(
            f"calibration method '{method}' is unknown (methods: {', '.join(METHODS)})"
        )
    names = list(dict.fromkeys(tensors))
    probe = _with_outputs(model, names)
    extremes: dict[str, list[float]] = {}
    samples = 0
    with _Session(probe, label="calibration") as session:
        for feed in data:
            samples += 1
            for name, value in _values(session, feed, names):
                seen = extremes.setdefault(name, [np.inf, -np.inf])
                seen[0] = min(seen[0], float(value.min()))
                seen[1] = max(seen[1], float(value.max()))
        if samples == 0:
            raise UsageError("the calibration data holds no samples")
        histograms: dict[str, np.ndarray] = {}
        if method != "minmax":
            for feed in data:
                for name, value in _values(session, feed, names):
                    low, high = extremes[name]
                    if high > low and max(abs(low), abs(high)) < MASK_MAGNITUDE:
                        counts, _ = np.histogram(value, bins=BINS, range=(low, high))
                        histograms[name] = histograms.get(name, 0) + counts
    stats: dict[str, RangeStats] = {}
    for name, (low, high) in extremes.items():
        if not np.isfinite(low) or not np.isfinite(high):
            continue
        hist = histograms.get(name)
        chosen = (low, high)
        if hist is not None and method == "percentile":
            chosen = percentile_range(hist, low, high, percentile)
        elif hist is not None and method == "entropy":
            chosen = entropy_range(hist, low, high)
        stats[name] = RangeStats(low, high, min(chosen[0], 0.0), max(chosen[1], 0.0), hist)
    facts = {
        "samples": samples,
        "passes": 1 if method == "minmax" else 2,
        "tensors": len(stats),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return stats, facts


def _values(
    session: _Session, feed: Mapping[str, np.ndarray], names: Sequence[str]
) -> Iterator[tuple[str, np.ndarray]]:
    outputs = session.run(feed)
    for name in names:
        value = outputs.get(name)
        if value is None or value.dtype.kind != "f" or value.size == 0:
            continue
        value = value[np.isfinite(value)] if not np.isfinite(value).all() else value
        if value.size:
            yield name, value


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (typed as float where unknown)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    present = {o.name for o in graph.output}
    typed = {v.name: v for v in (*graph.value_info, *graph.input)}
    for name in names:
        if name in present:
            continue
        if name in typed:
            value = onnx.ValueInfoProto()
            value.CopyFrom(typed[name])
            graph.output.append(value)
        else:
            graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
        present.add(name)
    return probe


def percentile_range(
    hist: np.ndarray, low: float, high: float, percentile: float
) -> tuple[float, float]:
    """The two-sided `percentile` range of a histogram over [low, high]."""
    cumulative = np.cumsum(hist, dtype=np.float64)
    total = cumulative[-1]
    edges = np.linspace(low, high, len(hist) + 1)
    tail = total * (100.0 - percentile) / 100.0
    first = int(np.searchsorted(cumulative, tail, side="right"))
    last = int(np.searchsorted(cumulative, total - tail, side="left"))
    return float(edges[min(first, len(hist) - 1)]), float(edges[min(last + 1, len(hist))])


def entropy_range(
    hist: np.ndarray, low: float, high: float, levels: int = 128
) -> tuple[float, float]:
    """The clipping range that minimizes KL(P || Q) between the tensor and its quantized form.

    TensorRT's entropy calibration on |x|: for each candidate threshold T, P is the histogram
    up to T (outliers folded into the last bin) and Q the histogram up to T without them,
    merged into `levels` bins and spread back over the bins that held values; the
    range is [max(low, -T), min(high, T)]. Non-negative tensors use x itself and 2 * `levels`.
    """
    edges = np.linspace(low, high, len(hist) + 1)
    if low >= 0.0:
        magnitude, top, nlevels = hist.astype(np.float64), high, 2 * levels
        origin = low
    else:
        top = max(abs(low), abs(high))
        centers = (edges[:-1] + edges[1:]) / 2
        magnitude, _ = np.histogram(np.abs(centers), bins=len(hist), range=(0.0, top), weights=hist)
        origin, nlevels = 0.0, levels
    width = (top - origin) / len(magnitude)
    best, best_kl = len(magnitude), np.inf
    for stop in range(nlevels, len(magnitude) + 1, max(1, len(magnitude) // 256)):
        kl = _kl_of_threshold(magnitude, stop, nlevels)
        if kl < best_kl:
            best, best_kl = stop, kl
    threshold = origin + best * width
    if low >= 0.0:
        return low, min(high, threshold)
    return max(low, -threshold), min(high, threshold)


def _kl_of_threshold(hist: np.ndarray, stop: int, levels: int) -> float:
    sliced = hist[:stop].astype(np.float64)
    reference = sliced.copy()
    reference[-1] += hist[stop:].sum()  # P: clipped values land in the last bin
    nonzero = sliced > 0
    group = (np.arange(stop) * levels) // stop
    # Q: the slice without the clipped mass, merged into `levels` bins and spread back.
    sums = np.bincount(group, weights=sliced, minlength=levels)
    used = np.bincount(group, weights=nonzero, minlength=levels)
    candidate = np.where(nonzero, sums[group] / np.maximum(used[group], 1), 0.0)
    p = reference / reference.sum()
    q = candidate / max(candidate.sum(), 1e-30)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-30))))
