"""`dsopt bench`: latency, peak memory, size, FLOPs and output fidelity of models side by side.

The first model is the baseline: latency ratios and output fidelity are measured against it.
Latency runs interleave the models (one run of each per round, in a rotating order) so that a
drift of the machine (thermal, a neighbour process) hits every model alike; the thread pools
never spin, so one idle session cannot steal the CPU of the next. Sessions use onnxruntime's
default graph optimizations (what a deployment gets), so fidelity includes onnxruntime's own
rewrites. Peak memory is the VmHWM of a fresh process that loads the model and runs it once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dsopt.errors import ModelError, UsageError

__all__ = ["BenchReport", "ModelBench", "bench", "plot", "render"]

Feeds = dict[str, np.ndarray]


@dataclasses.dataclass
class ModelBench:
    """What `bench` measured for one model.

    Attributes:
        path: The model file.
        bytes: File bytes, external data files included.
        flops: FLOPs of the nodes with static shapes (under the benchmark's input shapes).
        macs: Multiply-accumulates of those nodes.
        latency_ms: median, q1, q3, min and max of the timed runs, in milliseconds.
        ratio: This model's median latency over the first model's.
        peak_mb: Peak resident memory (VmHWM) of a fresh process loading and running it once.
        fidelity: Per output (vs the first model): max_abs_error, rel_l2_error, cosine;
            None for the first model.
    """

    path: str
    bytes: int
    flops: int
    macs: int
    latency_ms: dict[str, float]
    ratio: float
    peak_mb: float | None
    fidelity: list[dict[str, Any]] | None

    def worst(self) -> dict[str, float | None]:
        """The worst fidelity over outputs: largest max abs and rel L2 error, smallest cosine."""
        if not self.fidelity:
            return {"max_abs_error": None, "rel_l2_error": None, "cosine": None}

        def pick(key: str, fn: Any) -> float | None:
            values = [o[key] for o in self.fidelity or () if o[key] is not None]
            return fn(values) if values else None

        return {
            "max_abs_error": pick("max_abs_error", max),
            "rel_l2_error": pick("rel_l2_error", max),
            "cosine": pick("cosine", min),
        }


@dataclasses.dataclass
class BenchReport:
    """The benchmark of every model, the baseline first."""

    models: list[ModelBench]
    threads: int
    runs: int
    warmup: int
    inputs: str
    baseline_peak_mb: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable data; each model's `worst` fidelity is included."""
        return {
            "threads": self.threads,
            "runs": self.runs,
            "warmup": self.warmup,
            "inputs": self.inputs,
            "baseline_peak_mb": self.baseline_peak_mb,
            "models": [{**dataclasses.asdict(m), "worst": m.worst()} for m in self.models],
        }


def model_bytes(path: str | os.PathLike[str]) -> int:
    """The model file's bytes plus those of every external data file it references."""
    path = Path(path)
    proto = onnx.load(path, load_external_data=False)
    locations: set[str] = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            if entries.get("location"):
                locations.add(entries["location"])
    total = path.stat().st_size
    for location in sorted(locations):
        data = path.parent / location
        if data.is_file():
            total += data.stat().st_size
    return total


def _flops(path: Path, feeds: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """FLOPs and MACs from `dsopt inspect`'s counter, with inputs fixed to the feeds' shapes."""
    from dsopt import summary

    proto = onnx.load(path, load_external_data=False)
    for value in proto.graph.input:
        if value.name in feeds and value.type.HasField("tensor_type"):
            shape = value.type.tensor_type.shape
            dims = feeds[value.name].shape
            if len(shape.dim) == len(dims):
                for dim, size in zip(shape.dim, dims, strict=True):
                    dim.Clear()
                    dim.dim_value = int(size)
    result = summary.summarize(proto, base_dir=path.parent)
    return result.flops, result.macs


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    # Interleaved sessions: a spinning idle pool would steal the next session's CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors derive from Exception only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"onnxruntime cannot load '{path}': {first}") from e


def _run(session: Any, feeds: Feeds, path: Path) -> dict[str, np.ndarray]:
    try:
        values = session.run(None, feeds)
    except Exception as e:  # onnxruntime's errors derive from Exception only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"onnxruntime failed to run '{path}': {first}") from e
    return {o.name: np.asarray(v) for o, v in zip(session.get_outputs(), values, strict=True)}


def _feeds(
    first: Path, inputs: str | None, shapes: Mapping[str, Sequence[int]] | None, seed: int
) -> tuple[Feeds, str]:
    from dsopt import numerics

    proto = onnx.load(first, load_external_data=False)
    if inputs:
        samples = numerics.load_inputs(inputs, proto)
        if not samples:
            raise UsageError(f"--inputs {inputs}: holds no sample")
        return {k: np.asarray(v) for k, v in samples[0].items()}, inputs
    feeds = numerics.random_inputs(proto, shapes=shapes, seed=seed)
    return {k: np.asarray(v) for k, v in feeds.items()}, f"random (seed {seed})"


def _stats(times: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(times, dtype=np.float64) * 1e3
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return {
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "min": float(ms.min()),
        "max": float(ms.max()),
    }


def _peak_mb(path: Path | None, feeds_file: Path, threads: int) -> float:
    """VmHWM of a fresh Python that loads `path` and runs it once (None: imports only)."""
    command = [sys.executable, "-m", "dsopt.bench", str(path or ""), str(feeds_file), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ModelError(f"peak memory run of '{path}' failed (exit {done.returncode}): {tail}")
    return float(done.stdout.strip().splitlines()[-1])


def _child(path: str, feeds_file: str, threads: int) -> None:
    """The peak-memory child: load, run once, print VmHWM in MB."""
    import onnxruntime  # noqa: F401 - the baseline counts the runtime's own footprint

    if path:
        with np.load(feeds_file) as data:
            feeds = {k: data[k] for k in data.files}
        session = _session(Path(path), threads)
        _run(session, feeds, Path(path))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(int(line.split()[1]) / 1024)
            return
    import resource

    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def bench(
    models: Sequence[str | os.PathLike[str]],
    *,
    inputs: str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    memory: bool = True,
    seed: int = 0,
) -> BenchReport:
    """Benchmarks `models` on one input sample; the first model is the baseline.

    Args:
        models: Model files; the first is the reference for ratios and fidelity.
        inputs: An .npz (or folder / test_data_set) whose first sample is used; None makes a
            random one for the first model (with `shapes` fixing dynamic dims).
        shapes: Input shape overrides for random inputs.
        threads: onnxruntime intra-op threads.
        runs: Timed runs per model.
        warmup: Untimed runs per model first.
        memory: Measure peak memory in fresh subprocesses.
        seed: Seed of random inputs.

    Raises:
        UsageError: Bad counts, a missing file, or models whose inputs differ.
        ModelError: onnxruntime cannot load or run a model.
    """
    if not models:
        raise UsageError("bench needs at least one MODEL")
    if runs < 1 or warmup < 0 or threads < 1:
        raise UsageError(
            f"bench: --runs ({runs}) and --threads ({threads}) must be >= 1, warm-up >= 0"
        )
    paths = [Path(m) for m in models]
    for path in paths:
        if not path.is_file():
            raise UsageError(f"bench: model '{path}' does not exist")
    feeds, source = _feeds(paths[0], inputs, shapes, seed)
    sessions = [_session(p, threads) for p in paths]
    expected = sorted(feeds)
    for path, session in zip(paths, sessions, strict=True):
        names = sorted(i.name for i in session.get_inputs())
        if names != expected:
            raise UsageError(
                f"bench: '{path}' takes inputs {names}, the first model {expected}",
                hint="bench compares variants of one model; give models with the same inputs",
            )
    outputs = []
    for path, session in zip(paths, sessions, strict=True):
        for _ in range(max(warmup, 1)):
            result = _run(session, feeds, path)
        outputs.append(result)
    times: list[list[float]] = [[] for _ in paths]
    for round_ in range(runs):
        for k in range(len(paths)):
            i = (k + round_) % len(paths)
            started = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append(time.perf_counter() - started)
    del sessions
    peaks: list[float | None] = [None] * len(paths)
    baseline_peak = None
    if memory:
        with tempfile.TemporaryDirectory(prefix="dsopt-bench-") as tmp:
            feeds_file = Path(tmp) / "feeds.npz"
            np.savez(feeds_file, **feeds)
            baseline_peak = _peak_mb(None, feeds_file, threads)
            peaks = [_peak_mb(p, feeds_file, threads) for p in paths]
    from dsopt.numerics import compare_outputs

    reports = []
    base_median = _stats(times[0])["median"]
    for i, path in enumerate(paths):
        latency = _stats(times[i])
        fidelity = None
        if i > 0:
            fidelity = [
                {
                    "output": c.name,
                    "max_abs_error": c.max_abs_error,
                    "rel_l2_error": c.rel_l2_error,
                    "cosine": c.cosine,
                }
                for c in compare_outputs(outputs[0], outputs[i], rtol=0.0, atol=0.0)
            ]
        flops, macs = _flops(path, feeds)
        reports.append(
            ModelBench(
                path=str(path),
                bytes=model_bytes(path),
                flops=flops,
                macs=macs,
                latency_ms=latency,
                ratio=latency["median"] / base_median if base_median > 0 else float("nan"),
                peak_mb=peaks[i],
                fidelity=fidelity,
            )
        )
    return BenchReport(reports, threads, runs, warmup, source, baseline_peak)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(report: BenchReport, console: Any) -> None:
    """Prints the benchmark as a table."""
    from rich.table import Table

    from dsopt.summary import human_bytes, human_count

    title = (
        f"bench: {report.runs} interleaved runs after {report.warmup} warm-up, "
        f"{report.threads} thread(s), inputs {report.inputs}"
    )
    table = Table(title=title)
    columns = ("model", "median ms", "IQR ms", "min-max ms", "ratio", "peak MB", "size")
    for column in (*columns, "FLOPs", "max abs", "rel L2", "cosine"):
        table.add_column(column, overflow="fold")
    for m in report.models:
        lat, worst = m.latency_ms, m.worst()
        table.add_row(
            Path(m.path).name,
            f"{lat['median']:.3f}",
            f"{lat['q1']:.3f}-{lat['q3']:.3f}",
            f"{lat['min']:.3f}-{lat['max']:.3f}",
            f"{m.ratio:.2f}x",
            _fmt(m.peak_mb, ".1f"),
            human_bytes(m.bytes),
            human_count(m.flops),
            _fmt(worst["max_abs_error"], ".3g"),
            _fmt(worst["rel_l2_error"], ".3g"),
            _fmt(worst["cosine"], ".6f"),
        )
    if console.width < 132 and not console.is_terminal:
        # A pipe gets 80 columns from rich; this table needs more to stay readable.
        from rich.console import Console

        console = Console(file=console.file, width=132, highlight=False)
    console.print(table)
    if report.baseline_peak_mb is not None:
        console.print(
            f"peak MB includes {report.baseline_peak_mb:.1f} MB of Python + onnxruntime "
            "before any model is loaded"
        )


def plot(report: BenchReport, out: str | os.PathLike[str]) -> None:
    """Writes a PNG bar chart: latency, peak memory, size and FLOPs per model."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise UsageError(
            "--plot needs pillow, which is not installed", hint="pip install dsopt[bench]"
        ) from None
    panels = [
        ("median latency (ms)", [m.latency_ms["median"] for m in report.models]),
        ("peak memory (MB)", [m.peak_mb or 0.0 for m in report.models]),
        ("size (MB)", [m.bytes / 1e6 for m in report.models]),
        ("GFLOPs", [m.flops / 1e9 for m in report.models]),
    ]
    if report.baseline_peak_mb is None:  # measured without memory
        del panels[1]
    colors = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188)]
    width, panel_h, margin = 900, 170, 10
    label_w = 220
    image = Image.new("RGB", (width, margin + len(panels) * panel_h), "white")
    draw = ImageDraw.Draw(image)
    names = [Path(m.path).name for m in report.models]
    bar_h = max(8, (panel_h - 40) // max(len(names), 1) - 4)
    for p, (title, values) in enumerate(panels):
        top = margin + p * panel_h
        draw.text((margin, top), title, fill="black")
        peak = max(values) or 1.0
        for i, (name, value) in enumerate(zip(names, values, strict=True)):
            y = top + 20 + i * (bar_h + 4)
            draw.text((margin, y), name[:34], fill="black")
            length = int((width - label_w - 90) * value / peak)
            draw.rectangle(
                [label_w, y, label_w + max(length, 1), y + bar_h], fill=colors[i % len(colors)]
            )
            draw.text((label_w + length + 6, y), f"{value:.3g}", fill="black")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")


def to_json(report: BenchReport) -> str:
    """The report as indented JSON."""
    return json.dumps(report.to_dict(), indent=2)


if __name__ == "__main__":  # the peak-memory child
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
