"""The only module that imports Apache TVM (lazily): import, build, export and run libraries."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
import re
import shutil
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
    "tune",
    "tuning_database_dir",
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


# -- Default CPU schedules ----------------------------------------------------------------------
# Untuned TVM emits one scalar loop nest per fused PrimFunc. The rules below schedule the hot ones
# with `tvm.s_tir.Schedule` after FuseOps/FuseTIR: a register-tiled, vectorized outer product for
# contractions (conv2d in all its forms, matmul, pooling) and vectorized loops for big injective
# functions. A function no rule fits, or whose scheduling raises, stays as TVM built it.

#: Work (loop iterations of the main block) below which a loop stays on one thread: TVM's thread
#: pool splits a parallel loop statically, and waking it costs more than small kernels take.
_CPU_PARALLEL_MIN_WORK = 1 << 22
#: Elements of an injective function below which it is left to LLVM's auto-vectorizer.
_CPU_INJECTIVE_MIN = 1 << 16


def _cpu_vector_config(target: Any, extent: int = 0) -> tuple[int, int]:
    """(fp32 lanes per vector register, accumulator registers a micro-kernel may hold).

    `extent`: the vector axis. AVX-512 (32 registers) gets 16-lane tiles where they fit the
    axis exactly; ragged 16-lane tiles measured slower than 8-lane ones (PP-OCR rec), exact ones
    faster (BERT 2.37x vs 3.04x, ResNet 2.96x vs 3.40x of onnxruntime, same run).
    """
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith(("aarch64", "arm")):
        return 4, 24  # NEON: 128-bit, 32 registers
    if _has_avx512(target):
        return (16 if extent and extent % 16 == 0 else 8), 24
    return 8, 12  # AVX2: 256-bit, 16 registers


def _has_avx512(target: Any) -> bool:
    from tvm.target import codegen

    return bool(codegen.target_has_features("avx512f", target))


def _cpu_extent(node: Any) -> int:
    return int(node.dom.extent)


def _cpu_pick_vector_tile(extent: int, lanes: int) -> int:
    """The tile along the vector axis: the whole axis when short, else a divisor, 2 vectors first.

    An axis with no divisor of at least half a vector gets 2 vectors and a guarded remainder.
    """
    if extent <= 2 * lanes:
        return extent
    for factor in (2 * lanes, lanes):
        if extent % factor == 0:
            return factor
    best = max(d for d in range(1, 2 * lanes + 1) if extent % d == 0)
    return best if best >= lanes // 2 else 2 * lanes


def _cpu_pick_block_tile(extent: int, limit: int) -> int:
    """The largest divisor of `extent` not above `limit` (rows of the register tile)."""
    return next(f for f in range(max(1, min(limit, extent)), 0, -1) if extent % f == 0)


def _cpu_schedule_contraction(sch: Any, blocks: list[Any], main: Any, target: Any) -> bool:
    """Conv2d (plain, grouped, depthwise, dilated), matmul, pooling: one reduction block.

    The output's last spatial axis (conv width, matmul N) is tiled and vectorized; an axis that a
    vector-invariant operand depends on (output channels, matmul M) gives the rows of the
    register tile; reduction loops sit between the outer tile loops and the tile, small ones
    unrolled. The elementwise epilogue is inlined and computed per tile, so the accumulator tile
    stays in registers, and the outer loops run in parallel when the work is big.
    """
    from tvm import tirx
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    block = sch.get(main)
    iters = list(block.iter_vars)
    loops = sch.get_loops(main)
    if len(loops) != len(iters) or len(block.writes) != 1:
        return False
    spatial = [i for i, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.DataPar]
    reduce = [i for i, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.CommReduce]
    if len(spatial) + len(reduce) != len(iters) or not reduce or not spatial:
        return False
    index = {iv.var: i for i, iv in enumerate(iters)}

    def used(region: Any) -> set[int]:
        found: set[Any] = set()
        for r in region:
            found |= collect_vars_used_in_prim_expr(r.min)
        return {index[v] for v in found if v in index}

    out_axes = [used([r]) for r in block.writes[0].region]
    # The vector axis: the last output axis that is a plain spatial iterator longer than 1.
    vec = next(
        (
            next(iter(axes))
            for axes in reversed(out_axes)
            if len(axes) == 1 and _cpu_extent(iters[next(iter(axes))]) > 1
        ),
        None,
    )
    if vec is None:
        return False
    lanes, registers = _cpu_vector_config(target, _cpu_extent(iters[vec]))
    position = {next(iter(a)): p for p, a in enumerate(out_axes) if len(a) == 1}
    rows = None
    for read in block.reads:
        axes = used(read.region)
        candidates = [i for i in axes if i in spatial and i != vec and _cpu_extent(iters[i]) > 1]
        if vec not in axes and candidates:
            rows = max(candidates, key=lambda i: position.get(i, -1))
            break
    vec_tile = _cpu_pick_vector_tile(_cpu_extent(iters[vec]), lanes)
    vectors = -(-vec_tile // lanes)
    vec_outer, vec_inner = sch.split(loops[vec], [None, vec_tile])
    tile_loops = [vec_inner]
    if rows is not None:
        row_tile = _cpu_pick_block_tile(_cpu_extent(iters[rows]), registers // vectors)
        row_outer, row_inner = sch.split(loops[rows], [None, row_tile])
        tile_loops.insert(0, row_inner)
    outer = [vec_outer if i == vec else row_outer if i == rows else loops[i] for i in spatial]
    reductions = [loops[i] for i in reduce]
    sch.reorder(*outer, *reductions, *tile_loops)
    # The epilogue: inline the elementwise chain, compute its last block per tile.
    later = blocks[blocks.index(main) + 1 :]
    for epilogue in later[:-1]:
        sch.compute_inline(epilogue)
    consumer = later[-1] if later else sch.cache_write(main, 0, "global")
    sch.reverse_compute_at(consumer, outer[-1], preserve_unit_loops=True)
    work = 1
    for iv in iters:
        work *= _cpu_extent(iv)
    if work >= _CPU_PARALLEL_MIN_WORK and len(outer) > 1:
        sch.parallel(sch.fuse(*outer[:-1]))
    for loop in reductions[1:]:
        extent = sch.get(loop).extent
        if isinstance(extent, tirx.IntImm) and int(extent) <= 7:
            sch.unroll(loop)
    if len(tile_loops) > 1:
        sch.unroll(tile_loops[0])
    sch.vectorize(vec_inner)
    init = sch.decompose_reduction(main, reductions[0])
    sch.vectorize(sch.get_loops(init)[-1])
    consumer_loops = sch.get_loops(consumer)[len(outer) :]
    if consumer_loops:
        sch.vectorize(consumer_loops[-1])
    return True


def _cpu_schedule_injective(sch: Any, blocks: list[Any], target: Any) -> bool:
    """A big elementwise/injective function: inlined into its last block, vectorized, parallel."""
    lanes, _ = _cpu_vector_config(target)
    for block in blocks[:-1]:
        sch.compute_inline(block)
    last = blocks[-1]
    loops = sch.get_loops(last)
    extents = [int(sch.get(loop).extent) for loop in loops]
    total = 1
    for extent in extents:
        total *= extent
    if total < _CPU_INJECTIVE_MIN or not loops:
        return False
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if total % lanes:
        return False
    outer, inner = sch.split(fused, [None, lanes])
    sch.vectorize(inner)
    if total >= _CPU_PARALLEL_MIN_WORK:
        sch.parallel(outer)
    return True


def _cpu_schedule_func(func: Any, target: Any) -> Any | None:
    """The function scheduled by the first rule that fits it, or None when none does."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    if not blocks:
        return None
    is_reduction = [
        any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(b).iter_vars) for b in blocks
    ]
    done = False
    int8 = [b for b in blocks if sch.get(b).name_hint.startswith((_INT8_CONV, _INT8_MATMUL))]
    weights = [b for b in blocks if sch.get(b).name_hint == _WEIGHT_MATMUL]
    if weights:
        done = _cpu_schedule_dequantize_matmul(sch, blocks, weights[0], target)
    elif int8:
        done = _cpu_schedule_int8(sch, blocks, int8[0])
    elif sum(is_reduction) == 1:
        done = _cpu_schedule_contraction(sch, blocks, blocks[is_reduction.index(True)], target)
    elif not any(is_reduction):
        done = _cpu_schedule_injective(sch, blocks, target)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True) if done else None


def _cpu_schedule_pass(target: Any, stats: dict[str, int] | None = None) -> Any:
    """A module pass scheduling the fused PrimFuncs for a CPU target (counts into `stats`).

    `stats` gets `scheduled` (a rule applied), `fallback` (a rule failed: the function stays
    unscheduled) and `skipped` (no rule fits: small or unusual functions).
    """
    tvm = _load()
    from tvm import tirx

    counts = stats if stats is not None else {}
    for key in ("scheduled", "fallback", "skipped"):
        counts.setdefault(key, 0)

    @tvm.transform.module_pass(opt_level=0, name="DsoptCPUSchedule")
    def schedule(mod: Any, ctx: Any) -> Any:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", 0):
                continue
            try:
                new = _cpu_schedule_func(func, target)
            except Exception as e:  # noqa: BLE001 - any schedule error: keep the function
                logger.debug("CPU schedule of %s fell back: %s", gvar.name_hint, _first_line(e))
                counts["fallback"] += 1
                continue
            if new is None:
                counts["skipped"] += 1
            else:
                updates[gvar] = new
                counts["scheduled"] += 1
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return schedule


def _cpu_pipeline(
    target: Any, schedules: str, stats: dict[str, int] | None = None, int8: str = "float"
) -> Any:
    """TVM's CPU pipeline with a schedule pass after legalization and fusion.

    `schedules`: "dsopt" (this section's rules) or "dlight" (dlight's CPU GEMV/Reduction);
    With "dsopt" schedules, dsopt's Relax kernels go in before legalization (`_kernel_pass`):
    upsampling conv2d_transpose always; int8 conv2d/matmul when `int8` is "vnni" ("float"
    leaves the integer-valued float convolutions as they are).
    """
    tvm = _load()
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    counts = stats if stats is not None else {}

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: Any, ctx: Any) -> Any:
        with target:
            if schedules == "dlight":
                from tvm.s_tir import dlight

                scheduler = dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction())
            else:
                scheduler = _cpu_schedule_pass(target, counts)
            kernels = (
                [_kernel_pass(counts, int8 == "vnni", weights=True)] if schedules == "dsopt" else []
            )
            passes = [
                *cpu.library_dispatch_passes(target),
                *kernels,
                *cpu.legalize_passes(target),
                scheduler,
                *cpu.dataflow_lower_passes(target),
                *cpu.finalize_passes(target),
            ]
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


# -- dsopt's Relax kernels: int8 (x86 AVX-512 VNNI), upsampling conv2d_transpose ----------------
# TVM imports legalize-quantized's output as float convolutions of integer-valued tensors
# (`conv2d(float(x) - zp, W)`) and int32 matmuls (`matmul(int32(a) - zp, B)`). On CPUs with
# AVX-512 VNNI a Relax pass swaps those for int8 kernels: the activation stays uint8 (int8 is
# shifted by 128), packed as [.., K/4, 4]; the constant weight is packed as [N/16, K/4, .., 16, 4];
# one `vpdpbusd` multiplies 4 uint8 by 16x4 int8 and adds into 16 int32 lanes. The zero point is
# subtracted afterwards (`zp * sum(w)` per output channel, padding filled with the zero point), so
# results equal the float path's exactly, while there's no 2**24 bound to respect.

_INT8_CONV = "dsopt_int8_conv2d"
_INT8_MATMUL = "dsopt_int8_matmul"
_VNNI_INTRIN = "dsopt_vnni_u8s8_16x4"
_VNNI_LANES = 16  # int32 accumulators per zmm register
_VNNI_GROUP = 4  # bytes one vpdpbusd lane sums
#: Iterations of an int8 kernel's reduction block from which its outer loops run in parallel.
_INT8_PARALLEL_MIN_WORK = 1 << 20
#: Accumulator registers (of 32 zmm) one int8 micro-kernel holds.
_INT8_TILE = 16


def _int8_padded(extent: int) -> int:
    """`extent` rounded up so that the register tile along it is at least 4 (when longer)."""
    if extent <= 4 or _cpu_pick_block_tile(extent, _INT8_TILE // 2) >= 4:
        return extent
    return -(-extent // 8) * 8


@functools.cache
def _register_vnni_intrinsic() -> str:
    """Registers dsopt's `vpdpbusd` tensor intrinsic (16 int32 += 4 uint8 x 16x4 int8).

    TVM ships one (`dot_16x4_vnni`), but it hands LLVM 22 int32 vectors where the intrinsic takes
    `<64 x i8>` operands, and importing `tvm.s_tir.tensor_intrin` parses every intrinsic TVM has.
    """
    _load()
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a, 16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(_VNNI_INTRIN, desc, impl)
    return _VNNI_INTRIN


def _constant(expr: Any) -> np.ndarray | None:
    tvm = _load()
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _bound(mutator: Any, expr: Any) -> Any:
    """The value a dataflow variable is bound to (the expression itself otherwise)."""
    from tvm import relax

    value = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None
    return expr if value is None else value


def _unset_or(dtype: Any, *allowed: str) -> bool:
    """Whether an op's `out_dtype` attribute is unset or one of `allowed`."""
    return str(dtype) in ("", "None", "void", *allowed)


def _int8_source(mutator: Any, expr: Any, dtype: str) -> tuple[Any, int] | None:
    """`(x, zp)` when `expr` is `astype(x, dtype) [- zp]`: x int8/uint8, zp one integer."""
    from tvm import relax

    def bound(e: Any) -> Any:
        return _bound(mutator, e)

    def is_op(e: Any, name: str) -> bool:
        return isinstance(e, relax.Call) and getattr(e.op, "name", "") == name

    expr = bound(expr)
    zp, zp_rank = 0.0, 0
    if is_op(expr, "relax.subtract"):
        value = _constant(expr.args[1])
        if value is None or value.size != 1:
            return None
        zp, zp_rank = float(value.reshape(-1)[0]), value.ndim
        expr = bound(expr.args[0])
    if not is_op(expr, "relax.astype") or str(expr.attrs.dtype) != dtype:
        return None
    source = expr.args[0]
    low, high = _INTEGER_RANGES.get(str(source.ty.dtype), (1, 0))
    if zp != round(zp) or not low <= zp <= high or zp_rank > len(source.ty.shape):
        return None
    return source, int(zp)


#: The activation types the int8 kernels read.
_INTEGER_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def _int8_weight(value: np.ndarray | None, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`(w8, shift)` with `value == w8 + shift` (int8 w8, one int32 shift per index of `axis`).

    A slice whose integers span at most 255 but leave [-128, 127] (a centered uint8 weight, or
    int8 minus a zero point) is shifted into int8; the kernel adds `shift * sum(x)` back.
    None when the constant is not integer-valued or a slice spans more.
    """
    if value is None or value.dtype.kind not in "fi" or value.size == 0:
        return None
    if np.any(value != np.round(value)):
        return None
    moved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
    low, high = moved.min(axis=1), moved.max(axis=1)
    if np.any(high - low > 255):
        return None
    shift = np.where((low >= -128) & (high <= 127), 0, high - 127).astype(np.int32)
    shape = [1] * value.ndim
    shape[axis] = -1
    return (value - shift.reshape(shape)).astype(np.int8), shift


def _lane_blocks(w: np.ndarray, shifted: bool) -> np.ndarray:
    """[O, K...] int8 -> [O/16, 16, K...] (zero padded); shifted: 15 channels and a ones lane.

    The ones lane (weights 1 on every real input) sums the activation window, which the
    kernel needs for shifted weights; keeping it in every 16-lane block keeps it in the tile.
    """
    per = _VNNI_LANES - 1 if shifted else _VNNI_LANES
    blocks = -(-w.shape[0] // per)
    out = np.zeros((blocks, _VNNI_LANES, *w.shape[1:]), np.int8)
    padded = np.zeros((blocks * per, *w.shape[1:]), np.int8)
    padded[: w.shape[0]] = w
    out[:, :per] = padded.reshape(blocks, per, *w.shape[1:])
    if shifted:
        out[:, per] = 1
    return out


def _pack_conv_weight(w: np.ndarray, shifted: bool) -> np.ndarray:
    """[O, I, KH, KW] -> [O/16, I/4, KH, KW, 16, 4] (rounded up, zero padded)."""
    lanes = _lane_blocks(w, shifted)  # [OB, 16, I, KH, KW]
    ob, _, i, kh, kw = lanes.shape
    ib = -(-i // _VNNI_GROUP)
    padded = np.zeros((ob, _VNNI_LANES, ib * _VNNI_GROUP, kh, kw), np.int8)
    padded[:, :, :i] = lanes
    shape = (ob, _VNNI_LANES, ib, _VNNI_GROUP, kh, kw)
    return np.ascontiguousarray(padded.reshape(shape).transpose(0, 2, 4, 5, 1, 3))


def _pack_matmul_weight(w: np.ndarray, shifted: bool) -> np.ndarray:
    """[K, N] -> [N/16, K/4, 16, 4] (rounded up, zero padded)."""
    lanes = _lane_blocks(np.ascontiguousarray(w.T), shifted)  # [NB, 16, K]
    nb, _, k = lanes.shape
    kb = -(-k // _VNNI_GROUP)
    padded = np.zeros((nb, _VNNI_LANES, kb * _VNNI_GROUP), np.int8)
    padded[:, :, :k] = lanes
    shape = (nb, _VNNI_LANES, kb, _VNNI_GROUP)
    return np.ascontiguousarray(padded.reshape(shape).transpose(0, 2, 1, 3))


def _uint8_zero_point(x: Any, zp: int) -> int:
    """The zero point of `x` read as uint8 (int8 moves by 128)."""
    return zp + (128 if str(x.ty.dtype) == "int8" else 0)


def _to_uint8(value: Any, dtype: str) -> Any:
    """uint8 as it is; int8 shifted by 128 (the zero point moves with it)."""
    return value if dtype == "uint8" else (value.astype("int32") + 128).astype("uint8")


def _int8_conv2d_te(
    x: Any,
    weight: Any,
    correction: Any,
    shift: Any,
    *,
    pad_value: int,
    out_channels: int,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    shifted: bool,
) -> Any:
    """float32 NCHW conv of `x - zp` (x int8/uint8) with packed int8 weights, int32 sums.

    `correction[o]` is `zp * sum(w[o])`; `shifted`: each 16-lane weight block holds 15 channels
    and a ones lane (the window sums of x), and channel o adds `shift[o]` times that sum.
    """
    from tvm import te, tirx

    n, c, h, w = (int(d) for d in x.shape)
    ob, cb, kh, kw = (int(d) for d in weight.shape[:4])
    top, left, bottom, right = padding
    (sh, sw), (dh, dw) = strides, dilation
    hp, wp = h + top + bottom, w + left + right
    oh, ow = (hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1
    ow_padded = _int8_padded(ow)
    wp = max(wp, (ow_padded - 1) * sw + (kw - 1) * dw + 1)
    dtype = str(x.dtype)

    def pack(i: Any, b: Any, y: Any, z: Any, g: Any) -> Any:
        ch, yy, zz = b * _VNNI_GROUP + g, y - top, z - left
        inside = tirx.all(ch < c, yy >= 0, yy < h, zz >= 0, zz < w)
        clamp = (
            tirx.min(ch, c - 1),
            tirx.max(tirx.min(yy, h - 1), 0),
            tirx.max(tirx.min(zz, w - 1), 0),
        )
        value = _to_uint8(x[(i, *clamp)], dtype)
        return tirx.if_then_else(inside, value, tirx.const(pad_value, "uint8"))

    packed = te.compute((n, cb, hp, wp, _VNNI_GROUP), pack, name="dsopt_int8_pack")
    rc, rh = te.reduce_axis((0, cb), "rc"), te.reduce_axis((0, kh), "rh")
    rw, rg = te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, _VNNI_GROUP), "rg")
    acc = te.compute(
        (n, ob, oh, ow_padded, _VNNI_LANES),
        lambda i, b, y, z, o: te.sum(
            packed[i, rc, y * sh + rh * dh, z * sw + rw * dw, rg].astype("int32")
            * weight[b, rc, rh, rw, o, rg].astype("int32"),
            axis=[rc, rh, rw, rg],
        ),
        name=_INT8_CONV + ("_shifted" if shifted else ""),
    )
    per = _VNNI_LANES - 1 if shifted else _VNNI_LANES

    def unpack(i: Any, o: Any, y: Any, z: Any) -> Any:
        value = acc[i, o // per, y, z, o % per] - correction[o]
        if shifted:
            value = value + shift[o] * acc[i, o // per, y, z, per]
        return value.astype("float32")

    return te.compute((n, out_channels, oh, ow), unpack, name="dsopt_int8_unpack")


def _int8_matmul_te(
    a: Any, weight: Any, correction: Any, shift: Any, *, pad_value: int, columns: int, shifted: bool
) -> Any:
    """int32 `(a - zp) @ B` (a int8/uint8 [.., M, K]) with packed int8 B (shift: as for conv)."""
    from tvm import te, tirx

    shape = [int(d) for d in a.shape]
    k = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    rows_padded = _int8_padded(rows)
    nb, kb = (int(d) for d in weight.shape[:2])
    dtype = str(a.dtype)

    def unravel(r: Any) -> list[Any]:
        index = []
        for d in reversed(shape[:-1]):
            index.append(r % d)
            r = r // d
        return index[::-1]

    def pack(r: Any, q: Any, g: Any) -> Any:
        col = q * _VNNI_GROUP + g
        value = _to_uint8(a[(*unravel(tirx.min(r, rows - 1)), tirx.min(col, k - 1))], dtype)
        return tirx.if_then_else(col < k, value, tirx.const(pad_value, "uint8"))

    packed = te.compute((rows_padded, kb, _VNNI_GROUP), pack, name="dsopt_int8_pack")
    per = _VNNI_LANES - 1 if shifted else _VNNI_LANES
    rq, rg = te.reduce_axis((0, kb), "rq"), te.reduce_axis((0, _VNNI_GROUP), "rg")
    acc = te.compute(
        (rows_padded, nb, _VNNI_LANES),
        lambda r, q, o: te.sum(
            packed[r, rq, rg].astype("int32") * weight[q, rq, o, rg].astype("int32"),
            axis=[rq, rg],
        ),
        name=_INT8_MATMUL + ("_shifted" if shifted else ""),
    )

    def unpack(*index: Any) -> Any:
        r = 0
        for i, d in zip(index[:-1], shape[:-1], strict=True):
            r = r * d + i
        col = index[-1]
        value = acc[r, col // per, col % per] - correction[col]
        if shifted:
            value = value + shift[col] * acc[r, col // per, per]
        return value

    return te.compute((*shape[:-1], columns), unpack, name="dsopt_int8_unpack")


def _upsample_conv2d_transpose_te(x: Any, weight: Any) -> Any:
    """conv2d_transpose whose kernel equals its stride: each input pixel paints one s x s block.

    `y[n, o, i, j, h, w] = sum_c x[n, c, h, w] * w[c, o, i, j]`, a contraction over the input
    channels only (TOPI's form convolves a zero-dilated input: s*s times the work), whose
    [n, o, h, i, w, j] transpose is the NCHW result.
    """
    from tvm import te

    n, c, h, w = (int(d) for d in x.shape)
    _, o, sh, sw = (int(d) for d in weight.shape)
    rc = te.reduce_axis((0, c), "rc")
    return te.compute(
        (n, o, sh, sw, h, w),
        lambda b, k, i, j, y, z: te.sum(x[b, rc, y, z] * weight[rc, k, i, j], axis=[rc]),
        name="dsopt_upsample_conv2d_transpose",
    )


# -- Integer weights in the library: weight-only quantized MatMul / Conv -------------------------
# A weight-only quantized model (int8 per channel, int4 in blocks) reaches TVM as a float op of
# `dequantize(q) [- zp] * scale` on constants, which constant folding would store as a float32
# weight: the library four times the model's size. Before folding, dsopt's kernels take the
# integer constant instead and dequantize it inside the function (`_weight_stage`, computed
# as DequantizeLinear computes it, so the weights equal onnxruntime's bit for bit).

_WEIGHT_MATMUL = "dsopt_dequantize_matmul"
_WEIGHT_CONV = "dsopt_dequantize_conv2d"
_WEIGHT_DEQUANTIZE = "dsopt_dequantize_weight"


@dataclasses.dataclass(frozen=True)
class _IntegerWeight:
    """A float weight as `(float(q[i]) - zero[j]) * scale[j]`, `j[d] = i[d] // factors[d]`.

    `q` is int8/uint8 with at least the weight's extent along each axis (a blocked axis may be
    padded to whole blocks); `zero`/`scale` are float32 with one entry per block (extent 1
    along an axis they do not vary on).
    """

    q: np.ndarray
    zero: np.ndarray
    scale: np.ndarray
    factors: tuple[int, ...]


def _weight_stage(
    q: Any,
    zero: Any,
    scale: Any,
    *,
    factors: Sequence[int],
    shape: Sequence[int],
    nibbles: str = "",
) -> Any:
    """The TE stage computing the float weight of `shape` from an `_IntegerWeight`'s tensors.

    `nibbles` ("int4" or "uint4"): `q` holds two 4-bit values per byte along its first axis
    (`_pack_nibbles`), the even index in the low nibble. The first axis, so that a vector
    along the last one reads contiguous bytes with one shift for all lanes.
    """
    from tvm import te

    def integer(i: Sequence[Any]) -> Any:
        if not nibbles:
            return q[tuple(i)].astype("int32")
        byte = q[(i[0] // 2, *i[1:])].astype("int32")
        nibble = (byte >> ((i[0] % 2) * 4)) & 15
        return nibble - 16 * (nibble >= 8).astype("int32") if nibbles == "int4" else nibble

    def index(table: Any, i: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(0 if int(table.shape[d]) == 1 else i[d] // f for d, f in enumerate(factors))

    def value(*i: Any) -> Any:
        return (integer(i).astype("float32") - zero[index(zero, i)]) * scale[index(scale, i)]

    return te.compute(tuple(shape), value, name=_WEIGHT_DEQUANTIZE)


def _nibble_kind(q: np.ndarray) -> str:
    """`int4`/`uint4` when every value of the integer weight fits 4 bits, else empty."""
    if q.size == 0:
        return ""
    low, high = int(q.min()), int(q.max())
    if q.dtype == np.int8 and -8 <= low and high <= 7:
        return "int4"
    return "uint4" if q.dtype == np.uint8 and high <= 15 else ""


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values per uint8 along the first axis (zero padded), the even one low."""
    flat = (q.astype(np.int16) & 0xF).astype(np.uint8)
    if flat.shape[0] % 2:
        flat = np.concatenate([flat, np.zeros((1, *flat.shape[1:]), np.uint8)], axis=0)
    return np.ascontiguousarray(flat[0::2] | (flat[1::2] << 4))


def _dequantize_matmul_te(
    x: Any,
    q: Any,
    zero: Any,
    scale: Any,
    *,
    factors: Sequence[int],
    rows: int,
    columns: int,
    nibbles: str = "",
) -> Any:
    """`x @ W` with W [rows, N] computed from the integer weight in the same function.

    The sums match a float32 matmul of the dequantized weight up to summation order. The
    weight is its own stage, which `_cpu_schedule_dequantize_matmul` computes per column tile,
    once for all rows.
    """
    from tvm import te

    *batch, k = (int(d) for d in x.shape)
    n = columns
    assert k == rows
    weight = _weight_stage(q, zero, scale, factors=factors, shape=(k, n), nibbles=nibbles)
    r = te.reduce_axis((0, k), "k")
    return te.compute(
        (*batch, n),
        lambda *i: te.sum(x[(*i[:-1], r)] * weight[r, i[-1]], axis=r),
        name=_WEIGHT_MATMUL,
    )


def _dequantize_conv2d_te(
    x: Any,
    q: Any,
    zero: Any,
    scale: Any,
    *,
    factors: Sequence[int],
    shape: Sequence[int],
    nibbles: str = "",
    **conv: Any,
) -> Any:
    """TOPI's conv2d (as Relax legalizes it) of the weight computed from the integer weight.

    The weight stage runs once per call, in full, before the convolution: the library keeps
    the integer weight, at the price of one float32 weight written per call (ResNet-18: 12-14%
    slower than its float32 library).
    """
    from tvm import topi

    weight = _weight_stage(q, zero, scale, factors=factors, shape=shape, nibbles=nibbles)
    return topi.nn.conv(x, weight, **conv)


def _cpu_schedule_dequantize_matmul(sch: Any, blocks: list[Any], main: Any, target: Any) -> bool:
    """`dsopt_dequantize_matmul`: column tiles outermost, each dequantizing its weights once.

    Loops: column tiles (parallel) > row tiles > K > register tile (rows x vector lanes). The
    weight stage is computed at the column tile: K x tile float32 values, dequantized once
    per weight and reused by every row from cache. The elementwise epilogue is inlined and
    computed per register tile.
    """
    position = blocks.index(main)
    dequantize = blocks[position - 1]
    loops = sch.get_loops(main)
    *spatial, n_loop, k_loop = loops
    extents = [int(sch.get(loop).extent) for loop in loops]
    n = extents[-2]
    rows = int(np.prod(extents[:-2], dtype=np.int64))
    lanes, registers = _cpu_vector_config(target, n)
    vec_tile = _cpu_pick_vector_tile(n, lanes)
    vectors = -(-vec_tile // lanes)
    row_tile = _cpu_pick_block_tile(rows, max(1, registers // vectors))
    row = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    n_outer, n_inner = sch.split(n_loop, [None, vec_tile])
    r_outer, r_inner = sch.split(row, [None, row_tile])
    sch.reorder(n_outer, r_outer, k_loop, r_inner, n_inner)
    later = blocks[position + 1 :]
    for epilogue in later[:-1]:
        sch.compute_inline(epilogue)
    consumer = later[-1] if later else None
    if consumer is not None:
        sch.reverse_compute_at(consumer, r_outer, preserve_unit_loops=True)
    sch.compute_at(dequantize, n_outer, preserve_unit_loops=True)
    if rows * n * extents[-1] >= _CPU_PARALLEL_MIN_WORK // 4 and n // vec_tile > 1:
        sch.parallel(n_outer)
    sch.unroll(r_inner)
    sch.vectorize(n_inner)
    init = sch.decompose_reduction(main, k_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(dequantize)[-1])
    if consumer is not None:
        sch.vectorize(sch.get_loops(consumer)[-1])
    return True


def _dequantized_weight(mutator: Any, expr: Any) -> _IntegerWeight | None:
    """The `_IntegerWeight` behind a float weight, None unless it is one of these forms.

    The forms the importer gives `legalize-quantized`'s output and DequantizeLinear of a
    constant: per axis (or per tensor), `dequantize(q, s, z, axis)`; blocked along an axis,
    `reshape(dequantize(q_blocked, 1, 0) [- zp] * scale)` with an optional `strided_slice`
    back to the weight's extent (q_blocked splits the axis into [blocks, block]).
    """
    from tvm import relax

    def call(e: Any, name: str) -> Any:
        e = _bound(mutator, e)
        ok = isinstance(e, relax.Call) and getattr(e.op, "name", "") == name
        return e if ok else None

    def dequantize(e: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
        """(q, s, z, axis) of a dequantize of integer constants to float32."""
        node = call(e, "relax.dequantize")
        if node is None or str(node.attrs.out_dtype) != "float32":
            return None
        values = [_constant(_bound(mutator, a)) for a in node.args]
        if any(v is None for v in values) or values[0].dtype not in (np.int8, np.uint8):
            return None
        return values[0], values[1], values[2], int(node.attrs.axis)

    bound = _bound(mutator, expr)
    if not hasattr(bound, "ty") or bound.ty.shape is None:
        return None
    shape = tuple(int(d) for d in bound.ty.shape)
    plain = dequantize(expr)
    if plain is not None:
        q, s, z, axis = plain
        axis %= max(q.ndim, 1)
        if q.shape != shape or s.size not in (1, shape[axis]) or z.size not in (1, s.size):
            return None
        param = [1] * q.ndim
        param[axis] = s.size
        factors = tuple(1 if d == axis and s.size > 1 else max(n, 1) for d, n in enumerate(shape))
        scale = np.ascontiguousarray(s.astype(np.float32).reshape(param))
        zero = np.ascontiguousarray(np.broadcast_to(z.astype(np.float32).reshape(-1), s.size))
        return _IntegerWeight(q, zero.reshape(param), scale, factors)
    sliced = call(expr, "relax.strided_slice")
    reshaped = call(sliced.args[0] if sliced is not None else expr, "relax.reshape")
    multiply = call(reshaped.args[0], "relax.multiply") if reshaped is not None else None
    if multiply is None:
        return None
    scale = _constant(_bound(mutator, multiply.args[1]))
    inner, zero = multiply.args[0], None
    subtract = call(inner, "relax.subtract")
    if subtract is not None:
        zero = _constant(_bound(mutator, subtract.args[1]))
        inner = subtract.args[0]
        if zero is None:
            return None
    widened = dequantize(inner)
    if widened is None or scale is None or scale.dtype != np.float32:
        return None
    q, s, z, _ = widened
    if s.size != 1 or float(s.reshape(-1)[0]) != 1.0 or np.any(z != 0):
        return None
    if q.ndim != len(shape) + 1:
        return None
    axis = next(
        (
            a
            for a in range(len(shape))
            if q.shape[:a] == shape[:a]
            and q.shape[a + 2 :] == shape[a + 1 :]
            and q.shape[a] * q.shape[a + 1] >= shape[a]
        ),
        None,
    )
    if axis is None:
        return None
    blocks, block = q.shape[axis], q.shape[axis + 1]
    param = (*q.shape[: axis + 1], 1, *q.shape[axis + 2 :])
    if scale.shape != param or (zero is not None and zero.shape != param):
        return None
    if sliced is None and blocks * block != shape[axis]:
        return None
    flat = (*shape[:axis], blocks * block, *shape[axis + 1 :])
    zero = np.zeros(param, np.float32) if zero is None else zero.astype(np.float32)
    reduced = (*shape[:axis], blocks, *shape[axis + 1 :])
    factors = tuple(block if d == axis else 1 for d in range(len(shape)))
    return _IntegerWeight(
        np.ascontiguousarray(q.reshape(flat)),
        np.ascontiguousarray(zero.reshape(reduced)),
        np.ascontiguousarray(scale.reshape(reduced)),
        factors,
    )


def _weight_rewriter(mod: Any, stats: dict[str, int]) -> Any:
    """A Relax mutator: float32 MatMul/Conv2d of a dequantized constant reads the integer weight.

    Runs before constant folding, which would otherwise store the float32 weight (4 bytes per
    element, whatever the model stored) in the library. Counts `dequantize_matmul` and
    `dequantize_conv2d`.
    """
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Weights(PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if name not in ("relax.matmul", "relax.nn.conv2d") or len(call.args) != 2:
                return call
            x = call.args[0]
            if str(x.ty.dtype) != "float32" or not _unset_or(call.attrs.out_dtype, "float32"):
                return call
            found = _dequantized_weight(self, call.args[1])
            if found is None:
                return call
            if name == "relax.matmul":
                new = self.matmul(x, call, found)
            else:
                new = self.conv2d(x, call, found)
            return call if new is None else new

        def operands(self, weight: _IntegerWeight) -> tuple[tuple[Any, Any, Any], str]:
            """The weight's constants (q, zero, scale) and its `nibbles` kind.

            4-bit values go two per byte (counted as `int4_weights`); a symmetric weight
            keeps one zero, not one per block.
            """
            kind = _nibble_kind(weight.q)
            q = weight.q
            if kind:
                q = _pack_nibbles(q)
                stats["int4_weights"] = stats.get("int4_weights", 0) + 1
            zero = weight.zero
            if not zero.any():
                zero = np.zeros([1] * zero.ndim, np.float32)
            return (relax.const(q), relax.const(zero), relax.const(weight.scale)), kind

        def matmul(self, x: Any, call: Any, weight: _IntegerWeight) -> Any:
            shape = [int(d) for d in call.args[1].ty.shape]
            if len(x.ty.shape) < 2 or len(shape) != 2:
                return None
            stats["dequantize_matmul"] = stats.get("dequantize_matmul", 0) + 1
            tensors, nibbles = self.operands(weight)
            return self.builder_.call_te(
                _dequantize_matmul_te,
                x,
                *tensors,
                factors=weight.factors,
                rows=shape[0],
                columns=shape[1],
                nibbles=nibbles,
                primfunc_name_hint=_WEIGHT_MATMUL,
            )

        def conv2d(self, x: Any, call: Any, weight: _IntegerWeight) -> Any:
            attrs = call.attrs
            if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != (
                "NCHW",
                "OIHW",
                "NCHW",
            ):
                return None
            stats["dequantize_conv2d"] = stats.get("dequantize_conv2d", 0) + 1
            tensors, nibbles = self.operands(weight)
            return self.builder_.call_te(
                _dequantize_conv2d_te,
                x,
                *tensors,
                factors=weight.factors,
                shape=[int(d) for d in call.args[1].ty.shape],
                nibbles=nibbles,
                stride=attrs.strides,
                padding=attrs.padding,
                dilation=attrs.dilation,
                groups=attrs.groups,
                data_layout="NCHW",
                kernel_layout="OIHW",
                out_dtype=None,
                primfunc_name_hint=_WEIGHT_CONV,
            )

    return Weights(mod)


def _kernel_rewriter(mod: Any, stats: dict[str, int], int8: bool) -> Any:
    """A Relax mutator putting dsopt's kernels in (int8 ones only with `int8`).

    Upsampling conv2d_transpose (kernel == stride) always; integer-valued conv2d/matmul calls
    as int8 kernels with `int8`.
    """
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Kernels(PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            new = None
            if name == "relax.nn.conv2d" and int8:
                new = self.conv2d(call)
            elif name == "relax.matmul" and int8:
                new = self.matmul(call)
            elif name == "relax.nn.conv2d_transpose":
                new = self.conv2d_transpose(call)
            return call if new is None else new

        def conv2d_transpose(self, call: Any) -> Any:
            attrs, x, weight = call.attrs, call.args[0], call.args[1]
            if int(attrs.groups) != 1 or (attrs.data_layout, attrs.kernel_layout) != (
                "NCHW",
                "IOHW",
            ):
                return None
            if not _unset_or(attrs.out_dtype, str(x.ty.dtype)):
                return None
            shape = [int(d) for d in weight.ty.shape]
            strides = [int(v) for v in attrs.strides]
            if len(shape) != 4 or shape[2:] != strides or str(weight.ty.dtype) != str(x.ty.dtype):
                return None
            if any(int(v) for v in attrs.padding) or any(int(v) for v in attrs.output_padding):
                return None
            if any(int(v) != 1 for v in attrs.dilation):
                return None
            stats["upsample_conv2d_transpose"] = stats.get("upsample_conv2d_transpose", 0) + 1
            blocks = self.builder_.emit(
                self.builder_.call_te(
                    _upsample_conv2d_transpose_te,
                    x,
                    weight,
                    primfunc_name_hint="dsopt_upsample_conv2d_transpose",
                )
            )
            n, o, sh, sw, h, w = (int(d) for d in blocks.ty.shape)
            pixels = self.builder_.emit(relax.op.permute_dims(blocks, [0, 1, 4, 2, 5, 3]))
            return relax.op.reshape(pixels, [n, o, h * sh, w * sw])

        def conv2d(self, call: Any) -> Any:
            attrs = call.attrs
            if int(attrs.groups) != 1 or (attrs.data_layout, attrs.kernel_layout) != (
                "NCHW",
                "OIHW",
            ):
                return None  # depthwise/grouped convs stay on the float path
            if not _unset_or(attrs.out_dtype, "float32"):
                return None
            source = _int8_source(self, call.args[0], "float32")
            weight = _constant(call.args[1])
            split = _int8_weight(weight, 0)
            if source is None or split is None or 255 * 255 * weight[0].size >= 2**31:
                return None
            x, zp = source
            w8, shift = split
            return self.kernel(
                _INT8_CONV,
                _int8_conv2d_te,
                (x, zp),
                _pack_conv_weight(w8, bool(shift.any())),
                weight.reshape(weight.shape[0], -1).T,
                shift,
                out_channels=w8.shape[0],
                strides=[int(v) for v in attrs.strides],
                padding=[int(v) for v in attrs.padding],
                dilation=[int(v) for v in attrs.dilation],
            )

        def matmul(self, call: Any) -> Any:
            if str(call.attrs.out_dtype) != "int32":
                return None
            source = _int8_source(self, call.args[0], "int32")
            weight = _constant(_bound(self, call.args[1]))
            if weight is None or weight.ndim != 2 or source is None:
                return None
            split = _int8_weight(weight, 1)
            if split is None or len(source[0].ty.shape) < 2 or 255 * 255 * weight.shape[0] >= 2**31:
                return None
            w8, shift = split
            return self.kernel(
                _INT8_MATMUL,
                _int8_matmul_te,
                source,
                _pack_matmul_weight(w8, bool(shift.any())),
                weight,
                shift,
                columns=w8.shape[1],
            )

        def kernel(
            self,
            name: str,
            compute: Any,
            source: tuple[Any, int],
            packed: np.ndarray,
            weight: np.ndarray,
            shift: np.ndarray,
            **attrs: Any,
        ) -> Any:
            """The call of `compute` on x, the packed weight and its corrections.

            The corrections: `zp * sum(w)` per output of the [K, N] `weight` and the shifts.
            """
            x, zp = source
            zp_u8 = _uint8_zero_point(x, zp)
            correction = (zp_u8 * weight.astype(np.int64).sum(axis=0)).astype(np.int32)
            stats[name.removeprefix("dsopt_")] = stats.get(name.removeprefix("dsopt_"), 0) + 1
            return self.builder_.call_te(
                compute,
                x,
                relax.const(packed),
                relax.const(correction),
                relax.const(shift.astype(np.int32)),
                pad_value=zp_u8,
                shifted=bool(shift.any()),
                primfunc_name_hint=name,
                **attrs,
            )

    return Kernels(mod)


def _kernel_pass(stats: dict[str, int], int8: bool, weights: bool = False) -> Any:
    """The module pass putting dsopt's kernels in.

    With `weights`, MatMuls of dequantized integer weights first become kernels reading the
    integer weight (`_weight_rewriter`, before constant folding). Counts `dequantize_matmul`,
    `int8_conv2d`, `int8_matmul` and `upsample_conv2d_transpose` into `stats`.
    """
    tvm = _load()
    from tvm import relax

    def rewritten(mod: Any, rewriter: Any) -> Any:
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    @tvm.transform.module_pass(opt_level=0, name="DsoptKernels")
    def rewrite(mod: Any, ctx: Any) -> Any:
        if weights:
            mod = relax.transform.DeadCodeElimination()(
                rewritten(mod, _weight_rewriter(mod, stats))
            )
        mod = relax.transform.FoldConstant()(mod)  # zero points and weights become constants
        kernels = rewritten(mod, _kernel_rewriter(mod, stats, int8))
        return relax.transform.DeadCodeElimination()(kernels)

    return rewrite


def _cpu_schedule_int8(sch: Any, blocks: list[Any], main: Any) -> bool:
    """The VNNI schedule of an int8 kernel with its fused elementwise prologue and epilogue.

    A register tile of output pixels x 16-channel blocks (conv) or rows x 16-column blocks
    (matmul) accumulates in zmm registers over the reduction loops; the innermost 16x4 step is
    one `vpdpbusd`. When the output's extents are whole tiles, its loops drive and the kernel is
    computed per tile (the epilogue reads the accumulators while they are hot); otherwise the
    kernel runs first, then the epilogue. Producers of the activation are inlined into the
    packing block, which runs before. Outer loops run in parallel.
    """
    intrin = _register_vnni_intrinsic()
    position = blocks.index(main)
    name = sch.get(main).name_hint
    is_conv = name.startswith(_INT8_CONV)
    per = _VNNI_LANES - 1 if "_shifted" in name else _VNNI_LANES
    acc_extents = [int(sch.get(loop).extent) for loop in sch.get_loops(main)]
    parallel = int(np.prod(acc_extents, dtype=np.int64)) >= _INT8_PARALLEL_MIN_WORK
    for epilogue in blocks[position + 1 : -1]:
        sch.compute_inline(epilogue)
    for prologue in blocks[: position - 1]:
        sch.compute_inline(prologue)
    consumer = blocks[-1]
    out = sch.get_loops(consumer)
    out_extents = [int(sch.get(loop).extent) for loop in out]
    if is_conv:
        blocks16, width = acc_extents[1], acc_extents[3]
        b_tile = 2 if blocks16 % 2 == 0 and width >= 4 else 1
        z_tile = _cpu_pick_block_tile(width, _INT8_TILE // b_tile)
        tiles = (per * b_tile, z_tile)
        whole = out_extents[1] % tiles[0] == 0 and out_extents[3] % tiles[1] == 0
    else:
        rows, blocks16 = acc_extents[0], acc_extents[1]
        q_tile = _cpu_pick_block_tile(blocks16, 2)
        r_tile = _cpu_pick_block_tile(rows, _INT8_TILE // q_tile)
        tiles = (r_tile, per * q_tile)
        whole = int(np.prod(out_extents[:-1])) % tiles[0] == 0 and out_extents[-1] % tiles[1] == 0
    if whole:
        if is_conv:
            n, o, y, z = out
            o_outer, o_inner = sch.split(o, [None, tiles[0]])
            z_outer, z_inner = sch.split(z, [None, tiles[1]])
            sch.reorder(n, o_outer, y, z_outer, o_inner, z_inner)
            outer, at = [n, o_outer, y], z_outer
        else:
            row = sch.fuse(*out[:-1]) if len(out) > 2 else out[0]
            r_outer, r_inner = sch.split(row, [None, tiles[0]])
            c_outer, c_inner = sch.split(out[-1], [None, tiles[1]])
            sch.reorder(r_outer, c_outer, r_inner, c_inner)
            outer, at = [r_outer, c_outer], c_outer
        sch.compute_at(main, at, preserve_unit_loops=True)
        if parallel:  # before decompose_reduction, which parallel() rejects afterwards
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        loops = sch.get_loops(main)
        if is_conv:  # [.., b, y, z, o, rc, rh, rw, rg] under the tile loop
            b, _, z, o, rc, rh, rw, _ = loops[-8:]
            sch.reorder(rc, rh, rw, z, b, o)
        else:  # [.., r, q, o, rq, rg]
            r, q, o, rq, _ = loops[-5:]
            sch.reorder(rq, r, q, o)
    else:
        loops = sch.get_loops(main)
        if is_conv:
            n, b, y, z, o, rc, rh, rw, _ = loops
            z_outer, z = sch.split(z, [None, z_tile])
            b_outer, b = sch.split(b, [None, b_tile])
            sch.reorder(n, b_outer, y, z_outer, rc, rh, rw, z, b, o)
            outer = [n, b_outer, y]
        else:
            r, q, o, rq, _ = loops
            r_outer, r = sch.split(r, [None, r_tile])
            q_outer, q = sch.split(q, [None, q_tile])
            sch.reorder(r_outer, q_outer, rq, r, q, o)
            outer = [r_outer, q_outer]
        outer = [sch.fuse(*outer)]
        if parallel:
            sch.parallel(outer[0])
        if parallel and len(out) > 2:
            sch.parallel(sch.fuse(*out[:2]))
        if out_extents[-1] > _VNNI_LANES:
            sch.split(out[-1], [None, _VNNI_LANES])
    tile, first, small = ([z, b], rc, [rh, rw]) if is_conv else ([r, q], rq, [])
    init = sch.decompose_reduction(main, first)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(o, intrin)
    for loop in tile + [loop for loop in small if int(sch.get(loop).extent) <= 7]:
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(consumer)[-1])
    pack_loops = sch.get_loops(blocks[position - 1])
    if parallel and len(pack_loops) > 2:
        sch.parallel(sch.fuse(*pack_loops[:2]))
    sch.vectorize(pack_loops[-1])
    return True


# -- Build --------------------------------------------------------------------------------------
def build(
    mod: Any,
    target_config: Mapping[str, Any],
    opt: Mapping[str, Any] | None = None,
    *,
    stats: dict[str, int] | None = None,
) -> Any:
    """Compiles a Relax module for a target with fusion (and dsopt's CPU schedules).

    Args:
        mod: The IRModule from `import_onnx`.
        target_config: The TVM target in dict form (a nested `host` dict for GPUs).
        opt: `schedules` on llvm targets: "dsopt" (dsopt's default CPU schedules), "dlight"
            (dlight's CPU rules) or "none" (TVM's unscheduled fused pipeline); `int8`: "vnni"
            (int8 kernels for integer-valued convs and matmuls, AVX-512 VNNI) or "float" (the
            default: TVM's float code for them); `target_name`
            for messages; `tuning_database`: a folder written by `tune`, whose schedules
            replace the default ones of the functions it has.
        stats: Filled with the schedule counts (`scheduled`, `fallback`, `skipped`) for "dsopt"
            and the int8 kernels put in (`int8_conv2d`, `int8_matmul`),
            `tuned` (functions scheduled from the tuning database) and `default_faster` (tuned
            functions whose default schedule measured faster, which it keeps).

    Returns:
        The `tvm.runtime.Executable`.

    Raises:
        LoweringError: TVM fails to compile (its message quoted).
    """
    tvm = _load()
    from tvm import relax

    opt = dict(opt or {})
    name = opt.get("target_name", "?")
    schedules = opt.get("schedules", "none")
    target = make_target(target_config)
    if target.kind.name == "llvm" and schedules in ("dsopt", "dlight"):
        pipeline = _cpu_pipeline(target, schedules, stats, opt.get("int8", "float"))
    elif target.kind.name == "cuda":
        pipeline = _cuda_pipeline(target, stats)
    else:
        pipeline = relax.get_default_pipeline(target)
    try:
        if opt.get("tuning_database"):
            mod, tuned, kept = _apply_tuning(mod, target, opt["tuning_database"])
            if stats is not None:
                stats["tuned"] = tuned
                stats["default_faster"] = kept
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


# -- CUDA ---------------------------------------------------------------------------------------
# TVM 0.27 wheels without a CUDA runtime keep each CUDA module as source (format "cuda"); the
# device's runtime compiles it when the library loads (`tvm_callback_cuda_compile`). With nvcc
# at build time dsopt compiles the source itself and rewrites the module's serialized payload
# (format, function table, code) to format "cubin" before linking, so the device loads SASS.


def _cuda_compile_mode() -> None:
    """Uses nvcc for TVM's CUDA JIT (its default, nvrtc, needs the `cuda-bindings` package)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("cuda.bindings") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")


def _import_cuda_intrinsics() -> None:
    """Imports TVM's CUDA tensor intrinsics, which dlight's Matmul rule needs for Tensor Cores.

    The module parses hundreds of TVMScript functions, each calling `inspect.stack()` (which
    reads the source line of every frame); without that context the import is ~3x faster.
    """
    if "tvm.s_tir.tensor_intrin.cuda" in sys.modules:
        return
    import inspect

    stack = inspect.stack
    inspect.stack = lambda context=1: stack(0)  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin.cuda  # noqa: F401
    finally:
        inspect.stack = stack  # type: ignore[assignment]


def _cuda_pipeline(target: Any, stats: dict[str, int] | None = None) -> Any:
    """TVM's CUDA pipeline with dlight's GPU rules after fusion (Matmul gives Tensor Cores).

    Upsampling conv2d_transpose (kernel == stride) goes in as dsopt's channel contraction
    first: TOPI's CUDA legalization of an fp16 conv2d_transpose computes in float32 and then
    meets the float16 weight (PP-OCR det's head failed to build), and does s·s times the work.
    """
    tvm = _load()
    from tvm.relax import transform as relax_transforms
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight

    _cuda_compile_mode()
    _import_cuda_intrinsics()
    counts = stats if stats is not None else {}

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: Any, ctx: Any) -> Any:
        with target:
            passes = [
                *cuda.library_dispatch_passes(target),
                _kernel_pass(counts, int8=False),
                relax_transforms.LegalizeOps(),
                relax_transforms.AnnotateTIROpPattern(),
                relax_transforms.FoldConstant(),
                relax_transforms.FuseOps(),
                relax_transforms.FuseTIR(),
                dlight.ApplyDefaultSchedule(
                    dlight.gpu.Matmul(),
                    dlight.gpu.GEMV(),
                    dlight.gpu.Reduction(),
                    dlight.gpu.GeneralReduction(),
                    dlight.gpu.Fallback(),
                ),
                *cuda.dataflow_lower_passes(target),
                *cuda.finalize_passes(target),
            ]
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def _u64(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 8], "little")


def _split_blob(blob: bytes) -> tuple[bytes, list[tuple[str, bytes | None]]] | None:
    """The packed-imports blob as (import tree bytes, [(kind, payload)]); None if unexpected.

    Layout (tvm-ffi 0.1.14): u64 size of the rest, the import tree (two u64 vectors), then
    per module its kind (u64 length + bytes) and, except for the host library `_lib`, its
    payload (u64 length + bytes).
    """
    if len(blob) < 8 or _u64(blob, 0) != len(blob) - 8:
        return None
    at = 8
    for _ in range(2):
        count = _u64(blob, at)
        at += 8 + 8 * count
        if at > len(blob):
            return None
    head = blob[8:at]
    modules: list[tuple[str, bytes | None]] = []
    while at < len(blob):
        size = _u64(blob, at)
        kind = blob[at + 8 : at + 8 + size]
        at += 8 + size
        if not kind.isascii() or at > len(blob):
            return None
        payload = None
        if kind != b"_lib":
            size = _u64(blob, at)
            payload = blob[at + 8 : at + 8 + size]
            at += 8 + size
            if at > len(blob):
                return None
        modules.append((kind.decode(), payload))
    return head, modules


def _join_blob(head: bytes, modules: Sequence[tuple[str, bytes | None]]) -> bytes:
    body = bytearray(head)
    for kind, payload in modules:
        body += len(kind).to_bytes(8, "little") + kind.encode()
        if payload is not None:
            body += len(payload).to_bytes(8, "little") + payload
    return len(body).to_bytes(8, "little") + bytes(body)


def _cuda_payload(payload: bytes) -> tuple[str, bytes, bytes]:
    """A CUDA module payload as (format, function table bytes, code)."""
    size = _u64(payload, 0)
    fmt = payload[8 : 8 + size].decode()
    # The function table is opaque here; the code is the last field, so its length prefix is
    # the first u64 that counts exactly the bytes after it.
    for start in range(8 + size, len(payload) - 7):
        if _u64(payload, start) == len(payload) - start - 8:
            return fmt, payload[8 + size : start], payload[start + 8 :]
    raise ValueError("no code field")


def _compile_cuda_blob(executable: Any, arch: str) -> tuple[bytes | None, str]:
    """The packed imports with every CUDA source module compiled to a cubin for `arch`.

    Returns:
        (blob, code): blob None when nothing changed; code "cubin" (compiled here or by TVM
        already) or "source-jit" (no nvcc, or a layout this version does not know).
    """
    tvm = _load()
    from tvm.support import nvcc

    tensor = tvm.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod)
    split = _split_blob(bytes(tensor.numpy().tobytes()))
    if split is None:
        logger.warning("unknown TVM library layout: CUDA kernels stay source (compiled at load)")
        return None, "source-jit"
    head, modules = split
    formats = []
    changed = False
    for index, (kind, payload) in enumerate(modules):
        if kind != "cuda" or payload is None:
            continue
        fmt, table, code = _cuda_payload(payload)
        if fmt == "cuda" and shutil.which("nvcc"):
            with make_target({"kind": "cuda", "arch": arch}):
                cubin = nvcc.compile_cuda(
                    code.decode(), target_format="cubin", arch=arch, compiler="nvcc"
                )
            fmt, code = "cubin", bytes(cubin)
            payload = len(fmt).to_bytes(8, "little") + fmt.encode() + table
            payload += len(code).to_bytes(8, "little") + code
            modules[index] = (kind, payload)
            changed = True
        formats.append("source-jit" if fmt == "cuda" else "cubin")
    code_kind = "source-jit" if not formats or "source-jit" in formats else "cubin"
    return (_join_blob(head, modules) if changed else None), code_kind


def _pack_blob(blob: bytes, linked: bool) -> Any:
    """An `fpack_imports` for export_library that writes `blob` as `__tvm_ffi__library_bin`."""

    def pack(module: Any, is_system_lib: bool, prefix: str, workspace: str) -> str:
        symbol = f"{prefix}__tvm_ffi__library_bin"
        if linked:  # assembler .incbin: fast for big weights, works with any GNU toolchain
            data = Path(workspace, "devc.bin")
            data.write_bytes(blob)
            path = Path(workspace, "devc.S")
            path.write_text(
                f"  .section .rodata\n  .globl {symbol}\n  .type {symbol}, %object\n"
                f'  .balign 16\n{symbol}:\n  .incbin "{data}"\n'
                f"  .size {symbol}, {len(blob)}\n"
                '  .section .note.GNU-stack,"",%progbits\n'
            )
            return str(path)
        path = Path(workspace, "devc.c")
        rows = ",\n".join(
            ",".join(str(b) for b in blob[i : i + 32]) for i in range(0, len(blob), 32)
        )
        path.write_text(
            f'#ifdef __cplusplus\nextern "C" {{\n#endif\n'
            f"extern const unsigned char {symbol}[];\n"
            f"const unsigned char {symbol}[{len(blob)}] = {{\n{rows}\n}};\n"
            "#ifdef __cplusplus\n}\n#endif\n"
        )
        return str(path)

    return pack


def export_cuda(
    executable: Any, path: Path, arch: str, cross_compiler: str | None = None
) -> dict[str, str]:
    """Exports a CUDA executable like `export`, its kernels compiled ahead of time if possible.

    With `nvcc` on PATH the CUDA C source of each kernel module becomes a cubin for `arch`
    embedded in the library (the device needs no compiler); without it the library keeps the
    source and TVM's runtime compiles it when the library is loaded on the device.

    Returns:
        The manifest's `cuda` entry: `{"arch": "sm_80", "code": "cubin" | "source-jit"}`.

    Raises:
        LoweringError: nvcc or the linker fails.
    """
    try:
        blob, code = _compile_cuda_blob(executable, arch)
    except Exception as e:  # noqa: BLE001 - nvcc failures come as RuntimeError and others
        raise LoweringError(
            f"nvcc cannot compile the CUDA kernels for {arch}: {_first_line(e)}",
            hint="remove nvcc from PATH to ship CUDA source compiled on the device",
        ) from e
    if blob is None:
        export(executable, path, cross_compiler)
        return {"arch": arch, "code": code}
    kwargs: dict[str, Any] = {"fpack_imports": _pack_blob(blob, path.suffix == ".so")}
    if cross_compiler and path.suffix == ".so":
        from tvm.support import cc

        kwargs["fcompile"] = cc.cross_compiler(cross_compiler)
    try:
        executable.export_library(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - linker failures come as assorted types
        raise LoweringError(f"cannot write {path.name}: {_first_line(e)}") from e
    return {"arch": arch, "code": code, "compiler": "nvcc"}


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


# -- Tuning (MetaSchedule) ----------------------------------------------------------------------
# `tune` runs TVM MetaSchedule on the fused PrimFuncs within a wall-clock budget and keeps the best
# schedule of each in a JSON database (one folder per TVM target, reused across runs: workloads
# with records are not tuned again); `build(..., {"tuning_database": DIR})` applies it, and
# dsopt's default schedules cover the functions the database lacks.

#: Trials per batch (one evolutionary-search round per task); the deadline is checked between.
_TUNE_TRIALS_PER_ITER = 8
#: Default cap of trials per task (the time budget usually ends tuning first).
_TUNE_MAX_TRIALS_PER_TASK = 256
#: The evolutionary search's population per trial of a batch (TVM's 512 per batch takes
#: minutes per round on a small CPU), and its bounds.
_TUNE_POPULATION_PER_TRIAL = 16
_TUNE_POPULATION_BOUNDS = (32, 512)
#: Seconds an RPC session may take (upload, load, run) before the trial counts as failed.
_TUNE_RPC_TIMEOUT = 60
#: `num-cores` of a board tuned through RPC whose TVM target does not say.
_TUNE_RPC_CORES = 4


def _physical_cores() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return os.cpu_count() or 1


def tuning_database_dir(target_config: Mapping[str, Any]) -> Path:
    """The default tuning database of a TVM target: `~/.cache/dsopt/tune/<target hash>/`."""
    import hashlib
    import json

    text = json.dumps(dict(target_config), sort_keys=True, default=str)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "dsopt" / "tune" / hashlib.sha256(text.encode()).hexdigest()[:16]


def _import_tensor_intrinsics() -> None:
    """Imports TVM's tensor intrinsics (MetaSchedule needs them) about 6x faster.

    The package parses hundreds of TVMScript functions, each calling `inspect.stack()`, which
    looks up the module of every frame (a scan of `sys.modules` per `<frozen importlib>` frame:
    over a minute on a small CPU). The parser only uses the frames and their source lines.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    import inspect
    import linecache

    def stack(context: int = 1) -> list[inspect.FrameInfo]:
        frame = sys._getframe(1)
        frames = []
        while frame is not None:
            code = frame.f_code
            line = linecache.getline(code.co_filename, frame.f_lineno) if context > 0 else ""
            frames.append(
                inspect.FrameInfo(
                    frame,
                    code.co_filename,
                    frame.f_lineno,
                    code.co_name,
                    [line] if line else None,
                    0 if line else None,
                )
            )
            frame = frame.f_back
        return frames

    original = inspect.stack
    inspect.stack = stack  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original  # type: ignore[assignment]


def _fuse_for_tuning(mod: Any, target: Any) -> Any:
    """The module after library dispatch, legalization and fusion: the functions to tune.

    The same passes start every build pipeline, so the fused functions (and so the database
    keys) of `tune` and `build` agree.
    """
    tvm = _load()
    from tvm import relax

    with target:
        passes = [
            *relax.pipeline.library_dispatch_passes(target),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
        return tvm.transform.Sequential(passes)(mod)


def _apply_tuning(
    mod: Any, target: Any, database_dir: str | os.PathLike[str]
) -> tuple[Any, int, int]:
    """The fused module with the database's schedules applied where they beat dsopt's default.

    Returns:
        (module, functions running a tuned schedule, tuned functions whose default schedule
        measured faster and so stays).
    """
    tvm = _load()
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    fused = _fuse_for_tuning(mod, target)
    database = ms.database.JSONDatabase(work_dir=str(database_dir), allow_missing=False)
    with target, database, tvm.transform.PassContext(opt_level=3):
        tuned = relax.transform.MetaScheduleApplyDatabase()(fused)
    defaults = _read_default_seconds(Path(database_dir))
    applied = kept = 0
    for gvar, func in fused.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if not tuned[gvar].attrs.get("tirx.is_scheduled", 0):
            continue
        record = database.query_tuning_record(_normalize_mod(func), target, gvar.name_hint)
        default = defaults.get(_workload_key(func))
        if record is not None and default is not None and default <= _median(record.run_secs):
            tuned[gvar] = func  # dsopt's default schedule runs it
            kept += 1
        else:
            applied += 1
    return tuned, applied, kept


#: File in a tuning database folder: seconds of each workload with dsopt's default schedule.
_DEFAULT_SECONDS_FILE = "dsopt_default_seconds.json"


def _median(values: Any) -> float:
    import statistics

    return float(statistics.median(float(v) for v in values))


def _workload_key(func: Any) -> str:
    """A fused PrimFunc's key in the default-seconds file (TVM's structural hash)."""
    _load()
    import tvm_ffi
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return str(tvm_ffi.structural_hash(_normalize_mod(func)))


def _read_default_seconds(path: Path) -> dict[str, float]:
    import json

    file = path / _DEFAULT_SECONDS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _measure_defaults(fused: Any, target: Any, path: Path, builder: Any, runner: Any) -> int:
    """Measures dsopt's default CPU schedule of each fused function not measured before.

    The times go to the database folder, so `_apply_tuning` keeps a default schedule that is
    faster than the best tuned one. Returns how many functions were measured.
    """
    import json

    _load()
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    known = _read_default_seconds(path)
    pending: dict[str, Any] = {}
    for _, func in fused.functions_items():
        if isinstance(func, tirx.PrimFunc):
            key = _workload_key(func)
            if key not in known and key not in pending:
                pending[key] = func
    inputs, keys, infos = [], [], []
    for key, func in pending.items():
        try:
            scheduled = _cpu_schedule_func(func, target)
        except Exception:  # noqa: BLE001 - no default schedule: the tuned one is used
            scheduled = None
        if scheduled is not None:
            inputs.append(ms.builder.BuilderInput(_normalize_mod(scheduled), target))
            keys.append(key)
            infos.append(ms.arg_info.ArgInfo.from_prim_func(func))
    if not inputs:
        return 0
    runs = [
        (key, built.artifact_path, info)
        for key, built, info in zip(keys, builder.build(inputs), infos, strict=True)
        if built.error_msg is None
    ]
    futures = runner.run(
        [ms.runner.RunnerInput(artifact, "cpu", info) for _, artifact, info in runs]
    )
    for (key, artifact, _), future in zip(runs, futures, strict=True):
        result = future.result()
        if result.error_msg is None:
            known[key] = _median(result.run_secs)
        shutil.rmtree(os.path.dirname(artifact), ignore_errors=True)
    (path / _DEFAULT_SECONDS_FILE).write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
    return len(runs)


def _tune_build(mod: Any, target: Any, _params: Any) -> Any:
    """Builds one trial (in a MetaSchedule worker) without importing TVM's tensor intrinsics.

    TVM's default build imports them in every fresh worker process, which takes longer than a
    build's timeout on a small CPU; a tensorized trial already holds its intrinsics.
    """
    from tvm import tirx
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _tune_export(rt_mod: Any, linker: str | None = None) -> str:
    """Writes one trial for the runner, in a worker: a shared library, or objects to link.

    `linker`: None links with the host's compiler, `tar` writes objects (the device links
    them), anything else is the cross compiler driver that links for the device.
    """
    import tempfile

    from tvm.support import cc, tar

    folder = tempfile.mkdtemp(prefix="dsopt-trial-")
    if linker == "tar":
        path = os.path.join(folder, "trial.tar")
        rt_mod.export_library(path, fcompile=tar.tar)
        return path
    path = os.path.join(folder, "trial.so")
    kwargs = {"fcompile": cc.cross_compiler(linker)} if linker else {}
    rt_mod.export_library(path, **kwargs)
    return path


@contextlib.contextmanager
def _worker_environment(cuda: bool) -> Any:
    """Environment of MetaSchedule's worker processes while tuning.

    They import tvm, whose tvm_ffi imports torch eagerly when installed (8-12 s per worker here,
    and the builder starts new workers for every batch): a `torch` that fails to import is put
    first on their PYTHONPATH. CUDA builds use nvcc unless `cuda-bindings` is installed.
    """
    import tempfile

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "TVM_CUDA_COMPILE_MODE")}
    with tempfile.TemporaryDirectory(prefix="dsopt-tune-") as shim:
        Path(shim, "torch.py").write_text(
            'raise ImportError("dsopt hides torch from TVM workers")\n'
        )
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (shim, saved["PYTHONPATH"]) if p)
        if cuda:
            _cuda_compile_mode()
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _timed_scheduler(deadline: float, batches: list[float]) -> Any:
    """A round-robin task scheduler that starts no batch it expects to end after `deadline`.

    The expected length of a batch is the mean of the last three (search, build, run; zero
    before the first ends). `batches` receives the measured lengths.
    """
    import time

    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class DeadlineRoundRobin(ms.task_scheduler.PyTaskScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.last = -1
            self.started: float | None = None

        def next_task_id(self) -> int:
            outer = self._outer()
            now = time.monotonic()
            if self.started is not None:
                batches.append(now - self.started)
            count = len(outer.tasks_)
            for task_id in range(count):
                outer.touch_task(task_id)
            recent = batches[-3:]
            expected = sum(recent) / len(recent) if recent else 0.0
            if now + expected > deadline:
                return -1
            for _ in range(count):
                self.last = (self.last + 1) % count
                task = outer.tasks_[self.last]
                if not task.is_terminated:
                    if task.runner_futures is not None:
                        outer.join_running_task(self.last)
                    self.started = time.monotonic()
                    return self.last
            return -1

    return DeadlineRoundRobin()


def _trial_counter(trials: list[int], failed: list[int]) -> Any:
    """A measure callback counting trials and failed trials per task."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class CountTrials(ms.measure_callback.PyMeasureCallback):
        def apply(self, scheduler, task_id, candidates, builder_results, runner_results):  # noqa: D102, ANN001, ANN201
            for built, ran in zip(builder_results, runner_results, strict=True):
                trials[task_id] += 1
                failed[task_id] += bool(built.error_msg or ran.error_msg)

    return CountTrials()


def _tune_contexts(tasks: Sequence[Any], target: Any, per_iter: int, threads: int) -> list[Any]:
    """MetaSchedule tuning contexts: post-order-apply spaces, a population sized to the batch."""
    from tvm.s_tir import meta_schedule as ms

    low, high = _TUNE_POPULATION_BOUNDS
    population = max(low, min(high, _TUNE_POPULATION_PER_TRIAL * per_iter))
    return [
        ms.TuneContext(
            mod=task.dispatched[0],
            target=target,
            space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=population,
                init_min_unmeasured=population // 4,
                genetic_num_iters=2,
            ),
            task_name=task.task_name,
            logger=logging.getLogger("dsopt.tune"),
            rand_state=index + 1,
            num_threads=threads,
        ).clone()
        for index, task in enumerate(tasks)
    ]


def _rpc_config(rpc: Mapping[str, Any]) -> Any:
    """MetaSchedule's RPC settings, once the tracker has a server with the key.

    Raises:
        UsageError: The tracker is unreachable or no server registered the key.
    """
    from tvm.s_tir import meta_schedule as ms

    from dsopt.errors import UsageError

    config = ms.runner.RPCConfig(
        tracker_host=rpc["host"],
        tracker_port=int(rpc["port"]),
        tracker_key=rpc["key"],
        session_timeout_sec=_TUNE_RPC_TIMEOUT,
    )
    try:
        config.count_num_servers(allow_missing=False)
    except Exception as e:  # noqa: BLE001 - tracker errors come as assorted types
        raise UsageError(
            f"--tune-rpc {rpc['host']}:{rpc['port']}:{rpc['key']}: no RPC server with key "
            f"'{rpc['key']}' at that tracker ({_first_line(e)})",
            hint="start the tracker, and `python -m tvm.exec.rpc_server --tracker HOST:PORT "
            "--key KEY` on the device (README, 'Tuning on a device')",
        ) from e
    return config


def _database_summary(database: Any, path: Path) -> dict[str, Any]:
    import hashlib

    digest = hashlib.sha256()
    for name in ("database_workload.json", "database_tuning_record.json", _DEFAULT_SECONDS_FILE):
        file = path / name
        digest.update(file.read_bytes() if file.is_file() else b"")
    return {
        "path": str(path.resolve()),
        "records": len(database),
        "sha256": digest.hexdigest(),
    }


def tune(
    mod: Any,
    target_config: Mapping[str, Any],
    *,
    seconds: float,
    database_dir: str | os.PathLike[str],
    rpc: Mapping[str, Any] | None = None,
    linker: str | None = None,
    max_trials_per_task: int | None = None,
    trials_per_iter: int | None = None,
    target_name: str = "?",
) -> dict[str, Any]:
    """Tunes the fused functions of `mod` with MetaSchedule within `seconds` of wall-clock time.

    Functions whose workload already has a record in the database are not tuned again. Tasks are
    tuned round-robin, the most floating-point work first, in batches of `trials_per_iter`, and
    no batch starts that would end after the budget (measured from the call).

    Args:
        mod: The IRModule from `import_onnx`.
        target_config: The TVM target in dict form.
        seconds: The wall-clock budget, start-up and search included.
        database_dir: The JSON database folder (created if missing).
        rpc: `{"host", "port", "key"}` of an RPC tracker whose servers run the trials; None
            runs them on this machine.
        linker: How each trial is linked: None (host compiler), a cross compiler driver such
            as `aarch64-linux-gnu-g++`, or `tar` (objects the device links).
        max_trials_per_task: Cap per task (default 256).
        trials_per_iter: Trials per batch (default 8, at most the cap).
        target_name: The dsopt target, for messages.

    Returns:
        The manifest's tuning record: budget, seconds, trials, tasks, database summary.

    Raises:
        UsageError: The RPC tracker is unreachable or has no server with the key.
        LoweringError: MetaSchedule fails.
    """
    import time

    from dsopt.errors import UsageError

    started = time.monotonic()
    deadline = started + seconds
    tvm = _load()
    from tvm.s_tir import meta_schedule as ms

    config = dict(target_config)
    if config.get("kind") == "llvm" and "num-cores" not in config:
        # MetaSchedule sizes parallel loops by it; boards behind RPC are assumed quad-core.
        config["num-cores"] = _physical_cores() if not rpc else _TUNE_RPC_CORES
    target = make_target(config)
    if not rpc and target.kind.name != "llvm" and not tvm.device(target.kind.name, 0).exist:
        raise UsageError(
            f"target '{target_name}' runs on {target.kind.name} devices and this machine has "
            "none to measure trials on: tune with --tune-rpc HOST:PORT:KEY (README, 'Tuning')"
        )
    cap = max(1, int(max_trials_per_task or _TUNE_MAX_TRIALS_PER_TASK))
    per_iter = max(1, min(int(trials_per_iter or _TUNE_TRIALS_PER_ITER), cap))
    path = Path(database_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    try:
        fused = _fuse_for_tuning(mod, target)
        extracted = list(ms.relax_integration.extract_tasks(fused, target))
    except Exception as e:  # noqa: BLE001 - TVM raises assorted types; quoted to the user
        raise LoweringError(
            f"target '{target_name}': cannot extract tuning tasks: {_first_line(e)}"
        ) from e
    database = ms.database.JSONDatabase(work_dir=str(path))
    todo, reused = [], []
    for task in extracted:
        workload = task.dispatched[0]
        known = database.has_workload(workload) and database.get_top_k(
            database.commit_workload(workload), 1
        )
        (reused if known else todo).append(task)
    flops = {
        id(t): float(tvm.s_tir.analysis.estimate_tir_flops(t.dispatched[0])) * int(t.weight)
        for t in todo
    }
    todo.sort(key=lambda t: -flops[id(t)])
    runner_text = "local"
    if rpc:
        runner_text = f"rpc {rpc['host']}:{rpc['port']} key {rpc['key']}"
    record: dict[str, Any] = {
        "budget_minutes": round(seconds / 60, 3),
        "runner": runner_text,
        "tasks": len(extracted),
        "tasks_reused": len(reused),
        "num_cores": config.get("num-cores"),
    }
    trials = [0] * len(todo)
    failed = [0] * len(todo)
    batches: list[float] = []
    cost_model = None
    defaults = 0
    if todo:
        rpc_config = _rpc_config(rpc) if rpc else None
        _import_tensor_intrinsics()
        try:
            import xgboost  # noqa: F401

            cost_model = "xgb"
        except ImportError:
            cost_model = "random"
            logger.info("xgboost is not installed: tuning uses a random cost model")
        threads = os.cpu_count() or 1
        contexts = _tune_contexts(todo, target, per_iter, threads)
        with _worker_environment(target.kind.name == "cuda"):
            try:
                builder = ms.builder.LocalBuilder(
                    max_workers=threads,
                    f_build=_tune_build,
                    f_export=functools.partial(_tune_export, linker=linker),
                    timeout_sec=60,
                )
                if rpc_config is not None:
                    runner = ms.runner.RPCRunner(rpc_config=rpc_config)
                else:
                    runner = ms.runner.LocalRunner(timeout_sec=60)
                if target.kind.name == "llvm":
                    defaults = _measure_defaults(fused, target, path, builder, runner)
                ms.tune.tune_tasks(
                    tasks=contexts,
                    task_weights=[float(t.weight) for t in todo],
                    work_dir=str(path),
                    max_trials_global=cap * len(todo),
                    max_trials_per_task=cap,
                    num_trials_per_iter=per_iter,
                    builder=builder,
                    runner=runner,
                    database=database,
                    cost_model=ms.cost_model.CostModel.create(cost_model, num_tuning_cores=threads),
                    measure_callbacks=[
                        *ms.measure_callback.MeasureCallback.create("default"),
                        _trial_counter(trials, failed),
                    ],
                    task_scheduler=_timed_scheduler(deadline, batches),
                )
            except Exception as e:  # noqa: BLE001 - TVM raises assorted types; quoted to the user
                raise LoweringError(
                    f"target '{target_name}': MetaSchedule tuning failed: {_first_line(e)}"
                ) from e
    record.update(
        {
            "seconds": round(time.monotonic() - started, 3),
            "trials": sum(trials),
            "failed_trials": sum(failed),
            "tasks_tuned": sum(1 for n, f in zip(trials, failed, strict=True) if n > f),
            "trials_per_iter": per_iter,
            "max_trials_per_task": cap,
            "cost_model": cost_model,
            "defaults_measured": defaults,
            "database": _database_summary(database, path),
        }
    )
    return record
