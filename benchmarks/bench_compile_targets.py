"""Compile time of every TVM target on the same models, side by side in one run.

For each model and target, `dsopt.compile(model, target=T, shapes=..., check=False)` into a
temporary OUTDIR; reported: the wall time of the whole compile (dsopt passes, static shapes,
TVM import + build, link), TVM's share (`compile_seconds` in the manifest), the library's
size and kind, and the schedule counts. The goal is < 60 s per untuned compile.

Usage:
    python benchmarks/bench_compile_targets.py [--models ppocr_cls ...] [--targets x86 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import dsopt
from benchmarks.bench_tvm_cpu import MODELS, MODELS_DIR

TARGETS = ("x86", "arm-neon", "rpi4", "jetson", "cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", default=["ppocr_cls", "ppocr_rec", "ppocr_det", "bert_6l_384h"]
    )
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    args = parser.parse_args()
    print("| model | target | wall | TVM import + build | library | schedules |")
    print("|---|---|---:|---:|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for target in args.targets:
                out = Path(tmp) / f"{name}-{target}"
                started = time.perf_counter()
                try:
                    dsopt.compile(
                        MODELS_DIR / f"{name}.onnx", target=target, shapes=MODELS[name],
                        outdir=out, check=False,
                    )  # fmt: skip
                except dsopt.DsoptError as e:
                    print(f"| {name} | {target} | fails: {str(e).splitlines()[0]} | | | |")
                    continue
                wall = time.perf_counter() - started
                manifest = json.loads((out / "manifest.json").read_text())
                library = next(a for a in manifest["artifacts"] if a["role"] == "library")
                kind = library["path"] + (
                    f" ({manifest['cuda']['code']})" if "cuda" in manifest else ""
                )
                counts = manifest["tvm"]["schedules"]
                sched = ", ".join(
                    f"{k} {v}" for k, v in counts.items() if k not in ("rules", "int8") and v
                )
                print(
                    f"| {name} | {target} | {wall:.1f} s | {library['compile_seconds']:.1f} s | "
                    f"{kind}, {library['bytes'] / 1e6:.1f} MB | {sched or '-'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
