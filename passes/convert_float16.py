"""Convert float32 weights and compute to float16, with Casts where fp16 would be unsafe."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dsopt import Module, Pass, PassContext, PassResult
from dsopt.analysis import AnalysisManager, Shapes
from dsopt.errors import ModelError, UsageError
from dsopt.pattern import fresh_name, node_subgraphs, topological_order

__all__ = ["BF16_BLOCK_OPS", "DEFAULT_BLOCK_OPS", "NEUTRAL_OPS", "ConvertFloat16"]

logger = logging.getLogger(__name__)

#: Ops kept in float32 by default, with the reason. fp16 tops out at 65504 and carries 11
#: significant bits: exponentials, powers and products overflow, long sums lose precision and
#: may overflow, and float integer sequences stop being exact above 2048.
_EXPONENT = ("Exp", "Pow", "Softplus", "Mish", "ReduceProd")
_ACCUMULATION = (
    "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "GlobalAveragePool", "CumSum", "DFT", "STFT", "Det",
)  # fmt: skip
_SQUARES = (
    "InstanceNormalization", "GroupNormalization", "LpNormalization", "LRN",
    "MeanVarianceNormalization",
)  # fmt: skip
DEFAULT_BLOCK_OPS: Mapping[str, str] = {
    **dict.fromkeys(_EXPONENT, "exponent/power range"),
    **dict.fromkeys(_ACCUMULATION, "long accumulation (range and precision)"),
    **dict.fromkeys(_SQUARES, "statistics of squares over many elements"),
    "Range": "float integer sequences are exact only up to 2048",
}
#: Ops kept in float32 with `dtype=bfloat16`, with the reason. bfloat16 has float32's range
#: and 8 significant bits: exponentials and powers cannot overflow (Exp/Pow/Softplus/Mish run
#: in bf16), but a sum or product of many terms rounded at 8 bits drifts (relative error
#: n * 2**-9 when a kernel accumulates in bf16), normalization statistics need the bits, and
#: float integers stop being exact above 256.
BF16_BLOCK_OPS: Mapping[str, str] = {
    **dict.fromkeys((*_ACCUMULATION, "ReduceProd"), "long accumulation (8 significant bits)"),
    **dict.fromkeys(_SQUARES, "statistics of squares over many elements"),
    "Range": "float integer sequences are exact only up to 256",
}

#: Ops whose result is an exact function of their inputs in any precision (data movement,
#: selection, comparison): they run in the precision their inputs arrive in, so they never
#: add a Cast of their own.
NEUTRAL_OPS = frozenset(
    {
        "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split",
        "Slice", "Gather", "GatherElements", "GatherND", "Expand", "Tile", "Pad", "Shape", "Size",
        "DepthToSpace", "SpaceToDepth", "Dropout", "Where", "Relu", "Abs", "Neg", "Sign",
        "Max", "Min", "Clip", "MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "TopK",
        "ArgMax", "ArgMin", "Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual",
        "IsNaN", "IsInf", "Round", "Floor", "Ceil",
    }
)  # fmt: skip

#: Producers of float values that are integers (positions, sizes): arithmetic on them stays
#: float32 until it meets an activation.
_INTEGER_SOURCES = frozenset({"Range"})

_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_FP16_MAX = float(np.finfo(np.float16).max)
#: The smallest float16 subnormal: a tensor whose every nonzero magnitude lies below it
#: becomes all zeros (or all 2**-24) in float16.
_FP16_TINY = 2.0**-24


@dataclasses.dataclass(frozen=True)
class _Low:
    """The 16-bit type a `dtype` option names: numpy and ONNX types, name suffix, limits."""

    numpy: np.dtype[Any]
    onnx: int
    suffix: str
    max: float
    tiny: float  # smallest subnormal
    tolerance: float  # declared bound (rtol = atol)


_LOW = {
    "float16": _Low(_F16, onnx.TensorProto.FLOAT16, "fp16", _FP16_MAX, _FP16_TINY, 1e-2),
    # 8 significant bits against fp16's 11: each rounding is 8x coarser (2**-9 vs 2**-12);
    # the worst of 150 random graphs (the property test's strategy) measured 0.047.
    "bfloat16": _Low(
        _BF16, onnx.TensorProto.BFLOAT16, "bf16", float(ml_dtypes.finfo(_BF16).max), 2.0**-133,
        1e-1,
    ),
}  # fmt: skip
#: Ops whose weight input `weights_only` always stores in `dtype` (other float initializers
#: need `_MIN_STORED` elements: a scalar saves 2 bytes and costs a Cast node).
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}
_MIN_STORED = 16


class _Bound:
    """`tolerance`: float16's on the class (the registry's metadata), the dtype's on a pass."""

    def __get__(self, obj: Any, owner: Any = None) -> float:
        low = _LOW.get(getattr(obj, "dtype", "float16")) if obj is not None else None
        return (low or _LOW["float16"]).tolerance


#: Default-blocked ops `calibrated_unblock` may run in fp16, with the power of |x| they sum
#: (0: elementwise, judged by the measured input and output ranges alone).
_UNBLOCKABLE: Mapping[str, int] = {
    "Exp": 0, "Pow": 0, "Softplus": 0, "Mish": 0,
    "ReduceSum": 1, "ReduceMean": 1, "ReduceL1": 1, "ReduceLogSum": 1, "GlobalAveragePool": 1,
    "ReduceSumSquare": 2, "ReduceL2": 2,
}  # fmt: skip
#: The most elements a reduction may sum and still be un-blocked: fp16 rounding error of a
#: sum grows like sqrt(n) * 2**-11 (0.8% at 256).
_UNBLOCK_MAX_REDUCED = 256
#: The largest Pow exponent `calibrated_unblock` accepts (relative error grows with it).
_UNBLOCK_MAX_EXPONENT = 4.0
#: Reasons listed in the `range-blocked-nodes` statistic before "... and N more".
_LISTED = 20
_VARIADIC = onnx.defs.OpSchema.FormalParameterOption.Variadic


@dataclasses.dataclass(frozen=True)
class _Signature:
    """An op's formal input/output type strings (`T`, `tensor(float)`) and type variables."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    variadic_in: bool
    variadic_out: bool
    allowed: Mapping[str, frozenset[str]]

    def input(self, index: int) -> str | None:
        return _formal(self.inputs, self.variadic_in, index)

    def output(self, index: int) -> str | None:
        return _formal(self.outputs, self.variadic_out, index)


@functools.cache
def _signature(op: str, opset: int) -> _Signature | None:
    try:
        schema = onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return None
    return _Signature(
        tuple(p.type_str for p in schema.inputs),
        tuple(p.type_str for p in schema.outputs),
        bool(schema.inputs) and schema.inputs[-1].option == _VARIADIC,
        bool(schema.outputs) and schema.outputs[-1].option == _VARIADIC,
        {c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints},
    )


def _formal(types: tuple[str, ...], variadic: bool, index: int) -> str | None:
    if index < len(types):
        return types[index]
    return types[-1] if variadic and types else None


@dataclasses.dataclass
class _Plan:
    """What the planner decided: precision per tensor and the precision each read needs."""

    prec: dict[int, int] = dataclasses.field(default_factory=dict)  # id(tensor) -> 16 | 32
    orig32: set[int] = dataclasses.field(default_factory=set)  # float32 before the pass
    integer: set[int] = dataclasses.field(default_factory=set)  # float32 holding integers
    reads: list[tuple[gs.Node, int, int]] = dataclasses.field(default_factory=list)
    fp16_nodes: int = 0
    blocked: int = 0
    range_blocked: list[str] = dataclasses.field(default_factory=list)  # reasons
    unblocked: list[str] = dataclasses.field(default_factory=list)  # node labels


@dataclasses.dataclass
class _Ranges:
    """Calibration facts per tensor name: finite max |x| over the samples, largest size."""

    amax: dict[str, float] = dataclasses.field(default_factory=dict)
    size: dict[str, int] = dataclasses.field(default_factory=dict)
    samples: int = 0


@dataclasses.dataclass(frozen=True)
class ConvertFloat16(Pass):
    """float32 weights and compute  ==>  float16, Casts at the float32 boundaries.

    Every default-domain op whose float32 type variable admits float16 runs in fp16, except:
      * blocked ops (`DEFAULT_BLOCK_OPS` plus the `block_ops` option): exponentials and
        powers (overflow past 65504), long sums and reductions (ReduceSum/Mean/L2...,
        GlobalAveragePool, Instance/Group normalization), float `Range`. Softmax stays fp16
        (its implementations subtract the max; outputs lie in [0, 1]); LayerNormalization
        takes fp16 input and keeps its float32 `stash_type`.
      * neutral ops (`NEUTRAL_OPS`: reshapes, gathers, comparisons, max/min...) run in the
        precision their inputs arrive in: they never add a Cast.
      * arithmetic on floats made from integers (`Cast` from an integer type, `Range`) stays
        float32 until it meets an activation, so shape and position math stays exact.
      * other domains and nodes with subgraphs are left alone.
    The declared bound holds for continuous computations: an op whose output jumps at a
    threshold (Round, comparisons feeding Where) flips when fp16 moves its input across it.
    Inputs a node needs in the other precision get one Cast per tensor (a Cast back to fp16 of
    a Cast from fp16 reads the fp16 value instead); float32 initializers read only in fp16 are
    converted in place (values clipped to +-65504), shared ones get a float16 copy. With
    `keep_io_types` graph inputs and outputs stay float32.

    Calibrated block list (when `ctx.calibration` is given, e.g. `--precision fp16 --calib`):
    one onnxruntime pass over the first `samples` feeds measures max |x| of every float
    tensor of the main graph (initializers are read directly; non-finite values ignored).
      1. A node that would run in fp16 stays float32 when one of its float inputs or outputs
         exceeds the limit 65504 / `headroom` (4094 at the default 16, room for the sums and
         products a kernel forms before its output): products that overflow (Mul by 1e4 ->
         MatMul), Exp of inputs > 8.3, Conv/Gemm/ReduceSum outputs past the limit. The node
         reading an out-of-range tensor stays float32 too, so the tensor never becomes fp16.
      2. Likewise when every nonzero value of a float input or output lies below 2**-24, the
         smallest fp16 subnormal (an epsilon of 1e-12, a tensor of tiny gradients): fp16
         would flush it to zero.
      3. With `calibrated_unblock` only: a default-blocked Exp/Pow/Softplus/Mish, or a
         ReduceSum/Mean/L1/L2/SumSquare/LogSum/GlobalAveragePool, runs in fp16 when its
         measured ranges fit the limit, a reduction sums at most 256 elements with
         n * max|x|^p within the limit (p = 2 for squares), and a Pow exponent is at most 4.
         Off by default: the ranges are those of the calibration samples, and a deployment
         input beyond them would overflow where the static list is safe for any input.
    The stats record `range-blocked` / `unblocked` counts, the nodes and reasons
    (`range-blocked-nodes`: "conv_3: output 'y' range 1.2e+05 > 4094"), `range-limit` and
    `calibration-samples`. Measurements are cached per calibration object and model bytes,
    so `dsopt.mixed` lowering one node at a time probes once.

    `dtype=bfloat16` (`--precision bf16`): the same plan in bfloat16, float32's range with 8
    significant bits. `BF16_BLOCK_OPS` replaces the default list (reductions, normalization
    statistics and `Range` stay float32; Exp/Pow/Softplus/Mish run in bf16); an op whose schema
    at the model's opset does not admit bfloat16 (Conv before opset 22) stays float32, and
    below opset 13 (no Cast to or from bfloat16) the model is left alone. Of the
    calibrated rules only 2 applies, at 2**-133 (rules 1 and 3 guard fp16's range); weights
    round to nearest even. onnxruntime's CPU provider has no bf16 kernels: `dsopt.numerics`
    runs such models through `dsopt.bfloat16.emulate` (fp32 compute, bf16 rounding after each
    op, as bf16 hardware stores).

    `weights_only`: compute stays float32; float32 initializers read only by main-graph
    default-domain nodes (weights of MatMul/Gemm/Conv/ConvTranspose/Gather, and others of 16+
    elements) are stored in `dtype`, each read through one `Cast(to=FLOAT)` that onnxruntime
    folds at session start: half the weight bytes on targets whose fp16 compute is slow (x86,
    Cortex-A72). Outputs equal the float32 model's with the weights rounded; a float16 weight
    past 65504 stays float32. `blocked_nodes` and `block_ops` readers keep a weight float32.

    Lossy: `tolerance` 1e-2 (1e-1 with bfloat16; the class attribute is float16's) means every
    output element stays within tolerance * (1 + |reference|) of the float32 model on
    well-scaled models (activations far below 65504, no catastrophic cancellation, or
    calibrated on inputs like the deployment's); used as both rtol and atol.

    Subclasses may override `blocked_nodes` to keep more nodes float32.
    """

    name = "convert-float16"
    summary = "convert float32 weights and compute to float16 (Casts around unsafe ops)"
    stage = "precision"
    exactness = "lossy"
    tolerance = _Bound()  # type: ignore[assignment]

    keep_io_types: bool = dataclasses.field(
        default=True, metadata={"help": "keep float32 graph inputs and outputs"}
    )
    block_ops: str = dataclasses.field(
        default="", metadata={"help": "comma-separated op types also kept float32"}
    )
    samples: int = dataclasses.field(
        default=16, metadata={"help": "calibration feeds measured for the range check (0: all)"}
    )
    headroom: float = dataclasses.field(
        default=16.0,
        metadata={"help": "calibrated limit is 65504 / headroom; tensors past it stay float32"},
    )
    calibrated_unblock: bool = dataclasses.field(
        default=False,
        metadata={"help": "run default-blocked ops in fp16 when calibration shows small ranges"},
    )
    dtype: str = dataclasses.field(
        default="float16",
        metadata={"help": "float16, or bfloat16 (float32's range, 8 significant bits)"},
    )
    weights_only: bool = dataclasses.field(
        default=False,
        metadata={"help": "store weights in dtype (a Cast to float32 each); compute stays fp32"},
    )

    def blocked_ops(self) -> frozenset[str]:
        """The op types kept in float32: the defaults for `dtype` plus `block_ops`."""
        defaults = BF16_BLOCK_OPS if self.dtype == "bfloat16" else DEFAULT_BLOCK_OPS
        return frozenset(defaults) | self._extra_blocked()

    def _extra_blocked(self) -> frozenset[str]:
        return frozenset(op.strip() for op in self.block_ops.split(",") if op.strip())

    def blocked_nodes(self, module: Module, ctx: PassContext) -> frozenset[str]:
        """Names of nodes to keep float32 beyond the blocked op types (none by default)."""
        return frozenset()

    @property
    def range_limit(self) -> float:
        """The largest magnitude a calibrated tensor may reach and still become fp16."""
        return _FP16_MAX / self.headroom if self.dtype == "float16" else math.inf

    @property
    def _low(self) -> _Low:
        return _LOW[self.dtype]

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Plans a precision per node in topological order, then inserts Casts."""
        if not self.headroom >= 1.0:
            raise UsageError(
                f"convert-float16: headroom must be >= 1, not {self.headroom}",
                hint="the range limit is 65504 / headroom; 16 (limit 4094) is the default",
            )
        if self.samples < 0:
            raise UsageError(
                f"convert-float16: samples must be >= 0, not {self.samples}",
                hint="0 measures every calibration sample",
            )
        if self.dtype not in _LOW:
            raise UsageError(
                f"convert-float16: dtype must be float16 or bfloat16, not '{self.dtype}'",
                hint="convert-float16{dtype=bfloat16} for bfloat16",
            )
        cast = _signature("Cast", module.opset)
        if self.dtype == "bfloat16" and (
            cast is None or "tensor(bfloat16)" not in cast.allowed.get("T1", ())
        ):
            logger.warning(
                "convert-float16: Cast admits no %s at opset %d; model left float32 "
                "(upgrade-opset{to=13} first; Conv takes bfloat16 from opset 22)",
                self.dtype,
                module.opset,
            )
            return PassResult(False, {"nodes": 0, "opset-too-old": 1})
        if self.weights_only:
            return self._store_weights(module, ctx)
        graph = module.graph
        analyses = ctx.analyses or AnalysisManager(module)
        types = analyses.get(Shapes)
        order = topological_order(graph)
        dtypes = {k: v.dtype for k, v in types.items()}
        plan = self._plan(module, ctx, order, dtypes)
        calibrated: dict[str, int | float | str] = {}
        unblock = self.calibrated_unblock and self.dtype == "float16"
        if ctx.calibration is not None and (plan.fp16_nodes or (unblock and plan.blocked)):
            plan, calibrated = self._calibrate(module, ctx, order, dtypes, plan)
        stats = _Rewriter(graph, plan, self.keep_io_types, self._low).apply()
        stats = {
            "nodes": plan.fp16_nodes,
            "blocked": plan.blocked,
            "range-blocked": len(plan.range_blocked),
            "unblocked": len(plan.unblocked),
            **stats,
            **calibrated,
        }
        changed = any(stats[k] for k in ("casts", "initializers", "nodes", "io", "pairs"))
        if changed:
            graph.nodes = topological_order(graph)
        return PassResult(changed, stats)

    # -- weights only ----------------------------------------------------------------------------
    def _store_weights(self, module: Module, ctx: PassContext) -> PassResult:
        """Float32 initializers read only by compute, stored in `dtype` behind a Cast each."""
        graph, low = module.graph, self._low
        blocked_names, blocked_ops = self.blocked_nodes(module, ctx), self._extra_blocked()
        main = {id(n) for n in graph.nodes}
        outputs = {id(t) for t in graph.outputs}
        names = set(graph.tensors()) | {n.name for n in graph.nodes if n.name}

        def unique(base: str) -> str:
            return fresh_name(names, base)

        stats = {"weights": 0, "casts": 0, "bytes-before": 0, "bytes-after": 0, "out-of-range": 0}
        for tensor in list(graph.tensors().values()):
            if not isinstance(tensor, gs.Constant) or id(tensor) in outputs or not tensor.outputs:
                continue
            if _numpy_dtype(tensor.dtype) != _F32:
                continue
            readers = list(tensor.outputs)
            if any(
                id(r) not in main or (r.domain or "") not in ("", "ai.onnx")
                or list(node_subgraphs(r)) or (r.name and r.name in blocked_names)
                or r.op in blocked_ops
                for r in readers
            ):  # fmt: skip
                continue
            values = np.asarray(tensor.values)
            weight = any(
                len(r.inputs) > _WEIGHT_INPUT[r.op] and r.inputs[_WEIGHT_INPUT[r.op]] is tensor
                for r in readers
                if r.op in _WEIGHT_INPUT
            )
            if not (weight or values.size >= _MIN_STORED):
                continue
            if np.any(np.isfinite(values) & (np.abs(values) > low.max)):
                stats["out-of-range"] += 1  # clipping would change the outputs: keep float32
                continue
            name = tensor.name
            tensor.name = unique(f"{name}_fp32")
            stored = gs.Constant(unique(f"{name}_{low.suffix}"), values.astype(low.numpy))
            read = gs.Variable(name, dtype=np.float32, shape=list(values.shape))
            to = {"to": onnx.TensorProto.FLOAT}
            graph.nodes.append(gs.Node("Cast", unique(f"{name}_to_fp32"), to, [stored], [read]))
            for reader in readers:
                for i, t in enumerate(reader.inputs):
                    if t is tensor:
                        reader.inputs[i] = read
            stats["weights"] += 1
            stats["casts"] += 1
            stats["bytes-before"] += int(values.nbytes)
            stats["bytes-after"] += int(values.size * low.numpy.itemsize)
        if stats["weights"]:
            graph.nodes = topological_order(graph)
        return PassResult(bool(stats["weights"]), stats)

    # -- calibration ---------------------------------------------------------------------------
    def _calibrate(
        self,
        module: Module,
        ctx: PassContext,
        order: list[gs.Node],
        dtypes: Mapping[str, np.dtype[Any] | None],
        plan: _Plan,
    ) -> tuple[_Plan, dict[str, int | float | str]]:
        """The plan redone with the calibrated block list, and the statistics saying why."""
        try:
            ranges = _measure(module, order, _typer(dtypes), ctx.calibration, self.samples)
        except ModelError as e:  # the conversion itself needs no onnxruntime
            logger.warning(
                "convert-float16: no calibrated block list, onnxruntime cannot run the model "
                "(%s); keeping the static block list",
                e.message,
            )
            return plan, {"calibration": f"skipped: {e.message}"}
        blocks, unblocks = self._calibrated(order, ranges)
        if blocks or unblocks:
            plan = self._plan(module, ctx, order, dtypes, blocks, unblocks)
        stats: dict[str, int | float | str] = {"calibration-samples": ranges.samples}
        if math.isfinite(self.range_limit):
            stats["range-limit"] = self.range_limit
        if plan.range_blocked:
            stats["range-blocked-nodes"] = _listing(plan.range_blocked)
        if plan.unblocked:
            stats["unblocked-nodes"] = _listing(plan.unblocked)
        return plan, stats

    def _calibrated(
        self, order: list[gs.Node], ranges: _Ranges
    ) -> tuple[dict[int, str], frozenset[int]]:
        """Nodes to keep float32 with the reason (rules 1, 2), default-blocked ones to free (3)."""
        limit = self.range_limit
        unblockable = (set(DEFAULT_BLOCK_OPS) & set(_UNBLOCKABLE)) - self._extra_blocked()
        blocks: dict[int, str] = {}
        unblocks: set[int] = set()
        constants: dict[int, float] = {}
        for node in order:
            measured = [
                (role, t.name, amax)
                for role, tensors in (("input", node.inputs), ("output", node.outputs))
                for t in tensors
                if (amax := _amax(t, ranges, constants)) is not None
            ]
            over = [m for m in measured if m[2] > limit]
            tiny = [m for m in measured if 0.0 < m[2] < self._low.tiny]
            label = _label(node)
            if over:
                role, name, amax = max(over, key=lambda m: m[2])
                blocks[id(node)] = f"{label}: {role} '{name}' range {amax:.3g} > {limit:.4g}"
            elif tiny:
                role, name, amax = tiny[0]
                blocks[id(node)] = (
                    f"{label}: {role} '{name}' max {amax:.2g} < {self._low.tiny:.2g} flushes to 0"
                )
            elif self.calibrated_unblock and self.dtype == "float16" and node.op in unblockable:
                if _fits_fp16(node, ranges, constants, limit):
                    unblocks.add(id(node))
        return blocks, frozenset(unblocks)

    # -- planning ------------------------------------------------------------------------------
    def _plan(
        self,
        module: Module,
        ctx: PassContext,
        order: list[gs.Node],
        dtypes: Mapping[str, np.dtype[Any] | None],
        blocks: Mapping[int, str] | None = None,
        unblocks: frozenset[int] = frozenset(),
    ) -> _Plan:
        plan = _Plan()
        blocked_ops, blocked_names = self.blocked_ops(), self.blocked_nodes(module, ctx)
        dtype = _typer(dtypes)
        for tensor in module.graph.inputs:
            if dtype(tensor) == _F32:
                plan.orig32.add(id(tensor))
                plan.prec[id(tensor)] = 32 if self.keep_io_types else 16
        for tensor in module.graph.tensors().values():
            if isinstance(tensor, gs.Constant) and dtype(tensor) == _F32:
                plan.orig32.add(id(tensor))
        calibrated = _Calibrated(blocks or {}, unblocks)
        for node in order:
            self._plan_node(node, module.opset, plan, dtype, blocked_ops, blocked_names, calibrated)
        return plan

    def _plan_node(
        self,
        node: gs.Node,
        opset: int,
        plan: _Plan,
        dtype: Any,
        blocked_ops: frozenset[str],
        blocked_names: frozenset[str],
        calibrated: _Calibrated,
    ) -> None:
        def is32(tensor: gs.Tensor) -> bool:
            if id(tensor) in plan.orig32:
                return True
            if dtype(tensor) == _F32:
                plan.orig32.add(id(tensor))
                return True
            return False

        inputs = [(i, t) for i, t in enumerate(node.inputs) if t.name]
        outputs = [t for t in node.outputs if t.name]
        schema = _signature(node.op, opset) if (node.domain or "") in ("", "ai.onnx") else None
        if node.op == "Cast" and schema is not None:
            # Reads any type; a Cast to float of integers starts integer-valued float math.
            source = node.inputs[0] if node.inputs else None
            for out in outputs:
                if is32(out):
                    plan.prec[id(out)] = 32
                    if source is not None and (
                        (np.dtype(dtype(source) or _F32).kind not in "f" and not is32(source))
                        or id(source) in plan.integer
                    ):
                        plan.integer.add(id(out))
            return
        convertible: set[str] = set()
        in_types: list[str | None] = [None] * len(node.inputs)
        out_types: list[str | None] = [None] * len(node.outputs)
        if schema is not None and not list(node_subgraphs(node)):
            allowed = schema.allowed
            in_types = [schema.input(i) for i in range(len(node.inputs))]
            out_types = [schema.output(i) for i in range(len(node.outputs))]
            bound32 = {in_types[i] for i, t in inputs if is32(t)}
            bound32 |= {out_types[j] for j, t in enumerate(node.outputs) if t.name and is32(t)}
            convertible = {
                v
                for v in bound32
                if v in allowed and f"tensor({self.dtype})" in allowed[v] and v in in_types
            }

        def mode_of(chosen: set[str]) -> tuple[int, list[gs.Tensor], bool]:
            """fp16 or float32 for the node, its float32-bound inputs, integer-valued or not."""
            variables = [
                t for i, t in inputs if in_types[i] in chosen and isinstance(t, gs.Variable)
            ]
            integer = bool(variables) and all(id(t) in plan.integer for t in variables)
            if not chosen:
                return 32, variables, integer
            if node.op in NEUTRAL_OPS:
                fp32_input = any(plan.prec.get(id(t), 32) == 32 for t in variables)
                return (32 if fp32_input else 16), variables, integer
            return (32 if integer else 16), variables, integer

        freed = id(node) in calibrated.unblocks
        if convertible and (
            (node.op in blocked_ops and not freed) or (node.name and node.name in blocked_names)
        ):
            plan.blocked += 1
            convertible = set()
        reason = calibrated.blocks.get(id(node)) if convertible else None
        if reason is not None:
            if mode_of(convertible)[0] == 16:  # else float32 anyway: nothing to report
                plan.range_blocked.append(reason)
            convertible = set()
        # Tensors bound to a float32 type variable are float32 even where inference gave up.
        for i, t in inputs:
            if in_types[i] in convertible:
                plan.orig32.add(id(t))
        for j, t in enumerate(node.outputs):
            if t.name and out_types[j] in convertible:
                plan.orig32.add(id(t))
        mode, variables, integer = mode_of(convertible)
        if node.op in _INTEGER_SOURCES or (integer and convertible):
            for t in outputs:
                plan.integer.add(id(t))
        if mode == 16:
            plan.fp16_nodes += 1
            if freed and node.op in blocked_ops:
                plan.unblocked.append(_label(node))
        any_input = node.op in ("Shape", "Size")
        for i, t in inputs:
            if not is32(t):
                continue
            wanted = 16 if mode == 16 and in_types[i] in convertible else 32
            if not (any_input and isinstance(t, gs.Variable)):
                plan.reads.append((node, i, wanted))
        for j, t in enumerate(node.outputs):
            if t.name and is32(t):
                plan.prec[id(t)] = 16 if mode == 16 and out_types[j] in convertible else 32


@dataclasses.dataclass(frozen=True)
class _Calibrated:
    """What calibration decided per node (by id): keep float32 (with why), or free to fp16."""

    blocks: Mapping[int, str]
    unblocks: frozenset[int]


def _typer(dtypes: Mapping[str, np.dtype[Any] | None]) -> Any:
    """A function giving a tensor's dtype from the Shapes analysis or the graph (None: unknown)."""

    def dtype(tensor: gs.Tensor) -> np.dtype[Any] | None:
        if isinstance(tensor, gs.Constant):
            return np.dtype(tensor.dtype) if isinstance(tensor.dtype, type | np.dtype) else None
        found = dtypes.get(tensor.name)
        if found is None and tensor.dtype is not None:
            try:
                found = np.dtype(tensor.dtype)
            except TypeError:
                found = None
        return found

    return dtype


def _label(node: gs.Node) -> str:
    named = node.name or next((t.name for t in node.outputs if t.name), "")
    return named or node.op


def _listing(items: list[str]) -> str:
    shown = "; ".join(items[:_LISTED])
    return shown + (f"; ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _amax(tensor: gs.Tensor, ranges: _Ranges, constants: dict[int, float]) -> float | None:
    """Measured finite max |x| of a float tensor (initializers from their values)."""
    if isinstance(tensor, gs.Constant):
        if id(tensor) not in constants:
            values = np.asarray(tensor.values)
            if values.dtype not in (_F32, _F16) or not values.size:
                return None
            constants[id(tensor)] = _finite_amax(values)
        return constants[id(tensor)]
    return ranges.amax.get(tensor.name) if tensor.name else None


def _finite_amax(values: np.ndarray) -> float:
    """Largest |x| over the finite elements (0.0 when none is finite)."""
    if not values.size:
        return 0.0
    top = max(-float(values.min()), float(values.max()))
    if not np.isfinite(top):
        finite = values[np.isfinite(values)]
        top = float(np.abs(finite).max()) if finite.size else 0.0
    return top


def _fits_fp16(node: gs.Node, ranges: _Ranges, constants: dict[int, float], limit: float) -> bool:
    """Whether calibration shows a default-blocked node safe in fp16 (rule 3)."""
    floats = [t for t in (*node.inputs, *node.outputs) if t.name and (
        isinstance(t, gs.Variable) or np.asarray(t.values).dtype == _F32
    )]  # fmt: skip
    measured = [_amax(t, ranges, constants) for t in floats]
    if not floats or any(m is None for m in measured):
        return False  # an unmeasured float tensor (or not float at all): keep it blocked
    x, y = node.inputs[0], node.outputs[0]
    power = _UNBLOCKABLE[node.op]
    if node.op == "Pow":
        exponent = _amax(node.inputs[1], ranges, constants) if len(node.inputs) > 1 else None
        return exponent is not None and exponent <= _UNBLOCK_MAX_EXPONENT
    if power == 0:
        return True
    if not isinstance(x, gs.Variable) or x.name not in ranges.size or y.name not in ranges.size:
        return False
    count = ranges.size[x.name] // max(ranges.size[y.name], 1)
    amax = ranges.amax[x.name]
    return count <= _UNBLOCK_MAX_REDUCED and count * amax**power <= limit


#: Measured ranges per calibration object, keyed by (sha1 of the model bytes, samples); a
#: weak map, so a calibration set's entries go with it.
_MEASURED: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], _Ranges]] = (
    weakref.WeakKeyDictionary()
)
_CACHED_MODELS = 4


def _measure(
    module: Module, order: list[gs.Node], dtype: Any, calibration: Any, samples: int
) -> _Ranges:
    """Largest |x| and size of every float tensor of the main graph over the calibration feeds."""
    from dsopt.quant.calibration import CalibrationData, Probe

    proto = module.to_proto()
    cacheable = isinstance(calibration, CalibrationData)
    data = calibration if cacheable else CalibrationData.from_feeds(list(calibration))
    key = (hashlib.sha1(proto.SerializeToString()).hexdigest(), samples)
    cache = _MEASURED.setdefault(data, {}) if cacheable else {}
    if key in cache:
        return cache[key]
    names = [
        t.name
        for node in order
        for t in (*node.inputs, *node.outputs)
        if isinstance(t, gs.Variable) and t.name and _probed(t, dtype)
    ]
    ranges = _Ranges()
    inputs = {t.name: np.dtype(t.dtype) for t in module.graph.inputs if _probed(t, dtype)}
    with Probe(proto, list(dict.fromkeys(names)), label="convert-float16 calibration") as probe:
        for values in probe.stream(_typed_feeds(data.limited(samples), inputs)):
            ranges.samples += 1
            for name, value in values.items():
                amax = _finite_amax(value)
                ranges.amax[name] = max(ranges.amax.get(name, 0.0), amax)
                ranges.size[name] = max(ranges.size.get(name, 0), int(value.size))
    if ranges.samples == 0:
        raise UsageError("convert-float16: the calibration data holds no samples")
    while len(cache) >= _CACHED_MODELS:
        cache.pop(next(iter(cache)))
    cache[key] = ranges
    return ranges


def _probed(tensor: gs.Tensor, dtype: Any) -> bool:
    """Float tensors the probe can type: float32 (its default), or float16 the graph declares."""
    found = dtype(tensor)
    if found == _F32:
        return True
    return found == _F16 and tensor.dtype is not None and np.dtype(tensor.dtype) == _F16


def _typed_feeds(
    data: Iterable[Mapping[str, np.ndarray]], inputs: Mapping[str, np.dtype[Any]]
) -> Iterable[dict[str, np.ndarray]]:
    """Feeds with float arrays cast to the graph input's float type (float16 after a run)."""
    for feed in data:
        yield {
            name: (
                value.astype(inputs[name])
                if name in inputs and np.asarray(value).dtype.kind == "f"
                else value
            )
            for name, value in feed.items()
        }


class _Rewriter:
    """Applies a plan: Casts per tensor and precision, converted initializers, graph I/O."""

    def __init__(self, graph: gs.Graph, plan: _Plan, keep_io_types: bool, low: _Low) -> None:
        self.graph, self.plan, self.keep_io, self.low = graph, plan, keep_io_types, low
        self.names = set(graph.tensors()) | {n.name for n in graph.nodes if n.name}
        self.cache: dict[tuple[int, int], gs.Tensor] = {}
        self.dropped: list[gs.Node] = []  # Casts to float32 some readers no longer read
        self.stats = {"casts": 0, "initializers": 0, "clipped": 0, "pairs": 0, "io": 0}

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def apply(self) -> dict[str, int]:
        plan, graph = self.plan, self.graph
        main = {id(n) for n in graph.nodes}
        outputs = {id(t) for t in graph.outputs}
        # Initializers read only in fp16 (in the main graph, not as outputs) convert in place.
        wants: dict[int, set[int]] = {}
        for node, i, wanted in plan.reads:
            tensor = node.inputs[i]
            if isinstance(tensor, gs.Constant):
                wants.setdefault(id(tensor), set()).add(wanted)
        for node, i, wanted in plan.reads:
            tensor = node.inputs[i]
            if isinstance(tensor, gs.Constant) and wanted == 16 and wants[id(tensor)] == {16}:
                if id(tensor) not in outputs and all(id(r) in main for r in tensor.outputs):
                    if plan.prec.get(id(tensor)) != 16:
                        tensor.values = self._to_fp16(np.asarray(tensor.values))
                        plan.prec[id(tensor)] = 16
                        self.stats["initializers"] += 1
                    continue
            if plan.prec.get(id(tensor), 32) != wanted:
                node.inputs[i] = self.convert(tensor, wanted)
        # Readers in subgraphs see outer tensors by identity: give them float32.
        for node in [n for n in graph.nodes if list(node_subgraphs(n))]:
            for sub in node_subgraphs(node):
                for inner in sub.nodes:
                    for i, t in enumerate(inner.inputs):
                        if plan.prec.get(id(t)) == 16 and id(t) in plan.orig32:
                            inner.inputs[i] = self.convert(t, 32)
        for tensor in graph.tensors().values():
            # Types the model declared change; unknown ones stay unknown (no new value_info).
            known = tensor.dtype is not None
            if isinstance(tensor, gs.Variable) and plan.prec.get(id(tensor)) == 16 and known:
                tensor.dtype = self.low.numpy
        self._graph_io()
        self._drop_dead_casts()
        return self.stats

    def _to_fp16(self, values: np.ndarray) -> np.ndarray:
        top = self.low.max
        clipped = np.isfinite(values) & (np.abs(values) > top)
        self.stats["clipped"] += int(np.count_nonzero(clipped))
        return np.where(clipped, np.sign(values) * top, values).astype(self.low.numpy)

    def convert(self, tensor: gs.Tensor, wanted: int) -> gs.Tensor:
        """`tensor` in precision `wanted` (16 or 32), made once per tensor."""
        key = (id(tensor), wanted)
        if key in self.cache:
            return self.cache[key]
        if isinstance(tensor, gs.Constant):
            assert wanted == 16, tensor.name
            result: gs.Tensor = gs.Constant(
                self.unique(f"{tensor.name}_{self.low.suffix}"),
                self._to_fp16(np.asarray(tensor.values)),
            )
            self.plan.prec[id(result)] = 16
            self.stats["initializers"] += 1
        elif wanted == 16 and (source := self._fp16_source(tensor)) is not None:
            result = source
            self.stats["pairs"] += 1
            self.dropped.append(tensor.inputs[0])
        else:
            suffix = self.low.suffix if wanted == 16 else "fp32"
            result = gs.Variable(self.unique(f"{tensor.name}_{suffix}"))
            to = self.low.onnx if wanted == 16 else onnx.TensorProto.FLOAT
            cast = gs.Node(
                "Cast", self.unique(f"{tensor.name}_to_{suffix}"), {"to": to}, [tensor], [result]
            )
            self.graph.nodes.append(cast)
            self.plan.prec[id(result)] = wanted
            self.plan.orig32.add(id(result))
            self.stats["casts"] += 1
        self.cache[key] = result
        return result

    def _fp16_source(self, tensor: gs.Tensor) -> gs.Tensor | None:
        """The 16-bit x when `tensor` is Cast(to=FLOAT) of x (the same value, exactly)."""
        if len(tensor.inputs) != 1:
            return None
        producer = tensor.inputs[0]
        if producer.op != "Cast" or producer.domain or not producer.inputs:
            return None
        source = producer.inputs[0]
        if int(producer.attrs.get("to", 0)) != onnx.TensorProto.FLOAT:
            return None
        is16 = self.plan.prec.get(id(source)) == 16 or (
            id(source) not in self.plan.orig32 and _numpy_dtype(source.dtype) == self.low.numpy
        )
        return source if is16 else None

    def _graph_io(self) -> None:
        graph, plan = self.graph, self.plan
        wanted = 32 if self.keep_io else 16
        for tensor in graph.inputs:
            low = self.low.numpy
            if id(tensor) in plan.orig32 and not self.keep_io and _numpy_dtype(tensor.dtype) != low:
                tensor.dtype = low
                self.stats["io"] += 1
        for index, tensor in enumerate(list(graph.outputs)):
            if not isinstance(tensor, gs.Variable) or id(tensor) not in plan.orig32:
                continue
            if plan.prec.get(id(tensor), 32) == wanted or tensor in graph.inputs:
                continue
            name = tensor.name
            held = self.low.suffix if plan.prec.get(id(tensor), 32) == 16 else "fp32"
            tensor.name = self.unique(f"{name}_{held}")
            converted = self.convert(tensor, wanted)
            if converted.name != name and all(t is not converted for t in graph.outputs):
                self.names.discard(converted.name)
                converted.name = name
                converted.dtype = np.float32 if wanted == 32 else self.low.numpy
                converted.shape = tensor.shape
            graph.outputs[index] = converted
            self.stats["io"] += 1

    def _drop_dead_casts(self) -> None:
        outputs = {id(t) for t in self.graph.outputs}
        dead = {
            id(n): n
            for n in self.dropped
            if all(not t.outputs and id(t) not in outputs for t in n.outputs)
        }
        for node in dead.values():
            node.inputs.clear()
            node.outputs.clear()
        if dead:
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in dead]


def _numpy_dtype(dtype: Any) -> np.dtype[Any] | None:
    """A tensor's numpy dtype; graphsurgeon keeps bfloat16 as its ONNX enum value."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(dtype)))
        except (KeyError, TypeError, ValueError):
            return None
