"""The Python API behind the CLI: `optimize` a model and `compile` it for a target."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from dsopt.backend import int8_kernels
from dsopt.errors import CheckFailed, UsageError
from dsopt.ir import Module
from dsopt.limits import discard_on_abort
from dsopt.pass_infra import PassContext, PassManager, PipelineReport, Verify
from dsopt.pipeline import Pipeline, default_pipeline, load_config, parse_pipeline
from dsopt.plugin import PluginHost
from dsopt.precision import FLOAT_ONLY_PASSES, precision_passes

__all__ = [
    "CompileResult",
    "OptimizeResult",
    "build_pipeline",
    "compile",
    "optimize",
    "verify_manifest",
]

MANIFEST_VERSION = 1
#: Samples of the per-tensor quantization error report (and of a quantized model's check).
QUANT_ERROR_SAMPLES = 4
#: Tensors and weights report.json lists, worst first.
QUANT_ERROR_WORST = 20
#: Larger models get no error report: it would hold a second copy of the weights.
QUANT_ERROR_MAX_BYTES = 1 << 30

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class OptimizeResult:
    """The optimized module, the pipeline report and (with `check`) the equivalence report.

    `quant_error` is the per-tensor error report of an int8/int4 precision stage
    (`dsopt.quant.error_report.QuantErrorReport`), None when none ran; `mixed` the
    `dsopt.mixed.MixedResult` of `--precision mixed`.
    """

    module: Module
    report: PipelineReport
    pipeline: str
    equivalence: Any = None
    quant_error: Any = None
    mixed: Any = None
    calibration: dict[str, Any] | None = None

    @property
    def model(self) -> onnx.ModelProto:
        """The optimized model as a ModelProto."""
        return self.module.to_proto()

    def quant_error_entry(self) -> dict[str, Any]:
        """`{"quant_error": worst tensors and weights}` for report.json; {} without one."""
        if self.quant_error is None:
            return {}
        return {"quant_error": self.quant_error.to_dict(worst=QUANT_ERROR_WORST)}

    def mixed_entry(self) -> dict[str, Any]:
        """`{"mixed": per-node precisions, totals, Pareto points}` for report.json; {} without."""
        return {"mixed": self.mixed.to_dict()} if self.mixed is not None else {}

    def calibration_entry(self) -> dict[str, Any]:
        """`{"calibration": where the data came from, samples}` for report.json; {} without."""
        return {"calibration": self.calibration} if self.calibration is not None else {}


@dataclasses.dataclass
class CompileResult:
    """What `compile` wrote: the output directory, its manifest and report."""

    outdir: Path
    manifest: dict[str, Any]
    report: dict[str, Any]


def _as_module(
    model: onnx.ModelProto | Module | str | os.PathLike[str],
) -> tuple[Module, Path | None]:
    if isinstance(model, Module):
        return model, None
    if isinstance(model, onnx.ModelProto):
        return Module.from_proto(model), None
    path = Path(model)
    return Module.load(path), path


def as_pipeline_text(passes: str | Pipeline | Sequence[str] | None) -> str | None:
    """Pipeline text for a text, a `Pipeline` or a list of pass texts (None stays None)."""
    if passes is None or isinstance(passes, str):
        return passes
    if isinstance(passes, Pipeline):
        return str(passes)
    return ",".join(passes)


def _either(calibration: Any, calib: Any) -> Any:
    if calibration is not None and calib is not None:
        raise UsageError("give calibration data once: calibration= or calib=, not both")
    return calibration if calibration is not None else calib


def build_pipeline(
    host: PluginHost,
    *,
    passes: str | None,
    target: str | None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    rounds: int | None = None,
) -> tuple[Pipeline, list[Any]]:
    """The pipeline to run (user text, else the target's default) and its pass instances."""
    if passes:
        pipeline = parse_pipeline(passes)
    else:
        target_obj = host.get_target(target) if target else None
        pipeline_text = target_obj.pipeline if target_obj else "default"
        pipeline = (
            default_pipeline() if pipeline_text == "default" else parse_pipeline(pipeline_text)
        )
        if pipeline_text != "default":
            pipeline.rounds = default_pipeline().rounds
        host.hook.dsopt_extend_pipeline(pipeline=pipeline, target=target)
    if rounds is not None:
        pipeline.rounds = rounds
    pipeline = pipeline.with_options(options or {})
    instances = [host.get_pass(e.name).from_options(e.options) for e in pipeline.entries]
    return pipeline, instances


def optimize(
    model: onnx.ModelProto | Module | str | os.PathLike[str],
    *,
    passes: str | Pipeline | Sequence[str] | None = None,
    target: str | None = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    verify: Verify | None = None,
    check: bool = False,
    shapes: Mapping[str, Sequence[int]] | None = None,
    inputs: Sequence[Mapping[str, Any]] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    host: PluginHost | None = None,
    rounds: int | None = None,
    options: Mapping[str, Any] | None = None,
    precision: str | None = None,
    calibration: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None = None,
    block_size: int | None = None,
    size_budget: str | float | None = None,
    max_error: float | None = None,
    min_cosine: float | None = None,
    calib: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None = None,
) -> OptimizeResult:
    """Runs a pipeline on `model` and returns the optimized module.

    With a `precision` other than fp32, the lossless pipeline runs to its fixed point and the
    precision passes (`dsopt.precision`) run once after it; `calibration` feeds static int8.

    Args:
        model: A path, ModelProto or Module; a path or proto is never modified.
        passes: Pipeline text (`a,b{k=v}`), a `Pipeline` built in code (its `rounds` apply
            unless `rounds` is given) or a list of pass texts; default: the target's pipeline.
        target: Target name whose default pipeline and capabilities apply.
        config: A config file path or an already-loaded config mapping.
        verify: `each`, `end` (default) or `off`.
        check: Run original and result in onnxruntime and compare outputs.
        shapes: Input shape overrides for checking and shape-dependent passes.
        inputs: Feeds for the check (default: random, seeded).
        rtol: Relative tolerance of the check.
        atol: Absolute tolerance of the check.
        host: A plugin host to reuse (default: a fresh one).
        rounds: Override how often the pipeline repeats while it changes the model.
        options: Global options exposed to passes as `ctx.options`.
        precision: fp32 (default), fp16, int8, int8-dynamic or int4 (`dsopt.precision`).
        calibration: `--calib`: a folder of .npz feeds, one stacked .npz, feeds in memory,
            or "synthetic" (random feeds; warns).
        block_size: Block size of int4 weights.
        size_budget: `--precision mixed`: weight bytes, a fraction of the float32 ones (0.15)
            or a size ("12MB").
        max_error: `--precision mixed`: most relative L2 error of the outputs on the
            calibration samples.
        min_cosine: `--precision mixed`: least cosine of the outputs to the float32 ones.
        calib: The same as `calibration`, spelled like the flag.
    """
    settings = dict(config) if isinstance(config, Mapping) else load_config(config)
    host = host or PluginHost()
    calibration = _either(calibration, calib)
    if isinstance(passes, Pipeline) and rounds is None:
        rounds = passes.rounds
    passes = as_pipeline_text(passes) or settings.get("passes")
    target = target or settings.get("target")
    verify = verify or settings.get("verify", "end")
    precision = precision or settings.get("precision")
    module, _ = _as_module(model)
    if precision == "mixed":  # config budgets are the defaults of mixed runs; each flag wins
        size_budget = settings.get("size_budget") if size_budget is None else size_budget
        max_error = settings.get("max_error") if max_error is None else max_error
        min_cosine = settings.get("min_cosine") if min_cosine is None else min_cosine
    budget = _mixed_budget(precision, size_budget, max_error, min_cosine)
    calib = _calibration(calibration, module, shapes)
    original = module.to_proto() if check else None
    if isinstance(model, Module) and check:
        original = model.to_proto()
    pipeline, instances = build_pipeline(
        host,
        passes=passes,
        target=target,
        options=settings.get("options"),
        rounds=rounds if rounds is not None else settings.get("rounds"),
    )
    global_options: dict[str, Any] = {}
    host.hook.dsopt_add_options(options=global_options)
    global_options.update(options or {})
    global_options.setdefault("verify", verify)  # plugin.py's contract check runs under "each"
    if shapes:
        global_options["shapes"] = {k: list(v) for k, v in shapes.items()}
    calib_plugin = None
    if calib is None and (
        precision in ("int8", "mixed") or "quantize-static" in pipeline.names()
    ):  # the user gave no data: a plugin may (dsopt_calibration_data)
        provided = host.calibration_data(
            module.skeleton_proto(main_only=True),
            shapes=shapes,
            precision=precision,
            options=global_options,
        )
        if provided is not None:
            calib, calib_plugin = provided
    if precision == "mixed" and calib is None:
        raise UsageError(
            "--precision mixed needs calibration data to measure each weight's sensitivity",
            hint="pass --calib DIR|FILE.npz (--calib synthetic for random data), or install a "
            "plugin that provides it",
        )
    stage_text = precision_passes(
        precision,
        calibrated=calib is not None,
        block_size=block_size,
        legalize="legalize-quantized" in pipeline.names(),
    )
    if stage_text and precision != "fp16":
        instances = [p for p in instances if p.name not in FLOAT_ONLY_PASSES]
    if precision == "mixed":  # a target pipeline's fp16 would leave no float32 weight to assign
        instances = [p for p in instances if p.name != "convert-float16"]
    target_obj = host.get_target(target) if target else None
    if target_obj is not None and target_obj.tvm is not None:
        global_options["int8_kernels"] = int8_kernels(
            target_obj, global_options.get("int8"), global_options.get("schedules")
        )
    ctx = PassContext(
        target=target_obj.name if target_obj else None,
        options=global_options,
        hook=host.hook,
        fused_ops=target_obj.fused_ops if target_obj else frozenset(),
        max_opset=target_obj.opset if target_obj else None,
        calibration=calib,
        providers=dict(host.passes.providers),
    )
    manager = PassManager(instances, verify=verify, rounds=pipeline.rounds)  # type: ignore[arg-type]
    report = manager.run(module, ctx)
    pipeline_text = str(pipeline)
    before_stage = None
    if stage_text and precision != "fp16" and report.after["bytes"] <= QUANT_ERROR_MAX_BYTES:
        before_stage = module.to_proto()
    mixed = None
    if precision == "mixed":
        from dsopt.mixed import mixed_precision, target_candidates

        mixed = mixed_precision(
            module,
            calib,
            budget,
            ctx,
            precisions=target_candidates(target_obj.precisions if target_obj else None),
            block_size=block_size,
            size_budget=size_budget,
        )
        module = mixed.module
        report.notes.extend(f"mixed precision: {note}" for note in mixed.notes)
    if stage_text:
        # Static int8 that misses its bound on the calibration samples (a model too
        # sensitive to per-tensor activation scales) falls back to dynamic int8.
        fallback = precision == "int8" and calib is not None and before_stage is not None
        saved = module.clone() if fallback else None
        stage, stage_passes, stage_report = _run_stage(
            host, stage_text, settings, module, ctx, verify
        )
        if saved is not None and before_stage is not None:
            miss = _bound_miss(before_stage, module, stage_passes, calib)
            if miss:
                logger.warning(
                    "static int8 misses its bound on the calibration samples (%s); using "
                    "int8-dynamic instead (keep static int8: --passes with quantize-static)",
                    miss,
                )
                module = saved
                dynamic = precision_passes(
                    "int8-dynamic",
                    calibrated=True,
                    legalize="legalize-quantized" in pipeline.names(),
                )
                assert dynamic is not None
                stage, stage_passes, stage_report = _run_stage(
                    host, dynamic, settings, module, ctx, verify
                )
                report.notes.append(f"int8 static -> int8-dynamic: {miss}")
        _extend_report(report, stage_report)
        instances = [*instances, *stage_passes]
        pipeline_text += " | " + str(stage)
    result = OptimizeResult(module=module, report=report, pipeline=pipeline_text, mixed=mixed)
    if calib is not None:
        result.calibration = (
            {"from": "plugin", "plugin": calib_plugin, "samples": len(calib)}
            if calib_plugin is not None
            else {"from": "user", "source": calib.source, "samples": len(calib)}
        )
    # A lossy pass that changed the model (e.g. convert-float16) declares its error bound:
    # the check allows it.
    changed = {record.name for record in report.passes if record.changed}
    lossy = [p for p in instances if p.exactness == "lossy" and p.name in changed]
    if mixed is not None:
        lossy += mixed.passes  # run by dsopt.mixed, outside the report's records
    bounds = [float(p.tolerance or 0.0) for p in lossy if p.bound == "absolute"]
    if bounds:
        rtol, atol = max(rtol, *bounds), max(atol, *bounds)
    relative = max(
        (float(p.tolerance or 0.0) for p in lossy if p.bound == "relative"), default=None
    )
    if inputs is None and calib is not None and relative is not None:
        inputs = list(calib.limited(QUANT_ERROR_SAMPLES))  # real inputs judge a quantized model
    if before_stage is not None and lossy:
        result.quant_error = _quant_error(before_stage, module.to_proto(), inputs, shapes)
    if check:
        from dsopt import numerics

        assert original is not None
        result.equivalence = numerics.check_equivalence(
            original,
            module.to_proto(),
            inputs=inputs,
            shapes=None if inputs is not None else shapes,
            rtol=rtol,
            atol=atol,
            relative=relative,
        )
    return result


def _mixed_budget(
    precision: str | None,
    size_budget: str | float | None,
    max_error: float | None,
    min_cosine: float | None,
) -> Any:
    """The `--precision mixed` budget (size resolved later), None for other precisions."""
    given = [
        flag
        for flag, value in (
            ("--size-budget", size_budget),
            ("--max-error", max_error),
            ("--min-cosine", min_cosine),
        )
        if value is not None
    ]
    if precision != "mixed":
        if given:
            raise UsageError(
                f"{given[0]} applies to --precision mixed, not {precision or 'fp32'}",
                hint="add --precision mixed",
            )
        return None
    from dsopt.mixed import Budget, check_error_budget

    if not given:
        raise UsageError(
            "--precision mixed needs a budget",
            hint="give --size-budget (0.25 or 12MB), --max-error 0.01 or --min-cosine 0.995",
        )
    check_error_budget(max_error, min_cosine)
    return Budget(max_error=max_error, min_cosine=min_cosine)


def _run_stage(
    host: PluginHost,
    text: str,
    settings: Mapping[str, Any],
    module: Module,
    ctx: PassContext,
    verify: str,
) -> tuple[Any, list[Any], PipelineReport]:
    """Runs the precision stage `text` once on `module`: (pipeline, passes, report)."""
    stage = parse_pipeline(text).with_options(settings.get("options") or {})
    passes = [host.get_pass(e.name).from_options(e.options) for e in stage.entries]
    return stage, passes, PassManager(passes, verify=verify).run(module, ctx)  # type: ignore[arg-type]


def _bound_miss(
    reference: onnx.ModelProto, module: Module, passes: Sequence[Any], calib: Any
) -> str | None:
    """How the lossy stage's result misses its relative bound on calibration samples, if it does."""
    from dsopt import numerics

    relative = max(
        (
            float(p.tolerance or 0.0)
            for p in passes
            if p.exactness == "lossy" and p.bound == "relative"
        ),
        default=None,
    )
    if relative is None:
        return None
    check = numerics.check_equivalence(
        reference, module.to_proto(), inputs=list(calib.limited(QUANT_ERROR_SAMPLES)),
        relative=relative,
    )  # fmt: skip
    failed = check.failures()
    if not failed:
        return None
    worst = failed[0]
    cosine = f"{worst.cosine:.4f}" if worst.cosine is not None else "?"
    rel = f"{worst.rel_l2_error:.3f}" if worst.rel_l2_error is not None else "?"
    return f"output '{worst.name}': cosine {cosine}, relative L2 error {rel}"


def _quant_error(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    inputs: Sequence[Mapping[str, Any]] | None,
    shapes: Mapping[str, Sequence[int]] | None,
) -> Any:
    """The precision stage's per-tensor error on the check's samples (None if it cannot run)."""
    from dsopt import numerics
    from dsopt.errors import DsoptError
    from dsopt.quant.error_report import tensor_errors

    try:
        samples = inputs or [numerics.random_inputs(reference, shapes=shapes)]
        return tensor_errors(reference, quantized, samples, limit=QUANT_ERROR_SAMPLES)
    except DsoptError as e:
        logger.warning("no quantization error report: %s", e.message)
        return None


def _calibration(source: Any, module: Module, shapes: Mapping[str, Sequence[int]] | None) -> Any:
    """`--calib` as CalibrationData (None when not given)."""
    if source is None:
        return None
    from dsopt.quant.calibration import CalibrationData

    if isinstance(source, CalibrationData):
        return source
    proto = module.skeleton_proto(main_only=True)
    if isinstance(source, str) and source == "synthetic":
        return CalibrationData.synthetic(proto, shapes=shapes)
    if isinstance(source, (str, os.PathLike)):
        return CalibrationData.load(source, proto)
    return CalibrationData.from_feeds(list(source))


def _extend_report(report: PipelineReport, stage: PipelineReport) -> None:
    """Appends the precision stage's records to the main pipeline's report."""
    offset = len(report.passes)
    for record in stage.passes:
        record.position += offset
        report.passes.append(record)
    report.after = stage.after
    report.seconds += stage.seconds
    report.verification = stage.verification


def compile(  # noqa: A001 - the public name users expect (`dsopt.compile`)
    model: str | os.PathLike[str],
    *,
    target: str,
    outdir: str | os.PathLike[str] | None = None,
    passes: str | Pipeline | Sequence[str] | None = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    verify: Verify | None = None,
    check: bool = True,
    shapes: Mapping[str, Sequence[int]] | None = None,
    inputs: Sequence[Mapping[str, Any]] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    host: PluginHost | None = None,
    options: Mapping[str, Any] | None = None,
    tune: Mapping[str, Any] | None = None,
    precision: str | None = None,
    calibration: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None = None,
    block_size: int | None = None,
    size_budget: str | float | None = None,
    max_error: float | None = None,
    min_cosine: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    calib: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None = None,
) -> CompileResult:
    """Optimizes `model` for `target` and writes OUTDIR (model, manifest.json, report.json).

    The directory is built in a temporary sibling and renamed into place, so a failure never
    leaves a partial output. An existing OUTDIR is replaced only if it holds a dsopt manifest.
    `tune` (TVM targets) runs MetaSchedule first: `{"minutes": N}` plus optional `db`, `rpc`
    (`HOST:PORT:KEY`) and `trials` (see `dsopt.backend.tune_settings`); the manifest's
    `tvm.tuning` records it. With `cache_dir` (`dsopt.cache`), an unchanged model, config and
    target restore the cached OUTDIR without optimizing or lowering; report.json's `cache`
    says whether it was a hit.
    """
    from dsopt.backend import tune_settings

    source = Path(model)
    host = host or PluginHost()
    calibration = _either(calibration, calib)
    target_obj = host.get_target(target)
    tuning = tune_settings(tune, target_obj)
    out = (
        Path(outdir)
        if outdir is not None
        else source.with_name(source.stem + f".{target_obj.name}")
    )
    if out.exists() and not (out / "manifest.json").is_file():
        raise UsageError(
            f"output directory {out} exists and is not a dsopt output",
            hint="choose another -o or remove it",
        )
    if out.resolve() == source.resolve() or source.resolve().parent == out.resolve():
        raise UsageError(f"output directory {out} would overwrite the input's folder")
    store, key = _compile_cache(
        cache_dir,
        source,
        host,
        target_obj,
        options,
        {
            "model_name": source.name,
            "passes": as_pipeline_text(passes),
            "rounds": passes.rounds if isinstance(passes, Pipeline) else None,
            "config": config,
            "verify": verify,
            "check": check,
            "shapes": shapes,
            "inputs": inputs,
            "rtol": rtol,
            "atol": atol,
            "tune": tuning,
            "precision": precision,
            "calibration": calibration,
            "block_size": block_size,
            "size_budget": size_budget,
            "max_error": max_error,
            "min_cosine": min_cosine,
        },
    )
    tree = store.get_tree(key) if store is not None else None
    if store is not None and tree is not None:
        report = json.loads((tree / "report.json").read_text())
        report.update(input=str(source), cache={"hit": True, "key": key, "dir": str(store.root)})
        store.restore_tree(tree, out, report)
        manifest = json.loads((out / "manifest.json").read_text())
        return CompileResult(outdir=out, manifest=manifest, report=report)
    started = time.perf_counter()
    result = optimize(
        source,
        passes=passes,
        target=target_obj.name,
        config=config,
        verify=verify,
        check=check,
        shapes=shapes,
        inputs=inputs,
        rtol=rtol,
        atol=atol,
        host=host,
        options=options,
        precision=precision,
        calibration=calibration,
        block_size=block_size,
        size_budget=size_budget,
        max_error=max_error,
        min_cosine=min_cosine,
    )
    if result.equivalence is not None and not result.equivalence.ok:
        bad = [o for o in result.equivalence.outputs if not o.within_tolerance]
        worst = max(bad, key=lambda o: o.max_abs_error)
        raise CheckFailed(
            f"{source}: optimized output '{worst.name}' differs from the original (max abs error "
            f"{worst.max_abs_error:.3g}, cosine {worst.cosine:.6f}); nothing was written to {out}",
            hint="rerun with --verify each --dump-dir DIR to find the pass, and report it",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    with discard_on_abort(staging):
        try:
            lowering_started = time.perf_counter()
            artifacts = target_obj.lower(
                result.module,
                staging,
                {
                    "shapes": shapes,
                    "target": target_obj,
                    "schedules": (options or {}).get("schedules"),
                    "int8": (options or {}).get("int8"),
                    "tune": tuning,
                },
            )
            lowering_seconds = time.perf_counter() - lowering_started
            optimized = result.module.to_proto()
            manifest = _manifest(source, target_obj.name, result, optimized, artifacts, staging)
            library_check = None
            if check and any(a.role == "library" for a in artifacts):
                library_check = _check_library(
                    target_obj, staging, manifest, optimized, source, out, rtol=rtol, atol=atol
                )
                manifest["library_verified"] = library_check["ok"]
            report = {
                "dsopt_report_version": MANIFEST_VERSION,
                "input": str(source),
                "target": target_obj.name,
                "pipeline": result.pipeline,
                "seconds": round(time.perf_counter() - started, 6),
                **result.report.to_dict(),
                "equivalence": result.equivalence.to_dict() if result.equivalence else None,
                **result.quant_error_entry(),
                **result.mixed_entry(),
                **result.calibration_entry(),
                "lowering_seconds": round(lowering_seconds, 6),
                "library_check": library_check,
            }
            if store is not None:
                report["cache"] = {"hit": False, "key": key, "dir": str(store.root)}
            _write_json(staging / "manifest.json", manifest)
            if result.mixed is not None:  # the Pareto plot, OUTDIR/pareto.png
                from dsopt.mixed.plot import write_beside

                write_beside(report, staging / "report.json")
            _write_json(staging / "report.json", report)
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    if store is not None:
        try:
            store.put_tree(key, out)
        except OSError as e:  # a full or read-only cache never fails the build
            logger.warning("compile output not cached in %s: %s", store.root, e)
    return CompileResult(outdir=out, manifest=manifest, report=report)


def _compile_cache(
    cache_dir: str | os.PathLike[str] | None,
    source: Path,
    host: PluginHost,
    target: Any,
    options: Mapping[str, Any] | None,
    settings: Mapping[str, Any],
) -> tuple[Any, str]:
    """The artifact cache of a compile run and its key; (None, "") when off or bypassed."""
    if cache_dir is None:
        return None, ""
    from dsopt import cache

    resolved = cache.compile_settings(settings, options)
    if resolved is None:
        return None, ""
    return cache.ArtifactCache(cache_dir), cache.compile_key(source, resolved, host, target)


#: The library check's whole-output bound (`compare_outputs(relative=...)`: cosine >= 1 - it,
#: rel L2 <= sqrt(2 * it) = 1.4%) for models that quantize activations: two exact int8
#: implementations may round a value that lies on a tie differently (TVM's and onnxruntime's
#: DynamicQuantizeLinear), and one step in an early activation moves every later one.
#: Measured: BERT int8-dynamic, x86 library vs onnxruntime, rel L2 0.0045, cosine 0.99999.
_ROUNDING_TIES = 1e-4
#: Ops that quantize activations (weight-only models have none and are checked elementwise).
_ACTIVATION_QUANT_OPS = frozenset(
    {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QGemm"}
)


def _quantizes_activations(model: onnx.ModelProto) -> bool:
    """Whether some node of the main graph quantizes or computes on quantized activations."""
    return any(
        n.op_type in _ACTIVATION_QUANT_OPS or n.op_type.startswith(("QLinear", "DynamicQuantize"))
        for n in model.graph.node
    )


def _check_library(
    target: Any,
    outdir: Path,
    manifest: Mapping[str, Any],
    optimized: onnx.ModelProto,
    source: Path,
    final: Path,
    *,
    rtol: float,
    atol: float,
) -> dict[str, Any]:
    """Runs the compiled library on seeded random inputs against onnxruntime on the model.

    Raises:
        CheckFailed: An output is outside tolerance (nothing is written to OUTDIR).
    """
    from dsopt import numerics
    from dsopt.errors import NotRunnableHere

    feeds = numerics.random_inputs(
        outdir / "model.onnx", shapes={s["name"]: s["shape"] for s in manifest["inputs"]}
    )
    try:
        candidate = target.run(outdir, manifest, feeds)
    except NotRunnableHere as e:
        logger.info("library not checked: %s", e.message)
        return {"ok": None, "skipped": e.message}
    reference = numerics.run_model(optimized, feeds, label="optimized")
    relative = _ROUNDING_TIES if _quantizes_activations(optimized) else None
    comparisons = numerics.compare_outputs(
        reference, candidate, rtol=rtol, atol=atol, relative=relative
    )
    report = numerics.EquivalenceReport(outputs=comparisons, samples=1, rtol=rtol, atol=atol)
    if not report.ok:
        worst = report.failures()[0]
        raise CheckFailed(
            f"{source}: the {target.name} library's output '{worst.name}' differs from "
            f"onnxruntime on the optimized model ({worst.describe()}); nothing was written to "
            f"{final}",
            hint="compile for --target onnxruntime, or loosen --rtol/--atol if the error is "
            "float re-association",
        )
    return {"ok": True, **report.to_dict()}


def verify_manifest(outdir: Path, manifest: Mapping[str, Any]) -> None:
    """Checks that every artifact the manifest lists exists with its recorded size and hash.

    Raises:
        UsageError: The manifest is of an unknown version, or a file is missing or changed.
    """
    if manifest.get("dsopt_manifest_version") != MANIFEST_VERSION:
        raise UsageError(
            f"{outdir}/manifest.json: unknown manifest version "
            f"{manifest.get('dsopt_manifest_version')!r} (this dsopt reads {MANIFEST_VERSION})"
        )
    for entry in manifest.get("artifacts", []):
        path = outdir / entry["path"]
        if not path.is_file():
            raise UsageError(f"{path}: listed in manifest.json but missing")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise UsageError(
                f"{path}: does not match manifest.json (size or sha256 changed)",
                hint="compile the model again",
            )


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _io_specs(values: Sequence[onnx.ValueInfoProto], skip: set[str]) -> list[dict[str, Any]]:
    specs = []
    for vi in values:
        if vi.name in skip:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else None
        specs.append({"name": vi.name, "dtype": dtype, "shape": dims})
    return specs


def _manifest(
    source: Path,
    target: str,
    result: OptimizeResult,
    optimized: onnx.ModelProto,
    artifacts: Sequence[Any],
    staging: Path,
) -> dict[str, Any]:
    import dsopt

    # The inputs and outputs of what OUTDIR holds: a target may write a static-shape model.
    model_file = next((a.path for a in artifacts if a.role == "model"), None)
    described = (
        onnx.load(model_file, load_external_data=False) if model_file is not None else optimized
    )
    initializers = {t.name for t in described.graph.initializer}
    tvm = next((a.meta["tvm"] for a in artifacts if "tvm" in a.meta), None)
    manifest = {
        "dsopt_manifest_version": MANIFEST_VERSION,
        "dsopt_version": dsopt.__version__,
        "target": target,
        "source": {"path": source.name, "sha256": _sha256(source), "bytes": source.stat().st_size},
        "inputs": _io_specs(described.graph.input, initializers),
        "outputs": _io_specs(described.graph.output, set()),
        "opset_imports": {(i.domain or "ai.onnx"): i.version for i in optimized.opset_import},
        "pipeline": result.pipeline,
        "artifacts": [
            {
                "role": a.role,
                "path": a.path.relative_to(staging).as_posix(),
                "sha256": _sha256(a.path),
                "bytes": a.path.stat().st_size,
                **{k: v for k, v in a.meta.items() if k != "tvm"},
            }
            for a in artifacts
        ],
        "verified": result.report.verification,
        "equivalent": None if result.equivalence is None else bool(result.equivalence.ok),
    }
    if tvm is not None:
        manifest["tvm"] = tvm
    return manifest
