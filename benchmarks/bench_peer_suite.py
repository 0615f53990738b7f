"""Peer suite: how dsopt, onnxslim, onnxsim and onnxruntime's offline optimizer fare on the
models the onnx wheel ships for its backend tests (`dsopt.testing.backend_suite`).

For every case onnxruntime itself can run (CPU, ORT_DISABLE_ALL, on the backend runner's
inputs) each tool optimizes the model with its defaults (dsopt with `target="onnxruntime"`,
the runtime the suite runs on), in one process, and the result is
classified: `ok` (runs, outputs within rtol 1e-3 / atol 1e-4 of the original), `crash` (the
tool raised), `unloadable` (the written model no longer loads or runs in onnxruntime) or
`wrong` (runs, outputs differ). onnxruntime's offline optimizer is
`SessionOptions.optimized_model_filepath` at ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL.

Usage: python benchmarks/bench_peer_suite.py [--no-write]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort
from bench_optimize import ROOT, TOOLS, _first_line, _quiet, write_section

from dsopt import numerics
from dsopt.testing.backend_suite import discover

TITLE = "## Peer suite: onnx backend-test models through each optimizer"
RTOL, ATOL = 1e-3, 1e-4


def _ort_offline(level: ort.GraphOptimizationLevel) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    def run(model: onnx.ModelProto) -> onnx.ModelProto:
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
            options.log_severity_level = 4
            ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            return onnx.load(options.optimized_model_filepath)

    return run


ALL_TOOLS = {
    **TOOLS,
    "ort-extended": _ort_offline(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
    "ort-all": _ort_offline(ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
}


def classify(
    tool: Callable[[onnx.ModelProto], onnx.ModelProto],
    model: onnx.ModelProto,
    feeds: list[numerics.Feeds],
    expected: list[dict],
) -> tuple[str, str]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        result = _quiet(lambda: tool(copy))
    except Exception as e:  # noqa: BLE001 - a crash is the measurement
        return "crash", _first_line(e)
    try:
        for sample, reference in zip(feeds, expected, strict=True):
            got = numerics.run_model(result, sample)
            comparison = numerics.compare_outputs(reference, got, rtol=RTOL, atol=ATOL)
            if not all(c.within_tolerance for c in comparison):
                return "wrong", ", ".join(c.name for c in comparison if not c.within_tolerance)
    except Exception as e:  # noqa: BLE001
        return "unloadable", _first_line(e)
    return "ok", ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    started = time.time()
    tally = {name: collections.Counter() for name in ALL_TOOLS}
    failures = {name: [] for name in ALL_TOOLS}
    seconds = dict.fromkeys(ALL_TOOLS, 0.0)
    runnable = 0
    for case in discover():
        model = onnx.load(case.model)
        try:
            feeds = case.inputs()
            expected = [numerics.run_model(model, f) for f in feeds]
        except Exception:  # noqa: BLE001 - onnxruntime cannot run it: not part of the suite
            continue
        runnable += 1
        for name, tool in ALL_TOOLS.items():
            t = time.perf_counter()
            verdict, detail = classify(tool, model, feeds, expected)
            seconds[name] += time.perf_counter() - t
            tally[name][verdict] += 1
            if verdict != "ok":
                failures[name].append(f"{case.name} ({verdict}: {detail})")
        marks = " ".join(
            f"{n}={'X' if failures[n] and failures[n][-1].startswith(case.name + ' ') else 'ok'}"
            for n in ALL_TOOLS
        )
        print(f"{case.name}: {marks}", file=sys.stderr)
    lines = [
        TITLE,
        "",
        "Reproduce: `pip install -e '.[bench]' && python benchmarks/bench_peer_suite.py`",
        "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on the 2-core x86_64 "
        f"machine, onnx {onnx.__version__}, onnxruntime {ort.__version__}; "
        f"{runnable} cases onnxruntime can run, {time.time() - started:.0f} s in all. "
        "Each tool runs with its defaults; results are run in onnxruntime (CPU, ORT_DISABLE_ALL) "
        f"on the backend runner's inputs and compared at rtol {RTOL:g}, atol {ATOL:g}.",
        "",
        "| tool | ok | crash | unloadable | wrong outputs | seconds (all cases) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for name in ALL_TOOLS:
        t = tally[name]
        lines.append(
            f"| {name} | {t['ok']} | {t['crash']} | {t['unloadable']} | {t['wrong']} "
            f"| {seconds[name]:.1f} |"
        )
    lines.append("")
    for name in ALL_TOOLS:
        if failures[name]:
            shown = "; ".join(failures[name][:6])
            more = f" … and {len(failures[name]) - 6} more" if len(failures[name]) > 6 else ""
            lines.append(f"- {name} failures: {shown}{more}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(text, ROOT / "BENCHMARKS.md", TITLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
