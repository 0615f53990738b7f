"""convert-float16 with and without the calibrated block list on a real model.

For each variant (static block list; calibrated on rendered pages; calibrated on synthetic
random feeds; calibrated + `calibrated_unblock`; calibrated with a 4x tighter limit) it
reports what the pass kept float32 and
how the fp16 model's outputs compare with float32 on held-out rendered pages:

* onnxruntime CPU outputs: inf/NaN count, max abs diff, cosine, detector mask IoU.
  onnxruntime's CPU provider runs float16 ops that lack a float16 kernel in float32 and drops
  the Cast pairs between them, so an overflow rarely reaches its outputs.
* `overflowing fp16 tensors`: float16 tensors of the converted model that hold +-inf (or NaN)
  on those pages where the float32 model's tensor of the same name is finite: what fp16
  hardware, which rounds every op's result to float16, would turn into inf.

    python benchmarks/bench_fp16_calibrated.py benchmarks/models/ppocr_det.onnx \
        --calib-samples 8 --eval-samples 4 --size 480x640
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from dsopt import driver, numerics
from dsopt.quant.calibration import CalibrationData, Probe

try:
    from benchmarks.ocr_inputs import det_samples, mask_iou, rec_samples
except ImportError:  # run as a script from the repo root
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ocr_inputs import det_samples, mask_iou, rec_samples  # type: ignore[no-redef]


def _bert_samples(model: onnx.ModelProto, count: int, seed: int) -> list[dict]:
    """Token ids below 1000, a padded tail (attention_mask 0) of random length, segment 0."""
    rng = np.random.default_rng(seed)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    out = []
    for _ in range(count):
        mask = np.ones(shape, np.int64)
        mask[..., int(rng.integers(shape[-1] // 2, shape[-1] + 1)) :] = 0
        out.append(
            {
                "input_ids": rng.integers(0, 1000, shape).astype(np.int64) * mask,
                "attention_mask": mask,
                "token_type_ids": np.zeros(shape, np.int64),
            }
        )
    return out


def _feeds(task: str, model: onnx.ModelProto, count: int, seed: int, size: tuple) -> list:
    if task == "det":
        return det_samples(count, seed=seed, size=size)
    if task == "rec":
        return [feed for feed, _ in rec_samples(count, seed)]
    return _bert_samples(model, count, seed)


def _fp16_tensors(model: onnx.ModelProto) -> list[str]:
    return [
        v.name
        for v in model.graph.value_info
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    ]


def _overflowing(
    model: onnx.ModelProto, reference: onnx.ModelProto, feeds: list[dict]
) -> tuple[int, int, list[str]]:
    """(fp16 tensors that hold inf/NaN where float32 is finite, fp16 tensors, first names)."""
    model = onnx.shape_inference.infer_shapes(model)  # types for the probe's outputs
    names = _fp16_tensors(model)
    ref_names = {o for n in reference.graph.node for o in n.output}
    bad: set[str] = set()
    with (
        Probe(model, names, label="fp16") as probe,
        Probe(reference, [n for n in names if n in ref_names], label="fp32") as ref_probe,
    ):
        for values, ref_values in zip(probe.stream(feeds), ref_probe.stream(feeds), strict=True):
            for name, value in values.items():
                ref = ref_values.get(name)
                if not np.isfinite(value).all() and (ref is None or np.isfinite(ref).all()):
                    bad.add(name)
    return len(bad), len(names), sorted(bad)[:5]


def _largest(reference: onnx.ModelProto, feeds: list[dict], count: int = 5) -> list[str]:
    """The float32 model's tensors of largest max |x| on `feeds` (how near the fp16 limit)."""
    inferred = onnx.shape_inference.infer_shapes(reference)
    floats = {
        v.name
        for v in (*inferred.graph.value_info, *inferred.graph.output)
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    names = [o for n in reference.graph.node for o in n.output if o in floats]
    amax: dict[str, float] = {}
    with Probe(reference, names, label="fp32 ranges") as probe:
        for values in probe.stream(feeds):
            for name, value in values.items():
                if value.size:
                    amax[name] = max(amax.get(name, 0.0), float(np.abs(value).max()))
    top = sorted(amax.items(), key=lambda kv: -kv[1])[:count]
    return [f"{name} {value:.3g}" for name, value in top]


def _compare(
    model: onnx.ModelProto, reference: onnx.ModelProto, feeds: list[dict], mask: bool
) -> dict:
    nonfinite, worst, cosines, ious = 0, 0.0, [], []
    for feed in feeds:
        ref = numerics.run_model(reference, feed, label="fp32")
        got = numerics.run_model(model, feed, label="fp16")
        for name, r in ref.items():
            g = got[name].astype(np.float64)
            nonfinite += int(np.count_nonzero(~np.isfinite(g)))
            finite = np.isfinite(g)
            worst = max(worst, float(np.abs(g[finite] - r[finite]).max(initial=0.0)))
            a, b = r.ravel().astype(np.float64), np.nan_to_num(g.ravel())
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
            ious.append(mask_iou(r, g) if mask else float("nan"))
    return {
        "nonfinite": nonfinite,
        "max_abs": worst,
        "cosine": min(cosines),
        "mask_iou": min(ious),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--size", default="480x640", help="page HxW (multiples of 32)")
    parser.add_argument("--task", choices=("det", "rec", "bert"), default="det")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    reference = onnx.load(args.model)
    calib = _feeds(args.task, reference, args.calib_samples, 0, (height, width))
    held_out = _feeds(args.task, reference, args.eval_samples, 1000, (height, width))
    shapes = {"x": [1, 3, height, width]} if args.task == "det" else None
    synthetic = CalibrationData.synthetic(reference, args.calib_samples, shapes=shapes)
    variants = [
        ("static block list", None, {}),
        ("calibrated (task feeds)", calib, {}),
        ("calibrated (synthetic)", synthetic, {}),
        ("calibrated + calibrated_unblock", calib, {"calibrated_unblock": True}),
        ("calibrated, headroom=64 (limit 1023)", calib, {"headroom": 64.0}),
    ]
    rows = []
    fp32 = driver.optimize(args.model, shapes=shapes).module.to_proto()
    print("largest float32 tensors on the held-out feeds:", "; ".join(_largest(fp32, held_out)))
    for label, data, options in variants:
        start = time.perf_counter()
        result = driver.optimize(
            args.model,
            precision="fp16",
            calibration=data,
            shapes=shapes,
            config={"options": {"convert-float16": options}} if options else {},
        )
        seconds = time.perf_counter() - start
        (record,) = [r for r in result.report.passes if r.name == "convert-float16"]
        model = result.module.to_proto()
        metrics = _compare(model, reference, held_out, args.task == "det")
        bad, total, names = _overflowing(model, fp32, held_out)
        stats = record.stats
        rows.append((label, stats, metrics, bad, total, names, seconds))
        print(label, dict(stats), metrics, f"overflowing {bad}/{total}", names, f"{seconds:.1f}s")
    print()
    print(
        "| variant | fp16 nodes | blocked (ops) | range-blocked | unblocked | Casts | "
        "inf/NaN (ORT CPU) | max abs diff | min cosine | min mask IoU | "
        "overflowing fp16 tensors | optimize s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, stats, m, bad, total, _, seconds in rows:
        print(
            f"| {label} | {stats['nodes']} | {stats['blocked']} | {stats['range-blocked']} | "
            f"{stats['unblocked']} | {stats['casts']} | {m['nonfinite']} | {m['max_abs']:.3g} | "
            f"{m['cosine']:.6f} | {m['mask_iou']:.4f} | {bad} / {total} | {seconds:.1f} |"
        )
    for label, stats, *_ in rows:
        if stats.get("range-blocked-nodes"):
            print(f"\n{label}: {stats['range-blocked-nodes']}")


if __name__ == "__main__":
    main()
