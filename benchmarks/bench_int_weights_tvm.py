"""Weight-only quantized models through TVM for x86: library size and latency vs float32.

For each model, `dsopt.compile(model, target="x86", precision=P)` for P in `--precisions`
(default fp32, int4: 4-bit MatMul blocks + int8 per-channel convs, and mixed at a quarter of the
float32 weight bytes when `--mixed` is given). Each library runs in a Relax VM
(`TVM_NUM_THREADS=2`), interleaved with the others and with onnxruntime on the same optimized
model (2 intra-op threads, `ORT_ENABLE_ALL`), as in bench_tvm_cpu.py. Reported per precision:
the library's bytes and its ratio to the float32 library, the dequantizing kernels
(`tvm.schedules`), the median latency and its ratio to the float32 library, onnxruntime's median
on the same model.onnx, and the library's max abs difference from that onnxruntime run.

Usage:
    python -m benchmarks.bench_int_weights_tvm [--models bert_6l_384h resnet18_style] [--runs 20]
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import argparse  # noqa: E402 - TVM_NUM_THREADS must be set before TVM's thread pool starts
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import dsopt  # noqa: E402
from benchmarks.bench_tvm_cpu import MODELS, MODELS_DIR, _feeds, _library_runner, interleaved_times  # noqa: E402


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench(name: str, precisions: list[str], runs: int) -> None:
    shapes = MODELS[name]
    source = MODELS_DIR / f"{name}.onnx"
    feeds = _feeds(_session(source), shapes)
    runners, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            out = Path(tmp) / precision
            kwargs = {}
            if precision == "mixed":
                kwargs = {"calibration": [feeds], "size_budget": "0.25"}
            dsopt.compile(
                source, target="x86", shapes=shapes, outdir=out, precision=precision, **kwargs
            )
            manifest = json.loads((out / "manifest.json").read_text())
            library = next(a for a in manifest["artifacts"] if a["role"] == "library")
            order = [i["name"] for i in manifest["inputs"]]
            runner = _library_runner(out / library["path"], [feeds[n] for n in order])
            session = _session(out / "model.onnx")
            names = {i.name for i in session.get_inputs()}
            ort_feeds = {k: v for k, v in feeds.items() if k in names}
            reference = session.run(None, ort_feeds)
            error = max(
                float(np.max(np.abs(g.astype(np.float64) - w)))
                for g, w in zip(runner(), reference, strict=True)
            )
            schedules = manifest["tvm"]["schedules"]
            kernels = {k: v for k, v in schedules.items() if k.startswith("dequantize_")}
            info[precision] = (library["bytes"], kernels, error)
            runners[f"tvm/{precision}"] = runner
            runners[f"ort/{precision}"] = lambda s=session, f=ort_feeds: s.run(None, f)
        times = interleaved_times(runners, runs)
    base_ms = statistics.median(times[f"tvm/{precisions[0]}"]) * 1e3
    base_bytes = info[precisions[0]][0]
    print(f"{name}:")
    print(
        "| precision | library MB | vs fp32 | kernels | TVM ms | vs fp32 | ort ms | max abs err |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for precision in precisions:
        size, kernels, error = info[precision]
        ms = statistics.median(times[f"tvm/{precision}"]) * 1e3
        ort_ms = statistics.median(times[f"ort/{precision}"]) * 1e3
        text = ", ".join(f"{k} {v}" for k, v in kernels.items()) or "-"
        print(
            f"| {precision} | {size / 1e6:.1f} | {size / base_bytes:.2f}x | {text} | "
            f"{ms:.2f} | {ms / base_ms:.2f}x | {ort_ms:.2f} | {error:.1e} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["bert_6l_384h", "resnet18_style"])
    parser.add_argument("--precisions", default="fp32,int4")
    parser.add_argument("--mixed", action="store_true", help="also mixed at 0.25 of fp32 bytes")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    precisions = args.precisions.split(",") + (["mixed"] if args.mixed else [])
    print(
        f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, onnxruntime 2 threads, {args.runs} runs"
    )
    for name in args.models:
        bench(name, precisions, args.runs)


if __name__ == "__main__":
    main()
