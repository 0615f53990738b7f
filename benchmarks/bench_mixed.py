"""Mixed precision (issue 5) against uniform int8 / int4 weights, on held-out feeds.

    PYTHONPATH=. OPENBLAS_NUM_THREADS=1 python -m benchmarks.bench_mixed \
        --models ppocr_cls ppocr_rec ppocr_det resnet18_style bert_6l_384h --calib 8 --eval 16

Per model, on the model after dsopt's lossless pipeline (what `--precision mixed` assigns on):
uniform fp16, uniform int8 weights, uniform int4 weights (every weight at int4 blocks, or
per channel for depthwise/small convs; int8 where there is no int4 form), and
`--precision mixed` three ways: `--size-budget` = uniform int4's weight bytes (compare the
error), `--max-error` = uniform int8's relative L2 on the calibration samples (compare the
size), and `--min-cosine 0.99` (the smallest size at >= 0.99 output cosine). Sizes are the
weight bytes dsopt assigns (the MatMul/Gemm/Conv/Gather weights; biases and norms stay
float) and the serialized model. Errors (worst output's relative L2 and cosine, the feeds
pooled, as `--max-error`/`--min-cosine` define them) and task metrics (`bench_quant`'s) are
measured on held-out feeds, never the calibration ones. Sensitivities are measured once per
model (a `SensitivityCache` in memory) and reused by the three mixed runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.bench_quant import MODELS, _task, _task_metric
from dsopt.driver import optimize
from dsopt.ir import Module
from dsopt.mixed import (
    CANDIDATES,
    Budget,
    ErrorMeter,
    SensitivityCache,
    lower,
    measure,
    mixed_precision,
    output_errors,
    uniform_assignment,
    upgrade_for_quantization,
    weight_units,
)
from dsopt.pass_infra import PassContext
from dsopt.quant.calibration import CalibrationData

#: The default pipeline without `fuse-contrib-ops`, as `--precision mixed` runs it.
LOSSLESS = (
    "inline-constants,eliminate-noops,eliminate-double-negation,simplify-shapes,fold-constants,"
    "upgrade-opset,fuse-batch-norm,fold-bias-add,fold-conv-scale,fuse-matmul-add,"
    "fuse-activations,fuse-layer-norm,fuse-attention,fold-constant-chains,merge-layout-chains,"
    "fold-pad,fold-qdq,eliminate-common-subexpressions,eliminate-dead"
)


def _outputs(model: onnx.ModelProto, feeds: list[dict]) -> list[list[np.ndarray]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = {i.name for i in model.graph.input}
    return [session.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def bench(
    name: str, calib_count: int, eval_count: int, cosine: float, cache_dir: Path | None
) -> list[str]:
    started = time.perf_counter()
    source = onnx.load(MODELS / f"{name}.onnx")
    calib, _ = _task(name, source, calib_count, 0)
    held_out, labels = _task(name, source, eval_count, 1000)
    base = optimize(source, passes=LOSSLESS).module
    ctx = PassContext()
    upgrade_for_quantization(base, ("int8", "int4"), ctx)  # as mixed_precision does
    base_proto = base.to_proto()
    units = weight_units(base)
    fp32 = sum(u.fp32_bytes for u in units)
    meter = ErrorMeter(base_proto, calib)
    cache = SensitivityCache(cache_dir / f"{name}.json" if cache_dir else None)
    measure(base, units, CANDIDATES, meter, ctx, cache=cache)
    sens_s = time.perf_counter() - started
    print(f"{name}: {len(units)} weights, sensitivities in {sens_s:.0f} s", flush=True)

    variants: dict[str, tuple[Module, dict[str, int], str]] = {}
    for label, assignment in (
        ("uniform fp16", uniform_assignment(units, "fp16")),
        ("uniform int8 weights", uniform_assignment(units, "int8")),
        ("uniform int4 weights", uniform_assignment(units, "int4")),
    ):
        module, sizes = lower(base_proto, units, assignment, ctx)
        variants[label] = (module, sizes, "")
    int8_rel = meter.measure(variants["uniform int8 weights"][0].to_proto())[0]
    int4_bytes = sum(variants["uniform int4 weights"][1].values())
    data = CalibrationData.from_feeds(calib)
    runs = (
        (f"mixed --size-budget {int4_bytes}B (= int4)", {"size_budget": f"{int4_bytes}B"}),
        (f"mixed --max-error {int8_rel:.4g} (= int8)", {"budget": Budget(max_error=int8_rel)}),
        (f"mixed --min-cosine {cosine}", {"budget": Budget(min_cosine=cosine)}),
    )
    for label, kwargs in runs:
        budget = kwargs.pop("budget", Budget())
        t0 = time.perf_counter()
        result = mixed_precision(
            base, data, budget, ctx, samples=calib_count, cache=cache, **kwargs
        )
        counts = ", ".join(f"{v} {k}" for k, v in sorted(result.to_dict()["counts"].items()))
        note = f"{counts}; calib rel L2 {result.rel_l2:.4g}, {time.perf_counter() - t0:.0f} s"
        variants[label] = (result.module, result.sizes, note)

    ref = _outputs(base_proto, held_out)
    fp32_file = base_proto.ByteSize()
    rows = [
        f"| {name} | fp32 | {fp32 / 1e6:.2f} | 1.000 | {fp32_file / 1e6:.2f} | 0 | 1.00000 "
        f"| {_task_metric(name, source, ref, ref, labels)} | |"
    ]
    for label, (module, sizes, note) in variants.items():
        proto = module.to_proto()
        got = _outputs(proto, held_out)
        rel, cos = output_errors(ref, got)
        size = sum(sizes.values())
        rows.append(
            f"| {name} | {label} | {size / 1e6:.2f} | {size / fp32:.3f} | "
            f"{proto.ByteSize() / 1e6:.2f} | {rel:.4g} | {cos:.5f} | "
            f"{_task_metric(name, source, ref, got, labels)} | {note} |"
        )
    total = time.perf_counter() - started
    info = f"({len(calib)} calib, {len(held_out)} held out, {total:.0f} s)"
    rows.append(f"| {name} | {info} | | | | | | | |")
    for row in rows:
        print(row, flush=True)
    return rows


HEADER = (
    "| model | config | weights MB | of fp32 | model MB | rel L2 | cosine | task | notes |\n"
    "|---|---|---:|---:|---:|---:|---:|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ppocr_cls", "ppocr_rec"])
    parser.add_argument("--calib", type=int, default=8, help="calibration samples")
    parser.add_argument("--eval", type=int, default=16, help="held-out samples")
    parser.add_argument("--min-cosine", type=float, default=0.99)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--cache", type=Path, help="keep measured sensitivities in this folder")
    args = parser.parse_args()
    rows: list[str] = []
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        rows += bench(name, args.calib, args.eval, args.min_cosine, args.cache)
        if args.out:
            args.out.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    print(HEADER + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
