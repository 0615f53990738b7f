"""Collapse chains of elementwise Mul/Add/Sub/Div/Neg by constants into at most two nodes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.rewrite import Match, MatchResult, Op, Rule, RulePass

__all__ = ["RULES", "FoldConstantChains"]

_OPS = ("Mul", "Add", "Sub", "Div", "Neg")
_DOMAINS = ("", "ai.onnx")
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: A collapsed constant bigger than this may not outgrow the operands it replaces.
MAX_BYTES = 1 << 20
#: A collapsed constant may hold at most this many times the largest operand's elements.
MAX_GROWTH = 2

Shape = tuple[int, ...]
Dim = int | str | None


@dataclasses.dataclass(frozen=True)
class _Step:
    """One node of a chain: y = f(source) with f in mul, div, add, sub, rsub (c - x), neg."""

    node: gs.Node
    kind: str
    value: np.ndarray | None
    source: gs.Tensor


@dataclasses.dataclass
class _Plan:
    """What a chain collapses to: y = scale_op(x, scale) then + shift (either may be absent).

    `scale_op` is "Mul", "Div", "Neg" (the shift, if any, becomes Sub(shift, x)) or None.
    """

    steps: list[_Step]
    x: gs.Tensor
    scale_op: str | None
    scale: np.ndarray | None
    shift: np.ndarray | None

    @property
    def nodes(self) -> int:
        """How many nodes the plan emits (0: the chain is the identity, readers read x)."""
        if self.scale_op == "Neg" and self.shift is not None:
            return 1  # Sub(shift, x)
        return (self.scale_op is not None) + (self.shift is not None)

    @property
    def family(self) -> str:
        """The rule the chain belongs to: mul-chain, add-chain or affine-chain."""
        kinds = {step.kind for step in self.steps}
        if kinds <= {"mul", "div", "neg"}:
            return "mul-chain"
        if kinds <= {"add", "sub"}:
            return "add-chain"
        return "affine-chain"


class _Chain:
    """Finds the chain of constant-operand Mul/Add/Sub/Div/Neg nodes ending at a match's root.

    Every node below the top is owned by the chain: default domain, in the match's graph, its
    output read by exactly one node exactly once (the next node of the chain) and no graph
    output. Every step has exactly one non-constant input; its constant is a finite float
    (a nonzero divisor for Div) of one dtype for the whole chain.
    """

    def __init__(self, match: Match) -> None:
        self.match = match
        self.members = {id(n) for n in match.graph.nodes}
        self.protected = match.facts.protected

    def step(self, node: gs.Node, dtype: np.dtype | None = None) -> _Step | None:
        """`node` as a chain step, or None when it cannot be one."""
        if node.op not in _OPS or (node.domain or "") not in _DOMAINS:
            return None
        if id(node) not in self.members or len(node.outputs) != 1:
            return None
        if node.op == "Neg":
            return _Step(node, "neg", None, node.inputs[0]) if len(node.inputs) == 1 else None
        if len(node.inputs) != 2:
            return None
        first, second = (self.match.constant(t) for t in node.inputs)
        if (first is None) == (second is None):
            return None
        value = second if first is None else first
        if value.dtype not in _FLOATS or (dtype is not None and value.dtype != dtype):
            return None
        if not np.all(np.isfinite(value)):
            return None
        source = node.inputs[0] if first is None else node.inputs[1]
        if node.op == "Div":
            if first is not None or not np.all(value != 0):
                return None  # c / x is no affine map; x / 0 is not a number
            return _Step(node, "div", value, source)
        if node.op == "Sub":
            return _Step(node, "sub" if first is None else "rsub", value, source)
        return _Step(node, node.op.lower(), value, source)

    def below(self, step: _Step, dtype: np.dtype | None) -> _Step | None:
        """The step writing `step.source` when the chain may absorb it."""
        tensor = step.source
        if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
            return None
        if id(tensor) in self.protected or len(tensor.outputs) != 1:
            return None
        if sum(1 for t in step.node.inputs if t is tensor) != 1:
            return None
        node = tensor.inputs[0]
        if not node.outputs or node.outputs[0] is not tensor:
            return None
        return self.step(node, dtype)

    def above(self, step: _Step, dtype: np.dtype | None) -> _Step | None:
        """The step reading `step`'s output when that one continues the chain."""
        tensor = step.node.outputs[0]
        if id(tensor) in self.protected or len(tensor.outputs) != 1:
            return None
        upper = self.step(tensor.outputs[0], dtype)
        if upper is None or upper.source is not tensor:
            return None
        lower = self.below(upper, dtype)
        return upper if lower is not None and lower.node is step.node else None

    def walk(self) -> list[_Step] | MatchResult:
        """The chain's steps, bottom first, ending at the match's root (its top)."""
        top = self.step(self.match.root)
        if top is None:
            return self.match.fail("not Mul/Add/Sub/Div/Neg of one tensor by a float constant")
        dtype = None if top.value is None else top.value.dtype
        upper = self.above(top, dtype)
        if upper is not None:
            return self.match.fail(f"the chain goes on at {upper.node.op} '{upper.node.name}'")
        steps = [top]
        while (lower := self.below(steps[-1], dtype)) is not None:
            if any(lower.node is s.node for s in steps):
                break  # a cycle (invalid graph)
            dtype = dtype if lower.value is None else lower.value.dtype
            steps.append(lower)
        steps.reverse()
        return steps


def _absorbs(shape: Sequence[Dim] | None, constant: Shape) -> bool:
    """Whether broadcasting a tensor of `shape` with `constant` surely leaves `shape` alone."""
    if shape is None or len(shape) < len(constant):
        return False
    dims = list(shape)[len(shape) - len(constant) :]
    pairs = zip(constant, dims, strict=True)
    return all(c == 1 or (isinstance(d, int) and d == c) for c, d in pairs)


def _constant(match: Match, hint: str, array: np.ndarray) -> gs.Constant:
    """A new initializer of `array`'s exact shape (`Match.new_constant` makes 0-d arrays 1-d)."""
    return gs.Constant(match.facts.fresh(hint), np.array(array, order="C"))


def _plan(match: Match, steps: list[_Step]) -> _Plan | str:
    """The collapsed form of `steps`, or why it cannot be computed safely."""
    values = [s.value for s in steps if s.value is not None]
    x = steps[0].source
    if not values:  # Neg only, any dtype
        return _Plan(steps, x, "Neg" if len(steps) % 2 else None, None, None)
    dtype = values[0].dtype
    if isinstance(x.dtype, np.dtype) and x.dtype != dtype:
        return f"the input is {x.dtype}, the constants {dtype}"
    scale, shift, divisor = np.ones(()), np.zeros(()), np.ones(())
    sign, multiplied = 1.0, False
    for step in steps:
        value = None if step.value is None else step.value.astype(np.float64)
        if step.kind == "mul":
            scale, shift, multiplied = scale * value, shift * value, True
        elif step.kind == "div":
            scale, shift, divisor = scale / value, shift / value, divisor * value
        elif step.kind == "add":
            shift = shift + value
        elif step.kind == "sub":
            shift = shift - value
        elif step.kind == "rsub":
            scale, shift, sign = -scale, value - shift, -sign
        else:  # neg
            scale, shift, sign = -scale, -shift, -sign
    try:
        full: Shape = np.broadcast_shapes(*(v.shape for v in values))
    except ValueError:
        return "the constants do not broadcast together"
    cast_scale = scale.astype(dtype)
    cast_shift = shift.astype(dtype)
    if not (np.all(np.isfinite(cast_scale)) and np.all(np.isfinite(cast_shift))):
        return f"the collapsed constants overflow {dtype}"
    if np.any((cast_scale == 0) & (scale != 0)):
        return f"the collapsed scale underflows {dtype}"
    plan = _Plan(steps, x, None, None, None if np.all(cast_shift == 0) else cast_shift)
    if np.all(cast_scale == 1):
        pass
    elif np.all(cast_scale == -1):
        plan.scale_op = "Neg"
    elif any(s.kind == "div" for s in steps) and not multiplied:
        plan.scale_op, plan.scale = "Div", (sign * divisor).astype(dtype)  # x / (a * b)
        if not np.all(np.isfinite(plan.scale)) or np.any(plan.scale == 0):
            return f"the collapsed divisor leaves {dtype}"
    else:
        plan.scale_op, plan.scale = "Mul", cast_scale
    return _keep_shape(match, plan, full, max(v.size for v in values))


def _keep_shape(match: Match, plan: _Plan, full: Shape, largest: int) -> _Plan | str:
    """Makes the plan's constants broadcast x as all operands did; checks their sizes.

    The operands broadcast x to broadcast(x, full); the plan's constants must do the same,
    which they surely do when x already has the full shape or they jointly span `full`.
    """
    emitted = [a for a in (plan.scale, plan.shift) if a is not None]
    spans = np.broadcast_shapes(*(a.shape for a in emitted)) == full if emitted else not full
    if not spans and not _absorbs(match.shape(plan.x), full):
        if plan.shift is not None:
            plan.shift = np.broadcast_to(plan.shift, np.broadcast_shapes(plan.shift.shape, full))
        elif plan.scale is not None:
            plan.scale = np.broadcast_to(plan.scale, np.broadcast_shapes(plan.scale.shape, full))
        else:  # identity or Neg: a Mul by +-1 keeps the broadcast
            dtype = next(s.value.dtype for s in plan.steps if s.value is not None)
            one = -1 if plan.scale_op == "Neg" else 1
            plan.scale_op, plan.scale = "Mul", np.full(full, one, dtype)
    for array in (plan.scale, plan.shift):
        if array is None:
            continue
        if array.size > MAX_GROWTH * largest:
            return f"a collapsed constant of {array.size} elements outgrows the operands"
        if array.nbytes > MAX_BYTES and array.size > largest:
            return f"a collapsed constant of {array.nbytes} bytes outgrows the operands"
    return plan


def best_plan(match: Match) -> _Plan | MatchResult:
    """The longest chain ending at the match's root that collapses into fewer nodes."""
    steps = _Chain(match).walk()
    if isinstance(steps, MatchResult):
        return steps
    if len(steps) < 2:
        return match.fail("a single node is no chain")
    reason = ""
    for start in range(len(steps) - 1):
        plan = _plan(match, steps[start:])
        if isinstance(plan, str):
            reason = reason or plan
            continue
        top_is_output = id(match.output) in match.facts.protected
        emitted = max(plan.nodes, 1 if top_is_output else 0)  # Identity keeps an output
        if emitted < len(plan.steps):
            return plan
        reason = reason or f"{len(plan.steps)} nodes are already minimal"
    return match.fail(reason)


class _ChainRule(Rule):
    """Collapses a chain of one family; see `FoldConstantChains`."""

    pattern = (Op(*_OPS),)
    min_opset = 7  # multidirectional broadcasting

    def check(self, match: Match) -> MatchResult:
        """The longest collapsible chain ending here belongs to this rule's family."""
        plan = best_plan(match)
        if isinstance(plan, MatchResult):
            return plan
        if plan.family != self.name:
            return match.fail(f"left to {plan.family}")
        match.values["plan"] = plan
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """At most a Mul/Div/Neg then an Add (or one Sub), writing the top's output."""
        plan: _Plan = match.values["plan"]
        top = match.root
        name = top.name
        match.nodes = tuple(step.node for step in plan.steps)
        stem = name or match.output.name or "chain"
        if plan.scale_op is None and plan.shift is None:
            if id(match.output) in match.facts.protected:
                return [match.new_node("Identity", [plan.x], name=name)]
            match.forward = plan.x
            return []
        if plan.scale_op == "Neg" and plan.shift is not None:
            shift = _constant(match, f"{stem}_shift", plan.shift)
            return [match.new_node("Sub", [shift, plan.x], name=name)]
        nodes: list[gs.Node] = []
        value = plan.x
        if plan.scale_op is not None:
            inputs = [plan.x]
            if plan.scale is not None:
                inputs.append(_constant(match, f"{stem}_scale", plan.scale))
            if plan.shift is None:
                return [match.new_node(plan.scale_op, inputs, name=name)]
            value = gs.Variable(match.facts.fresh(f"{stem}_scaled"))
            scaled = gs.Node(plan.scale_op, match.facts.fresh(f"{stem}_{plan.scale_op.lower()}"))
            scaled.inputs, scaled.outputs = inputs, [value]
            nodes.append(scaled)
        shift = _constant(match, f"{stem}_shift", plan.shift)
        nodes.append(match.new_node("Add", [value, shift], name=name))
        return nodes


class MulChain(_ChainRule):
    """Mul/Div/Neg by constants  ==>  one Mul (one Div when the chain only divides)."""

    name = "mul-chain"


class AddChain(_ChainRule):
    """Add/Sub of constants  ==>  one Add."""

    name = "add-chain"


class AffineChain(_ChainRule):
    """Mixed Mul/Div/Add/Sub/Neg by constants  ==>  Mul then Add (or Sub(c, x))."""

    name = "affine-chain"


#: The rules of `fold-constant-chains` (one fires per chain, by the ops it holds).
RULES: tuple[Rule, ...] = (MulChain(), AddChain(), AffineChain())


@dataclasses.dataclass(frozen=True)
class FoldConstantChains(RulePass):
    """Chains of elementwise ops by constants over one tensor x  ==>  the fewest nodes.

    A chain is a run of Mul, Add, Sub(x, c), Sub(c, x), Div(x, c) and Neg nodes, each with
    one non-constant input (the previous node's output, or x at the bottom) and a float
    constant (float16/32/64, finite, nonzero divisors); every intermediate has exactly one
    reader and is no graph output. It is matched at its top (whose output nothing in the
    chain reads) and becomes y = s * x + t, computed in float64 and cast to the dtype:

    Rules (`RULES`, one statistic each, by the ops of the collapsed chain):
      1. `mul-chain`: Mul/Div/Neg only  ==>  Mul(x, a*b); Div(x, a*b) when every scale
         divides (Div(Mul(x, a), b)  ==>  Mul(x, a/b)); Neg(x) for s = -1.
      2. `add-chain`: Add/Sub(x, c) only  ==>  Add(x, a+b) (Sub counts as Add of -c).
      3. `affine-chain`: both kinds (Sub(c, x) and Neg too)  ==>  Mul(x, s) then Add(t);
         Sub(t, x) for s = -1.

    The Mul is dropped when s is all ones and the Add when t is all zeros; an identity
    chain leaves Identity(x) when its top is a graph output, and otherwise its readers read
    x. A rule fires only when that leaves fewer nodes (Conv -> Mul(s) -> Add(b) stays for
    `fold-conv-scale` and `fold-bias-add`); when the whole chain cannot collapse, the
    longest shorter chain ending at its top is tried. The collapsed constants broadcast x as
    the operands did (they span the operands' joint broadcast shape, or x provably has it),
    hold at most twice the largest operand's elements, and above 1 MiB none more than it;
    they must stay finite and nonzero where they were (float16 overflow or underflow).
    Pipelines run it after `fuse-activations`, whose spellings (x * Clip(x + 3, 0, 6) / 6
    then a scale) it would otherwise fold apart. Exact up to float re-association
    (x / a / b becomes x / (a*b)).
    """

    name = "fold-constant-chains"
    summary = "collapse chains of Mul/Add/Sub/Div/Neg by constants into one Mul and one Add"
    stage = "fuse"
    exactness = "reassoc"
    opsets = (7, None)
    rules = RULES
