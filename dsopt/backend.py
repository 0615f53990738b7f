"""Targets: declared data (TVM config, default pipeline, capabilities) plus a lowering step."""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dsopt.errors import NotRunnableHere, UsageError
from dsopt.ir import Module

__all__ = [
    "TVM_PIPELINE",
    "Artifact",
    "Target",
    "int8_kernels",
    "lower_tvm",
    "parse_tune_rpc",
    "run_emulated",
    "run_library",
    "run_onnx",
    "static_model",
    "tune_settings",
    "write_onnx",
]

logger = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A file a target wrote into the output directory, with its role (`model`, `library`).

    Args:
        role: What the file is: `model` (ONNX) or `library` (compiled code).
        path: Where it was written.
        meta: Extra manifest fields for this artifact (format, entry point, ...); a `tvm` key
            becomes the manifest's top-level `tvm` section.
    """

    role: str
    path: Path
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


#: Lowers an optimized module into files under `outdir`; returns what it wrote. Options:
#: `shapes` (input shape overrides, may be None) and `target` (the Target being lowered for).
Lowering = Callable[[Module, Path, Mapping[str, Any]], list[Artifact]]

#: Runs a compiled OUTDIR once: (outdir, manifest, feeds by input name) -> outputs by name.
Runner = Callable[[Path, Mapping[str, Any], Feeds], dict[str, np.ndarray]]


def write_onnx(module: Module, outdir: Path, options: Mapping[str, Any]) -> list[Artifact]:
    """The default lowering: the optimized model as `model.onnx`."""
    path = module.save(outdir / "model.onnx")
    return [Artifact("model", path)]


def run_onnx(outdir: Path, manifest: Mapping[str, Any], feeds: Feeds) -> dict[str, np.ndarray]:
    """Runs OUTDIR's `model.onnx` in onnxruntime (CPU)."""
    from dsopt import numerics

    return numerics.run_model(_artifact(outdir, manifest, "model"), dict(feeds), label="model")


#: Default pipeline of the TVM targets: quantized ops spelled in ops TVM's importer takes
#: (a no-op on float models), then the lossless default pipeline.
TVM_PIPELINE = "legalize-quantized,default"


@dataclasses.dataclass(frozen=True)
class Target:
    """A hardware/runtime target, declared as data.

    Args:
        name: Kebab-case name used with `--target`.
        summary: One line for `dsopt targets`.
        aliases: Other accepted names.
        tvm: TVM target config in dict form (None for non-TVM targets); a GPU config nests its
            CPU side under `host`.
        host_cpu: The TVM config's `mcpu` is the build machine's CPU (LLVM's name for it).
        cpu_features: CPU flags (/proc/cpuinfo spelling, `avx512vnni` for VNNI) the compiled
            code needs, so it runs here only when this machine has them.
        link: How the library is linked: `host` (a `.so` by the host's C++ compiler), `cross`
            (a `.so` by `cross_compiler`; without it on PATH, a `.tar` of objects), or
            `objects` (a `.tar` of objects to link for the device).
        cross_compiler: C++ compiler driver that links for the device, e.g.
            `aarch64-linux-gnu-g++`.
        schedules: CPU schedules added to TVM's fused pipeline: `dsopt` (dsopt's default
            rules), `dlight` (TVM's CPU GEMV/Reduction rules) or `none`.
        pipeline: Default pass pipeline text for this target.
        precisions: Precisions the target runs, with relative cost (lower is faster).
        fused_ops: Non-standard ops (`domain::Op`, e.g. `com.microsoft::FusedConv`) its runtime
            executes; fusions into such ops fire only for targets that declare them.
        opset: The newest default-domain opset its runtime executes; `upgrade-opset` may raise a
            model's opset up to it when a standard fused op needs that (None: never upgrade).
        allow_lossy: Whether lossy passes may join its default pipeline.
        lower: Writes the deployable files; defaults to writing `model.onnx`.
        run: Runs a compiled OUTDIR here (`dsopt run`, and compile's check of the library);
            raises `NotRunnableHere` when the code is for another machine.
    """

    name: str
    summary: str
    aliases: tuple[str, ...] = ()
    tvm: Mapping[str, Any] | None = None
    host_cpu: bool = False
    cpu_features: frozenset[str] = frozenset()
    link: str = "host"
    cross_compiler: str | None = None
    schedules: str = "none"
    pipeline: str = "default"
    precisions: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"float32": 1.0})
    fused_ops: frozenset[str] = frozenset()
    opset: int | None = None
    allow_lossy: bool = False
    lower: Lowering = write_onnx
    run: Runner = run_onnx

    def tvm_config(self) -> dict[str, Any] | None:
        """The TVM target dict as lowering uses it (the host's CPU filled in for `host_cpu`)."""
        if self.tvm is None:
            return None
        config = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.tvm.items()}
        if self.host_cpu:
            from dsopt import _tvm

            config["mcpu"] = _tvm.host_cpu_features()["cpu"]
        return config


# -- TVM lowering ------------------------------------------------------------------------------
def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    # Some exporters (Paddle2ONNX) write -1 for a dynamic dim.
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
        for d in tt.shape.dim
    ]


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def static_model(
    module: Module, shapes: Mapping[str, Sequence[int]] | None, target: str
) -> onnx.ModelProto:
    """A copy of `module` with static input shapes and its shape arithmetic folded away.

    Inputs get the `shapes` overrides (or keep their static shapes); then `simplify-shapes`,
    `fold-constants` and `eliminate-dead` run until nothing changes, so TVM's importer sees
    constants instead of `Shape -> Gather -> Concat -> Reshape` chains.

    Raises:
        UsageError: An input has dynamic dims and no override, or an override does not fit.
    """
    from dsopt.pass_infra import PassContext, PassManager
    from dsopt.passes.eliminate_dead import EliminateDead
    from dsopt.passes.fold_constants import FoldConstants
    from dsopt.passes.simplify_shapes import SimplifyShapes

    proto = module.to_proto()
    shapes = dict(shapes or {})
    inputs = _graph_inputs(proto)
    names = [vi.name for vi in inputs]
    for name in shapes:
        if name not in names:
            raise UsageError(
                f"--shape {name}: the model has no input '{name}' (inputs: {', '.join(names)})"
            )
    for vi in inputs:
        dims = _dims(vi)
        if vi.name in shapes:
            wanted = [int(d) for d in shapes[vi.name]]
            if dims is not None and len(dims) != len(wanted):
                raise UsageError(
                    f"--shape {vi.name}: the model's input has rank {len(dims)}, not {len(wanted)}"
                )
            for declared, given in zip(dims or wanted, wanted, strict=True):
                if isinstance(declared, int) and declared != given:
                    raise UsageError(
                        f"--shape {vi.name}={','.join(map(str, wanted))} contradicts the model's "
                        f"static shape {dims}"
                    )
        elif dims is None or not all(isinstance(d, int) for d in dims):
            shown = (
                "?" if dims is None else ",".join(str(d if d is not None else "?") for d in dims)
            )
            example = (
                "D1,D2,..."
                if dims is None
                else ",".join(str(d) if isinstance(d, int) else "1" for d in dims)
            )
            raise UsageError(
                f"input '{vi.name}' has dynamic shape [{shown}]; target '{target}' compiles for "
                f"static shapes: pass --shape {vi.name}={example}"
            )
        else:
            continue
        shape = vi.type.tensor_type.shape
        shape.ClearField("dim")
        for size in shapes[vi.name]:
            shape.dim.add().dim_value = int(size)
    # Intermediate and output types were inferred for the dynamic shapes; infer them again.
    del proto.graph.value_info[:]
    for vi in proto.graph.output:
        for dim in vi.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    static = Module.from_proto(proto)
    passes = [SimplifyShapes(), FoldConstants(), EliminateDead()]
    PassManager(passes, verify="off", rounds=8).run(static, PassContext(target=target))
    folded = static.to_proto()
    try:
        return onnx.shape_inference.infer_shapes(folded, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: the library check catches real problems
        logger.debug("shape inference failed on the static model", exc_info=True)
        return folded


def _input_dtype(vi: onnx.ValueInfoProto) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name)


def _unlinked_note(target: Target) -> str:
    """The manifest's note on a `model.tar` of objects: why it is unlinked, how to link it."""
    why = f"{target.cross_compiler} was not on PATH" if target.cross_compiler else "no linker"
    return (
        f"objects only ({why}): on the device run `tar xf model.tar && g++ -shared -fPIC "
        "-o model.so *.o`, or install the cross toolchain (scripts/setup-cross.sh) and "
        "compile again"
    )


#: CPU schedule sets `lower_tvm` applies (option `schedules` overrides the target's).
_SCHEDULES = ("dsopt", "dlight", "none")
#: How `lower_tvm` computes integer-valued convolutions and matmuls (option `int8`).
_INT8_KERNELS = ("auto", "vnni", "float")


def int8_kernels(target: Target, choice: str | None, schedules: str | None = None) -> str:
    """The int8 kernels lowering uses: "vnni" (AVX-512 VNNI on the target's CPU) or "float".

    The target's CPU is the host's for `host_cpu` targets. The int8 kernels come with dsopt's
    schedules: other `schedules` get "float".

    Raises:
        UsageError: An unknown choice, or "vnni" for a CPU without VNNI or without dsopt's
            schedules.
    """
    choice = choice or "auto"
    if choice not in _INT8_KERNELS:
        raise UsageError(
            f"unknown int8 '{choice}' for target '{target.name}': use one of "
            f"{', '.join(_INT8_KERNELS)}"
        )
    if (schedules or target.schedules) != "dsopt":
        if choice == "vnni":
            raise UsageError(
                f"int8 'vnni' needs dsopt's CPU schedules, not '{schedules or target.schedules}'"
                f" (target '{target.name}'): drop the schedules option or use int8 'float'"
            )
        return "float"
    features = set(target.cpu_features)
    if target.host_cpu:
        from dsopt import _tvm

        features |= set(_tvm.host_cpu_features()["features"])
    x86 = target.tvm is not None and str(target.tvm.get("mtriple", "x86_64")).startswith("x86")
    has_vnni = x86 and target.tvm.get("kind") == "llvm" and "avx512vnni" in features
    if choice == "vnni" and not has_vnni:
        raise UsageError(
            f"target '{target.name}' has no AVX-512 VNNI for int8 'vnni': use int8 'float' or "
            "--target x86-vnni"
        )
    return "vnni" if choice != "float" and has_vnni else "float"


# -- Tuning --------------------------------------------------------------------------------------
def parse_tune_rpc(text: str) -> dict[str, Any]:
    """`HOST:PORT:KEY` (an RPC tracker and the key its device servers registered) as a dict.

    Raises:
        UsageError: The text is not of that form.
    """
    parts = str(text).split(":")
    port = parts[1] if len(parts) == 3 else ""
    if len(parts) != 3 or not parts[0] or not parts[2] or not port.isdigit():
        raise UsageError(
            f"--tune-rpc {text!r}: expected HOST:PORT:KEY (the RPC tracker's host and port, and "
            "the key the device servers registered), e.g. 127.0.0.1:9190:rpi4"
        )
    if not 0 < int(port) < 65536:
        raise UsageError(f"--tune-rpc {text!r}: port {port} is outside 1..65535")
    return {"host": parts[0], "port": int(port), "key": parts[2]}


def tune_settings(tune: Mapping[str, Any] | None, target: Target) -> dict[str, Any] | None:
    """Checks `compile(tune=...)` for a target before any work; None when not tuning.

    Keys: `minutes` (the budget, required), `db` (database folder; default per TVM target under
    ~/.cache/dsopt/tune), `rpc` (`HOST:PORT:KEY` or a dict: trials run on the tracker's boards),
    `trials` (at most this many trials per function), `trials_per_iter` (batch size).

    Raises:
        UsageError: A bad value, a non-TVM target, or trials that cannot run here without RPC.
    """
    if not tune:
        return None
    settings = dict(tune)
    unknown = set(settings) - {"minutes", "db", "rpc", "trials", "trials_per_iter"}
    if unknown:
        raise UsageError(f"unknown tuning settings: {', '.join(sorted(unknown))}")
    minutes = settings.get("minutes")
    if minutes is None:
        raise UsageError("--tune-db, --tune-rpc and --tune-trials need --tune-minutes N")
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not minutes > 0:
        raise UsageError(f"--tune-minutes {minutes!r}: give a positive number of minutes")
    for key in ("trials", "trials_per_iter"):
        value = settings.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise UsageError(f"tuning setting {key}={value!r}: give a positive whole number")
    if target.tvm is None:
        raise UsageError(
            f"target '{target.name}' is not compiled by TVM: --tune-minutes applies to TVM "
            "targets (x86, arm-neon, rpi4, jetson, cuda)"
        )
    import importlib.util

    missing = [m for m in ("psutil", "cloudpickle") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"--tune-minutes needs {' and '.join(missing)} (MetaSchedule's worker pools)",
            hint="pip install 'dsopt[tune]'",
        )
    rpc = settings.get("rpc")
    if isinstance(rpc, str):
        rpc = parse_tune_rpc(rpc)
    settings["rpc"] = dict(rpc) if rpc else None
    if not rpc:
        config = target.tvm
        arch = str(config.get("mtriple") or "x86_64").split("-")[0]
        if config.get("kind") == "llvm" and arch != _host_arch():
            raise UsageError(
                f"target '{target.name}' runs {arch} code, which cannot run on this "
                f"{_host_arch()} machine to be measured: tune on the device with "
                "--tune-rpc HOST:PORT:KEY (README, 'Tuning')"
            )
        if target.cpu_features:
            from dsopt import _tvm

            missing = sorted(set(target.cpu_features) - set(_tvm.host_cpu_features()["features"]))
            if missing:
                raise UsageError(
                    f"target '{target.name}' needs CPU features {', '.join(missing)} this machine "
                    "lacks, so its trials cannot run here: tune with --tune-rpc HOST:PORT:KEY"
                )
    return settings


def _tune(
    mod: Any, target: Target, config: Mapping[str, Any], settings: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Runs `_tvm.tune` for `lower_tvm` with checked settings; returns its record (or None)."""
    if not settings:
        return None
    from dsopt import _tvm

    # Trials are linked like the library: here, by the cross compiler, or on the device.
    host = config if config.get("kind") == "llvm" else config.get("host") or {}
    if str(host.get("mtriple") or "x86_64").split("-")[0] == _host_arch():
        linker = None
    elif target.cross_compiler and shutil.which(target.cross_compiler):
        linker = target.cross_compiler
    else:
        linker = "tar"
    database = Path(settings["db"]).expanduser() if settings.get("db") else None
    return _tvm.tune(
        mod,
        config,
        seconds=float(settings["minutes"]) * 60,
        database_dir=database or _tvm.tuning_database_dir(config),
        rpc=settings.get("rpc"),
        linker=linker,
        max_trials_per_task=settings.get("trials"),
        trials_per_iter=settings.get("trials_per_iter"),
        target_name=target.name,
    )


def lower_tvm(module: Module, outdir: Path, options: Mapping[str, Any]) -> list[Artifact]:
    """Lowers through TVM: static shapes, Relax import, the target's pipeline, compile, link.

    Writes the static model as `model.onnx` (what the library computes) and the library as
    `model.so` (or `model.tar` of objects when it is linked for the device later).
    """
    from dsopt import _tvm

    target: Target = options["target"]
    config = target.tvm_config()
    assert config is not None, f"target '{target.name}' declares no TVM config"
    static = static_model(module, options.get("shapes"), target.name)
    model_path = outdir / "model.onnx"
    onnx.save(static, model_path)
    inputs = _graph_inputs(static)
    shapes = {vi.name: [int(d) for d in _dims(vi) or []] for vi in inputs}
    dtypes = {vi.name: _input_dtype(vi) for vi in inputs}
    started = time.perf_counter()
    mod = _tvm.import_onnx(static, shapes, dtypes, target_name=target.name)
    schedules = options.get("schedules") or target.schedules
    if schedules not in _SCHEDULES:
        raise UsageError(
            f"unknown schedules '{schedules}' for target '{target.name}': use one of "
            f"{', '.join(_SCHEDULES)}"
        )
    tuning = _tune(mod, target, config, options.get("tune"))
    schedule_stats: dict[str, int] = {}
    build_options = {
        "schedules": schedules,
        "target_name": target.name,
        "int8": int8_kernels(target, options.get("int8"), schedules),
    }
    if tuning is not None:
        build_options["tuning_database"] = tuning["database"]["path"]
    executable = _tvm.build(mod, config, build_options, stats=schedule_stats)
    compiled = time.perf_counter() - started
    if target.link == "host":
        library, linker = outdir / "model.so", None
    elif target.link == "cross" and target.cross_compiler and shutil.which(target.cross_compiler):
        library, linker = outdir / "model.so", target.cross_compiler
    else:
        library, linker = outdir / "model.tar", None
        if target.link == "cross":
            logger.warning(
                "%s is not on PATH: target '%s' gets model.tar (objects); link it with a "
                "cross compiler or on the device",
                target.cross_compiler,
                target.name,
            )
    cuda: dict[str, str] | None = None
    if config.get("kind") == "cuda":
        cuda = _tvm.export_cuda(executable, library, str(config["arch"]), cross_compiler=linker)
    else:
        _tvm.export(executable, library, cross_compiler=linker)
    note = _unlinked_note(target) if library.suffix == ".tar" else None
    meta: dict[str, Any] = {
        "format": "tvm-relax-vm",
        "entry": "main",
        "linked": library.suffix == ".so",
        "linker": linker or ("host" if library.suffix == ".so" else None),
        "cpu_features": sorted(target.cpu_features),
        "compile_seconds": round(compiled, 3),
        "tvm": {
            **_tvm.versions(),
            "target": config,
            "schedules": {"rules": schedules, "int8": build_options["int8"], **schedule_stats},
        },
    }
    if tuning is not None:
        meta["tvm"]["tuning"] = tuning
    if note:
        meta["note"] = note
    if cuda is not None:
        # "cubin": compiled here by nvcc; "source-jit": CUDA C compiled when loaded on the device.
        meta["cuda"] = cuda
    return [Artifact("model", model_path), Artifact("library", library, meta)]


def _artifact(outdir: Path, manifest: Mapping[str, Any], role: str) -> Path:
    for entry in manifest.get("artifacts", []):
        if entry.get("role") == role:
            return outdir / entry["path"]
    raise UsageError(f"{outdir}: manifest.json lists no {role} artifact")


def _host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


#: What scripts/setup-aarch64-runtime.sh builds (an arm64 Python + TVM runtime) and the runner
#: script it runs under qemu-user; both live in a dsopt checkout.
_CHECKOUT = Path(__file__).resolve().parents[1]
_AARCH64_RUNTIME = _CHECKOUT / ".cache" / "aarch64"
_AARCH64_RUNNER = _CHECKOUT / "scripts" / "aarch64_run.py"
#: Seconds an emulated run may take (Python and TVM start in ~10 s under qemu).
_EMULATED_TIMEOUT = 900


def run_emulated(outdir: Path, manifest: Mapping[str, Any], feeds: Feeds) -> dict[str, np.ndarray]:
    """Runs OUTDIR's aarch64 library under qemu-user with the aarch64 TVM runtime wheel.

    For checking numerics on an x86 build machine (about 35x slower than a board).

    Raises:
        NotRunnableHere: The library is not a linked aarch64 one, or qemu-aarch64 or the aarch64
            runtime (scripts/setup-aarch64-runtime.sh) is missing.
        UsageError: A feed is missing.
    """
    import os
    import subprocess
    import tempfile

    config = (manifest.get("tvm") or {}).get("target") or {}
    library = _artifact(outdir, manifest, "library")
    arch = str(config.get("mtriple") or "x86_64").split("-")[0]
    if config.get("kind") != "llvm" or arch != "aarch64" or library.suffix != ".so":
        raise NotRunnableHere(
            f"--emulate runs linked aarch64 CPU libraries; {library.name} of target "
            f"'{manifest.get('target', '?')}' is not one: run it without --emulate or on the device"
        )
    qemu = shutil.which("qemu-aarch64")
    sysroot = _AARCH64_RUNTIME / "sysroot"
    if qemu is None or not (_AARCH64_RUNTIME / "READY").is_file() or not _AARCH64_RUNNER.is_file():
        raise NotRunnableHere(
            "--emulate needs qemu-aarch64 and the aarch64 TVM runtime of a dsopt checkout: run "
            "scripts/setup-cross.sh and scripts/setup-aarch64-runtime.sh"
        )
    missing = [s["name"] for s in manifest["inputs"] if s["name"] not in feeds]
    if missing:
        raise UsageError(f"no value for input '{missing[0]}'")
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(_AARCH64_RUNTIME / "site")}
    with tempfile.TemporaryDirectory(prefix="dsopt-emulate-") as tmp:
        inputs, outputs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inputs, **{s["name"]: np.asarray(feeds[s["name"]]) for s in manifest["inputs"]})
        command = [qemu, "-L", str(sysroot), str(sysroot / "usr" / "bin" / "python3.11")]
        run = subprocess.run(
            [*command, str(_AARCH64_RUNNER), str(outdir), str(inputs), str(outputs)],
            capture_output=True,
            text=True,
            env=env,
            timeout=_EMULATED_TIMEOUT,
        )
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["?"])[-1]
            raise NotRunnableHere(f"the aarch64 library failed under qemu: {last}")
        with np.load(outputs) as data:
            return {name: data[name] for name in data.files}


def run_library(outdir: Path, manifest: Mapping[str, Any], feeds: Feeds) -> dict[str, np.ndarray]:
    """Runs OUTDIR's TVM library on this machine's CPU.

    Raises:
        NotRunnableHere: The library is for another ISA, needs CPU features this machine
            lacks, targets a GPU, or is an unlinked object archive.
        UsageError: A feed is missing or has the wrong shape or dtype.
    """
    from dsopt import _tvm

    target = manifest.get("target", "?")
    config = (manifest.get("tvm") or {}).get("target") or {}
    library = _artifact(outdir, manifest, "library")
    arch = str(config.get("mtriple") or "x86_64").split("-")[0]
    if config.get("kind") != "llvm":
        raise NotRunnableHere(
            f"target '{target}' builds {config.get('kind')} code; run {library.name} on the "
            "device with TVM's runtime (see README, 'Running a compiled library')"
        )
    if arch != _host_arch():
        raise NotRunnableHere(
            f"target '{target}' builds {arch} code and this machine is {_host_arch()}; run "
            f"{library.name} on the device with TVM's runtime"
            + (", or here under qemu with `dsopt run --emulate`" if arch == "aarch64" else "")
        )
    entry = next(a for a in manifest["artifacts"] if a["role"] == "library")
    needed = set(entry.get("cpu_features", []))
    missing = sorted(needed - set(_tvm.host_cpu_features()["features"]))
    if missing:
        raise NotRunnableHere(
            f"target '{target}' needs CPU features {', '.join(missing)}, which this machine "
            "lacks; run it on a machine that has them"
        )
    if library.suffix != ".so":
        raise NotRunnableHere(f"{library.name} holds unlinked objects; link it first")
    arrays = []
    for spec in manifest["inputs"]:
        if spec["name"] not in feeds:
            raise UsageError(f"no value for input '{spec['name']}'")
        value = np.asarray(feeds[spec["name"]])
        if list(value.shape) != list(spec["shape"]) or value.dtype.name != spec["dtype"]:
            raise UsageError(
                f"input '{spec['name']}' is {value.dtype.name}{list(value.shape)}; the library "
                f"was compiled for {spec['dtype']}{spec['shape']}",
                hint="compile again with --shape NAME=DIMS for other shapes",
            )
        arrays.append(value)
    outputs = _tvm.load_and_run(library, arrays, entry=entry.get("entry", "main"))
    names = [o["name"] for o in manifest["outputs"]]
    return dict(zip(names, outputs, strict=True))
