"""The `dsopt` command line; the only place that prints errors and chooses exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsopt.errors import CheckFailed, DsoptError, ExitCode, UsageError
from dsopt.limits import LimitExceeded, parse_size, resource_limits

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so errors print one way."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument(
        "-p",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE",
        help="load an extra plugin module (repeatable)",
    )
    p.add_argument(
        "--disable-plugin",
        action="append",
        default=[],
        metavar="NAME",
        help="block a plugin by name (repeatable)",
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="stop cleanly (exit 2, nothing written) past this resident memory, e.g. 8GB",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop cleanly (exit 2, nothing written) after this many seconds",
    )


def _pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--passes", help="pipeline text, e.g. 'fold-constants{max_size_mb=4},eliminate-dead'"
    )
    p.add_argument(
        "--config",
        help="dsopt.toml or pyproject.toml with [tool.dsopt] "
        "(default: the nearest one from the current folder)",
    )
    p.add_argument(
        "--verify",
        choices=("each", "end", "off"),
        help="checker + strict shape inference after each pass, at the end, or never "
        "(default: end)",
    )
    p.add_argument(
        "--print-after",
        action="append",
        default=[],
        metavar="PASS",
        help="print the IR after PASS (repeatable; 'all' for every pass)",
    )
    p.add_argument(
        "--print-after-change",
        action="store_true",
        help="print the IR after every pass that changed it",
    )
    p.add_argument("--dump-dir", help="write NNN_<pass>.onnx and .txt after every pass")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="fix an input shape, e.g. x=1,3,224,224 (repeatable)",
    )
    p.add_argument("--report", help="also write the report JSON to this path")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of --check")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of --check")
    p.add_argument(
        "--inputs", help="inputs for --check: .npz, folder of .npz, or test_data_set dir"
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16", "int8", "int8-dynamic", "int4", "mixed"),
        help="lower weights/compute after the lossless passes: fp16, bf16, int8 (static with "
        "--calib, else dynamic), int8-dynamic, int4 (block-wise weights), mixed (a precision "
        "per weight within --size-budget/--max-error/--min-cosine; needs --calib)",
    )
    p.add_argument(
        "--calib",
        metavar="PATH",
        help="calibration data for --precision int8/mixed (fp16: measured ranges keep "
        "overflowing nodes float32): a folder of .npz feeds, one .npz with a "
        "leading sample axis, or 'synthetic' (random; warns)",
    )
    p.add_argument(
        "--calib-method",
        choices=("minmax", "percentile", "entropy", "mse"),
        help="activation range observer of static int8 (default minmax; mse: least squared "
        "rounding-plus-clipping error)",
    )
    p.add_argument(
        "--block-size", type=int, metavar="N", help="int4 block size (power of two, 16-256)"
    )
    p.add_argument(
        "--size-budget",
        metavar="SIZE",
        help="--precision mixed: weight bytes, a fraction of float32 (0.15) or a size (12MB)",
    )
    p.add_argument(
        "--max-error",
        type=float,
        metavar="E",
        help="--precision mixed: most relative L2 error of the outputs on the --calib samples",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        metavar="C",
        help="--precision mixed: least cosine of the outputs to float32 on the --calib samples",
    )


def _cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="reuse/store outputs in this content-addressed cache")
    p.add_argument("--cache", action="store_true", help="--cache-dir ~/.cache/dsopt/artifacts")
    p.add_argument("--no-cache", action="store_true", help="ignore --cache/DSOPT_CACHE_DIR")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `dsopt` and its subcommands."""
    parser = _Parser(prog="dsopt", description="Optimize and compile ONNX models, verified.")
    from dsopt import __version__

    parser.add_argument("--version", action="version", version=f"dsopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("optimize", help="run a pass pipeline and write the optimized model")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="where to write the optimized .onnx")
    p.add_argument("--target", help="use this target's default pipeline and capabilities")
    p.add_argument(
        "--check",
        action="store_true",
        help="run original and result in onnxruntime and compare the outputs",
    )
    _cache_options(p)
    _pipeline_options(p)
    _common(p)

    p = sub.add_parser("compile", help="optimize for a target and write a deploy folder")
    p.add_argument("model")
    p.add_argument("--target", required=True, help="target name (see `dsopt targets`)")
    p.add_argument("-o", "--outdir", help="output folder (default: MODEL stem + .TARGET)")
    p.add_argument("--no-check", action="store_true", help="skip the numerical check")
    p.add_argument(
        "--tune-minutes",
        type=float,
        metavar="N",
        help="tune with TVM MetaSchedule for about N minutes first (TVM targets); functions "
        "already in the tuning database are not tuned again",
    )
    p.add_argument(
        "--tune-db",
        metavar="DIR",
        help="tuning database folder (default: ~/.cache/dsopt/tune/<TVM target hash>/)",
    )
    p.add_argument(
        "--tune-rpc",
        metavar="HOST:PORT:KEY",
        help="run the tuning trials on the devices a TVM RPC tracker serves under KEY",
    )
    p.add_argument(
        "--tune-trials", type=int, metavar="N", help="at most N trials per function (default 256)"
    )
    _cache_options(p)
    _pipeline_options(p)
    _common(p)

    p = sub.add_parser("run", help="run a compiled OUTDIR on inputs and write its outputs")
    p.add_argument("outdir", help="a folder written by `dsopt compile`")
    p.add_argument("--inputs", required=True, help="an .npz with one array per input name")
    p.add_argument("-o", "--output", required=True, help="where to write the outputs (.npz)")
    p.add_argument(
        "--emulate",
        action="store_true",
        help="run an aarch64 library under qemu-user (scripts/setup-aarch64-runtime.sh first)",
    )
    _common(p)

    p = sub.add_parser("passes", help="list passes with summaries and options")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)

    p = sub.add_parser("targets", help="list targets")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)

    p = sub.add_parser("inspect", help="ops, parameters, FLOPs, inputs and outputs of a model")
    p.add_argument("model")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="fix an input shape so FLOPs of dynamic models can be counted",
    )
    p.add_argument(
        "--quant",
        metavar="REFERENCE",
        help="report MODEL's per-tensor quantization error (SQNR) against this float model",
    )
    p.add_argument(
        "--calib",
        metavar="PATH",
        help="samples for --quant: a folder of .npz feeds, one .npz with a leading sample "
        "axis, or 'synthetic' (random; warns; the default)",
    )
    p.add_argument(
        "--samples", type=int, metavar="N", help="use at most N samples for --quant (default 8)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)

    p = sub.add_parser("explain", help="say why the rules of a fusion pass did not fire")
    p.add_argument("model")
    p.add_argument("pass_name", metavar="PASS", help="a rule-based pass, e.g. fuse-batch-norm")
    p.add_argument("--target", help="target whose fused ops and opset apply (default: none)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)

    p = sub.add_parser(
        "lint", help="which Q/DQ a target will not fuse and which ops run in float between them"
    )
    p.add_argument("model")
    p.add_argument(
        "--target", default="onnxruntime", help="target whose runtime fuses (default onnxruntime)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="exit 1 when there is any finding")
    _common(p)

    p = sub.add_parser("verify", help="compare two models' outputs in onnxruntime")
    p.add_argument("original")
    p.add_argument("candidate")
    p.add_argument("--inputs", help=".npz, folder of .npz, or an onnx test_data_set folder")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS")
    p.add_argument("--samples", type=int, default=1, help="random input samples (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)
    p = sub.add_parser("bench", help="latency, peak memory, size, FLOPs and fidelity vs MODEL")
    p.add_argument("model", help="the baseline model")
    p.add_argument("candidates", nargs="*", metavar="CANDIDATE", help="models to compare")
    p.add_argument("--inputs", help="an .npz sample (default: random, seeded)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart (needs pillow)")
    _common(p)
    p = sub.add_parser("config", help="print the effective config (file found + flags)")
    p.add_argument("--show", action="store_true", help="print the effective config")
    p.add_argument("--config", help="dsopt.toml or pyproject.toml (default: the nearest one)")
    p.add_argument("--passes", help="override the pipeline")
    p.add_argument("--target", help="override the target")
    p.add_argument("--verify", choices=("each", "end", "off"), help="override verification")
    p.add_argument("--precision", help="override the precision")
    p.add_argument("--size-budget", metavar="SIZE", help="override size_budget")
    p.add_argument("--max-error", type=float, metavar="E", help="override max_error")
    p.add_argument("--min-cosine", type=float, metavar="C", help="override min_cosine")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _quiet_graphsurgeon(debug)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="dsopt: %(levelname)s: %(message)s",
    )
    try:
        args = build_parser().parse_args(argv)
        if not args.command:
            build_parser().print_help()
            return ExitCode.USAGE_ERROR
        handler = _COMMANDS[args.command]
        memory = getattr(args, "max_memory", None)
        limits = (parse_size(memory) if memory else None, getattr(args, "timeout", None))
        with resource_limits(*limits, what=f"dsopt {args.command}"):
            return int(handler(args))
    except DsoptError as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"dsopt: error: {e.message}\n")
        if e.hint:
            sys.stderr.write(f"  hint: {e.hint}\n")
        return int(e.exit_code)
    except LimitExceeded as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"dsopt: error: {e.message}\n  hint: {e.hint}\n")
        return int(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("dsopt: interrupted\n")
        return 130
    except Exception:  # noqa: BLE001 - anything else is a dsopt bug
        traceback.print_exc()
        sys.stderr.write(
            "dsopt: internal error: this is a bug in dsopt, please report it "
            "with the traceback above\n"
        )
        return int(ExitCode.INTERNAL_ERROR)


# -- helpers -----------------------------------------------------------------------------------
def _quiet_graphsurgeon(debug: bool) -> None:
    """Graphsurgeon prints its warnings to stdout; the CLI shows them only with --debug."""
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.VERBOSE if debug else G_LOGGER.ERROR


def _host(args: argparse.Namespace) -> Any:
    from dsopt.plugin import PluginHost

    return PluginHost(extra=args.plugins, disabled=args.disable_plugin)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    from dsopt.pipeline import find_config, load_config

    return load_config(args.config if args.config else find_config())


def _shapes(specs: Sequence[str]) -> dict[str, list[int]] | None:
    if not specs:
        return None
    from dsopt.numerics import parse_shape_overrides

    return parse_shape_overrides(specs)


def _inputs(path: str | None, model_path: str) -> list[dict[str, Any]] | None:
    if not path:
        return None
    from dsopt import numerics
    from dsopt.ir import load

    return numerics.load_inputs(path, load(model_path))


def _instrument_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "print_after": tuple(args.print_after),
        "print_after_change": args.print_after_change,
        "dump_dir": args.dump_dir,
    }


def _check_output_path(model: str, output: str) -> None:
    src, dst = Path(model), Path(output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise UsageError(
            f"-o {output} is the input model; dsopt never overwrites its input",
            hint="write to another path",
        )
    if dst.is_dir():
        raise UsageError(f"-o {output} is a directory; give a file path ending in .onnx")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _progress_context(total_hint: int) -> Any:
    """A rich progress bar on stderr when it is a terminal, else a no-op."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=_console(stderr=True),
        transient=True,
    )


def _run_with_progress(run: Any, args: argparse.Namespace, **kwargs: Any) -> Any:
    """Calls `run` (driver.optimize or driver.compile) with the shared pipeline options.

    On a terminal, a progress line shows the pass running and the node count.
    """
    options = _instrument_options(args)
    config = _config(args)
    if args.calib_method:
        passes = dict(config.get("options") or {})
        passes["quantize-static"] = {
            **passes.get("quantize-static", {}),
            "method": args.calib_method,
        }
        config = {**config, "options": passes}
    progress = _progress_context(0)
    if progress is not None:
        task = progress.add_task("optimizing", total=None)
        options["progress"] = lambda name, record: progress.update(
            task, description=f"{name}: {record.nodes} nodes"
        )
        progress.start()
    try:
        return run(
            args.model,
            passes=args.passes,
            config=config,
            verify=args.verify,
            shapes=_shapes(args.shape),
            inputs=_inputs(args.inputs, args.model),
            rtol=args.rtol,
            atol=args.atol,
            host=_host(args),
            options=options,
            precision=args.precision,
            calibration=args.calib,
            block_size=args.block_size,
            size_budget=args.size_budget,
            max_error=args.max_error,
            min_cosine=args.min_cosine,
            **kwargs,
        )
    finally:
        if progress is not None:
            progress.stop()


def _print_report_summary(report: Any, console: Any) -> None:
    before, after = report.before, report.after
    changed = [p for p in report.passes if p.changed]
    console.print(
        f"nodes {before['nodes']} -> {after['nodes']}, initializers {before['initializers']} -> "
        f"{after['initializers']}, weight bytes {before['bytes']} -> {after['bytes']}; "
        f"{len(changed)} of {len(report.passes)} pass runs changed the model "
        f"in {report.seconds:.2f}s; verification {report.verification}"
    )


def _print_equivalence(equivalence: Any, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"equivalence (rtol={equivalence.rtol:g}, atol={equivalence.atol:g})")
    for column in ("output", "max abs err", "rel L2 err", "cosine", "ok"):
        table.add_column(column)
    for o in equivalence.outputs:
        table.add_row(
            o.name,
            f"{o.max_abs_error:.3g}",
            f"{o.rel_l2_error:.3g}",
            f"{o.cosine:.6f}",
            "yes" if o.within_tolerance else "NO",
        )
    console.print(table)


# -- commands ----------------------------------------------------------------------------------
def _cmd_optimize(args: argparse.Namespace) -> int:
    _check_output_path(args.model, args.output)
    from dsopt.driver import optimize

    cache, key = _optimize_cache(args)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        import shutil

        shutil.copyfile(hit[0], args.output)
        report = {**hit[1], "cache": {"hit": True, "key": key, "dir": str(cache.root)}}
        if args.report:
            _mixed_plot(report, args.report)
            Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        _console().print(f"wrote {args.output} (cache hit {key[:12]}, no pass ran)")
        return ExitCode.OK
    result = _run_with_progress(optimize, args, target=args.target, check=args.check)
    console = _console()
    if result.equivalence is not None and not result.equivalence.ok:
        _print_equivalence(result.equivalence, console)
        raise CheckFailed(
            f"{args.model}: optimized outputs differ beyond tolerance; "
            f"nothing was written to {args.output}",
            hint="rerun with --verify each --dump-dir D to find the pass",
        )
    result.module.save(args.output)
    report = result.report.to_dict()
    report["pipeline"] = result.pipeline
    if result.equivalence is not None:
        report["equivalence"] = result.equivalence.to_dict()
        _print_equivalence(result.equivalence, console)
    report.update(result.quant_error_entry())
    report.update(result.mixed_entry())
    report.update(result.calibration_entry())
    if cache is not None:
        cache.put(key, Path(args.output), report)
        report["cache"] = {"hit": False, "key": key, "dir": str(cache.root)}
    if args.report:
        _mixed_plot(report, args.report)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    _print_report_summary(result.report, console)
    console.print(f"wrote {args.output}")
    return ExitCode.OK


def _mixed_plot(report: dict[str, Any], path: str) -> None:
    """`--precision mixed`: the Pareto plot beside the report, named in it (`dsopt.mixed.plot`)."""
    if "mixed" in report:
        from dsopt.mixed.plot import write_beside

        write_beside(report, path)


def _optimize_cache(args: argparse.Namespace) -> tuple[Any, str]:
    """The artifact cache of this optimize run and its key; (None, "") when off or bypassed."""
    from dsopt import cache

    folder = _cache_folder(args)
    if folder is None:
        return None, ""
    skip = {"debug", "output", "report", "model", "cache_dir", "cache", "no_cache", "command"}
    settings = {k: v for k, v in vars(args).items() if k not in skip | {"inputs", "calib"}}
    settings.update(config=_config(args), inputs_file=args.inputs, calib_file=args.calib)
    return cache.ArtifactCache(folder), cache.cache_key(args.model, settings, _host(args))


def _cache_folder(args: argparse.Namespace) -> str | None:
    """--cache-dir, else DSOPT_CACHE_DIR, else (--cache) the user cache dir; None when off."""
    folder = args.cache_dir or os.environ.get("DSOPT_CACHE_DIR")
    if args.cache and not folder:
        from dsopt import cache

        folder = str(cache.default_cache_dir())
    # A hit runs no pass, so hooks of -p plugins and the per-pass instruments would not run.
    instruments = args.plugins or args.dump_dir or args.print_after or args.print_after_change
    if not folder or args.no_cache or instruments:
        return None
    return folder


def _tune_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """`compile`'s tuning options as `driver.compile(tune=...)`; a bad --tune-rpc exits 2 now."""
    from dsopt.backend import parse_tune_rpc

    given = {
        "minutes": args.tune_minutes,
        "db": args.tune_db,
        "rpc": parse_tune_rpc(args.tune_rpc) if args.tune_rpc is not None else None,
        "trials": args.tune_trials,
    }
    if all(value is None for value in given.values()):
        return None
    return {k: v for k, v in given.items() if v is not None}


def _cmd_compile(args: argparse.Namespace) -> int:
    from dsopt.driver import compile as compile_model

    result = _run_with_progress(
        compile_model,
        args,
        target=args.target,
        outdir=args.outdir,
        check=not args.no_check,
        tune=_tune_settings(args),
        cache_dir=_cache_folder(args),
    )
    console = _console()
    equivalence = result.report.get("equivalence")
    if args.report:
        Path(args.report).write_text(json.dumps(result.report, indent=2) + "\n")
    for artifact in result.manifest["artifacts"]:
        console.print(
            f"{artifact['role']:>8}: {result.outdir / artifact['path']} ({artifact['bytes']} bytes)"
        )
    tuning = result.manifest.get("tvm", {}).get("tuning")
    if tuning:
        console.print(
            f"  tuning: {tuning['trials']} trials on {tuning['tasks_tuned']} of {tuning['tasks']} "
            f"functions in {tuning['seconds']:.0f}s ({tuning['tasks_reused']} from the database "
            f"{tuning['database']['path']})",
            soft_wrap=True,
        )
    if (result.report.get("cache") or {}).get("hit"):
        console.print(f"   cache: hit {result.report['cache']['key'][:12]}, nothing recompiled")
    console.print(f"manifest: {result.outdir / 'manifest.json'}")
    console.print(f"  report: {result.outdir / 'report.json'}")
    if equivalence is not None:
        worst = max((o["max_abs_error"] for o in equivalence["outputs"]), default=0.0)
        console.print(
            f"   check: {'ok' if equivalence['ok'] else 'FAILED'} (max abs error {worst:.3g})"
        )
        if not equivalence["ok"]:
            return ExitCode.CHECK_FAILED
    library_check = result.report.get("library_check")
    if library_check is not None:
        if library_check.get("ok"):
            worst = max((o["max_abs_error"] for o in library_check["outputs"]), default=0.0)
            console.print(f" library: ok vs onnxruntime (max abs error {worst:.3g})")
        else:
            console.print(f" library: not run here ({library_check.get('skipped')})")
    return ExitCode.OK


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from dsopt import numerics

    outdir = Path(args.outdir)
    manifest_path = outdir / "manifest.json"
    if not manifest_path.is_file():
        raise UsageError(f"{outdir} holds no manifest.json; give a folder `dsopt compile` wrote")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{manifest_path}: unreadable manifest ({e})") from e
    from dsopt.driver import verify_manifest

    verify_manifest(outdir, manifest)
    target = _host(args).get_target(manifest.get("target", "?"))
    model = next((outdir / a["path"] for a in manifest["artifacts"] if a["role"] == "model"), None)
    feeds = numerics.load_inputs(args.inputs, str(model) if model else None)
    if len(feeds) != 1:
        raise UsageError(f"--inputs {args.inputs}: give one sample (an .npz), not {len(feeds)}")
    if args.emulate:
        from dsopt.backend import run_emulated

        outputs = run_emulated(outdir, manifest, feeds[0])
    else:
        outputs = target.run(outdir, manifest, feeds[0])
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("wb") as f:
        np.savez(f, **{name: np.asarray(value) for name, value in outputs.items()})
    _console().print(f"wrote {output} ({', '.join(outputs)})")
    return ExitCode.OK


def _cmd_passes(args: argparse.Namespace) -> int:
    host = _host(args)
    rows = []
    for pass_class in host.passes:
        rows.append(
            {
                "name": pass_class.name,
                "stage": pass_class.stage,
                "exactness": pass_class.exactness,
                "tolerance": pass_class.tolerance,
                "opsets": list(pass_class.opsets),
                "summary": pass_class.summary,
                "plugin": host.passes.providers[pass_class.name],
                "options": [
                    {"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help}
                    for o in pass_class.options()
                ],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    from rich.table import Table

    table = Table(title="passes")
    for column in ("name", "stage", "exactness", "options", "summary", "plugin"):
        table.add_column(column)
    for row in rows:
        options = ", ".join(f"{o['name']}={o['default']} ({o['type']})" for o in row["options"])
        table.add_row(
            row["name"],
            row["stage"],
            row["exactness"],
            options or "-",
            row["summary"],
            row["plugin"],
        )
    _console().print(table)
    return ExitCode.OK


def _cmd_targets(args: argparse.Namespace) -> int:
    host = _host(args)
    rows = [
        {
            "name": t.name,
            "aliases": list(t.aliases),
            "summary": t.summary,
            "pipeline": t.pipeline,
            "precisions": dict(t.precisions),
            "tvm": dict(t.tvm) if t.tvm else None,
            "plugin": host.targets.providers[t.name],
        }
        for t in host.targets
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    from rich.table import Table

    table = Table(title="targets")
    for column in ("name", "aliases", "precisions", "summary", "plugin"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            ", ".join(row["aliases"]) or "-",
            ", ".join(row["precisions"]),
            row["summary"],
            row["plugin"],
        )
    _console().print(table)
    return ExitCode.OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dsopt import summary
    from dsopt.ir import load

    if args.quant:
        return _inspect_quant(args)
    if args.calib or args.samples is not None:
        raise UsageError("--calib and --samples apply to inspect --quant REFERENCE")
    model = load(args.model)
    for name, dims in (_shapes(args.shape) or {}).items():
        _fix_input_shape(model, name, dims)
    result = summary.summarize(model, base_dir=Path(args.model).parent)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        summary.render(result, _console())
    return ExitCode.OK


def _inspect_quant(args: argparse.Namespace) -> int:
    """`inspect QUANTIZED --quant REFERENCE`: per-tensor error on calibration samples."""
    from dsopt.ir import load
    from dsopt.quant import error_report
    from dsopt.quant.calibration import CalibrationData

    quantized, reference = load(args.model), load(args.quant)
    samples = 8 if args.samples is None else args.samples
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    if args.calib in (None, "synthetic"):
        data = CalibrationData.synthetic(reference, samples, shapes=_shapes(args.shape))
    else:
        data = CalibrationData.load(args.calib, reference)
    report = error_report.tensor_errors(reference, quantized, data, limit=samples)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        error_report.render(report, _console())
    return ExitCode.OK


def _cmd_explain(args: argparse.Namespace) -> int:
    from dsopt.ir import Module
    from dsopt.pass_infra import PassContext
    from dsopt.rewrite import RulePass, explain

    host = _host(args)
    pass_class = host.get_pass(args.pass_name)
    if not issubclass(pass_class, RulePass):
        raise UsageError(
            f"pass '{args.pass_name}' is not made of rewrite rules; nothing to explain",
            hint="explain works for the fusion passes (`dsopt passes`, stage 'fuse')",
        )
    ctx = PassContext()
    if args.target:
        target = host.get_target(args.target)
        ctx = PassContext(target=target.name, fused_ops=target.fused_ops, max_opset=target.opset)
    reasons = explain(Module.load(args.model), pass_class(), ctx)
    if args.json:
        print(json.dumps(reasons, indent=2))
        return ExitCode.OK
    console = _console()
    for rule, why in reasons.items():
        console.print(f"[bold]{rule}[/bold]: " + ("no failed matches" if not why else ""))
        for reason in why[:10]:
            console.print(f"  - {reason}")
    return ExitCode.OK


def _cmd_lint(args: argparse.Namespace) -> int:
    from dsopt.quant.lint import lint

    target = _host(args).get_target(args.target)
    report = lint(args.model, target)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console = _console()
        if report.findings:
            from rich.table import Table

            table = Table(title=f"lint: {args.model} on {target.name} ({report.runtime})")
            for column in ("kind", "node", "op", "why / what to do"):
                table.add_column(column, overflow="fold")
            for f in report.findings:
                node = f"{f.graph}/{f.node}" if f.graph else f.node
                table.add_row(f.kind, node or f.tensor, f.op, f.message)
            console.print(table)
        console.print(report.summary(), soft_wrap=True)
    if args.strict and report.findings:
        return ExitCode.CHECK_FAILED
    return ExitCode.OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from dsopt import numerics
    from dsopt.ir import load

    original = load(args.original)
    candidate = load(args.candidate)
    inputs = numerics.load_inputs(args.inputs, original) if args.inputs else None
    original_src: Any = args.original if _is_large(args.original) else original
    candidate_src: Any = args.candidate if _is_large(args.candidate) else candidate
    report = numerics.check_equivalence(
        original_src,
        candidate_src,
        inputs=inputs,
        shapes=_shapes(args.shape),
        samples=args.samples,
        seed=args.seed,
        rtol=args.rtol,
        atol=args.atol,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_equivalence(report, _console())
    if not report.ok:
        bad = ", ".join(o.name for o in report.outputs if not o.within_tolerance)
        sys.stderr.write(f"dsopt: outputs outside tolerance: {bad}\n")
        return ExitCode.CHECK_FAILED
    return ExitCode.OK


def _fix_input_shape(model: Any, name: str, dims: Sequence[int]) -> None:
    """Sets graph input `name` to static `dims` (for `inspect --shape`)."""
    for value in model.graph.input:
        if value.name == name:
            shape = value.type.tensor_type.shape
            if len(shape.dim) != len(dims):
                raise UsageError(
                    f"--shape {name}: the model's input has rank {len(shape.dim)}, not {len(dims)}"
                )
            for dim, size in zip(shape.dim, dims, strict=True):
                dim.Clear()
                dim.dim_value = size
            return
    names = ", ".join(v.name for v in model.graph.input)
    raise UsageError(f"--shape {name}: the model has no input '{name}' (inputs: {names})")


def _is_large(path: str) -> bool:
    try:
        return os.path.getsize(path) > 1 << 30
    except OSError:
        return False


def _cmd_bench(args: argparse.Namespace) -> int:
    from dsopt import bench

    report = bench.bench(
        [args.model, *args.candidates],
        inputs=args.inputs,
        shapes=_shapes(args.shape),
        threads=args.threads,
        runs=args.runs,
        warmup=args.warmup,
        memory=not args.no_memory,
        seed=args.seed,
    )
    if args.plot:
        bench.plot(report, args.plot)
    if args.json:
        print(bench.to_json(report))
    else:
        bench.render(report, _console())
    return ExitCode.OK


def _cmd_config(args: argparse.Namespace) -> int:
    if not args.show:
        raise UsageError("config: say what to do", hint="dsopt config --show [--json]")
    from dsopt.driver import build_pipeline

    config = _config(args)
    effective: dict[str, Any] = {"source": config.get("source")}
    for key in ("passes", "target", "verify", "precision", "rounds", "check", "rtol", "atol"):
        given = getattr(args, key, None)
        effective[key] = given if given is not None else config.get(key)
    effective["verify"] = effective["verify"] or "end"
    pipeline, _ = build_pipeline(
        _host(args),
        passes=effective["passes"],
        target=effective["target"],
        options=config.get("options"),
        rounds=effective["rounds"],
    )
    effective.update(pipeline=str(pipeline), rounds=pipeline.rounds)
    effective["shapes"] = config.get("shapes")
    from dsopt.pipeline import BUDGET_KEYS, check_budget

    for key in BUDGET_KEYS:
        given = getattr(args, key, None)
        if given is not None:
            check_budget(key, given, f"--{key.replace('_', '-')}")
        effective[key] = given if given is not None else config.get(key)
    effective["options"] = config.get("options") or {}
    if args.json:
        print(json.dumps(effective, indent=2))
        return ExitCode.OK
    for key, value in effective.items():
        if key != "options" and value is not None:
            print(f"{key} = {json.dumps(value)}")
    for name, table in effective["options"].items():
        print(f"\n[options.{name}]")
        for key, value in table.items():
            print(f"{key} = {json.dumps(value)}")
    return ExitCode.OK


_COMMANDS = {
    "optimize": _cmd_optimize,
    "compile": _cmd_compile,
    "run": _cmd_run,
    "passes": _cmd_passes,
    "targets": _cmd_targets,
    "inspect": _cmd_inspect,
    "verify": _cmd_verify,
    "explain": _cmd_explain,
    "lint": _cmd_lint,
    "bench": _cmd_bench,
    "config": _cmd_config,
}
