"""Fold QuantizeLinear/DequantizeLinear pairs that change nothing, and quantize QAT weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dsopt.analysis import Shapes
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import (
    fresh_name,
    is_used,
    read_constant,
    replace_all_uses,
    topological_order,
)

__all__ = [
    "LAYOUT_OPS",
    "FoldQdq",
    "QdqEditor",
    "QuantParams",
    "in_default_domain",
    "producer_of",
    "quantize",
    "round_trips",
]

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOAT32 = np.dtype(np.float32)
#: Integer types whose every value float32 represents exactly, scaled or not.
_INTEGERS = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16))
#: QuantizeLinear `output_dtype` values (TensorProto enums) of those types.
_OUTPUT_DTYPES = {2: np.dtype(np.uint8), 3: np.dtype(np.int8), 4: np.dtype(np.uint16)}
_OUTPUT_DTYPES[5] = np.dtype(np.int16)
#: Ops that only move, select or take the max of their data inputs' values.
LAYOUT_OPS = frozenset(
    ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "MaxPool")
    + ("Identity", "Concat")
)
_SWEEPS = 64
#: Round-trip checks of a 16-bit type cover 65536 values per scale; chunked to this many.
_CHECK_CHUNK = 1 << 22


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """The constant parameters of one Q or DQ node, normalized so that equal means equal.

    A one-element scale without blocks is per tensor (`axis` None, scale and zero point 0-D);
    otherwise `axis` is the attribute, made non-negative when the rank is known.
    """

    dtype: np.dtype[Any]
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    block_size: int = 0

    def same_as(self, other: QuantParams) -> bool:
        """Whether both quantize identically: same types, axis, blocks and bits of values."""
        return (
            self.dtype == other.dtype
            and self.axis == other.axis
            and self.block_size == other.block_size
            and self.scale.dtype == other.scale.dtype
            and self.scale.shape == other.scale.shape
            and self.scale.tobytes() == other.scale.tobytes()
            and self.zero_point.tobytes() == other.zero_point.tobytes()
        )

    @property
    def per_tensor(self) -> bool:
        """One scale and zero point for the whole tensor."""
        return self.axis is None


def round_trips(params: QuantParams) -> bool:
    """Whether QuantizeLinear(DequantizeLinear(q)) == q for every q of the type.

    Checked the way onnxruntime computes both: `float32(q - z) * s`, then `rint(x / s) + z`.
    Scales must be positive, normal and finite (zero, subnormal or huge ones are refused).
    """
    scale = params.scale.reshape(-1).astype(np.float32)
    zero = np.broadcast_to(params.zero_point, params.scale.shape).reshape(-1).astype(np.int64)
    if not (np.isfinite(scale).all() and (scale >= np.finfo(np.float32).tiny).all()):
        return False
    pairs = np.unique(np.stack([scale.view(np.int32).astype(np.int64), zero]), axis=1)
    info = np.iinfo(params.dtype)
    values = np.arange(info.min, info.max + 1, dtype=np.int64)
    step = max(1, _CHECK_CHUNK // values.size)
    for start in range(0, pairs.shape[1], step):
        chunk = pairs[:, start : start + step]
        s = chunk[0].astype(np.int32).view(np.float32)[:, None]
        centered = (values[None, :] - chunk[1][:, None]).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            restored = np.rint((centered * s) / s)
        if not np.array_equal(restored, centered):
            return False
    return True


def quantize(values: np.ndarray, params: QuantParams) -> np.ndarray:
    """QuantizeLinear of a float32 constant, bit for bit as onnxruntime computes it.

    `values / scale` in float32 (IEEE division), rounded half to even, plus the zero point,
    saturated to the type. Per tensor or per axis (no blocks).
    """
    scale, zero = params.scale, params.zero_point.astype(np.float64)
    if params.axis is not None:
        shape = [1] * values.ndim
        shape[params.axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    info = np.iinfo(params.dtype)
    with np.errstate(over="ignore"):
        quotient = np.rint(np.asarray(values, np.float32) / scale).astype(np.float64)
    return np.clip(quotient + zero, info.min, info.max).astype(params.dtype)


@dataclasses.dataclass(frozen=True)
class FoldQdq(Pass):
    """Removes QuantizeLinear/DequantizeLinear work that cannot change a value.

    Rules (one statistic each):
      1. `dq-q`: `QuantizeLinear(DequantizeLinear(q, s, z), s', z')` with identical scale,
         zero point, integer type, axis and block size  ==>  `q`.
      2. `quantize-constant`: `QuantizeLinear(W, s, z)` of a constant float32 W (the QAT
         export's weight, read by a DequantizeLinear)  ==>  the integer constant, computed as
         onnxruntime computes it (`W / s` in float32, half to even, `+ z`, saturated).
      3. `layout-through`: `Q(L(DQ(q, s, z)), s, z)` with per-tensor parameters, L one of
         `LAYOUT_OPS` (Gather: its data input; Concat: every input a DQ of those parameters;
         MaxPool: a positive scale and no Indices read)  ==>  `L(q)`, when ONNX allows the
         integer type for L at the model's opset. Other float readers of L's output read
         `DQ(L(q), s, z)` instead.
      4. `removed-dead`: the Q, DQ and Constant nodes those rewrites leave unread.

    Rules 1 and 3 rest on `Q(DQ(q)) == q`, which is checked for every value of the type
    (8- or 16-bit, float32 scales); DQ commutes with L elementwise. Every rule is exact.
    Subgraphs are walked; graph outputs keep their names and types.
    """

    name: ClassVar[str] = "fold-qdq"
    summary: ClassVar[str] = (
        "fold DequantizeLinear->QuantizeLinear round trips (also through layout ops) and "
        "quantize QAT float weights offline"
    )
    stage: ClassVar[str] = "qdq"
    exactness: ClassVar[str] = "exact"
    opsets: ClassVar[tuple[int | None, int | None]] = (10, None)

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Applies the rules to a fixed point over every graph, then drops dead nodes."""
        folder = _Folder(module, ctx)
        for graph in list(module.graphs()):
            for _ in range(_SWEEPS):
                if not folder.sweep(graph):
                    break
        folder.remove_dead(module)
        return PassResult(any(folder.fired[k] for k in _RULES), dict(folder.fired))


_RULES = ("dq-q", "quantize-constant", "layout-through")


class QdqEditor:
    """Facts and edits the QDQ passes share over one run.

    Knows the names in use, the graph outputs (of every graph), element types found before
    any rewrite, and the normalized parameters of Q/DQ nodes. Rewrites `detach` nodes (their
    inputs' producers become suspects) and `flush` them from a graph; `remove_dead` then
    drops the suspect Q, DQ and Constant nodes nothing reads, counting `removed-dead`.
    """

    def __init__(self, module: Module, ctx: PassContext, rules: Iterable[str]) -> None:
        self.module = module
        self.ctx = ctx
        self.opset = module.opset
        self.fired: dict[str, int] = dict.fromkeys((*rules, "removed-dead"), 0)
        self.names: set[str] = set()
        self.protected: set[int] = set()
        for graph in module.graphs():
            self.protected.update(id(t) for t in graph.outputs)
            self.names.update(t.name for t in [*graph.inputs, *graph.outputs] if t.name)
            for node in graph.nodes:
                self.names.add(node.name)
                self.names.update(t.name for t in [*node.inputs, *node.outputs] if t.name)
        self.suspects: dict[int, gs.Node] = {}
        self.removed: set[int] = set()
        self.members: set[int] = set()
        self._round_trips: dict[tuple[Any, ...], bool] = {}
        self._dtypes: dict[int, np.dtype[Any] | None] = {}
        self._shapes: dict[str, Any] | None = None
        for graph in module.graphs():  # type facts come from the unchanged model
            for node in graph.nodes:
                if node.op in (_Q, _DQ) and in_default_domain(node):
                    self.params(node)

    # -- facts --------------------------------------------------------------------------------
    def shapes(self) -> dict[str, Any]:
        """Inferred tensor types by name (the `Shapes` analysis), computed on first use."""
        if self._shapes is None:
            self._shapes = self.ctx.analyses.get(Shapes) if self.ctx.analyses else {}
        return self._shapes

    def dtype_of(self, tensor: gs.Tensor) -> np.dtype[Any] | None:
        """The element type of `tensor`: constant, producing Q or layout op, declared, inferred.

        Remembered per tensor object (rewrites keep tensors and their types), so types found
        before any rewrite serve later questions too.
        """
        if id(tensor) not in self._dtypes:
            self._dtypes[id(tensor)] = self._find_dtype(tensor)
        return self._dtypes[id(tensor)]

    def _find_dtype(self, tensor: gs.Tensor) -> np.dtype[Any] | None:
        if isinstance(tensor, gs.Constant):
            return np.dtype(tensor.dtype)
        producer = producer_of(tensor)
        if producer is not None and in_default_domain(producer) and producer.inputs:
            if producer.op == _Q:
                params = self.params(producer)
                if params is not None:
                    return params.dtype
            elif producer.op in LAYOUT_OPS and producer.outputs[0] is tensor:
                return self.dtype_of(producer.inputs[0])
        for dtype in (tensor.dtype, getattr(self.shapes().get(tensor.name), "dtype", None)):
            try:
                if dtype is not None:
                    return np.dtype(dtype)
            except TypeError:  # graphsurgeon keeps some types as onnx enum values
                continue
        return None

    def rank_of(self, tensor: gs.Tensor) -> int | None:
        """The rank of `tensor`, declared or inferred, else None."""
        if tensor.shape is not None:
            return len(tensor.shape)
        found = self.shapes().get(tensor.name)
        shape = getattr(found, "shape", None)
        return None if shape is None else len(shape)

    def params(self, node: gs.Node) -> QuantParams | None:
        """The normalized constant parameters of a Q or DQ node, else None."""
        if len(node.inputs) < 2 or not node.inputs[1].name:
            return None
        scale = read_constant(node.inputs[1])
        if scale is None or np.dtype(scale.dtype) != _FLOAT32:
            return None
        zero = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            zero = read_constant(node.inputs[2])
            if zero is None:
                return None
        if node.op == _Q:
            if int(node.attrs.get("precision", 0)):
                return None
            output_dtype = int(node.attrs.get("output_dtype", 0))
            dtype = np.dtype(zero.dtype) if zero is not None else _OUTPUT_DTYPES.get(output_dtype)
            if output_dtype == 0 and zero is None:
                dtype = np.dtype(np.uint8)
        else:
            if int(node.attrs.get("output_dtype", 0)) not in (0, onnx.TensorProto.FLOAT):
                return None
            dtype = np.dtype(zero.dtype) if zero is not None else self.dtype_of(node.inputs[0])
        if dtype not in _INTEGERS:
            return None
        zero = np.zeros(scale.shape, dtype) if zero is None else np.asarray(zero, dtype)
        if zero.shape != scale.shape:
            return None
        block = int(node.attrs.get("block_size", 0))
        if scale.size == 1 and not block:
            return QuantParams(dtype, scale.reshape(()), zero.reshape(()), None)
        axis = int(node.attrs.get("axis", 1))
        if axis < 0:
            rank = self.rank_of(node.inputs[0])
            axis = axis + rank if rank is not None else axis
        return QuantParams(dtype, scale, zero, axis, block)

    def round_trips(self, params: QuantParams) -> bool:
        """`round_trips(params)`, remembered per type, scale and zero point."""
        key = (params.dtype.str, params.scale.tobytes(), params.zero_point.tobytes())
        if key not in self._round_trips:
            self._round_trips[key] = round_trips(params)
        return self._round_trips[key]

    def fresh(self, hint: str) -> str:
        """A name no tensor or node uses yet, derived from `hint`."""
        return fresh_name(self.names, hint)

    # -- editing ------------------------------------------------------------------------------
    def add(self, graph: gs.Graph, node: gs.Node) -> None:
        """Appends a new node to `graph` (sorted once the pass is done)."""
        graph.nodes.append(node)
        self.members.add(id(node))

    def detach(self, nodes: Iterable[gs.Node]) -> None:
        """Disconnects `nodes` (`flush` drops them); their inputs' producers may be dead now."""
        for node in nodes:
            for tensor in node.inputs:
                producer = producer_of(tensor)
                if producer is not None:
                    self.suspects[id(producer)] = producer
            node.inputs.clear()
            node.outputs.clear()
            self.removed.add(id(node))

    def flush(self, graph: gs.Graph) -> None:
        """Drops the detached nodes from `graph`."""
        graph.nodes = [n for n in graph.nodes if id(n) not in self.removed]

    def remove_dead(self, module: Module) -> None:
        """Rule 4: drops the suspects (Q, DQ, Constant) nothing reads any more."""
        removable = {_Q, _DQ, "Constant"}
        while self.suspects:
            found = False
            for graph in module.graphs():
                dead = [
                    node
                    for node in graph.nodes
                    if id(node) in self.suspects
                    and node.op in removable
                    and in_default_domain(node)
                    and not any(is_used(graph, t) or id(t) in self.protected for t in node.outputs)
                ]
                for node in dead:
                    del self.suspects[id(node)]
                if dead:
                    self.detach(dead)
                    self.flush(graph)
                    self.fired["removed-dead"] += len(dead)
                    found = True
            if not found:
                break


class _Folder(QdqEditor):
    """The rules of `fold-qdq`."""

    def __init__(self, module: Module, ctx: PassContext) -> None:
        super().__init__(module, ctx, _RULES)

    def sweep(self, graph: gs.Graph) -> bool:
        """One topological pass over `graph`; whether any rule fired."""
        changed = False
        self.members = {id(n) for n in graph.nodes}
        for node in topological_order(graph):
            if id(node) in self.removed or node.op != _Q or not in_default_domain(node):
                continue
            for rule in (self.dq_q, self.quantize_constant, self.layout_through):
                if rule(graph, node):
                    changed = True
                    break
        self.flush(graph)
        return changed

    def dq_q(self, graph: gs.Graph, quant: gs.Node) -> bool:
        """Rule 1: Q(DQ(q)) with the same parameters reads q."""
        dequant = producer_of(quant.inputs[0])
        if dequant is None or dequant.op != _DQ or not in_default_domain(dequant):
            return False
        params, source = self.params(quant), self.params(dequant)
        if params is None or source is None or not params.same_as(source):
            return False
        if not self.round_trips(params):
            return False
        out, q = quant.outputs[0], dequant.inputs[0]
        if len(quant.outputs) != 1 or not replace_all_uses(graph, out, q):
            # `out` is a graph output that `q` cannot be renamed to: copy q into it.
            identity = gs.Node("Identity", self.fresh(quant.name or "Identity"), {}, [q], [])
            self.detach([quant])
            identity.outputs.append(out)
            self.add(graph, identity)
        else:
            self.detach([quant])
        self.fired["dq-q"] += 1
        return True

    def quantize_constant(self, graph: gs.Graph, quant: gs.Node) -> bool:
        """Rule 2: Q of a constant float32 tensor becomes the integer constant."""
        weight = read_constant(quant.inputs[0]) if quant.inputs[0].name else None
        if weight is None or np.dtype(weight.dtype) != _FLOAT32 or not np.isfinite(weight).all():
            return False
        params = self.params(quant)
        if params is None or params.block_size or len(quant.outputs) != 1:
            return False
        scale = params.scale
        if not (np.isfinite(scale).all() and (scale >= np.finfo(np.float32).tiny).all()):
            return False
        if params.axis is not None and not (0 <= params.axis < weight.ndim):
            return False
        if params.axis is not None and weight.shape[params.axis] != scale.size:
            return False
        out = quant.outputs[0]
        if id(out) in self.protected:
            return False
        values = quantize(weight, params)
        self.detach([quant])
        out.to_constant(np.array(values, order="C"))
        self.fired["quantize-constant"] += 1
        return True

    def layout_through(self, graph: gs.Graph, quant: gs.Node) -> bool:
        """Rule 3: Q(L(DQ(q))) with equal per-tensor parameters becomes L(q)."""
        layout = producer_of(quant.inputs[0])
        if layout is None or layout.op not in LAYOUT_OPS or not in_default_domain(layout):
            return False
        if id(layout) not in self.members or layout.outputs[0] is not quant.inputs[0]:
            return False
        params = self.params(quant)
        if params is None or not params.per_tensor or len(quant.outputs) != 1:
            return False
        slots = range(len(layout.inputs)) if layout.op == "Concat" else [0]
        sources: dict[int, gs.Tensor] = {}
        for slot in slots:
            dequant = producer_of(layout.inputs[slot])
            if dequant is None or dequant.op != _DQ or not in_default_domain(dequant):
                return False
            found = self.params(dequant)
            if found is None or not found.same_as(params):
                return False
            sources[slot] = dequant.inputs[0]
        if any(is_used(graph, t) or id(t) in self.protected for t in layout.outputs[1:]):
            return False
        if layout.op == "MaxPool" and not float(params.scale) > 0:
            return False
        if not _takes(layout.op, self.opset, params.dtype) or not self.round_trips(params):
            return False
        out, floating = quant.outputs[0], layout.outputs[0]
        scale_and_zero = list(quant.inputs[1:3])
        inputs = [sources.get(i, t) for i, t in enumerate(layout.inputs)]
        replacement = gs.Node(
            layout.op, self.fresh(layout.name or layout.op), dict(layout.attrs), inputs, []
        )
        self.detach([quant])
        replacement.outputs.append(out)
        self.add(graph, replacement)
        if is_used(graph, floating) or id(floating) in self.protected:
            dequant = gs.Node(_DQ, self.fresh(f"{out.name}/DequantizeLinear"), {}, [out])
            dequant.inputs.extend(scale_and_zero)
            self.detach([layout])
            dequant.outputs.append(floating)
            self.add(graph, dequant)
        else:
            self.detach([layout])
        self.fired["layout-through"] += 1
        return True


def producer_of(tensor: gs.Tensor) -> gs.Node | None:
    """The node writing `tensor`, or None (a graph input, a constant, or several writers)."""
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def in_default_domain(node: gs.Node) -> bool:
    """Whether `node` is an ai.onnx op."""
    return (node.domain or "") in _DEFAULT_DOMAINS


def _takes(op: str, opset: int, dtype: np.dtype[Any]) -> bool:
    """Whether ONNX's `op` at `opset` accepts `dtype` for its first (data) input."""
    try:
        schema = onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return False
    wanted = f"tensor({np.dtype(dtype).name})"
    type_str = schema.inputs[0].type_str
    for constraint in schema.type_constraints:
        if constraint.type_param_str == type_str:
            return wanted in constraint.allowed_type_strs
    return type_str == wanted
