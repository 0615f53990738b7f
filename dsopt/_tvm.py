"""The only module that imports Apache TVM (lazily): import, build, export and run libraries."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dsopt.errors import LoweringError

__all__ = [
    "CONTRIB_OPS",
    "build",
    "export",
    "host_cpu_features",
    "import_onnx",
    "load_and_run",
    "make_target",
    "unsupported_ops",
    "versions",
]

logger = logging.getLogger(__name__)

#: com.microsoft ops the Relax ONNX frontend converts (it ignores a node's domain otherwise).
CONTRIB_OPS = frozenset(
    {"Attention", "BiasGelu", "EmbedLayerNormalization", "FastGelu", "SkipLayerNormalization"}
)
#: Default-domain ops the frontend would route to a different op's converter (it ignores the
#: domain, so the opset-23 `Attention` goes to the com.microsoft converter).
_MISROUTED_OPS = frozenset({"Attention"})
#: The CPU feature flags (from /proc/cpuinfo) the x86 targets care about.
_X86_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512vnni", "avx_vnni")


@functools.cache
def _load() -> Any:
    """Imports tvm, keeping apache-tvm-ffi from importing torch (8-12 s here, unused by dsopt).

    tvm_ffi imports torch eagerly when it is installed, only to convert torch tensors; dsopt
    hands TVM numpy arrays. A torch imported before dsopt is left alone.
    """
    if "torch" in sys.modules:
        import tvm

        return tvm
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail fast
    try:
        import tvm
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tvm


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # TVM errors often start with a traceback banner; the last line holds the message.
    meaningful = [line for line in lines if not line.startswith(("File ", "Traceback", "  "))]
    line = (meaningful or lines or [text])[-1]
    return line[:300]


def versions() -> dict[str, str]:
    """The installed apache-tvm and apache-tvm-ffi versions, for the manifest."""
    tvm = _load()
    import tvm_ffi

    return {"tvm": str(tvm.__version__), "tvm_ffi": str(getattr(tvm_ffi, "__version__", "?"))}


@functools.cache
def host_cpu_features() -> dict[str, Any]:
    """The build machine's CPU: LLVM's name for it and the x86 SIMD flags it has.

    Returns:
        `{"cpu": "znver1", "features": ["avx2", ...]}`; `avx512vnni` is spelled as LLVM does.
    """
    tvm = _load()

    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    features = sorted(
        {"avx512vnni" if f in ("avx512_vnni", "avx512vnni") else f for f in flags & set(_X86_FLAGS)}
    )
    return {"cpu": str(tvm.target.codegen.llvm_get_system_cpu()), "features": features}


def make_target(config: Mapping[str, Any]) -> Any:
    """A `tvm.target.Target` from a dict config (an optional nested `host` dict).

    Raises:
        LoweringError: TVM rejects the config.
    """
    tvm = _load()

    config = dict(config)
    host = config.pop("host", None)
    try:
        return tvm.target.Target(config, host=host) if host else tvm.target.Target(config)
    except Exception as e:  # noqa: BLE001 - TVM raises assorted types; quoted to the user
        raise LoweringError(f"TVM rejects the target {config}: {_first_line(e)}") from e


@functools.cache
def _convert_map_ops() -> frozenset[str]:
    _load()
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map())


def unsupported_ops(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    """Ops of the main graph the Relax ONNX frontend cannot import.

    Returns:
        `(domain::op or op, first node name, node count)` per unsupported op, in graph order.
    """
    known = _convert_map_ops()
    found: dict[str, list[str]] = {}
    for index, node in enumerate(model.graph.node):
        domain = node.domain or ""
        if domain in ("", "ai.onnx"):
            ok = node.op_type == "If" or (
                node.op_type in known and node.op_type not in _MISROUTED_OPS
            )
            key = node.op_type
        else:
            ok = domain == "com.microsoft" and node.op_type in CONTRIB_OPS
            key = f"{domain}::{node.op_type}"
        if not ok:
            found.setdefault(key, []).append(node.name or f"#{index}")
    return [(op, names[0], len(names)) for op, names in found.items()]


def import_onnx(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]],
    dtypes: Mapping[str, str],
    *,
    target_name: str = "?",
) -> Any:
    """Imports a static-shape ONNX model into a Relax IRModule.

    Args:
        model: The model; every input must have an entry in `shapes` and `dtypes`.
        shapes: Static shape of every graph input.
        dtypes: Element type name (numpy spelling) of every graph input.
        target_name: The dsopt target, for error messages.

    Raises:
        LoweringError: An op the frontend cannot import (naming op, node and target), or any
            other import failure (quoting TVM's message).
    """
    missing = unsupported_ops(model)
    if missing:
        op, node, count = missing[0]
        more = f" (and {count - 1} more)" if count > 1 else ""
        others = (
            f"; also unsupported: {', '.join(m[0] for m in missing[1:])}" if missing[1:] else ""
        )
        raise LoweringError(
            f"target '{target_name}' cannot lower op '{op}' (node '{node}'{more}): TVM's ONNX "
            f"importer does not support it{others}",
            hint="compile for --target onnxruntime, which runs every ONNX op",
        )
    _load()
    from tvm.relax.frontend.onnx import from_onnx

    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            return from_onnx(
                model,
                shape_dict={k: [int(d) for d in v] for k, v in shapes.items()},
                dtype_dict=dict(dtypes),
            )
    except Exception as e:  # noqa: BLE001 - converters raise anything; quoted to the user
        # The frontend prints "Error converting operator X, ..." before re-raising.
        found = re.search(r"Error converting operator (\S+?),", captured.getvalue())
        where = ""
        if found:
            op = found.group(1)
            nodes = [n.name for n in model.graph.node if n.op_type == op]
            where = f" op '{op}' (node '{nodes[0] if nodes else '?'}')"
        raise LoweringError(
            f"target '{target_name}' cannot import{where or ' the model'}: {_first_line(e)}",
            hint="compile for --target onnxruntime, which runs every ONNX op",
        ) from e


def _cpu_schedule_pipeline(target: Any) -> Any:
    """The default CPU pipeline plus dlight's CPU rules (GEMV, Reduction) after legalization."""
    tvm = _load()
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: Any, ctx: Any) -> Any:
        with target:
            passes = [
                *cpu.library_dispatch_passes(target),
                *cpu.legalize_passes(target),
                dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction()),
                *cpu.dataflow_lower_passes(target),
                *cpu.finalize_passes(target),
            ]
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def build(mod: Any, target_config: Mapping[str, Any], opt: Mapping[str, Any] | None = None) -> Any:
    """Compiles a Relax module for a target with fusion (and dsopt's CPU schedules).

    Args:
        mod: The IRModule from `import_onnx`.
        target_config: The TVM target in dict form (a nested `host` dict for GPUs).
        opt: `schedules`: "dlight" adds dlight's CPU rules on llvm targets, "none" leaves the
            default fused pipeline; `target_name` for messages.

    Returns:
        The `tvm.runtime.Executable`.

    Raises:
        LoweringError: TVM fails to compile (its message quoted).
    """
    tvm = _load()
    from tvm import relax

    opt = dict(opt or {})
    name = opt.get("target_name", "?")
    target = make_target(target_config)
    if target.kind.name == "llvm" and opt.get("schedules", "none") == "dlight":
        pipeline = _cpu_schedule_pipeline(target)
    else:
        pipeline = relax.get_default_pipeline(target)
    try:
        return tvm.compile(mod, target=target, relax_pipeline=pipeline)
    except Exception as e:  # noqa: BLE001 - TVM raises assorted types; quoted to the user
        raise LoweringError(f"target '{name}': TVM failed to compile: {_first_line(e)}") from e


def export(executable: Any, path: Path, cross_compiler: str | None = None) -> Path:
    """Writes the executable as a shared library (`.so`) or an object archive (`.tar`).

    Args:
        executable: From `build`.
        path: Ends in `.so` (linked here: with the host compiler, or `cross_compiler`) or in
            `.tar` (objects only; link on or for the device).
        cross_compiler: The C++ compiler driver that links for the device, e.g.
            `aarch64-linux-gnu-g++`; None links with the host's.

    Raises:
        LoweringError: Linking fails.
    """
    kwargs: dict[str, Any] = {}
    if cross_compiler and path.suffix == ".so":
        _load()
        from tvm.support import cc

        kwargs["fcompile"] = cc.cross_compiler(cross_compiler)
    try:
        executable.export_library(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - linker failures come as assorted types
        raise LoweringError(f"cannot write {path.name}: {_first_line(e)}") from e
    return path


def cuda_source(executable: Any) -> str:
    """The CUDA C source kept in an executable built for a CUDA target ("" if none)."""
    sources: list[str] = []

    def visit(module: Any) -> None:
        if module.kind == "cuda":
            sources.append(module.inspect_source())
        for sub in module.imports:
            visit(sub)

    visit(executable.mod)
    return "".join(sources)


def _to_numpy(value: Any) -> np.ndarray:
    tvm = _load()

    if isinstance(value, tvm.runtime.Tensor):
        return value.numpy()
    # A shape value (the frontend keeps Shape outputs as shapes) and scalars.
    return np.asarray([int(d) for d in value], dtype=np.int64)


def load_and_run(
    library: str | os.PathLike[str], feeds: Sequence[np.ndarray], *, entry: str = "main"
) -> list[np.ndarray]:
    """Loads a library written by `export` on this machine's CPU and runs it once.

    Args:
        library: The `.so` path.
        feeds: Input arrays in the graph's input order.
        entry: The Relax function to call.

    Returns:
        The outputs, in the graph's output order.

    Raises:
        LoweringError: TVM cannot load or run the library.
    """
    tvm = _load()
    from tvm import relax

    device = tvm.cpu()
    try:
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), device)
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in feeds]
        result = vm[entry](*args)
    except Exception as e:  # noqa: BLE001 - TVM raises assorted types; quoted to the user
        raise LoweringError(f"cannot run {Path(library).name}: {_first_line(e)}") from e
    import tvm_ffi

    if isinstance(result, (tvm.runtime.Tensor, tvm_ffi.Shape)):
        return [_to_numpy(result)]
    return [_to_numpy(item) for item in result]
