"""Fold a zero spatial Pad into the `pads` of the Conv or AveragePool after it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.rewrite import Match, MatchResult, Op, Rule, RulePass

__all__ = ["RULES", "FoldPad"]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pad_amounts(match: Match) -> tuple[list[int], list[int]] | MatchResult:
    """The Pad's (begins, ends) per input dim; a failure unless it pads with constant 0."""
    pad = match.root
    mode = _text(pad.attrs.get("mode", "constant"))
    if mode != "constant":
        return match.fail(f"Pad mode is '{mode}', not 'constant'")
    if match.opset < 11:
        pads = pad.attrs.get("pads")
        if pads is None:
            return match.fail("Pad has no pads attribute")
        pads = np.asarray(pads, np.int64)
        value = float(pad.attrs.get("value", 0.0))
        axes = None
    else:
        pads = match.constant(pad.inputs[1]) if len(pad.inputs) > 1 else None
        if pads is None:
            return match.fail("Pad pads are not constant")
        value = 0.0
        if len(pad.inputs) > 2 and pad.inputs[2].name:
            fill = match.constant(pad.inputs[2])
            if fill is None:
                return match.fail("Pad constant_value is not constant")
            value = float(np.asarray(fill).reshape(-1)[0]) if np.asarray(fill).size else 0.0
        axes = None
        if len(pad.inputs) > 3 and pad.inputs[3].name:
            axes = match.constant(pad.inputs[3])
            if axes is None:
                return match.fail("Pad axes are not constant")
    if value != 0.0:
        return match.fail(f"Pad value is {value}, not 0")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    rank = match.rank(pad.inputs[0])
    if axes is None:
        rank = len(pads) // 2
        axes_list = list(range(rank))
    else:
        if rank is None:
            return match.fail("Pad has axes and the input rank is unknown")
        axes_list = [int(a) + rank if int(a) < 0 else int(a) for a in np.asarray(axes).reshape(-1)]
    if len(pads) != 2 * len(axes_list):
        return match.fail(f"Pad pads {pads} do not match {len(axes_list)} axes")
    begins, ends = [0] * rank, [0] * rank
    for i, axis in enumerate(axes_list):
        begins[axis] += pads[i]
        ends[axis] += pads[len(axes_list) + i]
    if any(p < 0 for p in begins + ends):
        return match.fail(f"Pad pads {pads} are negative (a crop)")
    if rank < 3:
        return match.fail(f"Pad input has rank {rank}, no spatial dims")
    if begins[:2] != [0, 0] or ends[:2] != [0, 0]:
        return match.fail(f"Pad pads {pads} pad the batch or channel dim")
    return begins, ends


class _PadInto(Rule):
    """Pad(x, spatial zeros) -> Op  ==>  Op(x) with the pads added to its `pads` attribute."""

    def extra_check(self, match: Match, pads: list[int], padded: bool) -> MatchResult:
        """Op-specific conditions on the summed `pads` (`padded`: the Pad adds something)."""
        return match.ok()

    def check(self, match: Match) -> MatchResult:
        """A constant-0 spatial Pad and a consumer with explicit pads (auto_pad NOTSET)."""
        amounts = _pad_amounts(match)
        if isinstance(amounts, MatchResult):
            return amounts
        begins, ends = amounts
        node = match.last
        auto_pad = _text(node.attrs.get("auto_pad", "NOTSET"))
        if auto_pad != "NOTSET":
            return match.fail(f"{node.op} auto_pad is {auto_pad}, not NOTSET")
        spatial = len(begins) - 2
        own = [int(p) for p in node.attrs.get("pads", [0] * (2 * spatial))]
        if len(own) != 2 * spatial:
            return match.fail(f"{node.op} pads {own} do not match {spatial} spatial dims")
        pads = [own[i] + begins[2 + i] for i in range(spatial)] + [
            own[spatial + i] + ends[2 + i] for i in range(spatial)
        ]
        result = self.extra_check(match, pads, any(begins) or any(ends))
        if not result.ok:
            return result
        match.values["pads"] = pads
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """A copy of the consumer reading x, with the summed pads."""
        node = match.last
        attrs = {**node.attrs, "pads": match.values["pads"]}
        attrs.pop("auto_pad", None)
        inputs = [match.root.inputs[0], *node.inputs[1:]]
        return [match.new_node(node.op, inputs, attrs, name=node.name)]


class PadConv(_PadInto):
    """Conv(Pad(x, spatial zeros))  ==>  Conv(x, pads += Pad's pads)."""

    name = "pad-conv"
    pattern = (Op("Pad"), Op("Conv"))


class PadAvgPool(_PadInto):
    """AveragePool(Pad(x, spatial zeros))  ==>  AveragePool(x, pads += Pad's pads).

    Needs `count_include_pad=1` (the Pad's zeros count in the average), `ceil_mode=0` and
    summed pads smaller than the kernel (onnxruntime rejects larger pool pads).
    """

    name = "pad-avgpool"
    pattern = (Op("Pad"), Op("AveragePool"))

    def extra_check(self, match: Match, pads: list[int], padded: bool) -> MatchResult:
        """count_include_pad=1 (unless the Pad adds nothing), ceil_mode=0, pads < kernel."""
        pool = match.last
        if padded and not int(pool.attrs.get("count_include_pad", 0)):
            return match.fail("AveragePool count_include_pad=0 would drop the Pad's zeros")
        if int(pool.attrs.get("ceil_mode", 0)):
            return match.fail("AveragePool ceil_mode=1")
        kernel = [int(k) for k in pool.attrs.get("kernel_shape", ())]
        if len(kernel) * 2 != len(pads) or any(
            p >= kernel[i % len(kernel)] for i, p in enumerate(pads)
        ):
            return match.fail(f"pads {pads} not smaller than kernel {kernel} (onnxruntime)")
        return match.ok()


#: The rules of `fold-pad`, tried in this order at each root node.
RULES: tuple[Rule, ...] = (PadConv(), PadAvgPool())


@dataclasses.dataclass(frozen=True)
class FoldPad(RulePass):
    """Pad(x, constant 0 on spatial dims) -> Conv/AveragePool  ==>  Conv/AveragePool(x, pads').

    Rules (`RULES`, one statistic each):
      1. `pad-conv`: pads' = Conv pads + the Pad's spatial pads.
      2. `pad-avgpool`: the same for AveragePool with `count_include_pad=1`, `ceil_mode=0`
         and summed pads smaller than the kernel.

    The Pad must be mode `constant` with value 0, constant non-negative pads (an input from
    opset 11, with optional `axes` from 18; an attribute before) and zero pads on the batch
    and channel dims; the consumer must have `auto_pad=NOTSET`. MaxPool is left alone (it
    would need a -inf pad value). The intermediate has no other reader and is no graph
    output. Exact: the same zeros enter the same sums.
    """

    name = "fold-pad"
    summary = "fold a zero spatial Pad into the pads of the following Conv or AveragePool"
    stage = "fuse"
    exactness = "exact"
    opsets = (2, None)
    rules = RULES
