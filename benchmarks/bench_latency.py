"""onnxruntime CPU latency of the original model vs onnxslim's, onnxsim's and dsopt's results.

Each model is optimized once by each tool from a fresh copy of the same in-memory ModelProto
(the tools of `bench_optimize.TOOLS`): dsopt as `dsopt.optimize(model, target="onnxruntime")
.module.to_proto()`, the target for the runtime timed here (it allows com.microsoft contrib
fusions and opset upgrades), and `onnxslim.slim(model)` and `onnxsim.simplify(model)[0]` with
their defaults. Then one onnxruntime session per variant is created up front, the way users
run models: CPUExecutionProvider, `intra_op_num_threads=2`, `inter_op_num_threads=1`, ORT's
own graph optimizations on (`ORT_ENABLE_ALL`), everything else default.

Models: by default the `benchmarks/models/` ones and the onnx wheel's light CNNs, the latter
with their `ConstantOfShape` weights materialized into initializers first
(`bench_optimize.materialize_weights`; the original variant is that materialized model, so no
variant pays for generating weights on each run). light_vgg19 is left out of the defaults (see
`SKIPPED`): one run takes over 1.5 s on 2 threads on the 2-core machine this was written on.

Timing, all variants fed the same inputs (`bench_optimize`'s feeds: the onnx backend runner's
inputs for the light models; for the others seeded random ones, seed 0, attention masks all
ones, token types all zeros, fixed shapes for the symbolic dims):

* warm-up: `--warmup` runs of each variant, interleaved; the first run's outputs are checked
  against the original session's (max abs error over all outputs);
* `--rounds` timing rounds; in each round every variant runs `--runs` times back to back, and
  the variants take turns (round-robin, the starting variant rotating every round), so drift
  and noise from other processes on a shared machine hit all variants alike;
* SETTLE: each variant's turn starts with one untimed run. ORT's intra-op threads spin for a
  while after a run (`session.intra_op.allow_spinning`, on by default and left on here, as
  users run it), so the previous variant's threads compete with the first run after a switch:
  on 2 cores that run measured up to 2-4x slower (resnet18_style_unfolded, ppocr_cls), a cost
  of switching sessions that a user running one model never pays;
* per variant: the median over rounds of the per-round median (reported), and the 10th-90th
  percentile of the per-round medians (the spread);
* dsopt against the faster of onnxslim and onnxsim: the ratio of medians, and, since rounds are
  interleaved, the per-round paired ratio (dsopt's round median over that tool's round median),
  whose p10-p90 tells whether a difference stands out of the noise;
* goal: dsopt at least as fast as the faster of onnxslim and onnxsim, met when the median of
  the paired ratio is at most 1.00, or "within noise" when it is above 1.00 but its p10-p90
  straddles 1.00.

Usage:
    python benchmarks/export_models.py          # once: builds benchmarks/models/
    python benchmarks/bench_latency.py [--models NAME ...] [--rounds 30] [--runs 5] [--no-write]

Prints a markdown section and (unless --no-write) puts it into BENCHMARKS.md, replacing the
section of the same title.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import onnxsim
import onnxslim

import dsopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimize import (  # noqa: E402 - needs the path above when run as a script
    CRASH_DIR,
    ROOT,
    TOOLS,
    Model,
    _cpu,
    _first_line,
    _quiet,
    count_nodes,
    discover,
    warm_up,
    write_section,
)

TITLE = "## Latency: onnxruntime CPU, original vs onnxslim vs onnxsim vs dsopt"
COMMAND = (
    "pip install -e '.[bench]' && python benchmarks/export_models.py && "
    "python benchmarks/bench_latency.py"
)
# The light_* models run materialized (bench_optimize.materialize_weights, in Model.load).
DEFAULT_MODELS = [
    "ppocr_cls",
    "ppocr_det",
    "ppocr_rec",
    "resnet18_style_unfolded",
    "bert_6l_384h",
    "light_bvlc_alexnet",
    "light_densenet121",
    "light_inception_v1",
    "light_inception_v2",
    "light_resnet50",
    "light_shufflenet",
    "light_squeezenet",
    "light_zfnet512",
]
# Left out of DEFAULT_MODELS, and why (said in the generated text; --models still runs them).
SKIPPED = {
    "light_vgg19": "one run of the original takes about 2.3 s on 2 ORT threads on the 2-core "
    "machine these defaults were chosen on (the other light models: 0.04–0.72 s), so the "
    "timing protocol would take about 10 minutes for it alone",
}
VARIANTS = ["original", "onnxslim", "onnxsim", "dsopt"]
THREADS = 2


@dataclass
class Variant:
    name: str
    nodes: int | None = None
    error: str | None = None  # the tool crashed, or the session could not be created / run
    max_abs: float | None = None
    session: onnxruntime.InferenceSession | None = None
    rounds: list[float] = field(default_factory=list)  # per-round median, seconds

    @property
    def median(self) -> float | None:
        return statistics.median(self.rounds) if self.rounds else None


@dataclass
class ModelResult:
    name: str
    variants: dict[str, Variant]
    best_other: str | None = None  # the faster of onnxslim and onnxsim
    paired: list[float] = field(default_factory=list)  # per-round dsopt / best_other
    seconds: float = 0.0
    load: float = 0.0  # 1-minute load average when the model was done


def _session(proto: onnx.ModelProto) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _feeds_for(session: onnxruntime.InferenceSession, feeds: dict) -> dict:
    names = {x.name for x in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def _max_abs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, ref in reference.items():
        if name not in got:
            raise ValueError(f"output {name!r} missing")
        out = got[name]
        if out.shape != ref.shape:
            raise ValueError(f"output {name!r} has shape {out.shape}, expected {ref.shape}")
        if ref.size == 0:
            continue
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        worst = max(worst, float(np.nanmax(diff)) if np.isfinite(diff).any() else float("inf"))
    return worst


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_model(model: Model, rounds: int, runs: int, warmup: int) -> ModelResult:
    t0 = time.perf_counter()
    original = model.load()
    feeds = model.feeds(original)
    variants = {name: Variant(name) for name in VARIANTS}
    protos: dict[str, onnx.ModelProto] = {"original": original}
    for name in VARIANTS[1:]:
        copy = onnx.ModelProto()
        copy.CopyFrom(original)
        try:
            protos[name] = _quiet(lambda fn=TOOLS[name], m=copy: fn(m))
        except Exception as e:  # noqa: BLE001 - a crash is a result here
            variants[name].error = "optimize: " + _first_line(e)
    for name, proto in protos.items():
        variants[name].nodes = count_nodes(proto.graph)
        try:
            variants[name].session = _session(proto)
        except Exception as e:  # noqa: BLE001
            variants[name].error = "session: " + _first_line(e)
    del protos
    live = [v for v in variants.values() if v.session is not None]
    if variants["original"].session is None:
        live = []
    inputs = {v.name: _feeds_for(v.session, feeds) for v in live}
    output_names = {v.name: [o.name for o in v.session.get_outputs()] for v in live}

    # Warm-up, interleaved; the first run's outputs are the correctness check.
    reference: dict[str, np.ndarray] = {}
    for i in range(warmup):
        for v in list(live):
            try:
                outs = v.session.run(None, inputs[v.name])
            except Exception as e:  # noqa: BLE001
                v.error = "run: " + _first_line(e)
                live.remove(v)
                if v.name == "original":
                    live = []  # nothing to check the others against
                    break
                continue
            if i == 0:
                got = dict(zip(output_names[v.name], outs, strict=True))
                if v.name == "original":
                    reference = got
                try:
                    v.max_abs = _max_abs(reference, got)
                except ValueError as e:
                    v.error = "outputs: " + str(e)
                    live.remove(v)

    # Timing rounds: round-robin over the variants, the first one rotating every round.
    for r in range(rounds):
        k = r % len(live) if live else 0
        for v in live[k:] + live[:k]:
            run, feed = v.session.run, inputs[v.name]
            run(None, feed)  # untimed: see SETTLE in the module docstring
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                run(None, feed)
                times.append(time.perf_counter() - started)
            v.rounds.append(statistics.median(times))
    for v in variants.values():
        v.session = None

    result = ModelResult(model.name, variants)
    others = [variants[t] for t in ("onnxslim", "onnxsim") if variants[t].rounds]
    if others and variants["dsopt"].rounds:
        best = min(others, key=lambda v: v.median)
        result.best_other = best.name
        result.paired = [d / b for d, b in zip(variants["dsopt"].rounds, best.rounds, strict=True)]
    result.seconds = time.perf_counter() - t0
    result.load = os.getloadavg()[0]
    return result


# -- report -------------------------------------------------------------------------------------
def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.2f}"


def _cell(v: Variant) -> str:
    if v.error:
        return "crash" if v.error.startswith("optimize") else "failed"
    return f"{_ms(v.median)} ({_ms(_percentile(v.rounds, 10))}–{_ms(_percentile(v.rounds, 90))})"


def _vs_original(v: Variant, original: Variant) -> str:
    if v.median is None or original.median is None:
        return "—"
    return f"{v.median / original.median:.3f}"


def _err(v: Variant) -> str:
    if v.max_abs is None:
        return "—"
    return f"{v.max_abs:.1e}"


def goal(m: ModelResult) -> str | None:
    """ "yes" (paired median <= 1.00), "within noise" (p10-p90 straddles 1.00) or "no"."""
    if not m.paired:
        return None
    if statistics.median(m.paired) <= 1.0:
        return "yes"
    if _percentile(m.paired, 10) <= 1.0 <= _percentile(m.paired, 90):
        return "within noise"
    return "no"


def _verdict(m: ModelResult) -> str | None:
    if not m.paired:
        return None
    lo, hi = _percentile(m.paired, 10), _percentile(m.paired, 90)
    if hi < 1.0:
        return "faster"
    if lo > 1.0:
        return "slower"
    return "tie"


def render(
    results: list[ModelResult],
    started: datetime.datetime,
    seconds: float,
    load: tuple[float, float, float],
    load_end: float,
    args: argparse.Namespace,
) -> str:
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
        f"{platform.machine()} machine ({_cpu()}; load average {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} (1 / 5 / 15 min) at the start, 1-minute {load_end:.2f} at the end: the "
        "machine is shared, so other processes may have run alongside), "
        f"Python {platform.python_version()}, onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, dsopt {dsopt.__version__}, "
        f"onnxslim {onnxslim.__version__}, onnxsim {getattr(onnxsim, '__version__', '?')}.",
        "",
        "Each variant gets one onnxruntime session, created up front: CPUExecutionProvider, "
        f"{THREADS} intra-op threads, 1 inter-op thread, `ORT_ENABLE_ALL` (ORT's own graph "
        "optimizations on, as users run it). onnxslim and onnxsim run with their defaults; "
        'dsopt is `dsopt.optimize(model, target="onnxruntime").module.to_proto()`, the target '
        "for the runtime timed here (it allows com.microsoft contrib fusions and opset "
        "upgrades). The light models (the onnx wheel's `backend/test/data/light` CNNs) store "
        "their weights as `ConstantOfShape` generators; `bench_optimize.materialize_weights` "
        "turns those into initializers first, and every variant, the original included, "
        "starts from that materialized model. Same inputs for all variants (the onnx backend "
        "runner's for the light models, seeded random ones for the others; see "
        f"`bench_optimize.py`). {args.warmup} warm-up runs per variant, then "
        f"{args.rounds} interleaved rounds (round-robin over the variants, the first one "
        f"rotating) of {args.runs} timed runs each, after one untimed run (ORT's pool threads "
        "spin after a run, so the first run after switching sessions pays for the previous "
        "session's threads; see the script's docstring).",
        "",
        "*ms* is the median over rounds of each round's median, in milliseconds, with the "
        "p10–p90 of the round medians in parentheses (the noise). *×orig* is the median over "
        "the original's median. *dsopt/best* is dsopt's median over the faster of onnxslim "
        "and onnxsim (named); at or below 1.00 dsopt is at least as fast. *paired p10–p90* is "
        "the spread of the same ratio taken round by round (the rounds are interleaved, so "
        "this cancels drift): when it straddles 1.00 the difference is within the noise. "
        "*goal met*: dsopt at least as fast as the better of onnxslim and onnxsim, that is a "
        "paired median at most 1.00 (*yes*), or above it with the paired p10–p90 straddling "
        "1.00 (*within noise*). *err* is the max abs difference of every output from the "
        "original's (under the same session options).",
        "",
        "| model | nodes orig / slim / sim / dsopt | original ms | onnxslim ms | onnxsim ms "
        "| dsopt ms | ×orig slim / sim / dsopt | dsopt/best | paired p10–p90 | goal met "
        "| err slim / sim / dsopt |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for m in results:
        v = m.variants
        nodes = " / ".join("crash" if v[t].nodes is None else str(v[t].nodes) for t in VARIANTS)
        ratios = " / ".join(_vs_original(v[t], v["original"]) for t in VARIANTS[1:])
        if m.paired:
            best = v[m.best_other]
            dsopt_best = f"{v['dsopt'].median / best.median:.3f} ({m.best_other})"
            paired = f"{_percentile(m.paired, 10):.3f}–{_percentile(m.paired, 90):.3f}"
        else:
            dsopt_best = paired = "—"
        errs = " / ".join(_err(v[t]) for t in VARIANTS[1:])
        met = {None: "—", "no": "**no**"}.get(goal(m), goal(m))
        lines.append(
            f"| {m.name} | {nodes} | "
            + " | ".join(_cell(v[t]) for t in VARIANTS)
            + f" | {ratios} | {dsopt_best} | {paired} | {met} | {errs} |"
        )
    goals = [goal(m) for m in results]
    lines += [
        "",
        f"Goal (latency) met on {goals.count('yes') + goals.count('within noise')} of "
        f"{len(results)} models ({goals.count('yes')} with a paired median at most 1.00, "
        f"{goals.count('within noise')} within noise).",
    ]
    skipped = {n: why for n, why in SKIPPED.items() if n not in {m.name for m in results}}
    if skipped:
        lines += [
            "",
            "Left out: "
            + "; ".join(f"{n}: {why}" for n, why in skipped.items())
            + " (`--models` runs it).",
        ]
    notes = [(m.name, t, m.variants[t].error) for m in results for t in VARIANTS]
    notes = [n for n in notes if n[2]]
    if notes:
        lines += ["", "Failures (first line of the error):", ""]
        lines += [f"- {name}, {tool}: `{why}`" for name, tool, why in notes]
    lines += ["", _reading(results, load[0], max(load[0], load_end, *(m.load for m in results)))]
    return "\n".join(lines) + "\n"


def _reading(results: list[ModelResult], load: float, load_max: float) -> str:
    """One paragraph, written from the numbers (so it stays true when they change)."""
    spreads = []
    for m in results:
        for v in m.variants.values():
            if v.rounds and v.median:
                spreads.append(
                    (_percentile(v.rounds, 90) - _percentile(v.rounds, 10)) / v.median * 100
                )
    groups: dict[str, list[str]] = {"faster": [], "tie": [], "slower": []}
    for m in results:
        verdict = _verdict(m)
        if verdict:
            ratio = m.variants["dsopt"].median / m.variants[m.best_other].median
            groups[verdict].append(f"{m.name} ({ratio:.3f} vs {m.best_other})")
    vs_orig: dict[str, list[float]] = {t: [] for t in VARIANTS[1:]}
    for m in results:
        o = m.variants["original"]
        for t in VARIANTS[1:]:
            v = m.variants[t]
            if o.median and v.median:
                vs_orig[t].append(v.median / o.median)
    parts = ["Reading:"]
    if spreads:
        parts.append(
            f"noise first (1-minute load {load:.2f} at the start and up to {load_max:.2f} "
            "during the run, on 2 cores with 2 ORT threads): "
            f"the p10–p90 spread of the round medians is {min(spreads):.0f}–{max(spreads):.0f}% "
            f"of the median (median {statistics.median(spreads):.0f}%), so differences smaller "
            "than that mean little; the paired per-round ratio, which cancels drift, is the "
            "better guide."
        )
    if vs_orig["dsopt"]:
        ranges = ", ".join(
            f"{t} {min(x):.2f}×" if len(x) == 1 else f"{t} {min(x):.2f}–{max(x):.2f}×"
            for t, x in vs_orig.items()
            if x
        )
        parts.append(
            "Against the unoptimized original (same ORT settings) the results run at "
            f"{ranges} the original's time."
        )
        every = [r for x in vs_orig.values() for r in x]
        if all(0.9 <= r <= 1.1 for r in every):
            parts.append(
                "All within ±10%: with ORT_ENABLE_ALL, onnxruntime's own optimizer already "
                "folds and fuses most of what the offline tools remove, so their much smaller "
                "node counts buy little latency here."
            )
    if groups["faster"]:
        parts.append(
            "dsopt is faster than the better of onnxslim and onnxsim beyond the noise on "
            + ", ".join(groups["faster"])
            + "."
        )
    if groups["tie"]:
        parts.append(
            "dsopt against the better of onnxslim and onnxsim is within the noise (paired "
            "p10–p90 straddles 1.00) on " + ", ".join(groups["tie"]) + "."
        )
    if groups["slower"]:
        parts.append("dsopt is slower beyond the noise on " + ", ".join(groups["slower"]) + ".")
    elif groups["tie"] or groups["faster"]:
        parts.append("dsopt is not slower beyond the noise on any model here.")
    failed = [(m.name, t) for m in results for t in VARIANTS if m.variants[t].error]
    if failed:
        parts.append(
            "Failures: " + ", ".join(f"{t} on {n}" for n, t in failed) + " (listed above)."
        )
    else:
        parts.append(
            "Every variant ran and matched the original's outputs (err column: float rounding "
            "from reordered arithmetic)."
        )
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="model file stems")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5, help="runs per variant per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per variant")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.warmup = max(args.warmup, 1)  # the first warm-up run is the output check
    available = {m.name: m for m in discover()}
    missing = [n for n in args.models if n not in available]
    if missing:
        print(
            f"models not found: {', '.join(missing)} (run benchmarks/export_models.py first)",
            file=sys.stderr,
        )
    models = [available[n] for n in args.models if n in available]
    if not models:
        return 1
    output = args.output.resolve()
    CRASH_DIR.mkdir(parents=True, exist_ok=True)
    os.chdir(CRASH_DIR)  # dsopt writes dsopt-crash-*/ reproducers to the cwd
    started = datetime.datetime.now(datetime.UTC)
    load = os.getloadavg()
    warm_up()
    t0 = time.perf_counter()
    results = []
    for model in models:
        result = bench_model(model, args.rounds, args.runs, args.warmup)
        results.append(result)
        print(
            f"{model.name}: {result.seconds:.1f}s, load {result.load:.2f}",
            file=sys.stderr,
            flush=True,
        )
    text = render(results, started, time.perf_counter() - t0, load, os.getloadavg()[0], args)
    print(text)
    if not args.no_write:
        write_section(text, output, TITLE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
