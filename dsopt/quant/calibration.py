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

from dsopt.errors import ModelError, UsageError
from dsopt.numerics import _input_specs, _Session, _validate_sample, random_inputs

__all__ = [
    "METHODS",
    "CalibrationData",
    "Probe",
    "RangeStats",
    "collect_ranges",
    "entropy_range",
    "mse_range",
    "percentile_range",
]

logger = logging.getLogger(__name__)

Method = Literal["minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")

#: Histogram resolution of the percentile and entropy observers.
BINS = 2048
#: Tensors whose magnitude passes this are mask fill values (float-min, -1e9), not activations.
MASK_MAGNITUDE = 1e8
#: Clipping thresholds the mse observer evaluates, evenly spaced up to the largest magnitude.
_MSE_CANDIDATES = 512


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
    extremes: dict[str, list[float]] = {}
    samples = 0
    with Probe(model, names) as probe:
        for values in probe.stream(data):
            samples += 1
            for name, value in _finite(values):
                seen = extremes.setdefault(name, [np.inf, -np.inf])
                seen[0] = min(seen[0], float(value.min()))
                seen[1] = max(seen[1], float(value.max()))
        if samples == 0:
            raise UsageError("the calibration data holds no samples")
        for name in probe.dropped:  # seen on earlier samples only: no range for them
            extremes.pop(name, None)
        histograms: dict[str, np.ndarray] = {}
        if method != "minmax":
            for values in probe.stream(data):
                for name, value in _finite(values):
                    low, high = extremes[name]
                    if high > low and max(abs(low), abs(high)) < MASK_MAGNITUDE:
                        counts, _ = np.histogram(value, bins=BINS, range=(low, high))
                        # Exact zeros (after Relu, padding) quantize exactly at any range:
                        # left in, they would pull entropy's threshold down.
                        counts[_bin_of_zero(low, high)] -= np.count_nonzero(value == 0)
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
        elif hist is not None and method == "mse":
            chosen = mse_range(hist, low, high)
        stats[name] = RangeStats(low, high, min(chosen[0], 0.0), max(chosen[1], 0.0), hist)
    facts = {
        "samples": samples,
        "passes": 1 if method == "minmax" else 2,
        "tensors": len(stats),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return stats, facts


class Probe:
    """An onnxruntime session of `model` that also returns the named intermediate tensors.

    Use as a context manager; `stream(data)` yields, per calibration feed, the float values of
    the named tensors that were computed (a tensor onnxruntime cannot expose is absent).
    Passes that calibrate something other than ranges (channel maxima, means, Hessians)
    reduce these values as they stream past, one sample in memory at a time.

    Tensors inside If/Loop/Scan bodies (nested too) are threaded out to the top graph
    (`_thread_outputs`): an If branch's tensor comes out when that branch ran (a branch not
    taken gives nothing for that feed); a Loop or Scan body's tensor comes out stacked over
    the iterations (iterations x shape). When per-iteration shapes differ onnxruntime cannot
    stack them: those stacked tensors are then dropped (one warning) and the rest returned.
    """

    def __init__(self, model: onnx.ModelProto, names: Sequence[str], label: str = "calibration"):
        self.names = list(dict.fromkeys(names))
        self._model = model
        self._label = label
        probe, self._inner, self._stacked = _thread_outputs(model, self.names)
        #: Names given up on (Loop/Scan values onnxruntime could not stack), after the fact.
        self.dropped: set[str] = set()
        self._session = _Session(probe, label=label)

    def __enter__(self) -> Probe:
        self._session.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._session.__exit__(*exc)

    def stream(self, data: Iterable[Mapping[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """The named float tensors of each feed of `data`."""
        for feed in data:
            outputs = self._run(feed)
            values: dict[str, np.ndarray] = {}
            for name in self.names:
                if name in self.dropped:
                    continue
                outer = self._inner.get(name)
                value = outputs.get(name if outer is None else outer)
                if value is None or value.dtype.kind != "f":
                    continue
                if outer is not None and value.size == 0:
                    continue  # an If branch that did not run (or a Loop of no iteration)
                values[name] = value
            yield values

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._session.run(feed)
        except ModelError as e:
            if not self._stacked:
                raise
            # Most likely a Loop/Scan whose per-iteration shapes differ: onnxruntime cannot
            # stack them (its message names no output), so drop every stacked tensor.
            logger.warning(
                "%s: %d tensor(s) inside Loop/Scan bodies have per-iteration shapes that "
                "onnxruntime cannot stack (%s); calibrating without them",
                self._label,
                len(self._stacked),
                e.message,
            )
            self.dropped |= self._stacked
            kept = [n for n in self.names if n not in self._stacked]
            self._session.close()
            probe, self._inner, self._stacked = _thread_outputs(self._model, kept, stack=False)
            self._session = _Session(probe, label=self._label)
            return self._session.run(feed)


def _finite(values: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """Each non-empty value with its non-finite elements dropped."""
    for name, value in values.items():
        if value.size and not np.isfinite(value).all():
            value = value[np.isfinite(value)]
        if value.size:
            yield name, value


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (typed as float where unknown)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    _add_graph_outputs(probe.graph, names)
    return probe


def _add_graph_outputs(graph: onnx.GraphProto, names: Sequence[str]) -> None:
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


#: Where a subgraph sits: the graph holding its node, the node, and the attribute name.
_Parent = tuple[onnx.GraphProto, onnx.NodeProto, str]


def _thread_outputs(
    model: onnx.ModelProto, names: Sequence[str], *, stack: bool = True
) -> tuple[onnx.ModelProto, dict[str, str], set[str]]:
    """A copy of `model` that outputs `names`, those inside subgraph bodies threaded out.

    A body tensor goes out through an Identity in its body, then outward level by level: an If
    branch gets it as an extra output and the other branch an empty tensor of its type (ONNX
    If needs matching types only; onnxruntime 1.32 accepts differing shapes, rank included);
    a Loop body as an extra scan output after the carried values, a Scan body likewise, so
    the value comes out stacked over iterations. Names in no body, or in a body of another op,
    are handled as top-level names (`_with_outputs`), so top-level behaviour is unchanged.
    `stack=False` leaves out body tensors that would pass through a Loop or Scan.

    Returns:
        The probe model, the top-level output name of each threaded name, and the threaded
        names that come out stacked (through a Loop or Scan).
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    top = probe.graph
    parents: dict[int, _Parent] = {}
    owner: dict[str, onnx.GraphProto] = {}
    used: set[str] = set()
    for graph, parent in _graphs_with_parents(top, None):
        if parent is not None:
            parents[id(graph)] = parent
        defined = [
            *(v.name for v in graph.input),
            *(t.name for t in graph.initializer),
            *(o for n in graph.node for o in n.output),
        ]
        used.update(defined)
        used.update(i for n in graph.node for i in n.input)
        used.update(v.name for v in graph.output)
        if parent is not None:
            for name in defined:
                owner.setdefault(name, graph)
    top_names = _top_names(top)
    inner = [n for n in names if n in owner and n not in top_names]
    if not inner:
        _add_graph_outputs(top, names)
        return probe, {}, set()
    types = _elem_types(probe)
    threaded: dict[str, str] = {}
    stacked: set[str] = set()
    counter = [0]

    def fresh(base: str) -> str:
        while True:
            counter[0] += 1
            candidate = f"{base}__probe{counter[0]}"
            if candidate not in used:
                used.add(candidate)
                return candidate

    for name in inner:
        path = _path_to_top(owner[name], parents)
        if path is None or (not stack and any(node.op_type != "If" for _, node, _ in path)):
            continue
        elem = types.get(name, onnx.TensorProto.FLOAT)
        graph = owner[name]
        current = fresh(name)
        graph.node.append(onnx.helper.make_node("Identity", [name], [current]))
        for parent_graph, node, attr in path:
            current = _lift(graph, node, attr, current, elem, fresh)
            graph = parent_graph
        top.output.append(onnx.helper.make_tensor_value_info(current, elem, None))
        threaded[name] = current
        if any(node.op_type != "If" for _, node, _ in path):
            stacked.add(name)
    _add_graph_outputs(top, [n for n in names if n not in threaded])
    return probe, threaded, stacked


def _top_names(graph: onnx.GraphProto) -> set[str]:
    """Names defined in the top graph itself."""
    return {
        *(v.name for v in graph.input),
        *(t.name for t in graph.initializer),
        *(o for n in graph.node for o in n.output),
    }


def _graphs_with_parents(
    graph: onnx.GraphProto, parent: _Parent | None
) -> Iterator[tuple[onnx.GraphProto, _Parent | None]]:
    yield graph, parent
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs_with_parents(attr.g, (graph, node, attr.name))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs_with_parents(sub, (graph, node, attr.name))


def _path_to_top(graph: onnx.GraphProto, parents: dict[int, _Parent]) -> list[_Parent] | None:
    """The (parent graph, node, attribute) chain from `graph` outward; None past other ops."""
    path = []
    while id(graph) in parents:
        parent = parents[id(graph)]
        node = parent[1]
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("If", "Loop", "Scan"):
            return None
        path.append(parent)
        graph = parent[0]
    return path


def _lift(
    body: onnx.GraphProto,
    node: onnx.NodeProto,
    attr: str,
    name: str,
    elem: int,
    fresh: Callable[[str], str],
) -> str:
    """Makes `name` of `body` an extra output of `node`; returns that output's name."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "If":
        other = attrs["else_branch" if attr == "then_branch" else "then_branch"].g
        empty = fresh(name)
        other.node.append(
            onnx.helper.make_node(
                "Constant", [], [empty], value=onnx.helper.make_tensor(empty, elem, [0], [])
            )
        )
        other.output.append(onnx.helper.make_tensor_value_info(empty, elem, None))
    else:
        # Loop outputs: carried values then scan outputs (body outputs minus `cond`); Scan:
        # states then scan outputs (as many as the body's). Omitted trailing ones are named.
        count = len(body.output) - (1 if node.op_type == "Loop" else 0)
        while len(node.output) < count:
            node.output.append(fresh(f"{node.name or node.op_type}_unused"))
        for key in ("scan_output_axes", "scan_output_directions"):
            if key in attrs:
                attrs[key].ints.append(0)
    body.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    outer = fresh(name)
    node.output.append(outer)
    return outer


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor onnx shape inference (or the model) declares."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort; declared types remain
        inferred = model
    types: dict[str, int] = {}
    for graph, _ in _graphs_with_parents(inferred.graph, None):
        for tensor in graph.initializer:
            types[tensor.name] = tensor.data_type
        for value in (*graph.input, *graph.value_info, *graph.output):
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                types[value.name] = value.type.tensor_type.elem_type
    return types


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


def _bin_of_zero(low: float, high: float) -> int:
    """The histogram bin over [low, high] that holds 0.0."""
    return int(np.clip(np.floor((0.0 - low) / (high - low) * BINS), 0, BINS - 1))


def mse_range(hist: np.ndarray, low: float, high: float, levels: int = 256) -> tuple[float, float]:
    """The clipping range that minimizes the expected squared error of `levels`-step rounding.

    For each of `_MSE_CANDIDATES` thresholds T up to the largest magnitude, values inside the
    range cost the rounding noise step^2 / 12 and values beyond it their clipping distance
    squared; signed tensors clip |x| at T (the range [max(low, -T), min(high, T)]),
    non-negative ones [low, low + T].
    """
    edges = np.linspace(low, high, len(hist) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    counts = hist.astype(np.float64)
    magnitude = centers - low if low >= 0.0 else np.abs(centers)
    top = high - low if low >= 0.0 else max(abs(low), abs(high))
    thresholds = np.linspace(top / _MSE_CANDIDATES, top, _MSE_CANDIDATES)
    span = thresholds if low >= 0.0 else np.minimum(high, thresholds) - np.maximum(low, -thresholds)
    noise = (span / (levels - 1)) ** 2 / 12
    beyond = np.maximum(magnitude[None, :] - thresholds[:, None], 0.0)
    inside = (beyond == 0).astype(np.float64) @ counts
    error = noise * inside + (beyond**2) @ counts
    best = float(thresholds[int(np.argmin(error))])
    if low >= 0.0:
        return low, min(high, low + best)
    return max(low, -best), min(high, best)


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
