"""dsopt's int8/int4 presets vs onnxruntime.quantization on the same models and calibration data.

    python -m benchmarks.bench_quant --models resnet18_style bert_6l_384h --runs 20

Per model: size ratio vs fp32, onnxruntime CPU latency (2 threads, interleaved rounds, median)
as speedup over fp32, and fidelity (cosine, max abs error, argmax agreement on the last axis)
on held-out random samples. Calibration: the same seeded samples for every tool.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import dsopt
from dsopt.numerics import random_inputs

MODELS = Path(__file__).parent / "models"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(count):
        feed = random_inputs(model, seed=seed + i)
        for name, value in feed.items():
            if value.dtype == np.float32:  # images in [0, 1), not normal noise
                feed[name] = np.random.default_rng(seed + i).random(value.shape, np.float32)
        out.append(feed)
    return out


def _ort_variants(source: Path, calib: list, work: Path) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self):  # noqa: ANN201 - onnxruntime's interface
            return next(self.items, None)

    variants = {}
    path = work / "ort_dynamic.onnx"
    quantize_dynamic(source, path, weight_type=QuantType.QInt8)
    variants["ort quantize_dynamic"] = path
    if all(i.type.tensor_type.elem_type == 1 for i in onnx.load(source).graph.input):
        path = work / "ort_static.onnx"
        quantize_static(
            source, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
        variants["ort quantize_static QDQ minmax"] = path
    return variants


def _dsopt_variants(source: Path, calib: list, work: Path) -> dict[str, Path]:
    variants = {}
    static = all(i.type.tensor_type.elem_type == 1 for i in onnx.load(source).graph.input)
    presets = [("int8", calib)] if static else []
    presets += [("int8-dynamic", None), ("int4", None)]
    for precision, data in presets:
        started = time.perf_counter()
        result = dsopt.optimize(source, precision=precision, calibration=data)
        path = work / f"dsopt_{precision}.onnx"
        result.module.save(path)
        label = f"dsopt --precision {precision}"
        print(f"  {label}: {time.perf_counter() - started:.1f} s")
        variants[label] = path
    return variants


def _fidelity(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float, float]:
    cos, err, agree = [], [], []
    for r, g in zip(ref, got, strict=True):
        r64, g64 = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
        cos.append(float(r64 @ g64 / max(np.linalg.norm(r64) * np.linalg.norm(g64), 1e-30)))
        err.append(float(np.abs(r64 - g64).max()))
        agree.append(float((r.argmax(-1) == g.argmax(-1)).mean()))
    return min(cos), max(err), min(agree)


def bench(name: str, runs: int) -> None:
    source = MODELS / f"{name}.onnx"
    model = onnx.load(source)
    calib, held_out = _feeds(model, 16, 0), _feeds(model, 4, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {"fp32": source}
        variants.update(_ort_variants(source, calib, work))
        variants.update(_dsopt_variants(source, calib, work))
        sessions = {label: _session(path) for label, path in variants.items()}
        refs = [sessions["fp32"].run(None, f) for f in held_out]
        times = {label: [] for label in sessions}
        for _ in range(runs):
            for label, session in sessions.items():
                started = time.perf_counter()
                session.run(None, held_out[0])
                times[label].append(time.perf_counter() - started)
        base = np.median(times["fp32"])
        size0 = os.path.getsize(source)
        print(
            f"\n{name}\n| variant | size | latency | speedup | min cosine | max abs err | argmax |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, session in sessions.items():
            got = [session.run(None, f) for f in held_out]
            fid = [_fidelity(r, g) for r, g in zip(refs, got, strict=True)]
            cos, err, agree = min(f[0] for f in fid), max(f[1] for f in fid), min(f[2] for f in fid)
            median = np.median(times[label])
            ratio = size0 / os.path.getsize(variants[label])
            print(
                f"| {label} | {ratio:.2f}x smaller | {median * 1e3:.2f} ms | {base / median:.2f}x "
                f"| {cos:.5f} | {err:.3g} | {agree:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_style", "bert_6l_384h"])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    for name in args.models:
        bench(name, args.runs)


if __name__ == "__main__":
    main()
