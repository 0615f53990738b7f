"""`--precision bf16` vs fp16 (and bf16/fp16 weights only) against float32 on real models.

    PYTHONPATH=. python -m benchmarks.bench_bf16 [--models ppocr_det ppocr_rec bert_6l_384h] \
        [--samples 3] [--opset22] [--per-op-rounding] [--out table.md]

Variants, each compared with the original float32 model on the same feeds
(`benchmarks.bench_fp16_calibrated`'s: rendered 480x640 pages for the detector, rendered text
lines for the recognizer, random token sequences with padded tails for BERT; seed 123):

* fp16 / bf16: `driver.optimize(path, precision="fp16"|"bf16")` (= `dsopt optimize m.onnx
  --precision bf16`).
* fp16-weights / bf16-weights: `convert-float16{weights_only=true[,dtype=bfloat16]}` on the
  lossless pipeline's output (whose weights are initializers; PP-OCR keeps them in Constants).
* bf16@opset22 (`--opset22`, models below opset 22): `onnx.version_converter` to opset 22, then
  `--precision bf16` (Cast admits no bfloat16 below opset 13, Conv none below 22; PP-OCR is 12).

Columns: size = serialized ModelProto bytes (in parentheses the float32 model after the
lossless pipeline); max abs diff, relative L2 and cosine of the worst output over the samples;
inf/NaN where float32 is finite; bf16/fp16 initializer counts; emulated = `needs_emulation`
(some non-Cast node computes in bf16: onnxruntime's CPU provider has no bf16 kernels, so
`dsopt.numerics` runs the `dsopt.bfloat16.emulate` twin, rounding to bf16 after every op);
note = the task metric (detector: minimum text-mask IoU; recognizer: CTC strings equal to
float32's).

`--per-op-rounding` adds a second table, fp16 and bf16 on equal terms: onnxruntime runs fp16
ops that lack an fp16 kernel in float32 and drops the Cast pairs between them, so its fp16
numbers skip intermediate roundings. There the fp16 model runs through the same twin as bf16,
with float16 as the rounding type (`fp16_twin`), i.e. rounded to 16 bits after every op as
fp16 hardware does. Its bf16 rows are the first table's bf16 rows (already emulated; "left
float32" where bf16 converted nothing, as PP-OCR at opset 12: add `--opset22`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
from onnx import TensorProto, version_converter

from benchmarks.bench_fp16_calibrated import _feeds
from benchmarks.ocr_inputs import ctc_alphabet, ctc_decode, mask_iou
from dsopt import bfloat16, driver, numerics

MODELS = Path(__file__).parent / "models"
TASKS = {"ppocr_det": "det", "ppocr_rec": "rec", "bert_6l_384h": "bert"}
#: (label, driver.optimize keywords, whether it starts from the lossless output).
VARIANTS = (
    ("fp16", {"precision": "fp16"}, False),
    ("bf16", {"precision": "bf16"}, False),
    ("fp16-weights", {"passes": "convert-float16{weights_only=true}"}, True),
    ("bf16-weights", {"passes": "convert-float16{weights_only=true,dtype=bfloat16}"}, True),
)
HEADER = (
    "| model | variant | size MB (fp32 after lossless) | max abs diff | rel L2 | cosine "
    "| inf/NaN | bf16/fp16 inits | emulated | note |\n" + "|---" * 10 + "|"
)
ROUNDING_HEADER = "| model | variant | max abs diff | rel L2 | cosine |\n" + "|---" * 5 + "|"

Outputs = list[list[np.ndarray]]


def fp16_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float32 twin of an fp16 model, rounded to float16 after every fp16 op.

    Bench-only monkeypatch: `dsopt.bfloat16.emulate` with its target type (`_BF16`) patched
    to FLOAT16, so every float16 tensor becomes float32 holding float16 values and each fp16
    output gets a `Cast(to=FLOAT16)`, `Cast(to=FLOAT)` pair. `mock.patch.object` fails if the
    private name goes away.
    """
    with mock.patch.object(bfloat16, "_BF16", TensorProto.FLOAT16):
        twin = bfloat16.emulate(model)
    if any(t.data_type == TensorProto.FLOAT16 for t in twin.graph.initializer):
        raise RuntimeError("fp16_twin left float16 initializers; dsopt.bfloat16 changed")
    return twin


def _run(model: onnx.ModelProto | str, feeds: list[dict], label: str) -> Outputs:
    """Each feed's outputs in output order (bf16 models through the emulated twin)."""
    return [list(numerics.run_model(model, feed, label=label).values()) for feed in feeds]


def _compare(ref: Outputs, got: Outputs) -> dict[str, float]:
    """Worst max abs diff, relative L2 and cosine over samples and outputs; inf/NaN count."""
    worst = {"max_abs": 0.0, "rel_l2": 0.0, "cos": 1.0, "nonfinite": 0}
    for ref_sample, got_sample in zip(ref, got, strict=True):
        for r, g in zip(ref_sample, got_sample, strict=True):
            r = np.asarray(r, np.float64).ravel()
            g = np.asarray(g, np.float64).ravel()
            worst["nonfinite"] += int((~np.isfinite(g[np.isfinite(r)])).sum())
            diff = r - g
            worst["max_abs"] = max(worst["max_abs"], float(np.abs(diff).max()))
            rel = float(np.linalg.norm(diff) / np.linalg.norm(r))
            worst["rel_l2"] = max(worst["rel_l2"], rel)
            cos = float(r @ g / (np.linalg.norm(r) * np.linalg.norm(g)))
            worst["cos"] = min(worst["cos"], cos)
    return worst


def _task_note(task: str, fp32: onnx.ModelProto, ref: Outputs, got: Outputs) -> str:
    pairs = list(zip(ref, got, strict=True))
    if task == "det":
        return f"mask IoU min {min(mask_iou(r[0], g[0]) for r, g in pairs):.4f}"
    if task == "rec":
        alphabet = ctc_alphabet(fp32)
        same = sum(ctc_decode(r[0], alphabet) == ctc_decode(g[0], alphabet) for r, g in pairs)
        return f"strings = fp32 {same}/{len(ref)}"
    return ""


def _metrics(s: dict[str, float]) -> str:
    return f"{s['max_abs']:.3g} | {s['rel_l2']:.3g} | {s['cos']:.6f}"


def bench(name: str, samples: int, seed: int, opset22: bool, per_op: bool) -> tuple[list, list]:
    """(first-table rows, per-op rounding rows) of one model."""
    task = TASKS.get(name)
    if task is None:
        raise SystemExit(f"no feeds for {name!r}; pick from {', '.join(TASKS)}")
    path = str(MODELS / f"{name}.onnx")
    fp32 = onnx.load(path)
    feeds = _feeds(task, fp32, samples, seed, (480, 640))
    ref = _run(path, feeds, "fp32")
    base = driver.optimize(path).model  # the lossless pipeline: float32 reference size
    opset = next((o.version for o in fp32.opset_import if o.domain in ("", "ai.onnx")), 0)
    sources = [("", path)]
    variants = [(label, kwargs, lossless, "") for label, kwargs, lossless in VARIANTS]
    if opset22 and opset < 22:
        upgraded = version_converter.convert_version(fp32, 22)
        sources.append(("@opset22", upgraded))
        variants.append(("bf16@opset22", {"precision": "bf16"}, False, "@opset22"))
    rows, rounding, bf16_stats, fp16_models = [], [], {}, {}
    for label, kwargs, lossless, suffix in variants:
        source = base if lossless else dict(sources)[suffix]
        out = driver.optimize(source, **kwargs).model
        got = _run(out, feeds, label)
        s = _compare(ref, got)
        inits = [t.data_type for t in out.graph.initializer]
        counts = f"{inits.count(TensorProto.BFLOAT16)}/{inits.count(TensorProto.FLOAT16)}"
        emulated = bfloat16.needs_emulation(out)
        if label == "fp16":
            fp16_models[""] = out  # reused by the per-op rounding table
        elif kwargs.get("precision") == "bf16":
            bf16_stats[suffix] = (s, emulated)
        rows.append(
            f"| {name} | {label} | {out.ByteSize() / 1e6:.2f} ({base.ByteSize() / 1e6:.2f}) | "
            f"{_metrics(s)} | {s['nonfinite']} | {counts} | {emulated} | "
            f"{_task_note(task, fp32, ref, got)} |"
        )
        print(rows[-1], flush=True)
    if per_op:
        for suffix, source in sources:
            fp16 = fp16_models.get(suffix) or driver.optimize(source, precision="fp16").model
            s = _compare(ref, _run(fp16_twin(fp16), feeds, "fp16 (per-op rounding)"))
            bf16, emulated = bf16_stats[suffix]
            bf16_label = "bf16 (emulated)" if emulated else "bf16 (left float32)"
            rounding += [
                f"| {name}{suffix} | fp16 (per-op rounding emulated) | {_metrics(s)} |",
                f"| {name}{suffix} | {bf16_label} | {_metrics(bf16)} |",
            ]
            print(*rounding[-2:], sep="\n", flush=True)
    return rows, rounding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--samples", type=int, default=3, help="feeds per model")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument(
        "--opset22", action="store_true", help="add bf16 on the model upgraded to opset 22"
    )
    parser.add_argument(
        "--per-op-rounding",
        action="store_true",
        help="add the table of fp16 and bf16 both rounded after every op",
    )
    parser.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = parser.parse_args()
    rows, rounding = [], []
    for name in args.models:
        table, table_rounding = bench(
            name, args.samples, args.seed, args.opset22, args.per_op_rounding
        )
        rows += table
        rounding += table_rounding
    text = HEADER + "\n" + "\n".join(rows) + "\n"
    if args.per_op_rounding:
        text += "\n" + ROUNDING_HEADER + "\n" + "\n".join(rounding) + "\n"
    print("\n" + text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
