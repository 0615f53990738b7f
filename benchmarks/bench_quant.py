"""dsopt's int8/int4 presets vs onnxruntime.quantization on the same models and calibration data.

    python -m benchmarks.bench_quant --models resnet18_style bert_6l_384h ppocr_rec --runs 20

Per model: size ratio vs fp32, onnxruntime CPU latency (2 threads without spinning, interleaved
rounds, median) as speedup over fp32, fidelity vs fp32 (cosine and max abs error over all
held-out outputs) and the task metric:
argmax agreement (ResNet, PP-OCR cls; cls also accuracy on its labels), decoded-string
agreement and character accuracy (PP-OCR rec, CTC), text-mask IoU (PP-OCR det). PP-OCR feeds
are rendered text (`benchmarks.ocr_inputs`), the CNN gets uniform images, BERT random tokens.
Each quantizer runs in a fresh process, so its time and peak resident memory (calibration
included) are its own; the same calibration samples go to every tool.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks import ocr_inputs
from dsopt.numerics import random_inputs

MODELS = Path(__file__).parent / "models"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    # Interleaved sessions on 2 cores: a spinning idle pool would steal the next one's CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _random_feeds(model: onnx.ModelProto, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(count):
        feed = random_inputs(model, seed=seed + i)
        for name, value in feed.items():
            if value.dtype == np.float32:  # images in [0, 1), not normal noise
                feed[name] = np.random.default_rng(seed + i).random(value.shape, np.float32)
        out.append(feed)
    return out


def _task(name: str, model: onnx.ModelProto, count: int, seed: int) -> tuple[list, list]:
    """Feeds and their labels (None where the model has no ground truth here)."""
    if name == "ppocr_rec":
        pairs = ocr_inputs.rec_samples(count, seed)
    elif name == "ppocr_cls":
        pairs = ocr_inputs.cls_samples(count, seed)
    elif name == "ppocr_det":
        return ocr_inputs.det_samples(count, seed), [None] * count
    else:
        return _random_feeds(model, count, seed), [None] * count
    return [f for f, _ in pairs], [label for _, label in pairs]


# --- quantizers, each run in a fresh process -------------------------------------------------


def _load_calib(path: str) -> list[dict[str, np.ndarray]]:
    with np.load(path) as archive:
        names = sorted({key.split("/", 1)[1] for key in archive.files})
        count = len(archive.files) // len(names)
        return [{n: archive[f"{i}/{n}"] for n in names} for i in range(count)]


def _ort_job(kind: str, source: str, calib: str, out: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if kind == "dynamic":
        quantize_dynamic(source, out, weight_type=QuantType.QInt8)
        return
    if kind == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=32, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(out, use_external_data_format=False)
        return
    feeds = iter(_load_calib(calib))

    class Reader(CalibrationDataReader):
        def get_next(self):  # noqa: ANN201 - onnxruntime's interface
            return next(feeds, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}[kind]
    quantize_static(
        source, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        calibrate_method=method,
    )  # fmt: skip


def _dsopt_job(preset: str, source: str, calib: str, out: str) -> None:
    """`preset` is PRECISION[:METHOD][+calib]: the precision, quantize-static's observer, and
    whether --calib is given (int8:METHOD always takes it)."""
    import dsopt

    preset, plus, _ = preset.partition("+")
    precision, _, method = preset.partition(":")
    config = {"options": {"quantize-static": {"method": method}}} if method else None
    data = _load_calib(calib) if method or plus else None
    result = dsopt.optimize(source, precision=precision, calibration=data, config=config)
    result.module.save(out)


def _job(kind: str, preset: str, source: str, calib: str, out: str, queue) -> None:  # noqa: ANN001
    started = time.perf_counter()
    (_ort_job if kind == "ort" else _dsopt_job)(preset, source, calib, out)
    peak = _peak_rss_mb()
    queue.put((time.perf_counter() - started, peak))


def _peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM; ru_maxrss also counts the parent's
    memory at fork, which a spawned child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _quantize(kind: str, preset: str, source: Path, calib: Path, out: Path) -> tuple[float, float]:
    """Runs one quantizer in a fresh process: (seconds, peak RSS in MB)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    args = (kind, preset, str(source), str(calib), str(out), queue)
    process = context.Process(target=_job, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{kind} {preset} failed (exit {process.exitcode})")
    return queue.get()


VARIANTS: list[tuple[str, str, str, Callable[[onnx.ModelProto], bool]]] = [
    # label, kind, preset, applies to
    ("ort quantize_dynamic", "ort", "dynamic", lambda m: True),
    ("ort quantize_static QDQ MinMax", "ort", "minmax", lambda m: _float_inputs(m)),
    ("ort quantize_static QDQ Entropy", "ort", "entropy", lambda m: _float_inputs(m)),
    ("ort MatMulNBits int4", "ort", "nbits", lambda m: _has_op(m, "MatMul")),
    ("dsopt int8 (minmax)", "dsopt", "int8:minmax", lambda m: _float_inputs(m)),
    ("dsopt int8 (entropy)", "dsopt", "int8:entropy", lambda m: _float_inputs(m)),
    ("dsopt int8 (mse)", "dsopt", "int8:mse", lambda m: _float_inputs(m)),
    ("dsopt int8-dynamic", "dsopt", "int8-dynamic", lambda m: True),
    ("dsopt int8-dynamic --calib (smoothed)", "dsopt", "int8-dynamic+calib", lambda m: True),
    ("dsopt int4", "dsopt", "int4", lambda m: _has_op(m, "MatMul")),
    ("dsopt int4 --calib (GPTQ)", "dsopt", "int4+calib", lambda m: _has_op(m, "MatMul")),
]


def _float_inputs(model: onnx.ModelProto) -> bool:
    return all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)


def _has_op(model: onnx.ModelProto, op: str) -> bool:
    return any(n.op_type == op for n in model.graph.node)


# --- metrics ----------------------------------------------------------------------------------


def _fidelity(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    r64 = np.concatenate([r.astype(np.float64).ravel() for r in ref])
    g64 = np.concatenate([g.astype(np.float64).ravel() for g in got])
    cos = float(r64 @ g64 / max(np.linalg.norm(r64) * np.linalg.norm(g64), 1e-30))
    return cos, float(np.abs(r64 - g64).max())


def _task_metric(name: str, model: onnx.ModelProto, ref: list, got: list, labels: list) -> str:
    if name == "ppocr_rec":
        alphabet = ocr_inputs.ctc_alphabet(model)
        ref_text = [ocr_inputs.ctc_decode(r[0], alphabet).strip() for r in ref]
        got_text = [ocr_inputs.ctc_decode(g[0], alphabet).strip() for g in got]
        same = np.mean([a == b for a, b in zip(ref_text, got_text, strict=True)])
        acc = np.mean(
            [ocr_inputs.char_accuracy(t, w) for t, w in zip(got_text, labels, strict=True)]
        )
        return f"strings = fp32 {same:.3f}, char acc {acc:.3f}"
    if name == "ppocr_det":
        iou = min(ocr_inputs.mask_iou(r[0], g[0]) for r, g in zip(ref, got, strict=True))
        return f"mask IoU {iou:.3f}"
    agree = np.mean(
        [(r[0].argmax(-1) == g[0].argmax(-1)).mean() for r, g in zip(ref, got, strict=True)]
    )
    if name == "ppocr_cls":
        acc = np.mean([g[0].argmax(-1)[0] == y for g, y in zip(got, labels, strict=True)])
        return f"argmax = fp32 {agree:.3f}, accuracy {acc:.3f}"
    if name.startswith("bert"):
        return "-"  # hidden states: argmax means nothing
    return f"argmax = fp32 {agree:.3f}"


def bench(name: str, runs: int, calib_count: int, eval_count: int) -> None:
    source = MODELS / f"{name}.onnx"
    model = onnx.load(source)
    calib, _ = _task(name, model, calib_count, 0)
    held_out, labels = _task(name, model, eval_count, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib_path = work / "calib.npz"
        np.savez(calib_path, **{f"{i}/{k}": v for i, f in enumerate(calib) for k, v in f.items()})
        variants, costs = {"fp32": source}, {"fp32": "-"}
        for label, kind, preset, applies in VARIANTS:
            if not applies(model):
                continue
            out = work / f"{kind}_{preset.replace(':', '_').replace('+', '_')}.onnx"
            try:
                seconds, peak = _quantize(kind, preset, source, calib_path, out)
            except RuntimeError as e:
                print(f"  {label}: {e}")
                continue
            variants[label], costs[label] = out, f"{seconds:.1f} s, {peak:.0f} MB"
            print(f"  {label}: {costs[label]}", flush=True)
        sessions = {label: _session(path) for label, path in variants.items()}
        outputs = {label: [s.run(None, f) for f in held_out] for label, s in sessions.items()}
        times = {label: [] for label in sessions}
        for _ in range(runs):
            for label, session in sessions.items():
                started = time.perf_counter()
                session.run(None, held_out[0])
                times[label].append(time.perf_counter() - started)
        base = np.median(times["fp32"])
        size0 = os.path.getsize(source)
        print(f"\n{name} ({len(calib)} calibration samples, {len(held_out)} held out)")
        print("| variant | size | latency | vs fp32 | cosine | max abs err | task | quantize |")
        print("|---|---:|---:|---:|---:|---:|---|---:|")
        ref = outputs["fp32"]
        for label in sessions:
            cos, err = _fidelity([o[0] for o in ref], [o[0] for o in outputs[label]])
            task = _task_metric(name, model, ref, outputs[label], labels)
            median = np.median(times[label])
            ratio = size0 / os.path.getsize(variants[label])
            print(
                f"| {label} | {ratio:.2f}x smaller | {median * 1e3:.2f} ms | {base / median:.2f}x "
                f"| {cos:.5f} | {err:.3g} | {task} | {costs[label]} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_style", "bert_6l_384h"])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--calib", type=int, default=16, help="calibration samples")
    parser.add_argument("--eval", type=int, default=32, help="held-out samples for fidelity")
    args = parser.parse_args()
    for name in args.models:
        bench(name, args.runs, args.calib, args.eval)


if __name__ == "__main__":
    main()
