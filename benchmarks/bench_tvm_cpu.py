"""x86 TVM libraries from `dsopt compile --target x86` against onnxruntime, per CPU schedule set.

For each model, `dsopt.compile(model, target="x86", shapes=..., options={"schedules": S})` builds
one `model.so` per schedule set S (`--schedules`, default `none,dsopt`: TVM's unscheduled fused
pipeline and dsopt's default CPU schedules). The libraries run in Relax VMs with
`TVM_NUM_THREADS=2`; onnxruntime runs the source model with `intra_op_num_threads=2`,
`inter_op_num_threads=1` and its graph optimizations on (`ORT_ENABLE_ALL`).

Timing: `--runs` rounds (default 20); in each round every variant (the onnxruntime session and
each library) runs once untimed, to settle after the previous variant's threads (onnxruntime
spins after a run), then once timed. Reported: the median per variant, its ratio to
onnxruntime's median, the compile seconds (import + TVM build, from the manifest), the schedule
counts and the max abs error of the first run against onnxruntime's outputs.

With `--tune-minutes N` one more library, `tuned`, is MetaSchedule-tuned for N minutes on
top of dsopt's schedules (`dsopt compile --tune-minutes N`, a fresh tuning database per run
unless `--tune-db DIR`), and timed in the same rounds.

Usage:
    python benchmarks/bench_tvm_cpu.py [--models NAME ...] [--runs 20] [--schedules none,dsopt]
    python benchmarks/bench_tvm_cpu.py --models ppocr_det --shape x=1,3,320,320
    python benchmarks/bench_tvm_cpu.py --models resnet18_style --schedules dsopt --tune-minutes 20
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import argparse  # noqa: E402 - TVM_NUM_THREADS must be set before TVM's thread pool starts
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import dsopt  # noqa: E402
from dsopt import _tvm  # noqa: E402

MODELS_DIR = Path(__file__).parent / "models"
#: name -> input shapes.
MODELS = {
    "ppocr_cls": {"x": [1, 3, 48, 192]},
    "ppocr_det": {"x": [1, 3, 640, 640]},
    "ppocr_rec": {"x": [1, 3, 48, 320]},
    "resnet18_style": {"input": [1, 3, 224, 224]},
    "bert_6l_384h": {"input_ids": [1, 128], "attention_mask": [1, 128], "token_type_ids": [1, 128]},
}


def _feeds(session: ort.InferenceSession, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in session.get_inputs():
        shape = shapes[inp.name]
        if "int64" in inp.type:
            if "mask" in inp.name:
                feeds[inp.name] = np.ones(shape, np.int64)
            elif "type" in inp.name:
                feeds[inp.name] = np.zeros(shape, np.int64)
            else:
                feeds[inp.name] = rng.integers(0, 100, shape, dtype=np.int64)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _library_runner(library: Path, feeds: list[np.ndarray]):
    tvm = _tvm._load()
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in feeds]

    def run():
        out = vm["main"](*args)
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]

    return run


def interleaved_times(runners: dict[str, Any], runs: int) -> dict[str, list[float]]:
    """Seconds per run of each runner: `runs` rounds, each runner settled once, then timed."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for key, run in runners.items():
            run()  # settle
            started = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - started)
    return times


def bench(
    name: str,
    shapes: dict[str, list[int]],
    schedules: list[str],
    runs: int,
    tune: dict[str, Any] | None = None,
) -> None:
    source = MODELS_DIR / f"{name}.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    feeds = _feeds(session, shapes)
    reference = session.run(None, feeds)
    runners = {"onnxruntime": lambda: session.run(None, feeds)}
    info = {}
    variants = [(s, s, None) for s in schedules]
    if tune:
        variants.append(("tuned", "dsopt", tune))
    with tempfile.TemporaryDirectory() as tmp:
        for s, schedule_set, tuning in variants:
            out = Path(tmp) / s
            if tuning and "db" not in tuning:
                tuning = {**tuning, "db": str(Path(tmp) / "tune-db")}
            started = time.perf_counter()
            dsopt.compile(
                source, target="x86", shapes=shapes, outdir=out, check=False,
                options={"schedules": schedule_set}, tune=tuning,
            )  # fmt: skip
            wall = time.perf_counter() - started
            manifest = json.loads((out / "manifest.json").read_text())
            library = next(a for a in manifest["artifacts"] if a["role"] == "library")
            order = [i["name"] for i in manifest["inputs"]]
            runner = _library_runner(out / library["path"], [feeds[n] for n in order])
            error = max(
                float(np.max(np.abs(g.astype(np.float64) - w)))
                for g, w in zip(runner(), reference, strict=True)
            )
            counts = dict(manifest["tvm"]["schedules"])
            if tuning:
                summary = manifest["tvm"].get("tuning", {})
                kept = ("seconds", "trials", "tasks", "tasks_tuned", "cost_model")
                counts.update({f"tuning {k}": summary[k] for k in kept if k in summary})
            info[s] = (library["compile_seconds"], wall, counts, error)
            runners[f"tvm/{s}"] = runner
        times = interleaved_times(runners, runs)
    base = statistics.median(times["onnxruntime"]) * 1e3
    shape_text = " ".join(f"{k}={','.join(map(str, v))}" for k, v in shapes.items())
    print(f"{name} ({shape_text}): onnxruntime {base:.2f} ms")
    for s, _, _ in variants:
        ms = statistics.median(times[f"tvm/{s}"]) * 1e3
        build, wall, counts, error = info[s]
        stats = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "rules") or "-"
        print(
            f"  tvm/{s:6s} {ms:9.2f} ms  ratio {ms / base:6.2f}x  compile {build:6.1f} s "
            f"(dsopt.compile {wall:5.1f} s)  schedules: {stats}  max abs err {error:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--schedules", default="none,dsopt")
    parser.add_argument("--shape", action="append", default=[], help="NAME=d0,d1,... override")
    parser.add_argument("--tune-minutes", type=float, help="also time a MetaSchedule-tuned build")
    parser.add_argument("--tune-db", help="tuning database folder (default: fresh per model)")
    args = parser.parse_args()
    tune = None
    if args.tune_minutes:
        tune = {"minutes": args.tune_minutes, **({"db": args.tune_db} if args.tune_db else {})}
    overrides = {}
    for text in args.shape:
        key, dims = text.split("=")
        overrides[key] = [int(d) for d in dims.split(",")]
    threads = os.environ["TVM_NUM_THREADS"]
    print(f"TVM_NUM_THREADS={threads}, onnxruntime 2 threads, {args.runs} runs")
    for name in args.models:
        shapes = {k: overrides.get(k, v) for k, v in MODELS[name].items()}
        bench(name, shapes, args.schedules.split(","), args.runs, tune)


if __name__ == "__main__":
    main()
