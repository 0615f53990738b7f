"""Fuse exporter-spelled activations (GELU, HardSigmoid, HardSwish, SiLU) into ONNX ops."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.rewrite import Match, MatchResult, Op, Rule, RulePass

__all__ = ["RULES", "FuseActivations"]

#: Relative tolerance for the spelled constants (sqrt(2), 0.044715, 1/6, ...).
RTOL = 1e-4

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_DOMAINS = ("", "ai.onnx")
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_MAX_DEGREE = 3
#: HardSwish is a standard op from this opset on.
_HARD_SWISH_OPSET = 14
#: onnxruntime (1.32) executes Swish only at opset 24 (the op is unchanged since).
_SWISH_MAX_OPSET = 24

Poly = dict[int, float]


def _close(value: float, expected: float) -> bool:
    return math.isfinite(value) and abs(value - expected) <= RTOL * abs(expected)


def _poly_close(poly: Poly, expected: Poly) -> bool:
    terms = {d: c for d, c in poly.items() if c != 0.0}
    return terms.keys() == expected.keys() and all(_close(terms[d], c) for d, c in expected.items())


def _poly_mul(a: Poly, b: Poly) -> Poly | None:
    out: Poly = {}
    for da, ca in a.items():
        for db, cb in b.items():
            if da + db > _MAX_DEGREE:
                return None
            out[da + db] = out.get(da + db, 0.0) + ca * cb
    return out


def _poly_add(a: Poly, b: Poly, sign: float = 1.0) -> Poly:
    out = dict(a)
    for d, c in b.items():
        out[d] = out.get(d, 0.0) + sign * c
    return out


class _Tree:
    """Reads an expression DAG downwards from the match's last node.

    Every node it absorbs besides the root obeys the kit's guard rails: default domain, in
    the match's graph, its output read by exactly one node exactly once and no graph output,
    no other output used. Helpers return the nodes they absorbed instead of recording them,
    so a failed alternative leaves nothing behind. Every constant it reads is remembered in
    `dtypes` and `ndim` (conservatively, failed alternatives included).
    """

    def __init__(self, match: Match) -> None:
        self.match = match
        self.root = match.last
        self.dtypes: set[np.dtype] = set()
        self.ndim = 0
        self._members: set[int] | None = None

    def producer(self, tensor: gs.Tensor, ops: Sequence[str]) -> gs.Node | None:
        """The node writing `tensor` when the match may absorb it and its op is in `ops`."""
        if tensor is self.root.outputs[0]:
            return self.root if self.root.op in ops else None
        if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        if node.op not in ops or (node.domain or "") not in _DOMAINS:
            return None
        protected = self.match.facts.protected
        if not node.outputs or node.outputs[0] is not tensor or id(tensor) in protected:
            return None
        readers = list(tensor.outputs)
        if len(readers) != 1 or sum(1 for t in readers[0].inputs if t is tensor) != 1:
            return None
        if any(t.outputs or id(t) in protected for t in node.outputs[1:]):
            return None
        if self._members is None:
            self._members = {id(n) for n in self.match.graph.nodes}
        return node if id(node) in self._members else None

    def scalar(self, tensor: gs.Tensor) -> float | None:
        """The value of a one-element float constant, else None."""
        value = self.match.constant(tensor)
        if value is None or value.size != 1 or value.dtype not in _FLOATS:
            return None
        self.dtypes.add(value.dtype)
        self.ndim = max(self.ndim, value.ndim)
        return float(value.reshape(-1)[0])

    def product(
        self, tensor: gs.Tensor, *, general: bool
    ) -> tuple[float, list[gs.Tensor], list[gs.Node]]:
        """Splits `tensor` into a coefficient times factors, over Mul and Div-by-constant.

        `general=False` only crosses a Mul with a constant operand.
        """
        node = self.producer(tensor, ("Mul", "Div"))
        if node is None or len(node.inputs) != 2:
            value = self.scalar(tensor)
            return (1.0, [tensor], []) if value is None else (value, [], [])
        first, second = node.inputs
        if node.op == "Div":
            divisor = self.scalar(second)
            if not divisor:
                return 1.0, [tensor], []
            coef, factors, nodes = self.product(first, general=general)
            return coef / divisor, factors, [*nodes, node]
        if not general and self.scalar(first) is None and self.scalar(second) is None:
            return 1.0, [tensor], []
        c1, f1, n1 = self.product(first, general=general)
        c2, f2, n2 = self.product(second, general=general)
        return c1 * c2, [*f1, *f2], [*n1, *n2, node]

    def total(self, tensor: gs.Tensor) -> tuple[float, list[gs.Tensor], list[gs.Node]]:
        """`tensor` as constant + sum(terms) over Add and Sub of a constant.

        An Add of two non-constants is one term: x may well be such a sum.
        """
        node = self.producer(tensor, ("Add", "Sub"))
        if node is None or len(node.inputs) != 2:
            value = self.scalar(tensor)
            return (0.0, [tensor], []) if value is None else (value, [], [])
        first, second = node.inputs
        if node.op == "Add" and self.scalar(first) is None and self.scalar(second) is None:
            return 0.0, [tensor], []
        if node.op == "Sub":
            value = self.scalar(second)
            if value is None:
                return 0.0, [tensor], []
            const, terms, nodes = self.total(first)
            return const - value, terms, [*nodes, node]
        c1, t1, n1 = self.total(first)
        c2, t2, n2 = self.total(second)
        return c1 + c2, [*t1, *t2], [*n1, *n2, node]

    def scaled(self, tensor: gs.Tensor) -> tuple[float, gs.Tensor, list[gs.Node]] | None:
        """`tensor` as k * t for one non-constant t (Mul/Div by constants only)."""
        coef, factors, nodes = self.product(tensor, general=False)
        if len(factors) != 1:
            return None
        return coef, factors[0], nodes

    def affine(self, tensor: gs.Tensor) -> tuple[float, float, gs.Tensor, list[gs.Node]] | None:
        """`tensor` as a * x + b for one non-constant x: (a, b, x, nodes)."""
        const, terms, nodes = self.total(tensor)
        if len(terms) != 1:
            return None
        found = self.scaled(terms[0])
        if found is None:
            return None
        coef, x, more = found
        return coef, const, x, [*nodes, *more]

    def poly(self, tensor: gs.Tensor, x: gs.Tensor) -> tuple[Poly, list[gs.Node]] | None:
        """`tensor` as a polynomial in `x` (degree <= 3) over Add/Sub/Mul/Div/Pow."""
        if tensor is x:
            return {1: 1.0}, []
        value = self.scalar(tensor)
        if value is not None:
            return {0: value}, []
        node = self.producer(tensor, ("Add", "Sub", "Mul", "Div", "Pow"))
        if node is None or len(node.inputs) != 2:
            return None
        first = self.poly(node.inputs[0], x)
        if first is None:
            return None
        if node.op == "Pow":
            exponent = self.match.constant(node.inputs[1])
            if exponent is None or exponent.size != 1:
                return None
            power = float(exponent.reshape(-1)[0])
            if power not in (1.0, 2.0, 3.0):
                return None
            self.ndim = max(self.ndim, exponent.ndim)
            result: Poly | None = {0: 1.0}
            for _ in range(int(power)):
                result = _poly_mul(result, first[0]) if result is not None else None
            return None if result is None else (result, [*first[1], node])
        if node.op == "Div":
            divisor = self.scalar(node.inputs[1])
            if not divisor:
                return None
            return {d: c / divisor for d, c in first[0].items()}, [*first[1], node]
        second = self.poly(node.inputs[1], x)
        if second is None:
            return None
        nodes = [*first[1], *second[1], node]
        if node.op == "Mul":
            product = _poly_mul(first[0], second[0])
            return None if product is None else (product, nodes)
        return _poly_add(first[0], second[0], -1.0 if node.op == "Sub" else 1.0), nodes

    def clamp(self, tensor: gs.Tensor) -> tuple[gs.Tensor, float, float, list[gs.Node]]:
        """Peels Clip/Relu/Max/Min-by-constant layers: (inner, low, high, nodes)."""
        low, high, nodes = -math.inf, math.inf, []
        while True:
            node = self.producer(tensor, ("Clip", "Relu", "Max", "Min"))
            bounds = None if node is None else self._bounds(node)
            if bounds is None:
                return tensor, low, high, nodes
            inner, lo, hi = bounds
            low, high = max(low, lo), min(high, hi)
            if low > high:  # disjoint ranges: a constant, not a clamp
                return tensor, -math.inf, math.inf, []
            nodes.append(node)
            tensor = inner

    def _bounds(self, node: gs.Node) -> tuple[gs.Tensor, float, float] | None:
        if not node.inputs:
            return None
        if node.op == "Relu":
            return node.inputs[0], 0.0, math.inf
        if node.op == "Clip":
            if self.match.opset < 11:
                low = float(node.attrs.get("min", -math.inf))
                high = float(node.attrs.get("max", math.inf))
                return node.inputs[0], low, high
            limits = [-math.inf, math.inf]
            for i, tensor in enumerate(node.inputs[1:3]):
                if tensor.name:
                    value = self.scalar(tensor)
                    if value is None:
                        return None
                    limits[i] = value
            return node.inputs[0], limits[0], limits[1]
        if len(node.inputs) != 2:
            return None
        for inner, other in (node.inputs, node.inputs[::-1]):
            value = self.scalar(other)
            if value is not None and self.scalar(inner) is None:
                if node.op == "Max":
                    return inner, value, math.inf
                return inner, -math.inf, value
        return None

    def hard_sigmoid(
        self, tensor: gs.Tensor, scale: float, x: gs.Tensor | None
    ) -> tuple[float, float, gs.Tensor, list[gs.Node]] | None:
        """`scale * tensor` as HardSigmoid(x): (alpha, beta, x, nodes), or None.

        `tensor` must be clamp(a * x + b, 0, h) with scale * h == 1.
        """
        inner, low, high, nodes = self.clamp(tensor)
        if not nodes or low != 0.0 or not math.isfinite(high) or high <= 0.0:
            return None
        if not _close(scale * high, 1.0):
            return None
        found = self.affine(inner)
        if found is None or found[0] == 0.0 or (x is not None and found[2] is not x):
            return None
        coef, const, var, more = found
        return coef * scale, const * scale, var, [*nodes, *more]

    def fits(self, x: gs.Tensor) -> str | None:
        """Why `x` cannot stand for the whole expression (dtype, broadcasting), else None."""
        dtype = self.match.dtype(x)
        dtypes = set(self.dtypes) | ({dtype} if dtype is not None else set())
        if not dtypes:
            return "the input's dtype is unknown"
        if len(dtypes) != 1 or next(iter(dtypes)) not in _FLOATS:
            return f"dtypes {sorted(str(d) for d in dtypes)} are not one float type"
        if self.ndim:
            rank = self.match.rank(x)
            if rank is None or rank < self.ndim:
                return "a constant could broadcast the input to a higher rank"
        return None


def _finish(match: Match, tree: _Tree, x: gs.Tensor, nodes: list[gs.Node]) -> MatchResult:
    """Checks dtype and broadcasting, then records the nodes the rewrite replaces."""
    reason = tree.fits(x)
    if reason is not None:
        return match.fail(reason)
    last = match.last
    match.values["x"] = x
    match.values["nodes"] = (*[n for n in nodes if n is not last], last)
    return match.ok()


def _take_nodes(match: Match) -> None:
    """Makes the kit replace every absorbed node, not only the root.

    The kit's chains cannot express a DAG whose input feeds several branches, so `check`
    matches from the last node downwards and the rewrite widens `match.nodes` to the whole
    expression (the last node stays last, so the kit keeps its output tensor).
    """
    match.nodes = tuple(match.values["nodes"])


class _Gelu(Rule):
    """c * x * (b + k * F(u)) with c*b = c*k = 0.5 and u a polynomial in x."""

    function: str = ""
    approximate: str | None = None
    pattern = (Op("Mul", "Div"),)

    def argument(self) -> Poly:  # pragma: no cover
        raise NotImplementedError

    def check(self, match: Match) -> MatchResult:
        """Gelu needs opset 20; every spelled constant within `RTOL`."""
        if match.opset < 20:
            return match.fail("needs opset 20")
        tree = _Tree(match)
        coef, factors, nodes = tree.product(match.output, general=True)
        if len(factors) != 2:
            return match.fail(f"the product has {len(factors)} non-constant factors, not 2")
        for x, rest in (factors, factors[::-1]):
            const, terms, sum_nodes = tree.total(rest)
            if not sum_nodes or len(terms) != 1:
                continue
            found = tree.scaled(terms[0])
            if found is None:
                continue
            scale, value, scale_nodes = found
            node = tree.producer(value, (self.function,))
            if node is None or len(node.inputs) != 1:
                continue
            argument = tree.poly(node.inputs[0], x)
            if argument is None:
                continue
            if not (_close(coef * const, 0.5) and _close(coef * scale, 0.5)):
                return match.fail(f"the constants give {coef * const:g} + {coef * scale:g} * F")
            if not _poly_close(argument[0], self.argument()):
                return match.fail(f"the {self.function} argument is {argument[0]}")
            every = [*nodes, *sum_nodes, *scale_nodes, node, *argument[1]]
            return _finish(match, tree, x, every)
        return match.fail(f"no factor is 1 + {self.function}(...) of the other factor")

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """One Gelu node reading x."""
        name = match.last.name
        _take_nodes(match)
        attrs = {} if self.approximate is None else {"approximate": self.approximate}
        return [match.new_node("Gelu", [match.values["x"]], attrs, name=name)]


class GeluErf(_Gelu):
    """x * 0.5 * (1 + Erf(x / sqrt(2)))  ==>  Gelu(x) (any order of the factors)."""

    name = "gelu-erf"
    min_opset = 20
    function = "Erf"

    def argument(self) -> Poly:
        return {1: _SQRT_HALF}


class GeluTanh(_Gelu):
    """0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  ==>  Gelu(x, "tanh")."""

    name = "gelu-tanh"
    min_opset = 20
    function = "Tanh"
    approximate = "tanh"

    def argument(self) -> Poly:
        return {1: _SQRT_2_OVER_PI, 3: _SQRT_2_OVER_PI * _GELU_CUBIC}


class HardSwish(Rule):
    """x * HardSigmoid(x) or x * clamp(x + 3, 0, 6) / 6  ==>  HardSwish(x).

    The HardSigmoid must have alpha 1/6 and beta 0.5 (within `RTOL`).
    """

    name = "hard-swish"
    min_opset = 14
    pattern = (Op("Mul", "Div"),)

    def check(self, match: Match) -> MatchResult:
        """HardSwish needs opset 14."""
        if match.opset < _HARD_SWISH_OPSET:
            return match.fail("needs opset 14")
        return _hard_swish(match)

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """One HardSwish node reading x."""
        name = match.last.name
        _take_nodes(match)
        return [match.new_node("HardSwish", [match.values["x"]], name=name)]


def _hard_swish(match: Match) -> MatchResult:
    tree = _Tree(match)
    coef, factors, nodes = tree.product(match.output, general=True)
    if len(factors) != 2:
        return match.fail(f"the product has {len(factors)} non-constant factors, not 2")
    for x, rest in (factors, factors[::-1]):
        node = tree.producer(rest, ("HardSigmoid",))
        if node is not None and len(node.inputs) == 1 and node.inputs[0] is x:
            if not _close(coef, 1.0):  # a scaled HardSigmoid saturates at coef, not 1
                return match.fail(f"x * HardSigmoid(x) is scaled by {coef:g}")
            alpha = float(node.attrs.get("alpha", 0.2))
            beta = float(node.attrs.get("beta", 0.5))
            found = (alpha, beta, x, [node])
        else:
            found = tree.hard_sigmoid(rest, coef, x)
        if found is None:
            continue
        alpha, beta, _, more = found
        if not (_close(alpha, 1.0 / 6.0) and _close(beta, 0.5)):
            return match.fail(f"HardSigmoid alpha {alpha:g}, beta {beta:g} are not 1/6, 0.5")
        return _finish(match, tree, x, [*nodes, *more])
    return match.fail("no factor is HardSigmoid of the other factor")


class HardSwishMul(Rule):
    """x * clamp(x + 3, 0, 6) / 6 before opset 14  ==>  Mul(x, HardSigmoid(x, 1/6, 0.5)).

    Spelled as for `hard-swish` (which takes over from opset 14, where HardSwish exists);
    fires only when the spelling has more nodes than the two it becomes.
    """

    name = "hard-swish-mul"
    min_opset = 6
    pattern = (Op("Mul", "Div"),)

    def check(self, match: Match) -> MatchResult:
        """Opset 6 to 13, and more than two nodes to replace."""
        if match.opset >= _HARD_SWISH_OPSET:
            return match.fail("HardSwish exists from opset 14: left to hard-swish")
        result = _hard_swish(match)
        if result.ok and len(match.values["nodes"]) <= 2:
            return match.fail("already x * HardSigmoid(x)")
        return result

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """HardSigmoid(x, 1/6, 0.5) and the Mul of x by it."""
        name = match.last.name
        _take_nodes(match)
        x = match.values["x"]
        stem = name or "hard_swish"
        gate = gs.Variable(match.facts.fresh(f"{stem}_gate"), dtype=x.dtype, shape=x.shape)
        attrs = {"alpha": 1.0 / 6.0, "beta": 0.5}
        hard_sigmoid = gs.Node(
            "HardSigmoid", match.facts.fresh(f"{stem}_hard_sigmoid"), attrs, [x], [gate]
        )
        return [hard_sigmoid, match.new_node("Mul", [x, gate], name=name)]


class HardSigmoid(Rule):
    """clamp(a * x + b, 0, h) * s with s * h = 1  ==>  HardSigmoid(x, alpha=a*s, beta=b*s).

    Covers Clip(x + 3, 0, 6) / 6, Relu6-style Min/Max spellings and * (1/6). From opset 14
    it leaves x * HardSigmoid-shaped products to `hard-swish`.
    """

    name = "hard-sigmoid"
    min_opset = 6
    pattern = (Op("Mul", "Div", "Clip", "Min", "Max"),)

    def check(self, match: Match) -> MatchResult:
        """HardSigmoid needs opset 6."""
        if match.opset < 6:
            return match.fail("needs opset 6")
        tree = _Tree(match)
        found = tree.scaled(match.output)
        if found is None:
            return match.fail("not a constant multiple of one value")
        scale, tensor, nodes = found
        shaped = tree.hard_sigmoid(tensor, scale, None)
        if shaped is None:
            return match.fail("not clamp(a * x + b, 0, h) / h")
        alpha, beta, x, more = shaped
        if len(nodes) + len(more) < 2:
            return match.fail("a lone Clip(x, 0, 1) stays a Clip (nothing to fuse)")
        if match.opset >= 14 and self._inside_hard_swish(match):
            return match.fail("left to hard-swish")
        match.values["alpha"], match.values["beta"] = alpha, beta
        return _finish(match, tree, x, [*nodes, *more])

    @staticmethod
    def _inside_hard_swish(match: Match) -> bool:
        """Whether a Mul/Div chain above the match is a HardSwish of the same x."""
        value, protected = match.output, match.facts.protected
        while len(value.outputs) == 1 and id(value) not in protected:
            reader = value.outputs[0]
            if reader.op not in ("Mul", "Div") or (reader.domain or "") not in _DOMAINS:
                return False
            if not reader.outputs or not any(n is reader for n in match.graph.nodes):
                return False
            if _hard_swish(Match(match.rule, (reader,), match.graph, match.facts)).ok:
                return True
            value = reader.outputs[0]
        return False

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """One HardSigmoid node reading x."""
        name = match.last.name
        _take_nodes(match)
        attrs = {"alpha": match.values["alpha"], "beta": match.values["beta"]}
        return [match.new_node("HardSigmoid", [match.values["x"]], attrs, name=name)]


class Silu(Rule):
    """x * Sigmoid(x) or x * Sigmoid(a * x)  ==>  Swish(x, alpha=a) (either operand order).

    Swish needs opset 24; onnxruntime 1.32 has no Swish kernel at later opsets, so those
    are left alone too.
    """

    name = "silu"
    min_opset = 24
    pattern = (Op("Mul"),)

    def check(self, match: Match) -> MatchResult:
        """One operand is Sigmoid of the other one times a constant (or of it alone)."""
        if match.opset > _SWISH_MAX_OPSET:
            return match.fail(f"onnxruntime runs no Swish at opset {match.opset}")
        root, tree = match.root, _Tree(match)
        if len(root.inputs) != 2:
            return match.fail("Mul has no two inputs")
        for x, rest in (root.inputs, root.inputs[::-1]):
            node = tree.producer(rest, ("Sigmoid",))
            if node is None or len(node.inputs) != 1:
                continue
            alpha, more = 1.0, []
            if node.inputs[0] is not x:
                found = tree.scaled(node.inputs[0])
                if found is None or found[1] is not x:
                    continue
                alpha, _, more = found
            if not math.isfinite(alpha):
                return match.fail(f"alpha {alpha} is not finite")
            match.values["alpha"] = alpha
            return _finish(match, tree, x, [*more, node])
        return match.fail("no operand is Sigmoid(a * x) of the other operand")

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """One Swish node reading x (alpha only when it is not 1)."""
        name = match.last.name
        _take_nodes(match)
        alpha = match.values["alpha"]
        attrs = {} if alpha == 1.0 else {"alpha": alpha}
        return [match.new_node("Swish", [match.values["x"]], attrs, name=name)]


#: The rules of `fuse-activations`, tried in this order at each root node.
RULES: tuple[Rule, ...] = (
    GeluErf(),
    GeluTanh(),
    HardSwish(),
    HardSwishMul(),
    HardSigmoid(),
    Silu(),
)


@dataclasses.dataclass(frozen=True)
class FuseActivations(RulePass):
    """Exporter-spelled activations  ==>  one standard ONNX op each.

    Rules (`RULES`, one statistic each; each is matched from the last node of the
    expression, in any order of commutative operands and constant factors):
      1. `gelu-erf`: x * 0.5 * (1 + Erf(x / sqrt(2))) (Div by sqrt(2) or Mul by 1/sqrt(2),
         the 0.5 anywhere in the product)  ==>  Gelu(x); opset >= 20.
      2. `gelu-tanh`: 0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) (Pow(x, 3)
         or x*x*x)  ==>  Gelu(x, approximate="tanh"); opset >= 20.
      3. `hard-swish`: x * HardSigmoid(x) with alpha 1/6 and beta 0.5, or
         x * clamp(x + 3, 0, 6) / 6  ==>  HardSwish(x); opset >= 14.
      4. `hard-swish-mul`: the `hard-swish` spellings of three nodes or more (e.g. PP-OCR's
         x * Clip(x + 3, 0, 6) / 6)  ==>  Mul(x, HardSigmoid(x, 1/6, 0.5)); opset 6 to 13.
      5. `hard-sigmoid`: clamp(a * x + b, 0, h) * s with s * h = 1 (Clip(x + 3, 0, 6) / 6,
         Relu/Min/Max spellings, * (1/6))  ==>  HardSigmoid(x, a*s, b*s); opset >= 6.
      6. `silu`: x * Sigmoid(x) or x * Sigmoid(a * x) (Mul or Div by a constant)  ==>
         Swish(x, alpha=a); opset 24 (onnxruntime 1.32 runs no Swish at later opsets).

    Constants match within a relative `RTOL` of 1e-4 and must be one-element floats that
    cannot broadcast x to a higher rank; every intermediate has exactly one reader and is no
    graph output (x itself may have many readers). Exact up to float re-association (and the
    constants' tolerance).
    """

    name = "fuse-activations"
    summary = "fuse GELU, HardSigmoid, HardSwish and SiLU spellings into ONNX ops"
    stage = "fuse"
    exactness = "reassoc"
    opsets = (6, None)
    rules = RULES
