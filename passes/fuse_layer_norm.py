"""Fuse exporter-spelled LayerNorm and RMSNorm into LayerNormalization / RMSNormalization."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.rewrite import Match, MatchResult, Op, Rule, RulePass

__all__ = ["RULES", "FuseLayerNorm"]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_DOMAINS = ("", "ai.onnx")
#: ReduceMean reads its axes from an input (not an attribute) from this opset on.
_AXES_INPUT_OPSET = 18
_SKIPPED_DYNAMIC = "skipped-dynamic-shape"


class _Walker:
    """Reads an expression DAG around a match, absorbing only nodes the match may own.

    A node is absorbable when it is in the default domain, in the match's graph, and writes
    the tensor as its first output with no other output in use. The tensor itself must be no
    graph output (of any graph) and be read exactly by the readers the pattern expects.
    """

    def __init__(self, match: Match) -> None:
        self.match = match
        self._members: set[int] | None = None  # computed on first need: most roots fail early

    def owned(self, node: gs.Node) -> bool:
        """Whether `node` may be replaced: default domain, this graph, extra outputs unused."""
        if (node.domain or "") not in _DOMAINS:
            return False
        if self._members is None:
            self._members = {id(n) for n in self.match.graph.nodes}
        if id(node) not in self._members:
            return False
        protected = self.match.facts.protected
        return bool(node.outputs) and not any(
            t.outputs or id(t) in protected for t in node.outputs[1:]
        )

    def producer(
        self, tensor: gs.Tensor, ops: Sequence[str], readers: Sequence[gs.Node] | None = None
    ) -> gs.Node | None:
        """The node writing `tensor` if its op is in `ops` and the match may absorb it.

        `readers` lists the nodes expected to read `tensor`, once per read (default: exactly
        one read by anything); any other read keeps the node out of the match.
        """
        if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        if node.op not in ops or node.outputs[0] is not tensor or not self.owned(node):
            return None
        if id(tensor) in self.match.facts.protected:
            return None
        if readers is None:
            if len(tensor.outputs) != 1:
                return None
        elif sorted(id(n) for n in tensor.outputs) != sorted(id(n) for n in readers):
            return None
        return node

    def reader(self, tensor: gs.Tensor, ops: Sequence[str]) -> gs.Node | None:
        """The only node reading `tensor` (once) if its op is in `ops` and it is absorbable."""
        if id(tensor) in self.match.facts.protected or len(tensor.outputs) != 1:
            return None
        node = tensor.outputs[0]
        return node if node.op in ops and self.owned(node) else None

    def constant(self, tensor: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor, else None."""
        return self.match.constant(tensor)


def _reads(node: gs.Node, tensor: gs.Tensor) -> int:
    return sum(1 for t in node.inputs if t is tensor)


#: What a rule's `input_of` finds: (x, the nodes it absorbed, the ReduceMeans to check).
_Input = tuple[gs.Tensor, list[gs.Node], list[gs.Node]]


@dataclasses.dataclass
class _Core:
    """n = numerator / sqrt(ReduceMean(base^2) + eps), read downwards from n."""

    numerator: gs.Tensor
    base: gs.Tensor
    square: gs.Node
    reduce: gs.Node
    eps: np.ndarray
    nodes: list[gs.Node]


def _read_core(walker: _Walker, n: gs.Node) -> _Core | str:
    """Reads Div(num, std) or Mul(num, Reciprocal(std)), std = Sqrt(ReduceMean(sq) + eps)."""
    if len(n.inputs) != 2:
        return f"{n.op} does not have two inputs"
    candidates: list[tuple[gs.Tensor, gs.Tensor, list[gs.Node]]] = []
    if n.op == "Div":
        candidates.append((n.inputs[0], n.inputs[1], []))
    else:
        for num, other in (n.inputs, n.inputs[::-1]):
            recip = walker.producer(other, ("Reciprocal",))
            if recip is not None and len(recip.inputs) == 1:
                candidates.append((num, recip.inputs[0], [recip]))
    reason = "no operand is Reciprocal(Sqrt(...)) read only here"
    for num, std, nodes in candidates:
        found = _read_denominator(walker, std)
        if isinstance(found, str):
            reason = found
            continue
        base, square, reduce, eps, more = found
        return _Core(num, base, square, reduce, eps, [*nodes, *more])
    return reason


def _read_denominator(
    walker: _Walker, std: gs.Tensor
) -> tuple[gs.Tensor, gs.Node, gs.Node, np.ndarray, list[gs.Node]] | str:
    sqrt = walker.producer(std, ("Sqrt",))
    if sqrt is None or len(sqrt.inputs) != 1:
        return "the denominator is not a Sqrt read only here"
    add = walker.producer(sqrt.inputs[0], ("Add",))
    if add is None or len(add.inputs) != 2:
        return "the Sqrt does not read an Add read only there"
    for var, eps_tensor in (add.inputs, add.inputs[::-1]):
        eps = walker.constant(eps_tensor)
        if eps is None:
            continue
        reduce = walker.producer(var, ("ReduceMean",))
        if reduce is None or not reduce.inputs:
            return "the variance is not a ReduceMean read only by the epsilon Add"
        square = walker.producer(reduce.inputs[0], ("Pow", "Mul"))
        if square is None or len(square.inputs) != 2:
            return "the ReduceMean does not read a Pow or Mul read only there"
        base = square.inputs[0]
        if square.op == "Mul" and square.inputs[1] is not base:
            return "the squaring Mul does not multiply a value by itself"
        if square.op == "Pow":
            exponent = walker.constant(square.inputs[1])
            if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
                return "the Pow exponent is not a constant 2"
            if exponent.ndim > 1:
                return "the Pow exponent has rank > 1 and could grow the rank"
        return base, square, reduce, eps, [sqrt, add, reduce, square]
    return "neither Add operand is a constant epsilon"


def _axes(match: Match, reduce: gs.Node, rank: int | None) -> tuple[int, ...] | str:
    """The negative, sorted axes a keepdims ReduceMean reduces, or why they are unusable."""
    if int(reduce.attrs.get("keepdims", 1)) != 1:
        return "ReduceMean has keepdims=0"
    if match.opset < _AXES_INPUT_OPSET:
        if len(reduce.inputs) != 1:
            return "ReduceMean has more than one input"
        raw = reduce.attrs.get("axes")
        axes = None if raw is None else [int(a) for a in raw]
    else:
        if len(reduce.inputs) > 2:
            return "ReduceMean has more than two inputs"
        axes = None
        if len(reduce.inputs) == 2 and reduce.inputs[1].name:
            value = match.constant(reduce.inputs[1])
            if value is None or value.dtype.kind not in "iu" or value.ndim > 1:
                return "ReduceMean axes are not a constant integer list"
            axes = [int(a) for a in value.reshape(-1)] or None
        if axes is None and int(reduce.attrs.get("noop_with_empty_axes", 0)):
            return "ReduceMean without axes is a no-op (noop_with_empty_axes=1)"
    if axes is None:
        if rank is None:
            return "ReduceMean reduces every axis of an input of unknown rank"
        axes = list(range(rank))
    if any(a >= 0 for a in axes) and rank is None:
        return "positive ReduceMean axes on an input of unknown rank"
    if rank is not None:
        if any(not -rank <= a < rank for a in axes):
            return f"ReduceMean axes {axes} are out of range for rank {rank}"
        axes = [a - rank if a >= 0 else a for a in axes]
    found = tuple(sorted(axes))
    if len(set(found)) != len(found) or found != tuple(range(-len(found), 0)):
        return f"ReduceMean axes {axes} are not the trailing axes"
    return found


def _fit(
    array: np.ndarray, dtype: np.dtype, normalized: tuple[int, ...], rank: int
) -> np.ndarray | None:
    """`array` as the normalized shape when it broadcasts only over the normalized axes."""
    if array.dtype != dtype or array.ndim > rank:
        return None
    k = len(normalized)
    if any(d != 1 for d in array.shape[: max(0, array.ndim - k)]):
        return None
    tail = array.shape[max(0, array.ndim - k) :]
    if any(d not in (1, want) for d, want in zip(tail[::-1], normalized[::-1], strict=False)):
        return None
    return np.broadcast_to(array.reshape(tail), normalized)


def _affine(
    walker: _Walker,
    tensor: gs.Tensor,
    op: str,
    fit: Callable[[np.ndarray], np.ndarray | None],
) -> tuple[gs.Node, gs.Tensor, np.ndarray] | None:
    """The reader `op` of `tensor` with a constant other operand that `fit` accepts."""
    node = walker.reader(tensor, (op,))
    if node is None or len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
    value = walker.constant(other)
    fitted = None if value is None else fit(value)
    return None if fitted is None else (node, other, fitted)


def _parameter(match: Match, found: tuple[gs.Tensor | None, np.ndarray], hint: str) -> gs.Tensor:
    """The scale or bias input: the initializer itself when it has the normalized shape."""
    tensor, array = found
    if isinstance(tensor, gs.Constant) and tuple(tensor.shape) == array.shape:
        return tensor
    return match.new_constant(tensor.name if tensor is not None and tensor.name else hint, array)


class _Norm(Rule):
    """Shared matching: the normalization node n, read downwards and extended upwards."""

    pattern = (Op("Div", "Mul"),)
    stats = (_SKIPPED_DYNAMIC,)
    op = ""
    with_bias = False

    def input_of(self, walker: _Walker, core: _Core, n: gs.Node) -> _Input | str:
        """(x, nodes, reduces) for the numerator side of the core, or why not."""
        raise NotImplementedError  # pragma: no cover

    def check(self, match: Match) -> MatchResult:
        """Reads the core, checks axes, dtype and constants, then absorbs scale and bias."""
        n = match.root
        walker = _Walker(match)
        core = _read_core(walker, n)
        if isinstance(core, str):
            return match.fail(core)
        found = self.input_of(walker, core, n)
        if isinstance(found, str):
            return match.fail(found)
        x, nodes, reduces = found
        shape = match.shape(x)
        rank = None if shape is None else len(shape)
        axes = None
        for reduce in reduces:
            got = _axes(match, reduce, rank)
            if isinstance(got, str):
                return match.fail(got)
            if axes is not None and got != axes:
                return match.fail(f"the ReduceMeans reduce different axes {axes} and {got}")
            axes = got
        assert axes is not None
        dtype = match.dtype(x)
        if dtype not in _FLOATS:
            return match.fail(f"the input's dtype {dtype} is not float16/32/64")
        eps = core.eps
        if eps.size != 1 or eps.dtype != dtype:
            return match.fail(f"epsilon is {eps.dtype}[{eps.size}], not one {dtype}")
        if eps.ndim > (rank if rank is not None else len(axes)):
            return match.fail("epsilon has a rank that could grow the variance")
        epsilon = float(eps.reshape(-1)[0])
        if not math.isfinite(epsilon):
            return match.fail("epsilon is not finite")
        k = len(axes)
        normalized = None if shape is None else shape[-k:]
        if normalized is None or not all(isinstance(d, int) and d > 0 for d in normalized):
            return match.fail(
                f"the normalized dims {normalized} are not static", stat=_SKIPPED_DYNAMIC
            )
        assert rank is not None
        normalized = tuple(int(d) for d in normalized)  # type: ignore[arg-type]

        def fit(array: np.ndarray) -> np.ndarray | None:
            return _fit(array, dtype, normalized, rank)

        every = [*nodes, *core.nodes, n]
        last = n.outputs[0]
        scale = bias = None
        gamma = _affine(walker, last, "Mul", fit)
        if gamma is not None:
            every.append(gamma[0])
            scale = gamma[1:]
            last = gamma[0].outputs[0]
        if self.with_bias:
            beta = _affine(walker, last, "Add", fit)
            if beta is not None:
                every.append(beta[0])
                bias = beta[1:]
        match.values.update(
            x=x, axis=-k, epsilon=epsilon, normalized=normalized, dtype=dtype,
            scale=scale, bias=bias, nodes=tuple(every),
        )  # fmt: skip
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """One normalization node reading x, the scale and (LayerNorm) the bias."""
        values = match.values
        match.nodes = values["nodes"]  # the last node stays last: the kit keeps its output
        scale = values["scale"]
        if scale is None:
            ones = np.ones(values["normalized"], values["dtype"])
            scale = (None, ones)
        inputs = [values["x"], _parameter(match, scale, f"{match.output.name}_scale")]
        if values["bias"] is not None:
            inputs.append(_parameter(match, values["bias"], "bias"))
        attrs = {"axis": values["axis"], "epsilon": values["epsilon"]}
        return [match.new_node(self.op, inputs, attrs, name=match.last.name)]


class LayerNorm(_Norm):
    """(x - mean) / Sqrt(ReduceMean((x - mean)^2) + eps) * gamma + beta  ==>  LayerNormalization."""

    name = "layer-norm"
    op = "LayerNormalization"
    with_bias = True
    min_opset = 17

    def input_of(self, walker: _Walker, core: _Core, n: gs.Node) -> _Input | str:
        """The input x and the mean/Sub nodes of d = Sub(x, ReduceMean(x)) (one Sub or two)."""
        square = core.square
        squared = [square] * _reads(square, core.base)
        if core.numerator is core.base:
            sub = walker.producer(core.numerator, ("Sub",), [*squared, n])
            if sub is None:
                return "x - mean is not a Sub read only by the square and the normalization"
            subs = [sub]
        else:
            sub_n = walker.producer(core.numerator, ("Sub",))
            sub_sq = walker.producer(core.base, ("Sub",), squared)
            if sub_n is None or sub_sq is None or len(sub_n.inputs) != 2:
                return "the numerator is not the squared value (nor an equal Sub)"
            if any(a is not b for a, b in zip(sub_n.inputs, sub_sq.inputs, strict=False)):
                return "the two Subs compute different differences"
            subs = [sub_sq, sub_n]
        if len(subs[0].inputs) != 2:
            return "the Sub does not have two inputs"
        x, mean = subs[0].inputs
        reduce = walker.producer(mean, ("ReduceMean",), subs)
        if reduce is None or not reduce.inputs or reduce.inputs[0] is not x:
            return "x - mean does not subtract a ReduceMean of x read only there"
        return x, [reduce, *subs], [reduce, core.reduce]


class RmsNorm(_Norm):
    """x / Sqrt(ReduceMean(x^2) + eps) * gamma  ==>  RMSNormalization."""

    name = "rms-norm"
    op = "RMSNormalization"
    min_opset = 23

    def input_of(self, walker: _Walker, core: _Core, n: gs.Node) -> _Input | str:
        """The input x itself: the numerator must be the squared value."""
        if core.numerator is not core.base:
            return "the numerator is not the squared value"
        return core.numerator, [], [core.reduce]


#: The rules of `fuse-layer-norm`, tried in this order at each normalization node.
RULES: tuple[Rule, ...] = (LayerNorm(), RmsNorm())


@dataclasses.dataclass(frozen=True)
class FuseLayerNorm(RulePass):
    """Exporter-spelled normalizations  ==>  LayerNormalization / RMSNormalization.

    Both rules match at the normalization node n (a Div, or a Mul by a Reciprocal), read
    the expression below it, then absorb an affine tail above it while it fits:
      1. `layer-norm` (opset >= 17): mean = ReduceMean(x), d = Sub(x, mean),
         n = d / Sqrt(ReduceMean(Pow(d, 2) | Mul(d, d)) + eps) (Div, or Mul by Reciprocal),
         then optionally Mul(n, gamma) and Add(., beta)  ==>  LayerNormalization(x, gamma
         or ones, beta, axis=-k, epsilon=eps). Also two equal Sub(x, mean) nodes, one
         squared, one divided.
      2. `rms-norm` (opset >= 23): n = x / Sqrt(ReduceMean(Pow(x, 2) | Mul(x, x)) + eps)
         (Div or Mul by Reciprocal), then optionally Mul(n, gamma)  ==>
         RMSNormalization(x, gamma or ones, axis=-k, epsilon=eps).

    Conditions: both ReduceMeans keep dims and reduce the same trailing axes [-k..-1]
    (attribute below opset 18, constant input from 18; positive axes need a known rank);
    x is float16/32/64 with static normalized dims (else `skipped-dynamic-shape`); eps is
    a one-element constant of x's dtype, the Pow exponent a constant 2. gamma and beta are
    constants of x's dtype whose shape, right-aligned, is the normalized dims or 1s (with
    leading 1s not beyond x's rank); they are reshaped/expanded to the normalized shape. A
    gamma or beta that is not such a constant is not absorbed (the core still fuses). Every
    intermediate has only the pattern's readers (d: the square and n) and is no graph output.
    Exact up to float re-association.
    """

    name = "fuse-layer-norm"
    summary = "fuse LayerNorm and RMSNorm spellings into LayerNormalization / RMSNormalization"
    stage = "fuse"
    exactness = "reassoc"
    opsets = (17, None)
    rules = RULES
