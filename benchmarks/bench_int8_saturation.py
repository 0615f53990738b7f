"""int8 on x86 without VNNI: onnxruntime's u8s8 kernels saturate; dsopt's 7-bit weights do not.

onnxruntime's u8s8 GEMM on AVX2 / AVX-512 CPUs without VNNI multiplies with `vpmaddubsw`, which
adds each pair of uint8 x int8 products into an int16 with saturation: full-range int8 weights
(|w| up to 127, 255 * 127 * 2 > 32767) give wrong sums there. dsopt's quantize-dynamic and
quantize-static take 7-bit weights by default (`reduce_range`: 255 * 64 * 2 fits).

For each model: the fp32 model after dsopt's lossless pipeline, then
  * onnxruntime `quantize_dynamic` with its defaults (QInt8 weights, `reduce_range=False`),
  * onnxruntime `quantize_dynamic(reduce_range=True)`,
  * `dsopt optimize --precision int8-dynamic` (7-bit weights) and the same with
    `quantize-dynamic{reduce_range=false}`,
run in onnxruntime (2 threads) on `--samples` random inputs. Reported: relative L2 error and
cosine of the worst output vs fp32, and the median latency ratio vs fp32 (interleaved runs).
The CPU's flags decide which kernels run: the table only shows saturation on CPUs without VNNI.

Usage:
    PYTHONPATH=. python -m benchmarks.bench_int8_saturation [--models bert_6l_384h] [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from dsopt.driver import optimize

MODELS_DIR = Path(__file__).parent / "models"


def _session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(count):
        feed = {}
        for inp in session.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in inp.shape]
            if "int64" in inp.type:
                high = 2 if "mask" in inp.name or "type" in inp.name else 1000
                value = rng.integers(0, high, shape, dtype=np.int64)
                feed[inp.name] = np.ones(shape, np.int64) if "mask" in inp.name else value
            else:
                feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def _errors(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> tuple[float, float]:
    worst_rel, worst_cos = 0.0, 1.0
    for index in range(len(ref[0])):
        r = np.concatenate([s[index].ravel() for s in ref]).astype(np.float64)
        c = np.concatenate([s[index].ravel() for s in got]).astype(np.float64)
        worst_rel = max(worst_rel, float(np.linalg.norm(c - r) / np.linalg.norm(r)))
        worst_cos = min(worst_cos, float(r @ c / (np.linalg.norm(r) * np.linalg.norm(c))))
    return worst_rel, worst_cos


def bench(name: str, samples: int, runs: int) -> None:
    base = optimize(str(MODELS_DIR / f"{name}.onnx")).module.to_proto()
    variants: dict[str, onnx.ModelProto] = {"fp32": base}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "base.onnx"
        onnx.save(base, src)
        for label, reduce in (
            ("ort quantize_dynamic (default)", False),
            ("ort reduce_range", True),
        ):
            out = Path(tmp) / f"ort_{reduce}.onnx"
            quantize_dynamic(src, out, weight_type=QuantType.QInt8, reduce_range=reduce)
            variants[label] = onnx.load(out)
    variants["dsopt int8-dynamic (7-bit)"] = optimize(
        base, precision="int8-dynamic"
    ).module.to_proto()
    passes = "quantize-dynamic{reduce_range=false},quantize-weights{bits=8},fold-qdq,eliminate-dead"
    variants["dsopt reduce_range=false"] = optimize(base, passes=passes).module.to_proto()
    sessions = {label: _session(m) for label, m in variants.items()}
    feeds = _feeds(sessions["fp32"], samples)
    outputs = {label: [s.run(None, f) for f in feeds] for label, s in sessions.items()}
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(runs):
        for label, session in sessions.items():
            session.run(None, feeds[0])
            started = time.perf_counter()
            session.run(None, feeds[0])
            times[label].append(time.perf_counter() - started)
    fp32_ms = statistics.median(times["fp32"]) * 1e3
    print(f"{name} ({samples} random inputs, {runs} interleaved runs):")
    print("| variant | rel L2 vs fp32 | cosine | latency vs fp32 |")
    print("|---|---:|---:|---:|")
    for label in sessions:
        rel, cos = _errors(outputs["fp32"], outputs[label])
        ratio = statistics.median(times[label]) * 1e3 / fp32_ms
        print(f"| {label} | {rel:.4g} | {cos:.5f} | {ratio:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["bert_6l_384h"])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    print(f"CPU: {'VNNI' if vnni else 'no VNNI'} ({'avx512f' if 'avx512f' in flags else 'avx2'})")
    for name in args.models:
        bench(name, args.samples, args.runs)


if __name__ == "__main__":
    main()
