"""Merge chains of layout ops (Transpose, Reshape, Squeeze, Unsqueeze, Flatten) into one op."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.rewrite import Match, MatchResult, Op, Rule, RulePass

__all__ = ["RULES", "MergeLayoutChains"]

#: Ops that only regroup dims: the elements keep their row-major order.
_REGROUP = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")


def _perm(match: Match, node: gs.Node) -> list[int] | None:
    """The Transpose's perm (the default reverses the dims; needs the input rank)."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    rank = match.rank(node.inputs[0])
    return None if rank is None else list(range(rank))[::-1]


def _axes(match: Match, node: gs.Node) -> list[int] | str:
    """Squeeze/Unsqueeze axes (attribute before opset 13, input from 13); a reason on failure."""
    if match.opset < 13:
        axes = node.attrs.get("axes")
        return "no axes" if axes is None else [int(a) for a in axes]
    if len(node.inputs) < 2 or not node.inputs[1].name:
        return "no axes"
    value = match.constant(node.inputs[1])
    if value is None:
        return "axes are not constant"
    return [int(a) for a in np.asarray(value).reshape(-1)]


def _normalized(axes: list[int], rank: int | None) -> set[int] | None:
    """`axes` made non-negative for `rank` (None when a negative axis meets an unknown rank)."""
    if any(a < 0 for a in axes) and rank is None:
        return None
    return {a + rank if a < 0 else a for a in axes}  # type: ignore[operator]


class TransposeTranspose(Rule):
    """Transpose(Transpose(x, p), q)  ==>  Transpose(x, p[q]), or Identity(x) when p[q] is 1."""

    name = "transpose-transpose"
    pattern = (Op("Transpose"), Op("Transpose"))

    def check(self, match: Match) -> MatchResult:
        """Both perms known (a default perm needs the rank) and of one length."""
        first, second = (_perm(match, node) for node in match.nodes)
        if first is None or second is None:
            return match.fail("a Transpose has the default perm and the rank is unknown")
        if len(first) != len(second):
            return match.fail(f"perms {first} and {second} differ in length")
        match.values["perm"] = [first[q] for q in second]
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """One Transpose with the composed perm, or an Identity (eliminate-noops drops it)."""
        perm = match.values["perm"]
        source = match.root.inputs[0]
        if perm == list(range(len(perm))):
            return [match.new_node("Identity", [source])]
        return [match.new_node("Transpose", [source], {"perm": perm})]


def _target(match: Match, reshape: gs.Node) -> np.ndarray | MatchResult:
    """The last Reshape's target made independent of its input's shape (its 0s resolved)."""
    shape = match.constant(reshape.inputs[1])
    if shape is None:
        return match.fail("the Reshape shape is not constant")
    shape = np.asarray(shape, np.int64).reshape(-1)
    if match.opset >= 14 and int(reshape.attrs.get("allowzero", 0)):
        return shape  # a 0 is a literal zero dim
    if not (shape == 0).any():
        return shape
    middle = match.shape(reshape.inputs[0])
    resolved = shape.copy()
    for i in np.flatnonzero(shape == 0):
        dim = None if middle is None or i >= len(middle) else middle[i]
        if not isinstance(dim, int) or dim <= 0:
            return match.fail(f"Reshape shape copies dim {i} of its input, which is not static")
        resolved[i] = dim
    return resolved


class _RegroupReshape(Rule):
    """X(x) -> Reshape(s)  ==>  Reshape(x, s') for X that keeps the element order.

    s' is s with its copy-dims (0 entries, unless allowzero) taken from X's static output.
    """

    def check(self, match: Match) -> MatchResult:
        """A constant Reshape target whose 0 entries (if any) resolve to static dims."""
        target = _target(match, match.last)
        if isinstance(target, MatchResult):
            return target
        match.values["target"] = target
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """The last Reshape reading x (the original target tensor when unchanged)."""
        reshape = match.last
        target = match.values["target"]
        shape = reshape.inputs[1]
        if not np.array_equal(target, np.asarray(match.constant(shape)).reshape(-1)):
            shape = match.new_constant(f"{reshape.name or 'Reshape'}_shape", target)
        return [
            match.new_node(
                "Reshape", [match.root.inputs[0], shape], reshape.attrs, name=reshape.name
            )
        ]


class ReshapeReshape(_RegroupReshape):
    """Reshape(Reshape(x, s1), s2)  ==>  Reshape(x, s2')."""

    name = "reshape-reshape"
    pattern = (Op("Reshape"), Op("Reshape"))


class SqueezeReshape(_RegroupReshape):
    """Reshape(Squeeze(x), s)  ==>  Reshape(x, s')."""

    name = "squeeze-reshape"
    pattern = (Op("Squeeze"), Op("Reshape"))


class UnsqueezeReshape(_RegroupReshape):
    """Reshape(Unsqueeze(x), s)  ==>  Reshape(x, s')."""

    name = "unsqueeze-reshape"
    pattern = (Op("Unsqueeze"), Op("Reshape"))


class FlattenReshape(_RegroupReshape):
    """Reshape(Flatten(x), s)  ==>  Reshape(x, s')."""

    name = "flatten-reshape"
    pattern = (Op("Flatten"), Op("Reshape"))


class _ReshapeRegroup(Rule):
    """X(Reshape(x, s))  ==>  Reshape(x, S) where S is X's fully static output shape."""

    def check(self, match: Match) -> MatchResult:
        """The chain's output shape is fully static with no zero dims."""
        shape = match.shape(match.output)
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            return match.fail(f"the output shape {shape} is not fully static")
        match.values["target"] = np.array(shape, np.int64)
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """A Reshape of x to the static output shape."""
        reshape = match.root
        shape = match.new_constant(f"{reshape.name or 'Reshape'}_shape", match.values["target"])
        return [match.new_node("Reshape", [reshape.inputs[0], shape], name=reshape.name)]


class ReshapeSqueeze(_ReshapeRegroup):
    """Squeeze(Reshape(x, s))  ==>  Reshape(x, S)."""

    name = "reshape-squeeze"
    pattern = (Op("Reshape"), Op("Squeeze"))


class ReshapeUnsqueeze(_ReshapeRegroup):
    """Unsqueeze(Reshape(x, s))  ==>  Reshape(x, S)."""

    name = "reshape-unsqueeze"
    pattern = (Op("Reshape"), Op("Unsqueeze"))


class ReshapeFlatten(_ReshapeRegroup):
    """Flatten(Reshape(x, s))  ==>  Reshape(x, S)."""

    name = "reshape-flatten"
    pattern = (Op("Reshape"), Op("Flatten"))


class _Inverse(Rule):
    """Unsqueeze/Squeeze pairs on the same axes  ==>  Identity(x)."""

    def check(self, match: Match) -> MatchResult:
        """Constant axes on both nodes that name the same dims of the wider tensor."""
        first, second = (_axes(match, node) for node in match.nodes)
        if isinstance(first, str) or isinstance(second, str):
            return match.fail(f"{first if isinstance(first, str) else second}")
        wide = match.root.outputs[0] if match.root.op == "Unsqueeze" else match.root.inputs[0]
        rank = match.rank(wide)
        if rank is None and match.root.op == "Unsqueeze":
            inner = match.rank(match.root.inputs[0])
            rank = None if inner is None else inner + len(first)
        a, b = _normalized(first, rank), _normalized(second, rank)
        if a is None or b is None:
            return match.fail("negative axes and the rank is unknown")
        if a != b or len(a) != len(first) or len(b) != len(second):
            return match.fail(f"axes {first} and {second} differ")
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """An Identity (eliminate-noops drops it)."""
        return [match.new_node("Identity", [match.root.inputs[0]])]


class UnsqueezeSqueeze(_Inverse):
    """Squeeze(Unsqueeze(x, a), a)  ==>  Identity(x)."""

    name = "unsqueeze-squeeze"
    pattern = (Op("Unsqueeze"), Op("Squeeze"))


class SqueezeUnsqueeze(_Inverse):
    """Unsqueeze(Squeeze(x, a), a)  ==>  Identity(x) (the squeezed dims were 1)."""

    name = "squeeze-unsqueeze"
    pattern = (Op("Squeeze"), Op("Unsqueeze"))


#: The rules of `merge-layout-chains`, tried in this order at each root node.
RULES: tuple[Rule, ...] = (
    TransposeTranspose(),
    ReshapeReshape(),
    SqueezeReshape(),
    UnsqueezeReshape(),
    FlattenReshape(),
    UnsqueezeSqueeze(),
    SqueezeUnsqueeze(),
    ReshapeSqueeze(),
    ReshapeUnsqueeze(),
    ReshapeFlatten(),
)


@dataclasses.dataclass(frozen=True)
class MergeLayoutChains(RulePass):
    """Two layout ops in a row  ==>  one (or an Identity when they cancel).

    Rules (`RULES`, one statistic each):
      1. `transpose-transpose`: Transpose(Transpose(x, p), q) ==> Transpose(x, p[q]); an
         identity composition becomes Identity(x) (eliminate-noops removes it later).
      2. `reshape-reshape`, `squeeze-reshape`, `unsqueeze-reshape`, `flatten-reshape`:
         X(x) -> Reshape(s) ==> Reshape(x, s) for a constant s. A 0 in s (copy the input dim,
         unless `allowzero`) is replaced by the intermediate's static dim, else skipped.
      3. `unsqueeze-squeeze`, `squeeze-unsqueeze`: a pair on the same constant axes ==>
         Identity(x).
      4. `reshape-squeeze`, `reshape-unsqueeze`, `reshape-flatten`: Reshape(x) -> X ==>
         Reshape(x, S) when the output shape S is fully static (from shape inference).

    Axes are attributes before opset 13 and inputs from 13. The intermediate has no other
    reader and is no graph output. Exact: no arithmetic moves.
    """

    name = "merge-layout-chains"
    summary = "merge Transpose/Reshape/Squeeze/Unsqueeze/Flatten chains into one op"
    stage = "fuse"
    exactness = "exact"
    opsets = (5, None)
    rules = RULES
