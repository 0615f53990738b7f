"""Remove nodes that compute nothing: Identity, inference Dropout, same-type Cast, x * 1, ..."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dsopt import Module, Pass, PassContext, PassResult
from dsopt.analysis import Shapes, TensorType
from dsopt.pattern import (
    dropout_in_training,
    is_used,
    read_constant,
    remove_nodes,
    replace_all_uses,
    topological_order,
)

__all__ = ["RULES", "EliminateNoops", "NoopRule"]

Dim = int | str | None


@dataclasses.dataclass(frozen=True)
class _Facts:
    """What a rule may consult: inferred tensor types and the model's default opset."""

    types: Mapping[str, TensorType]
    opset: int

    def dtype(self, tensor: gs.Tensor) -> np.dtype[Any] | None:
        """The element type of `tensor`, from shape inference or the tensor itself."""
        if not isinstance(tensor, gs.Constant):
            found = self.types.get(tensor.name)
            if found is not None and found.dtype is not None:
                return found.dtype
        return _np_dtype(tensor.dtype)

    def shape(self, tensor: gs.Tensor) -> tuple[Dim, ...] | None:
        """The shape of `tensor` (dims are ints, symbols or None), or None for unknown rank."""
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        found = self.types.get(tensor.name)
        if found is not None and found.shape is not None:
            return found.shape
        return tuple(tensor.shape) if tensor.shape is not None else None

    def static_shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        """The shape when every dim is a known int, else None."""
        shape = self.shape(tensor)
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        return tuple(int(d) for d in shape)  # type: ignore[arg-type]


#: A rule returns the input tensor whose value the node's first output equals, or None.
Match = Callable[[gs.Node, _Facts], gs.Tensor | None]


class NoopRule(NamedTuple):
    """One kind of no-op: the statistic it counts under, the op types it applies to, the check."""

    stat: str
    ops: tuple[str, ...]
    match: Match


# -- rules -----------------------------------------------------------------------------------
def _identity(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Identity(x) is x."""
    return node.inputs[0]


def _dropout(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Dropout(x) in inference mode is x, whatever the ratio (the mask must be unused)."""
    return None if dropout_in_training(node, facts.opset) else node.inputs[0]


def _cast(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Cast(x, to=T) is x when x is already of type T."""
    x = node.inputs[0]
    return x if _same_dtype(facts.dtype(x), node.attrs.get("to")) else None


def _cast_like(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """CastLike(x, t) is x when x and t have the same element type."""
    x, like = node.inputs[0], node.inputs[1]
    target = facts.dtype(like)
    return x if target is not None and _same_dtype(facts.dtype(x), _elem_type(target)) else None


def _same_static_shape(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """A shape op is a no-op when x and its result have the same fully static shape."""
    x, y = node.inputs[0], node.outputs[0]
    shape = facts.static_shape(x)
    if shape is None or shape != facts.static_shape(y):
        return None
    return x if _dtypes_agree(facts.dtype(x), facts.dtype(y)) else None


def _reshape(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Reshape(x, s) is x when s keeps every dim (copies with 0, repeats it, or one -1)."""
    if _same_static_shape(node, facts) is not None:
        return node.inputs[0]
    x = node.inputs[0]
    shape, target = facts.shape(x), read_constant(node.inputs[1])
    if shape is None or target is None or target.shape != (len(shape),):
        return None
    copy_zero = not node.attrs.get("allowzero", 0)
    inferred = 0
    for dim, wanted in zip(shape, target.tolist(), strict=True):
        if wanted == -1:
            inferred += 1
        elif not ((wanted == 0 and copy_zero) or (isinstance(dim, int) and dim == wanted)):
            return None
    return x if inferred <= 1 else None


def _expand(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Expand(x, s) is x when broadcasting x to s keeps x's shape."""
    if _same_static_shape(node, facts) is not None:
        return node.inputs[0]
    x = node.inputs[0]
    shape, target = facts.shape(x), read_constant(node.inputs[1])
    if shape is None or target is None or target.ndim != 1:
        return None
    return x if _broadcast_keeps(shape, tuple(target.tolist())) else None


def _tile(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Tile(x, r) is x when every repeat is 1 (or the static shape is unchanged)."""
    repeats = read_constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if repeats is not None and np.all(repeats == 1):
        return node.inputs[0]
    return _same_static_shape(node, facts)


def _slice(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Slice(x) with steps 1 is x when it starts at 0 and runs to the end of every axis."""
    args = _slice_args(node, facts.opset)
    if args is None:
        return None
    starts, ends, axes, steps = args
    if steps is None or not np.all(steps == 1):
        return None
    if _same_static_shape(node, facts) is not None:
        return node.inputs[0]
    shape = facts.shape(node.inputs[0])
    if starts is None or ends is None or shape is None:
        return None
    rank = len(shape)
    if axes is None:
        axes = np.arange(len(starts))
    if not (len(starts) == len(ends) == len(axes)):
        return None
    for axis, start, end in zip(axes.tolist(), starts.tolist(), ends.tolist(), strict=True):
        if not -rank <= axis < rank:
            return None
        dim = shape[axis % rank]
        static = isinstance(dim, int)
        if not (start == 0 or (static and start <= -dim)):
            return None
        if not ((static and end >= dim) or end >= _UNBOUNDED_END):
            return None
    return node.inputs[0]


def _transpose(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Transpose(x, perm=[0, 1, ..., n-1]) is x (so is any Transpose of a rank <= 1 tensor)."""
    x = node.inputs[0]
    perm = node.attrs.get("perm")
    if perm is not None:
        return x if list(perm) == list(range(len(perm))) else None
    shape = facts.shape(x)  # no perm means "reverse the axes"
    return x if shape is not None and len(shape) <= 1 else None


def _pad(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Pad(x) with all pads zero is x, in every mode."""
    if facts.opset < 11:
        pads = node.attrs.get("pads", node.attrs.get("paddings"))
        values = None if pads is None else np.asarray(pads)
    else:
        values = read_constant(node.inputs[1]) if len(node.inputs) > 1 else None
    return node.inputs[0] if values is not None and not np.any(values) else None


def _mul_by_one(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Mul by ones: x * 1 and 1 * x are x when broadcasting keeps x's shape."""
    return _with_neutral(node, facts, 1, sides=(0, 1))


def _div_by_one(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Div by ones: x / 1 is x when broadcasting keeps x's shape (1 / x is not)."""
    return _with_neutral(node, facts, 1, sides=(1,))


def _add_zero(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Add of zeros: x + 0 and 0 + x are x when broadcasting keeps x's shape."""
    return _with_neutral(node, facts, 0, sides=(0, 1))


def _sub_zero(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Sub of zeros: x - 0 is x when broadcasting keeps x's shape (0 - x is not)."""
    return _with_neutral(node, facts, 0, sides=(1,))


def _single_input(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Concat/Sum/Mean/Max/Min of a single input is that input."""
    return node.inputs[0] if len(node.inputs) == 1 else None


def _concat(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Concat of one input, or of every output of one Split in order along its axis, is x."""
    if len(node.inputs) == 1:
        return node.inputs[0]
    first = node.inputs[0]
    split = first.inputs[0] if isinstance(first, gs.Variable) and len(first.inputs) == 1 else None
    if split is None or split.op != "Split" or (split.domain or "") not in ("", "ai.onnx"):
        return None
    if len(split.outputs) != len(node.inputs):
        return None
    if any(a is not b for a, b in zip(split.outputs, node.inputs, strict=True)):
        return None
    x = split.inputs[0]
    axes = {int(split.attrs.get("axis", 0)), int(node.attrs.get("axis", 0))}
    if len(axes) == 2:
        shape = facts.shape(x)
        if shape is None or len({a % len(shape) for a in axes}) != 1:
            return None
    return x


def _single_split(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    """Split into a single output is its input."""
    return node.inputs[0] if len(node.outputs) == 1 else None


#: The no-ops this pass removes, in the order they are tried.
RULES: tuple[NoopRule, ...] = (
    NoopRule("identity", ("Identity",), _identity),
    NoopRule("dropout", ("Dropout",), _dropout),
    NoopRule("cast", ("Cast",), _cast),
    NoopRule("cast-like", ("CastLike",), _cast_like),
    NoopRule("reshape", ("Reshape",), _reshape),
    NoopRule("flatten", ("Flatten",), _same_static_shape),
    NoopRule("squeeze", ("Squeeze", "Unsqueeze"), _same_static_shape),
    NoopRule("expand", ("Expand",), _expand),
    NoopRule("tile", ("Tile",), _tile),
    NoopRule("slice", ("Slice",), _slice),
    NoopRule("transpose", ("Transpose",), _transpose),
    NoopRule("pad", ("Pad",), _pad),
    NoopRule("mul-by-one", ("Mul",), _mul_by_one),
    NoopRule("div-by-one", ("Div",), _div_by_one),
    NoopRule("add-zero", ("Add",), _add_zero),
    NoopRule("sub-zero", ("Sub",), _sub_zero),
    NoopRule("concat", ("Concat",), _concat),
    NoopRule("variadic-single", ("Sum", "Mean", "Max", "Min"), _single_input),
    NoopRule("split-single", ("Split",), _single_split),
)

_RULES_BY_OP: dict[str, NoopRule] = {op: rule for rule in RULES for op in rule.ops}


# -- helpers ---------------------------------------------------------------------------------

#: A Slice end at least this large runs to the end of any axis (exporters write INT64_MAX).
_UNBOUNDED_END = 2**62


def _slice_args(node: gs.Node, opset: int) -> tuple[np.ndarray | None, ...] | None:
    """(starts, ends, axes, steps) of a Slice as constants (None where not constant or absent).

    Steps are all ones when absent; returns None when a given steps input is not constant.
    """
    if opset < 10:
        found = [node.attrs.get(key) for key in ("starts", "ends", "axes")]
        starts, ends, axes = (None if v is None else np.asarray(v) for v in found)
        return starts, ends, axes, np.ones(1, np.int64)
    inputs = list(node.inputs) + [gs.Variable.empty()] * (5 - len(node.inputs))
    values = [read_constant(t) if t.name else None for t in inputs[1:5]]
    if inputs[4].name and values[3] is None:
        return None
    steps = values[3] if inputs[4].name else np.ones(1, np.int64)
    return values[0], values[1], values[2], steps


def _np_dtype(dtype: object) -> np.dtype[Any] | None:
    """A graphsurgeon dtype (numpy, or an ONNX enum where numpy has none) as a numpy dtype."""
    if dtype is None:
        return None
    try:
        if isinstance(dtype, int):
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        return np.dtype(dtype)  # type: ignore[call-overload, no-any-return]
    except (KeyError, TypeError, ValueError):
        return None


def _elem_type(dtype: np.dtype[Any] | None) -> int | None:
    if dtype is None:
        return None
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None


def _same_dtype(dtype: np.dtype[Any] | None, elem_type: object) -> bool:
    """Whether `dtype` is the ONNX element type `elem_type` (False when either is unknown)."""
    found = _elem_type(dtype)
    return found is not None and isinstance(elem_type, int) and found == elem_type


def _dtypes_agree(a: np.dtype[Any] | None, b: np.dtype[Any] | None) -> bool:
    return a is None or b is None or a == b


def _with_neutral(
    node: gs.Node, facts: _Facts, neutral: int, *, sides: tuple[int, ...]
) -> gs.Tensor | None:
    """The other operand of a binary op whose input on one of `sides` is all `neutral`.

    Only when broadcasting the constant cannot change the other operand's shape: the
    constant has at most its rank and, aligned right, each of its dims is 1 or equal to a
    known dim of the operand.
    """
    if len(node.inputs) != 2:
        return None
    for side in sides:
        value = read_constant(node.inputs[side])
        if value is None or value.dtype.kind not in "biuf" or not np.all(value == neutral):
            continue
        x = node.inputs[1 - side]
        shape = facts.shape(x)
        if shape is None or not _broadcast_keeps(shape, value.shape):
            continue
        if not _dtypes_agree(facts.dtype(x), facts.dtype(node.outputs[0])):
            continue
        return x
    return None


def _broadcast_keeps(shape: tuple[Dim, ...], other: tuple[int, ...]) -> bool:
    """Whether broadcasting a tensor of `shape` with one of shape `other` leaves `shape`."""
    if len(other) > len(shape):
        return False
    tail = shape[len(shape) - len(other) :]
    return all(o == 1 or (isinstance(d, int) and d == o) for d, o in zip(tail, other, strict=True))


@dataclasses.dataclass(frozen=True)
class EliminateNoops(Pass):
    """op(x) -> y  ==>  x, for nodes that compute nothing (`RULES`, one statistic each).

    Identity; Dropout in inference mode with an unused mask; Cast/CastLike to the input's
    own type; Flatten/Squeeze/Unsqueeze whose fully static output shape equals the input's;
    Reshape, Expand, Tile and Slice (steps 1) likewise, or when their constant arguments
    provably keep every dim (Reshape copying dims with 0 plus at most one -1, Expand to a
    shape that broadcasts away, Tile by ones, Slice from 0 to INT64_MAX), so dynamic dims
    are fine; Transpose by the identity permutation; Pad by zeros; x*1, 1*x, x/1, x+0, 0+x
    and x-0 when broadcasting keeps x's shape and type; Concat, Sum, Mean, Max and Min of
    one input; Concat of all outputs of a Split, in order, along its axis; Split into one
    output. Runs in every subgraph, sweeping to a fixed point.

    A removed node's readers (subgraphs included) read its input instead. When its output
    is a graph output, the input's producer takes over that name; when the input cannot be
    renamed (a graph input or output, an initializer, an outer-scope value) the node is
    kept and counted in `kept-graph-output`. Exact up to the sign of zero: dropping
    x + 0.0 keeps a -0.0 that the Add would have turned into +0.0.
    """

    name = "eliminate-noops"
    summary = "remove Identity, inference Dropout, same-type Cast, x*1, x+0 and other no-ops"
    stage = "canonicalize"
    exactness = "exact"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Sweeps every graph in topological order until no rule fires."""
        assert ctx.analyses is not None
        facts = _Facts(ctx.analyses.get(Shapes), module.opset)
        stats: collections.Counter[str] = collections.Counter()
        kept: dict[int, gs.Node] = {}
        for graph in list(module.graphs()):
            while True:
                removed = self._sweep(graph, facts, stats, kept)
                if not removed:
                    break
                remove_nodes(graph, removed)
        result: dict[str, int | float | str] = {rule.stat: stats[rule.stat] for rule in RULES}
        result["kept-graph-output"] = sum(1 for node in kept.values() if node.outputs)
        return PassResult(sum(stats.values()) > 0, result)

    @staticmethod
    def _sweep(
        graph: gs.Graph,
        facts: _Facts,
        stats: collections.Counter[str],
        kept: dict[int, gs.Node],
    ) -> list[gs.Node]:
        """One pass over `graph`; returns the nodes it bypassed (already detached)."""
        removed: list[gs.Node] = []
        for node in topological_order(graph):
            rule = _RULES_BY_OP.get(node.op)
            if rule is None or (node.domain or "") not in ("", "ai.onnx") or not node.inputs:
                continue
            if not node.outputs or any(is_used(graph, t) for t in node.outputs[1:]):
                continue
            source = rule.match(node, facts)
            if source is None or not source.name:
                continue
            if not replace_all_uses(graph, node.outputs[0], source):
                kept[id(node)] = node
                continue
            kept.pop(id(node), None)
            node.inputs.clear()
            node.outputs.clear()
            removed.append(node)
            stats[rule.stat] += 1
        return removed
