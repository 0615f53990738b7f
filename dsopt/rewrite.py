"""Rule kit for fusion passes: declarative op chains, `check` that explains, guarded rewrites.

A `Rule` declares its `pattern` as a chain of `Op`s from a root op (each node reads the
previous node's first output), a `check(match)` that returns `match.fail("reason")` when the
match cannot be rewritten, and a `rewrite(match, graph)` that returns the replacement nodes.
`RulePass` applies its `rules` over every graph (subgraphs included) in topological order,
to a fixed point, and counts `<rule-name>: n` fires in its statistics.

The kit carries the guard rails, so rules need not repeat them: every matched node is in the
default domain and in the same graph; every intermediate value has exactly one reader (the next
node of the chain, reading it once, in the declared input slot) and is no graph output (of any
graph); no matched node has another output that anything reads. `rewrite` is called only after
`check` succeeded, and the kit then swaps the matched nodes for the new ones (which must write
the chain's final tensor, so names seen by readers and graph outputs stay), drops `Constant`
nodes the swap orphaned, and nothing else. A chain that computes one of its own inputs may
instead set `match.forward` to it and return no nodes: its readers then read that input (the
chain's result must be no graph output).

`MatchTracer` records why rules did not fire; `explain(module, pass_)` runs a pass on a clone
with a tracer and returns the reasons per rule, best (deepest partial match) first.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.analysis import AnalysisManager, Shapes, TensorType
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import fresh_name, is_used, read_constant, redirect_readers, topological_order

__all__ = [
    "Match",
    "MatchResult",
    "MatchTracer",
    "Op",
    "Rule",
    "RulePass",
    "apply_rules",
    "explain",
]

logger = logging.getLogger(__name__)

#: Safety net against rules that keep re-matching their own output.
_MAX_SWEEPS = 64

_DEFAULT_DOMAINS = ("", "ai.onnx")

Dim = int | str | None


@dataclasses.dataclass(frozen=True)
class MatchResult:
    """The outcome of matching or checking: success, or a failure with its reason.

    `stat` names a statistic the failure is counted under (once per root node, e.g.
    `skipped-rank`); `depth` is how far the match got (matched nodes, plus one once the
    whole chain matched and `check` ran), which ranks reasons in `MatchTracer`.
    """

    ok: bool
    reason: str = ""
    stat: str | None = None
    depth: int = 0

    @classmethod
    def success(cls) -> MatchResult:
        """A successful match."""
        return cls(True)

    @classmethod
    def fail(cls, reason: str, *, stat: str | None = None, depth: int = 0) -> MatchResult:
        """A failed match that says why."""
        return cls(False, reason, stat, depth)

    def __bool__(self) -> bool:
        return self.ok


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of a chain pattern: the op types it accepts and how it reads the previous node.

    `slot` is the input index at which the node reads the previous node's output (None: any
    one slot, e.g. either operand of Add). The root `Op`'s slot is ignored.
    """

    types: tuple[str, ...]
    slot: int | None = 0

    def __init__(self, *types: str, slot: int | None = 0) -> None:
        object.__setattr__(self, "types", tuple(types))
        object.__setattr__(self, "slot", slot)

    def __str__(self) -> str:
        return "|".join(self.types)


class _Facts:
    """Shared, lazily computed facts for the rules of one pass run."""

    def __init__(self, module: Module, analyses: AnalysisManager) -> None:
        self.module = module
        self.opset = module.opset
        self._analyses = analyses
        self._shapes: dict[str, TensorType] | None = None
        self.protected: set[int] = set()
        self.names: set[str] = set()
        for graph in module.graphs():
            self.protected.update(id(t) for t in graph.outputs)
            self.names.update(t.name for t in [*graph.inputs, *graph.outputs] if t.name)
            for node in graph.nodes:
                self.names.update(t.name for t in [*node.inputs, *node.outputs] if t.name)

    @property
    def shapes(self) -> dict[str, TensorType]:
        if self._shapes is None:
            self._shapes = self._analyses.get(Shapes)
        return self._shapes

    def fresh(self, hint: str) -> str:
        return fresh_name(self.names, hint or "fused")


@dataclasses.dataclass
class Match:
    """A matched chain: `nodes` from root to last, in `graph`, plus facts for `check`.

    `check` may stash computed values in `values` for `rewrite` (computing is fine; mutating
    the graph is not). A `rewrite` that returns no nodes sets `forward`, the tensor the
    chain's readers read instead of its result.
    """

    rule: Rule
    nodes: tuple[gs.Node, ...]
    graph: gs.Graph
    facts: _Facts
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    forward: gs.Tensor | None = None

    @property
    def root(self) -> gs.Node:
        """The first node of the chain."""
        return self.nodes[0]

    @property
    def last(self) -> gs.Node:
        """The last node of the chain."""
        return self.nodes[-1]

    @property
    def output(self) -> gs.Tensor:
        """The chain's result: the last node's first output (the replacement must write it)."""
        return self.nodes[-1].outputs[0]

    @property
    def opset(self) -> int:
        """The module's default-domain opset."""
        return self.facts.opset

    def fail(self, reason: str, *, stat: str | None = None) -> MatchResult:
        """A failed check with its reason (and optionally the statistic it counts under)."""
        return MatchResult.fail(reason, stat=stat, depth=len(self.nodes) + 1)

    def ok(self) -> MatchResult:
        """A successful check."""
        return MatchResult.success()

    def side_input(self, index: int) -> gs.Tensor:
        """The input of binary `nodes[index]` that the previous node does not feed."""
        node, fed = self.nodes[index], self.nodes[index - 1].outputs[0]
        return next(t for t in node.inputs if t is not fed)

    @staticmethod
    def constant(tensor: gs.Tensor | None) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant output), else None."""
        if tensor is None or not tensor.name:
            return None
        return read_constant(tensor)

    def shape(self, tensor: gs.Tensor) -> tuple[Dim, ...] | None:
        """The shape of `tensor` (ints, symbols or None per dim), or None for unknown rank."""
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        found = self.facts.shapes.get(tensor.name)
        if found is not None and found.shape is not None:
            return found.shape
        return tuple(tensor.shape) if tensor.shape is not None else None

    def dtype(self, tensor: gs.Tensor) -> np.dtype[Any] | None:
        """The element type of `tensor` (constant, shape inference, or declared), else None."""
        if isinstance(tensor, gs.Constant):
            return np.dtype(tensor.dtype)
        found = self.facts.shapes.get(tensor.name)
        dtype = found.dtype if found is not None and found.dtype is not None else tensor.dtype
        try:
            return None if dtype is None else np.dtype(dtype)
        except TypeError:  # graphsurgeon keeps some types as onnx enum values
            return None

    def rank(self, tensor: gs.Tensor) -> int | None:
        """The rank of `tensor`, or None when unknown."""
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def new_constant(self, hint: str, array: np.ndarray) -> gs.Constant:
        """A new initializer with a module-unique name derived from `hint`."""
        return gs.Constant(self.facts.fresh(hint), np.ascontiguousarray(array))

    def new_node(
        self,
        op: str,
        inputs: Sequence[gs.Tensor],
        attrs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        domain: str | None = None,
    ) -> gs.Node:
        """A node writing the chain's final tensor, named after the root by default."""
        return gs.Node(
            op,
            name=self.root.name if name is None else name,
            attrs=dict(attrs or {}),
            inputs=list(inputs),
            outputs=[self.output],
            domain=domain,
        )


class Rule:
    """A rewrite rule: a chain `pattern`, a `check` that explains failures, a `rewrite`.

    Subclasses set `name` (kebab-case; the statistic counting fires), `pattern` (a tuple of
    `Op`, root first) and optionally `stats` (failure statistics their checks may count),
    `requires` (non-standard ops it emits, `domain::Op`: the rule runs only for targets that
    declare them all) and `min_opset` (the default-domain opset its replacement needs; the
    kit refuses matches below it, and `upgrade-opset` reads it), and implement `check` and
    `rewrite`. `check` never raises and never mutates; it returns
    `match.fail("reason")` or `match.ok()`. `rewrite` returns the replacement nodes, which
    must write `match.output`; the kit removes the matched nodes.
    """

    name: ClassVar[str] = ""
    pattern: ClassVar[tuple[Op, ...]] = ()
    stats: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    min_opset: ClassVar[int] = 1

    def check(self, match: Match) -> MatchResult:
        """Whether `match` can be rewritten; a failure carries the reason."""
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:  # pragma: no cover
        """The nodes replacing `match.nodes`; the last value they write is `match.output`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class MatchTracer:
    """Records, per rule, why matches failed; `report()` lists reasons best first.

    Only nodes whose op is the rule's root op are traced, so a report speaks about the
    candidates a reader would look at.
    """

    def __init__(self, limit: int = 20) -> None:
        self.limit = limit
        self.fired: collections.Counter[str] = collections.Counter()
        self._failures: dict[str, dict[str, int]] = collections.defaultdict(dict)
        self._order: dict[str, int] = {}

    def record(self, rule: Rule, root: gs.Node, result: MatchResult) -> None:
        """Notes one failure of `rule` at `root`."""
        label = f"{root.op} '{root.name}'" if root.name else root.op
        reason = f"{label}: {result.reason}"
        seen = self._failures[rule.name]
        seen[reason] = max(seen.get(reason, 0), result.depth)
        self._order.setdefault(reason, len(self._order))

    def report(self, rules: Iterable[Rule] = ()) -> dict[str, list[str]]:
        """Failure reasons per rule name, deepest partial match first (every rule listed)."""
        names = [rule.name for rule in rules] or list(self._failures)
        out: dict[str, list[str]] = {}
        for name in names:
            seen = self._failures.get(name, {})
            ranked = sorted(seen, key=lambda r: (-seen[r], self._order[r]))
            out[name] = ranked[: self.limit]
        return out


@dataclasses.dataclass(frozen=True)
class RulePass(Pass):
    """A pass made of rules: subclasses set `rules` (a tuple of `Rule` instances).

    Statistics: one `<rule-name>` count per rule, plus the failure statistics the rules
    declare in `stats` (each root node counted once).
    """

    rules: ClassVar[tuple[Rule, ...]] = ()

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Applies the rules to a fixed point over every graph."""
        return apply_rules(self.rules, module, ctx)


def apply_rules(
    rules: Sequence[Rule],
    module: Module,
    ctx: PassContext,
    tracer: MatchTracer | None = None,
) -> PassResult:
    """Applies `rules` to every graph of `module`, sweeping in topological order until none fires.

    Rules are tried in order at each node; the first that fires wins and the sweep moves on.
    Rules whose `requires` the target (`ctx.fused_ops`) does not declare are left out.
    """
    analyses = ctx.analyses if ctx.analyses is not None else AnalysisManager(module)
    facts = _Facts(module, analyses)
    by_root: dict[str, list[Rule]] = collections.defaultdict(list)
    for rule in rules:
        if not rule.name or len(rule.pattern) < 1:
            raise TypeError(f"Pass developer: rule {rule!r} needs a name and a pattern")
        if not ctx.supports(*rule.requires):
            continue
        for op in rule.pattern[0].types:
            by_root[op].append(rule)
    fired: collections.Counter[str] = collections.Counter()
    skipped: dict[str, dict[int, gs.Node]] = collections.defaultdict(dict)
    for graph in list(module.graphs()):
        for _ in range(_MAX_SWEEPS):
            if not _sweep(graph, by_root, facts, fired, skipped, tracer):
                break
        else:
            logger.warning(
                "rules %s still fire after %d sweeps of graph '%s'; a rule may re-create "
                "its own pattern",
                ", ".join(r.name for r in rules),
                _MAX_SWEEPS,
                graph.name,
            )
    stats: dict[str, int | float | str] = {rule.name: fired[rule.name] for rule in rules}
    for rule in rules:
        for stat in rule.stats:
            stats[stat] = len(skipped.get(stat, {}))
    if tracer is not None:
        tracer.fired.update(fired)
    return PassResult(sum(fired.values()) > 0, stats)


def _sweep(
    graph: gs.Graph,
    by_root: dict[str, list[Rule]],
    facts: _Facts,
    fired: collections.Counter[str],
    skipped: dict[str, dict[int, gs.Node]],
    tracer: MatchTracer | None,
) -> int:
    """One topological sweep over `graph`; returns how many rules fired."""
    count = 0
    members = {id(n) for n in graph.nodes}
    for node in topological_order(graph):
        if id(node) not in members:
            continue  # replaced earlier in this sweep
        for rule in by_root.get(node.op, ()):
            found = _match(rule, node, graph, members, facts)
            if isinstance(found, Match):
                result = rule.check(found)
                if result.ok:
                    _replace(found, rule.rewrite(found, graph), members)
                    fired[rule.name] += 1
                    count += 1
                    break
            else:
                result = found
            if result.stat is not None:
                skipped[result.stat][id(node)] = node
            if tracer is not None:
                tracer.record(rule, node, result)
    return count


def _label(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'" if node.name else node.op


def _match(
    rule: Rule, root: gs.Node, graph: gs.Graph, members: set[int], facts: _Facts
) -> Match | MatchResult:
    """Follows `rule.pattern` from `root`, enforcing the kit's guard rails."""
    if (root.domain or "") not in _DEFAULT_DOMAINS:
        return MatchResult.fail(f"domain '{root.domain}' is not ai.onnx", depth=0)
    if facts.opset < rule.min_opset:
        return MatchResult.fail(f"needs opset {rule.min_opset} (model: {facts.opset})", depth=0)
    nodes = [root]
    for op in rule.pattern[1:]:
        depth = len(nodes)
        prev = nodes[-1]
        if not prev.outputs:
            return MatchResult.fail(f"{_label(prev)} has no output", depth=depth)
        value = prev.outputs[0]
        readers = list(value.outputs)
        if not any(r.op in op.types for r in readers):
            found = ", ".join(sorted({r.op for r in readers})) or "nothing"
            return MatchResult.fail(
                f"output '{value.name}' of {_label(prev)} feeds {found}, not {op}", depth=depth
            )
        if id(value) in facts.protected:
            return MatchResult.fail(f"intermediate '{value.name}' is a graph output", depth=depth)
        if len(readers) != 1:
            return MatchResult.fail(
                f"intermediate '{value.name}' has {len(readers)} readers", depth=depth
            )
        (nxt,) = readers
        if id(nxt) not in members:
            return MatchResult.fail(
                f"intermediate '{value.name}' is read in another graph", depth=depth
            )
        if (nxt.domain or "") not in _DEFAULT_DOMAINS:
            return MatchResult.fail(f"{_label(nxt)} is not in ai.onnx", depth=depth)
        slots = [i for i, t in enumerate(nxt.inputs) if t is value]
        if len(slots) != 1 or (op.slot is not None and slots[0] != op.slot):
            return MatchResult.fail(
                f"{_label(nxt)} reads '{value.name}' at inputs {slots}, "
                f"not {'once' if op.slot is None else f'at {op.slot}'}",
                depth=depth,
            )
        nodes.append(nxt)
    for node in nodes:
        if not node.outputs:
            return MatchResult.fail(f"{_label(node)} has no output", depth=len(nodes))
        for extra in node.outputs[1:]:
            if is_used(graph, extra) or id(extra) in facts.protected:
                return MatchResult.fail(
                    f"output '{extra.name}' of {_label(node)} is used", depth=len(nodes)
                )
    return Match(rule, tuple(nodes), graph, facts)


def _replace(match: Match, new_nodes: Sequence[gs.Node], members: set[int]) -> None:
    """Swaps the matched nodes for `new_nodes` (placed where the last one was)."""
    output = match.output
    if not new_nodes and match.forward is not None and id(output) not in match.facts.protected:
        redirect_readers(output, match.forward)
    elif not any(t is output for n in new_nodes for t in n.outputs):
        raise TypeError(
            f"Pass developer: rule '{match.rule.name}' must return nodes writing "
            f"'{output.name}', the chain's result (or none, with `match.forward` set)"
        )
    graph = match.graph
    old_ids = {id(n) for n in match.nodes}
    old_inputs = [t for n in match.nodes for t in n.inputs]
    for node in match.nodes:
        node.inputs.clear()
        node.outputs.clear()
    rebuilt: list[gs.Node] = []
    for node in graph.nodes:
        if node is match.last:
            rebuilt.extend(new_nodes)
        elif id(node) not in old_ids:
            rebuilt.append(node)
    members.difference_update(old_ids)
    members.update(id(n) for n in new_nodes)
    orphans = {
        id(t.inputs[0]): t.inputs[0]
        for t in old_inputs
        if isinstance(t, gs.Variable)
        and len(t.inputs) == 1
        and t.inputs[0].op == "Constant"
        and id(t.inputs[0]) in members
        and not is_used(graph, t)
        and id(t) not in match.facts.protected
    }
    for node in orphans.values():
        node.outputs.clear()
    members.difference_update(orphans)
    graph.nodes = [n for n in rebuilt if id(n) not in orphans]


def explain(
    module: Module, pass_: RulePass, ctx: PassContext | None = None
) -> dict[str, list[str]]:
    """Why each rule of `pass_` did not fire on `module`: reasons per rule, best first.

    Runs the pass on a clone (the module is left alone), so reasons reflect matches that
    earlier fusions enabled too. A rule that fired everywhere it matched has an empty list.
    `ctx` carries the target's capabilities (default: target-independent).
    """
    twin = module.clone()
    ctx = dataclasses.replace(ctx) if ctx is not None else PassContext()
    ctx.analyses = AnalysisManager(twin)
    tracer = MatchTracer()
    apply_rules(pass_.rules, twin, ctx, tracer)
    reasons = tracer.report(pass_.rules)
    for rule in pass_.rules:
        missing = [op for op in rule.requires if not ctx.supports(op)]
        if missing:
            ops = ", ".join(missing)
            reasons[rule.name] = [
                f"emits {ops}, which target '{ctx.target}' does not declare"
                if ctx.target
                else f"emits {ops}: runs only for targets that declare it "
                "(e.g. --target onnxruntime)"
            ]
    return reasons
