"""Benchmark dsopt's lossless default pipeline against onnxslim and onnxsim, in one process.

For every model each tool gets a fresh copy of the same in-memory ModelProto and returns a
ModelProto: `dsopt.optimize(model, target="onnxruntime").module.to_proto()` (the target whose
runtime `bench_latency.py` times; it allows com.microsoft contrib fusions and opset upgrades),
`onnxslim.slim(model)` and `onnxsim.simplify(model)[0]`, the last two with their default
settings (no input shapes fixed). `dsopt.optimize(model)` (no target: the portable default
pipeline) runs too, once per model, for its own node-count column.

The light models (the onnx wheel's `backend/test/data/light/*.onnx`) are stand-ins for real
CNNs: their weights are `ConstantOfShape` generators where real models have initializers. So
before any tool sees them, `materialize_weights` turns every generator whose shape is an
initializer or a Constant into an initializer of the same name holding the generated tensor
(the node goes; nothing else changes, except that under the models' IR version 3 the new
initializer is also listed as a graph input, as their other weights are). Every tool gets
that same materialized model, so node counts compare fusion work rather than who folds
generators, and the "before" columns count the materialized model.

Recorded:

* nodes after (all graphs, subgraphs included) and constant bytes after (initializers plus
  Constant-node tensors, so a tool that turns Constant nodes into initializers, or the reverse,
  is not credited with creating or removing weights);
* whether the goal is met: dsopt (target onnxruntime) leaves at most as many nodes as the
  better of onnxslim and onnxsim;
* wall time, median of 3 repetitions; the repetitions are interleaved (rep 1: dsopt, onnxslim,
  onnxsim; rep 2: onnxslim, onnxsim, dsopt; ...) so drift on a shared machine hits all tools,
  after one untimed warm-up call of each tool on a tiny model (imports, first-call setup);
  dsopt without a target is not timed;
* a crash (the exception's first line; the tool is not repeated after one);
* max abs error of the result against the original under onnxruntime (CPU, ORT_DISABLE_ALL,
  `dsopt.numerics`), on the onnx backend runner's inputs for the light models and on seeded
  random inputs (seed 0; attention masks all ones, token types all zeros) for the others.

Usage:
    python benchmarks/export_models.py          # once: builds benchmarks/models/
    python benchmarks/bench_optimize.py [--models NAME ...] [--reps 3] [--no-write]

Prints a markdown section and (unless --no-write) puts it into BENCHMARKS.md, replacing the
section of the same title.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import onnxsim
import onnxslim

import dsopt
from dsopt import numerics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = HERE / "models"
CRASH_DIR = HERE / ".cache" / "crashes"  # dsopt writes dsopt-crash-*/ reproducers to the cwd
TITLE = "## Optimize (lossless default pipeline) vs onnxslim vs onnxsim"
COMMAND = (
    "pip install -e '.[bench]' && python benchmarks/export_models.py && "
    "python benchmarks/bench_optimize.py"
)
RTOL, ATOL = 1e-3, 1e-4
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

# Shapes for inputs with symbolic or unknown dims (random feeds only; the models keep them).
FEED_SHAPES: dict[str, dict[str, list[int]]] = {
    "bert_6l_384h_dynamic": {
        n: [1, 128] for n in ("input_ids", "attention_mask", "token_type_ids")
    },
    "ppocr_det": {"x": [1, 3, 640, 640]},
    "ppocr_rec": {"x": [1, 3, 48, 320]},
    "ppocr_cls": {"x": [1, 3, 48, 192]},
}


# -- models -----------------------------------------------------------------------------------
@dataclass
class Model:
    name: str
    path: Path
    feeds: Callable[[onnx.ModelProto], numerics.Feeds]
    materialize: bool = False  # the light models: ConstantOfShape weights become initializers

    def load(self) -> onnx.ModelProto:
        proto = onnx.load(self.path)
        return materialize_weights(proto) if self.materialize else proto


def materialize_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` whose constant-shape ConstantOfShape nodes are initializers.

    Every top-graph ConstantOfShape node whose shape input is an initializer or the output of a
    Constant node becomes an initializer named after its output, holding
    `np.full(shape, value, dtype)` (value and dtype from its `value` attribute; without one,
    float32 0), and the node is removed. Nothing else changes: the shape tensors stay where they
    were, and under IR version 3, where initializers must also be graph inputs (as the light
    models' other weights are), each new initializer is also listed as an input.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    known = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and not node.domain:
            for attr in node.attribute:
                if attr.name == "value":
                    known[node.output[0]] = attr.t
                elif attr.name == "value_ints":
                    known[node.output[0]] = onnx.numpy_helper.from_array(
                        np.asarray(attr.ints, dtype=np.int64)
                    )
    keep = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.domain or node.input[0] not in known:
            keep.append(node)
            continue
        shape = onnx.numpy_helper.to_array(known[node.input[0]]).astype(np.int64).tolist()
        value = np.zeros(1, dtype=np.float32)
        for attr in node.attribute:
            if attr.name == "value":
                value = onnx.numpy_helper.to_array(attr.t).reshape(-1)
        tensor = onnx.numpy_helper.from_array(
            np.full(shape, value[0], dtype=value.dtype), node.output[0]
        )
        graph.initializer.append(tensor)
        if out.ir_version < 4:
            graph.input.append(
                onnx.helper.make_tensor_value_info(node.output[0], tensor.data_type, shape)
            )
    del graph.node[:]
    graph.node.extend(keep)
    onnx.checker.check_model(out)
    return out


def _runner_feeds(proto: onnx.ModelProto) -> numerics.Feeds:
    from onnx.backend.test.runner import Runner

    weights = {t.name for t in proto.graph.initializer}
    return {
        x.name: Runner.generate_dummy_data(x, random=False)
        for x in proto.graph.input
        if x.name not in weights
    }


def _random_feeds(name: str) -> Callable[[onnx.ModelProto], numerics.Feeds]:
    def feeds(proto: onnx.ModelProto) -> numerics.Feeds:
        values = numerics.random_inputs(
            _unfix_negative_dims(proto), shapes=FEED_SHAPES.get(name), seed=0
        )
        for key, value in values.items():
            if "mask" in key:  # a mask of 2s and 3s overflows BERT's additive mask to inf
                values[key] = np.ones_like(value)
            elif "token_type" in key:  # BERT has 2 token types; random ints go up to 3
                values[key] = np.zeros_like(value)
        return values

    return feeds


def _unfix_negative_dims(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the inputs' signature where dim_value -1 (Paddle2ONNX's "dynamic") is unknown.

    onnxruntime treats a negative dim as symbolic; dsopt.numerics (at the time of writing) takes
    it as fixed and rejects any override of it, so the random feeds are made from this copy.
    """
    if not any(
        d.HasField("dim_value") and d.dim_value < 0
        for x in proto.graph.input
        for d in x.type.tensor_type.shape.dim
    ):
        return proto
    copy = onnx.ModelProto()
    copy.graph.input.extend(proto.graph.input)
    for x in copy.graph.input:
        for d in x.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value < 0:
                d.dim_param = "?"
    return copy


def discover() -> list[Model]:
    models = [Model(p.stem, p, _runner_feeds, True) for p in sorted(LIGHT.glob("*.onnx"))]
    models += [Model(p.stem, p, _random_feeds(p.stem)) for p in sorted(MODELS.glob("*.onnx"))]
    return models


# -- measurements ----------------------------------------------------------------------------
def count_nodes(graph: onnx.GraphProto) -> int:
    total = 0
    for node in graph.node:
        total += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += count_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_nodes(g) for g in attr.graphs)
    return total


def count_op(graph: onnx.GraphProto, op_type: str) -> int:
    return sum(1 for node in graph.node if node.op_type == op_type and not node.domain)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def constant_bytes(graph: onnx.GraphProto) -> int:
    total = sum(_tensor_bytes(t) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                total += _tensor_bytes(attr.t)
            elif attr.type == onnx.AttributeProto.GRAPH:
                total += constant_bytes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(constant_bytes(g) for g in attr.graphs)
    return total


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}"[:160]


# -- tools --------------------------------------------------------------------------------------
def run_dsopt(model: onnx.ModelProto) -> onnx.ModelProto:
    return dsopt.optimize(model, target="onnxruntime").module.to_proto()


def run_dsopt_no_target(model: onnx.ModelProto) -> onnx.ModelProto:
    return dsopt.optimize(model).module.to_proto()


def run_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnxslim.slim(model)


def run_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    simplified, _ = onnxsim.simplify(model)
    return simplified


# Timed, and the variants of bench_latency.py: "dsopt" is dsopt with target="onnxruntime".
TOOLS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "dsopt": run_dsopt,
    "onnxslim": run_onnxslim,
    "onnxsim": run_onnxsim,
}
# Run once per model, untimed, for the node table only.
EXTRA_TOOLS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "dsopt_no_target": run_dsopt_no_target,
}
LABELS = {
    "dsopt": "dsopt (target onnxruntime)",
    "dsopt_no_target": "dsopt (no target)",
    "onnxslim": "onnxslim",
    "onnxsim": "onnxsim",
}


@dataclass
class ToolResult:
    times: list[float] = field(default_factory=list)
    nodes: int | None = None
    bytes: int | None = None
    error: str | None = None  # crash while optimizing
    max_abs: float | None = None
    ok: bool | None = None  # within RTOL/ATOL on every output
    check_error: str | None = None  # the result could not be run or compared


@dataclass
class ModelResult:
    name: str
    nodes: int  # of the model the tools get (the light models: materialized)
    bytes: int
    materialized: int | None  # ConstantOfShape nodes made initializers (None: not a light model)
    tools: dict[str, ToolResult]


def warm_up() -> None:
    """Runs every tool once on a tiny model, so lazy imports and first-call setup go untimed."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    for tool in (*TOOLS.values(), *EXTRA_TOOLS.values()):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        _quiet(lambda fn=tool, m=copy: fn(m))


def _quiet(fn: Callable[[], Any]) -> Any:
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return fn()


def bench_model(model: Model, reps: int) -> ModelResult:
    original = model.load()
    feeds = model.feeds(original)
    reference = numerics.run_model(original, feeds)
    tools = {**TOOLS, **EXTRA_TOOLS}
    results = {name: ToolResult() for name in tools}
    names, k = list(TOOLS), len(TOOLS)
    # Interleaved timed repetitions, then the untimed extra tools once.
    plan = [name for rep in range(reps) for name in names[rep % k :] + names[: rep % k]]
    plan += list(EXTRA_TOOLS)
    for name in plan:
        result = results[name]
        if result.error is not None:
            continue
        copy = onnx.ModelProto()
        copy.CopyFrom(original)
        started = time.perf_counter()
        try:
            out = _quiet(lambda fn=tools[name], m=copy: fn(m))
        except Exception as e:  # noqa: BLE001 - a crash is a result here
            result.error = _first_line(e)
            continue
        result.times.append(time.perf_counter() - started)
        if result.nodes is None:
            _measure(result, out, feeds, reference)
        del out
    generators = count_op(onnx.load(model.path).graph, "ConstantOfShape")
    return ModelResult(
        model.name,
        count_nodes(original.graph),
        constant_bytes(original.graph),
        generators - count_op(original.graph, "ConstantOfShape") if model.materialize else None,
        results,
    )


def _measure(
    result: ToolResult, out: onnx.ModelProto, feeds: numerics.Feeds, reference: dict[str, Any]
) -> None:
    result.nodes = count_nodes(out.graph)
    result.bytes = constant_bytes(out.graph)
    try:
        got = numerics.run_model(out, feeds)
    except Exception as e:  # noqa: BLE001 - recorded in the table
        result.check_error = _first_line(e)
        return
    comparisons = numerics.compare_outputs(reference, got, rtol=RTOL, atol=ATOL)
    errors = [c.max_abs_error for c in comparisons]
    result.ok = all(c.within_tolerance for c in comparisons)
    if any(e is None for e in errors):
        result.check_error = "; ".join(c.describe() for c in comparisons if not c.within_tolerance)
    finite = [e for e in errors if e is not None]
    result.max_abs = max(finite) if finite else None


# -- report -------------------------------------------------------------------------------------
def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f}"


def _cell_nodes(r: ToolResult) -> str:
    return "crash" if r.error else str(r.nodes)


def _cell_time(r: ToolResult) -> str:
    if r.error:
        return "crash"
    return f"{statistics.median(r.times):.2f}"


def _cell_err(r: ToolResult) -> str:
    if r.error:
        return "crash"
    if r.check_error and r.max_abs is None:
        return "run failed"
    text = f"{r.max_abs:.1e}" if r.max_abs is not None else "—"
    return text if r.ok else f"**{text} ✗**"


def _best_other(m: ModelResult) -> int | None:
    others = [m.tools[t].nodes for t in ("onnxslim", "onnxsim") if m.tools[t].nodes is not None]
    return min(others) if others else None


def _ratio(m: ModelResult) -> str:
    ours, best = m.tools["dsopt"].nodes, _best_other(m)
    if ours is None or not best:
        return "—"
    return f"{ours / best:.2f}"


def goal_met(m: ModelResult) -> bool:
    """dsopt (target onnxruntime) leaves at most as many nodes as onnxslim and onnxsim.

    A result that fails the numeric check does not count.
    """
    ours, best = m.tools["dsopt"].nodes, _best_other(m)
    return ours is not None and m.tools["dsopt"].ok is True and (best is None or ours <= best)


def render(
    results: list[ModelResult], started: datetime.datetime, seconds: float, reps: int, load: float
) -> str:
    tools = list(TOOLS)
    node_tools = ["dsopt", *EXTRA_TOOLS, *(t for t in tools if t != "dsopt")]
    light = [m for m in results if m.materialized is not None]
    lines = [
        TITLE,
        "",
        "Reproduce (from the repository root):",
        "",
        "```sh",
        COMMAND,
        "```",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all, on a {os.cpu_count()}-core "
        f"{platform.machine()} machine ({_cpu()}, 1-minute load average {load:.1f} at the "
        "start: the machine was shared, so read times as rough), "
        f"Python {platform.python_version()}, "
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"dsopt {dsopt.__version__}, onnxslim {onnxslim.__version__}, "
        f"onnxsim {getattr(onnxsim, '__version__', '?')}. Each tool gets the same in-memory "
        "model; onnxslim and onnxsim run with their defaults. *dsopt (target onnxruntime)* is "
        '`dsopt.optimize(model, target="onnxruntime")` (the target whose runtime the latency '
        "benchmark uses: it allows com.microsoft contrib fusions and opset upgrades; "
        "`verify=end`); it is the dsopt of every column not marked otherwise. *dsopt (no "
        "target)* is `dsopt.optimize(model)`, the portable default pipeline, run once per model "
        "for its node count. Light models are the onnx wheel's `backend/test/data/light` CNNs; "
        "the others are built by `benchmarks/export_models.py`.",
        "",
        "Nodes after (all graphs); *nodes before* counts the model the tools get (for the light "
        "models, after their weights were materialized; see below). *dsopt/best* is dsopt's "
        "count over the smaller of onnxslim's and onnxsim's (below 1: dsopt leaves fewer "
        "nodes); *goal met*: dsopt leaves at most as many nodes as the better of onnxslim and "
        "onnxsim, with a result that passes the numeric check. Constant MB counts initializers "
        "and Constant-node tensors.",
        "",
        "| model | nodes before | "
        + " | ".join(LABELS[t] for t in node_tools)
        + " | dsopt/best | goal met | const MB before | "
        + " | ".join(f"{LABELS[t]} MB" for t in tools)
        + " |",
        "|---|" + "---:|" * (len(node_tools) + 2) + ":---:|" + "---:|" * (len(tools) + 1),
    ]
    for m in results:
        lines.append(
            f"| {m.name} | {m.nodes} | "
            + " | ".join(_cell_nodes(m.tools[t]) for t in node_tools)
            + f" | {_ratio(m)} | {'yes' if goal_met(m) else '**no**'} | {_mb(m.bytes)} | "
            + " | ".join("crash" if m.tools[t].error else _mb(m.tools[t].bytes) for t in tools)
            + " |"
        )
    met = sum(goal_met(m) for m in results)
    lines += ["", f"Goal (nodes) met on {met} of {len(results)} models."]
    lines += [
        "",
        f"Wall time in seconds (median of {reps}, interleaved) and max abs error of the result "
        f"against the original (✗: outside rtol {RTOL:g}, atol {ATOL:g}).",
        "",
        "| model | "
        + " | ".join(f"{LABELS[t]} s" for t in tools)
        + " | "
        + " | ".join(f"{LABELS[t]} err" for t in tools)
        + " |",
        "|---|" + "---:|" * (2 * len(tools)),
    ]
    for m in results:
        lines.append(
            f"| {m.name} | "
            + " | ".join(_cell_time(m.tools[t]) for t in tools)
            + " | "
            + " | ".join(_cell_err(m.tools[t]) for t in tools)
            + " |"
        )
    if light:
        lines += [
            "",
            "The light models stand in for real CNNs, but store their weights as "
            "`ConstantOfShape` generators where real models have initializers. Before any tool "
            "sees them, the script's `materialize_weights` turns each generator with a constant "
            "shape into an initializer holding the generated tensor (a neutral numpy step: the "
            "node goes, nothing else changes; under the models' IR version 3 each new "
            "initializer is also listed as a graph input, as their other weights are). Every "
            "tool gets that same materialized model, so "
            "the node counts compare fusion work, not who folds generators; *nodes before* and "
            "*const MB before* count the materialized model. Each generated weight holds a "
            "single repeated value, so a tool that merges identical initializers shrinks these "
            "models' MB far more than it would real weights. Generators materialized: "
            + ", ".join(f"{m.name} {m.materialized}" for m in light)
            + ".",
        ]
    notes = [
        (m.name, LABELS[t], r.error or r.check_error)
        for m in results
        for t, r in m.tools.items()
        if r.error or r.check_error
    ]
    if notes:
        lines += ["", "Crashes and failed checks (first line of the error):", ""]
        lines += [f"- {name}, {tool}: `{why}`" for name, tool, why in notes]
    totals = {t: sum(1 for m in results if m.tools[t].error) for t in node_tools}
    lines += [
        "",
        "Crashed on: "
        + ", ".join(f"{LABELS[t]} {n}/{len(results)}" for t, n in totals.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path, title: str = TITLE) -> None:
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        new = (
            "".join(lines[:start])
            + text
            + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
        )
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="model names (file stems) to run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    models = discover()
    if args.models:
        models = [m for m in models if m.name in set(args.models)]
    if not any(m.path.parent == MODELS for m in models) and not args.models:
        print("benchmarks/models/ is empty: run benchmarks/export_models.py first", file=sys.stderr)
    CRASH_DIR.mkdir(parents=True, exist_ok=True)
    os.chdir(CRASH_DIR)
    started = datetime.datetime.now(datetime.UTC)
    load = os.getloadavg()[0]
    warm_up()
    t0 = time.perf_counter()
    results = []
    for model in models:
        t = time.perf_counter()
        results.append(bench_model(model, args.reps))
        print(f"{model.name}: {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    text = render(results, started, time.perf_counter() - t0, args.reps, load)
    print(text)
    if not args.no_write:
        write_section(text, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
