"""Size and output fidelity of `--precision int4` models against fp32, before/after Conv int4.

The quantized models are made beforehand with the CLI (the commands are in the report), e.g.

    dsopt optimize benchmarks/models/ppocr_det.onnx --precision int4 -o DIR/ppocr_det_int4.onnx

and this script only measures them: file size against the fp32 file, output cosine over the
held-out inputs pooled, and the task metric of `bench_quant` (real-looking OCR inputs from
`ocr_inputs` for PP-OCR, random images otherwise).

    python -m benchmarks.bench_conv_int4 --variants before=/tmp/w/before after=/tmp/w/after
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnx

from benchmarks.bench_quant import MODELS, _fidelity, _session, _task, _task_metric


def bench(name: str, variants: dict[str, Path], count: int) -> None:
    """Prints one markdown table row per variant of `name`."""
    source = MODELS / f"{name}.onnx"
    model = onnx.load(source)
    feeds, labels = _task(name, model, count, 1000)
    paths = {"fp32": source}
    for label, where in variants.items():
        path = where if where.suffix == ".onnx" else where / f"{name}_int4.onnx"
        if path.exists():  # a FILE.onnx variant is one model: name only that one
            paths[label] = path
    outputs = {label: [_session(p).run(None, f) for f in feeds] for label, p in paths.items()}
    ref = outputs["fp32"]
    size0 = os.path.getsize(source)
    print(f"\n{name} ({len(feeds)} held-out inputs)")
    print("| variant | file bytes | of fp32 | cosine | max abs err | task |")
    print("|---|---:|---:|---:|---:|---|")
    for label, path in paths.items():
        cos, err = _fidelity([o[0] for o in ref], [o[0] for o in outputs[label]])
        task = _task_metric(name, model, ref, outputs[label], labels)
        size = os.path.getsize(path)
        print(f"| {label} | {size} | {size / size0:.3f} | {cos:.5f} | {err:.3g} | {task} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["ppocr_det", "ppocr_rec", "ppocr_cls", "resnet18_style"]
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        help="label=DIR (holding NAME_int4.onnx) or label=FILE.onnx",
    )
    parser.add_argument("--eval", type=int, default=8, help="held-out inputs")
    args = parser.parse_args()
    variants = {v.split("=", 1)[0]: Path(v.split("=", 1)[1]) for v in args.variants}
    np.set_printoptions(precision=4)
    for name in args.models:
        bench(name, variants, args.eval)


if __name__ == "__main__":
    main()
