"""int8 x86 TVM libraries against fp32 ones and onnxruntime, on the same models, in one run.

For each model, onnxruntime's `quantize_static` (QOperator, per-channel int8 weights, uint8
activations, min-max over `--calib` random samples) makes the int8 model, from `dsopt
optimize`'s lossless clean-up of the float model (onnxruntime's quantizer fails on PP-OCR rec's
Constant-node weights). Then, side by side:

* `ort/fp32`, `ort/int8`: onnxruntime on the float and the quantized model (2 threads,
  `ORT_ENABLE_ALL`);
* `tvm/fp32`: `dsopt compile --target x86` of the float model (dsopt's CPU schedules);
* `tvm/int8-float`: the quantized model with `options={"int8": "float"}`: legalize-quantized's
  integer-valued float convolutions, as fp32 code;
* `tvm/int8-vnni`: the same with `{"int8": "vnni"}`: dsopt's AVX-512 VNNI int8 kernels.

Timing as in bench_tvm_cpu.py: `--runs` interleaved rounds, one untimed settle run before each
timed run, medians. Errors: max abs difference of each int8 library's output against
`ort/int8` (the same quantized model in onnxruntime) and, in output quantization steps, where
the output is dequantized from a known scale. Needs a CPU with AVX-512 VNNI.

Usage:
    python benchmarks/bench_int8_tvm.py [--models ppocr_cls ppocr_rec ppocr_det] [--runs 20]
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

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnxruntime import quantization  # noqa: E402

import dsopt  # noqa: E402
from benchmarks.bench_tvm_cpu import (  # noqa: E402
    MODELS,
    MODELS_DIR,
    _library_runner,
    interleaved_times,
)


class _RandomReader(quantization.CalibrationDataReader):
    def __init__(self, name: str, shape: list[int], count: int) -> None:
        rng = np.random.default_rng(1)
        self._feeds = iter(
            [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench(name: str, runs: int, calib: int, tmp: Path) -> None:
    ((input_name, shape),) = MODELS[name].items()
    source = MODELS_DIR / f"{name}.onnx"
    # onnxruntime's quantizer fails on weights stored as Constant nodes (PP-OCR rec): it
    # quantizes dsopt's cleaned-up model (`dsopt optimize`, lossless) instead.
    cleaned = tmp / f"{name}.clean.onnx"
    onnx.save(dsopt.optimize(source).model, cleaned)
    quantized = tmp / f"{name}.int8.onnx"
    quantization.quantize_static(
        str(cleaned),
        str(quantized),
        _RandomReader(input_name, shape, calib),
        quant_format=quantization.QuantFormat.QOperator,
        per_channel=True,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
    )
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sessions = {"ort/fp32": _session(source), "ort/int8": _session(quantized)}
    runners = {k: (lambda s=s: s.run(None, {input_name: x})) for k, s in sessions.items()}
    reference = sessions["ort/int8"].run(None, {input_name: x})
    builds = {
        "tvm/fp32": (source, "float"),
        "tvm/int8-float": (quantized, "float"),
        "tvm/int8-vnni": (quantized, "vnni"),
    }
    info = {}
    failed: dict[str, str] = {}
    for key, (model, int8) in builds.items():
        out = tmp / f"{name}-{key.replace('/', '-')}"
        started = time.perf_counter()
        try:
            dsopt.compile(
                model, target="x86", shapes={input_name: shape}, outdir=out, check=False,
                options={"int8": int8},
            )  # fmt: skip
        except dsopt.DsoptError as e:
            failed[key] = str(e).splitlines()[0]
            continue
        wall = time.perf_counter() - started
        manifest = json.loads((out / "manifest.json").read_text())
        library = next(a for a in manifest["artifacts"] if a["role"] == "library")
        runner = _library_runner(out / library["path"], [x])
        got = runner()
        error = max(
            float(np.max(np.abs(g.astype(np.float64) - w)))
            for g, w in zip(got, reference, strict=True)
        )
        counts = {k: v for k, v in manifest["tvm"]["schedules"].items() if k.startswith("int8_")}
        info[key] = (library["compile_seconds"], wall, error, counts)
        runners[key] = runner
    times = interleaved_times(runners, runs)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{name} ({input_name}={','.join(map(str, shape))}):")
    for key, ms in medians.items():
        line = (
            f"  {key:15s} {ms:9.2f} ms  vs ort/fp32 {ms / medians['ort/fp32']:5.2f}x  "
            f"vs ort/int8 {ms / medians['ort/int8']:5.2f}x"
        )
        if key in info:
            build, wall, error, counts = info[key]
            kernels = ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"
            vs_int8 = f"  err vs ort/int8 {error:.1e}" if "int8" in key else ""
            line += f"  compile {build:5.1f} s  int8 kernels: {kernels}{vs_int8}"
        print(line)
    for key, why in failed.items():
        print(f"  {key:15s} does not compile: {why}")
    print(
        f"  int8-vnni library vs fp32 library: "
        f"{medians['tvm/int8-vnni'] / medians['tvm/fp32']:.2f}x time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["ppocr_cls", "ppocr_rec", "ppocr_det"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--calib", type=int, default=4, help="random calibration samples")
    args = parser.parse_args()
    print(
        f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, onnxruntime 2 threads, {args.runs} runs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench(name, args.runs, args.calib, Path(tmp))


if __name__ == "__main__":
    main()
