"""Wall time of `dsopt compile --cache-dir`: a cold run (miss) against an unchanged rerun (hit).

Each run is a fresh `python -m dsopt compile` process, as a build system would start it, so the
times include interpreter start and imports. Prints a markdown table.

    python benchmarks/bench_compile_cache.py [--layers 120] [--targets onnxruntime,x86]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def chain(layers: int, width: int) -> onnx.ModelProto:
    """x -> (MatMul -> Add -> Relu) * layers, static shapes (TVM targets need them)."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
        ]
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dsopt", *argv], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=120)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--targets", default="onnxruntime,x86")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = root / "chain.onnx"
        onnx.save_model(chain(args.layers, args.width), model)
        for target in args.targets.split(","):
            store = root / f"cache-{target}"
            base = ["compile", str(model), "--target", target, "--cache-dir", str(store)]
            miss = timed([*base, "-o", str(root / f"{target}-a")])
            hit = timed([*base, "-o", str(root / f"{target}-b")])
            files = sorted(p.name for p in (root / f"{target}-a").iterdir())
            same = all(
                filecmp.cmp(root / f"{target}-a" / f, root / f"{target}-b" / f, shallow=False)
                for f in files
                if f != "report.json"
            )
            report = json.loads((root / f"{target}-b" / "report.json").read_text())
            rows.append((target, miss, hit, ", ".join(files), same, report["cache"]["hit"]))
    print(f"model: {args.layers} x (MatMul {args.width}x{args.width} + Add + Relu)\n")
    print("| target | miss (s) | hit (s) | hit/miss | OUTDIR | identical bytes | cache.hit |")
    print("|---|---|---|---|---|---|---|")
    for target, miss, hit, files, same, was_hit in rows:
        print(
            f"| {target} | {miss:.2f} | {hit:.2f} | {hit / miss:.2f} | {files} | {same} "
            f"| {was_hit} |"
        )


if __name__ == "__main__":
    main()
