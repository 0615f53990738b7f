"""Convert float32 weights and compute to float16, with Casts where fp16 would be unsafe."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dsopt import Module, Pass, PassContext, PassResult
from dsopt.analysis import AnalysisManager, Shapes
from dsopt.pattern import node_subgraphs, topological_order

__all__ = ["DEFAULT_BLOCK_OPS", "NEUTRAL_OPS", "ConvertFloat16"]

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
_FP16_MAX = float(np.finfo(np.float16).max)
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

    Lossy: `tolerance` 1e-2 means every output element stays within 1e-2 * (1 + |reference|)
    of the float32 model on well-scaled models (activations far below 65504, no catastrophic
    cancellation); used as both rtol and atol.

    Subclasses may override `blocked_nodes` (e.g. from calibration) to keep nodes float32.
    """

    name = "convert-float16"
    summary = "convert float32 weights and compute to float16 (Casts around unsafe ops)"
    stage = "precision"
    exactness = "lossy"
    tolerance = 1e-2

    keep_io_types: bool = dataclasses.field(
        default=True, metadata={"help": "keep float32 graph inputs and outputs"}
    )
    block_ops: str = dataclasses.field(
        default="", metadata={"help": "comma-separated op types also kept float32"}
    )

    def blocked_ops(self) -> frozenset[str]:
        """The op types kept in float32: the defaults plus `block_ops`."""
        extra = {op.strip() for op in self.block_ops.split(",") if op.strip()}
        return frozenset(DEFAULT_BLOCK_OPS) | extra

    def blocked_nodes(self, module: Module, ctx: PassContext) -> frozenset[str]:
        """Names of nodes to keep float32 beyond the blocked op types (none by default)."""
        return frozenset()

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Plans a precision per node in topological order, then inserts Casts."""
        graph = module.graph
        analyses = ctx.analyses or AnalysisManager(module)
        types = analyses.get(Shapes)
        order = topological_order(graph)
        plan = self._plan(module, ctx, order, {k: v.dtype for k, v in types.items()})
        stats = _Rewriter(graph, plan, self.keep_io_types).apply()
        stats = {"nodes": plan.fp16_nodes, "blocked": plan.blocked, **stats}
        changed = any(stats[k] for k in ("casts", "initializers", "nodes", "io", "pairs"))
        if changed:
            graph.nodes = topological_order(graph)
        return PassResult(changed, stats)

    # -- planning ------------------------------------------------------------------------------
    def _plan(
        self,
        module: Module,
        ctx: PassContext,
        order: list[gs.Node],
        dtypes: Mapping[str, np.dtype[Any] | None],
    ) -> _Plan:
        plan = _Plan()
        blocked_ops, blocked_names = self.blocked_ops(), self.blocked_nodes(module, ctx)

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

        for tensor in module.graph.inputs:
            if dtype(tensor) == _F32:
                plan.orig32.add(id(tensor))
                plan.prec[id(tensor)] = 32 if self.keep_io_types else 16
        for tensor in module.graph.tensors().values():
            if isinstance(tensor, gs.Constant) and dtype(tensor) == _F32:
                plan.orig32.add(id(tensor))
        for node in order:
            self._plan_node(node, module.opset, plan, dtype, blocked_ops, blocked_names)
        return plan

    def _plan_node(
        self,
        node: gs.Node,
        opset: int,
        plan: _Plan,
        dtype: Any,
        blocked_ops: frozenset[str],
        blocked_names: frozenset[str],
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
                if v in allowed and "tensor(float16)" in allowed[v] and v in in_types
            }
        if convertible and (node.op in blocked_ops or (node.name and node.name in blocked_names)):
            plan.blocked += 1
            convertible = set()
        # Tensors bound to a float32 type variable are float32 even where inference gave up.
        for i, t in inputs:
            if in_types[i] in convertible:
                plan.orig32.add(id(t))
        for j, t in enumerate(node.outputs):
            if t.name and out_types[j] in convertible:
                plan.orig32.add(id(t))
        variables = [
            t for i, t in inputs if in_types[i] in convertible and isinstance(t, gs.Variable)
        ]
        integer = bool(variables) and all(id(t) in plan.integer for t in variables)
        if node.op in _INTEGER_SOURCES or (integer and convertible):
            for t in outputs:
                plan.integer.add(id(t))
        if not convertible:
            mode = 32
        elif node.op in NEUTRAL_OPS:
            mode = 32 if any(plan.prec.get(id(t), 32) == 32 for t in variables) else 16
        else:
            mode = 32 if integer else 16
        if mode == 16:
            plan.fp16_nodes += 1
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


class _Rewriter:
    """Applies a plan: Casts per tensor and precision, converted initializers, graph I/O."""

    def __init__(self, graph: gs.Graph, plan: _Plan, keep_io_types: bool) -> None:
        self.graph, self.plan, self.keep_io = graph, plan, keep_io_types
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
                tensor.dtype = np.float16
        self._graph_io()
        self._drop_dead_casts()
        return self.stats

    def _to_fp16(self, values: np.ndarray) -> np.ndarray:
        finite = np.isfinite(values)
        clipped = finite & (np.abs(values) > _FP16_MAX)
        self.stats["clipped"] += int(np.count_nonzero(clipped))
        return np.where(clipped, np.sign(values) * _FP16_MAX, values).astype(np.float16)

    def convert(self, tensor: gs.Tensor, wanted: int) -> gs.Tensor:
        """`tensor` in precision `wanted` (16 or 32), made once per tensor."""
        key = (id(tensor), wanted)
        if key in self.cache:
            return self.cache[key]
        if isinstance(tensor, gs.Constant):
            assert wanted == 16, tensor.name
            result: gs.Tensor = gs.Constant(
                self.unique(f"{tensor.name}_fp16"), self._to_fp16(np.asarray(tensor.values))
            )
            self.plan.prec[id(result)] = 16
            self.stats["initializers"] += 1
        elif wanted == 16 and (source := self._fp16_source(tensor)) is not None:
            result = source
            self.stats["pairs"] += 1
            self.dropped.append(tensor.inputs[0])
        else:
            suffix = "fp16" if wanted == 16 else "fp32"
            result = gs.Variable(self.unique(f"{tensor.name}_{suffix}"))
            to = onnx.TensorProto.FLOAT16 if wanted == 16 else onnx.TensorProto.FLOAT
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
        """The float16 x when `tensor` is Cast(to=FLOAT) of x (the same value, exactly)."""
        if len(tensor.inputs) != 1:
            return None
        producer = tensor.inputs[0]
        if producer.op != "Cast" or producer.domain or not producer.inputs:
            return None
        source = producer.inputs[0]
        if int(producer.attrs.get("to", 0)) != onnx.TensorProto.FLOAT:
            return None
        is16 = self.plan.prec.get(id(source)) == 16 or (
            id(source) not in self.plan.orig32 and source.dtype is not None
            and np.dtype(source.dtype) == _F16
        )  # fmt: skip
        return source if is16 else None

    def _graph_io(self) -> None:
        graph, plan = self.graph, self.plan
        wanted = 32 if self.keep_io else 16
        for tensor in graph.inputs:
            if id(tensor) in plan.orig32 and not self.keep_io and tensor.dtype != np.float16:
                tensor.dtype = np.float16
                self.stats["io"] += 1
        for index, tensor in enumerate(list(graph.outputs)):
            if not isinstance(tensor, gs.Variable) or id(tensor) not in plan.orig32:
                continue
            if plan.prec.get(id(tensor), 32) == wanted or tensor in graph.inputs:
                continue
            name = tensor.name
            tensor.name = self.unique(f"{name}_fp{plan.prec.get(id(tensor), 32)}")
            converted = self.convert(tensor, wanted)
            if converted.name != name and all(t is not converted for t in graph.outputs):
                self.names.discard(converted.name)
                converted.name = name
                converted.dtype = np.float32 if wanted == 32 else np.float16
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
