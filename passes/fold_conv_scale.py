"""Fold a Mul by a constant per-channel scale into the Conv before it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.rewrite import Match, MatchResult, Op, Rule, RulePass

__all__ = ["RULES", "FoldConvScale"]


def _integer_valued(value: np.ndarray) -> bool:
    return bool(value.size) and bool(np.all(value == np.round(value)))


class ConvMul(Rule):
    """Conv(x, W, b) * s  ==>  Conv(x, W * s[:, None, ...], b * s) for s per output channel.

    s (either Mul operand) may be [M,1,...,1], [1,M,1,...,1], a scalar or all-ones shape:
    aligned right against the Conv output [N, M, d1, ...], it must be 1 on the batch and
    every spatial axis and 1 or M on the channel axis, and no longer than the output's rank.
    """

    name = "conv-mul"
    pattern = (Op("Conv"), Op("Mul", slot=None))

    def check(self, match: Match) -> MatchResult:
        """Constant float W (and b), and a per-channel constant s of W's dtype."""
        conv = match.root
        weight = match.constant(conv.inputs[1])
        if weight is None:
            return match.fail("the Conv weight is not constant")
        if weight.dtype.kind != "f" or weight.ndim < 3:
            return match.fail(f"the Conv weight is {weight.dtype}[{weight.ndim}-D]")
        producers = {node.op for node in conv.inputs[0].inputs}
        if _integer_valued(weight) and producers & {"Cast", "Sub"}:
            # A legalized quantized conv: integer sums, exact in float32 and in int8 kernels.
            return match.fail("the Conv is an integer convolution (integer weight and input)")
        scale = match.constant(match.side_input(1))
        if scale is None:
            return match.fail("the other Mul operand is not constant")
        if scale.dtype != weight.dtype:
            return match.fail(f"the scale is {scale.dtype}, the weight {weight.dtype}")
        channels, rank = weight.shape[0], weight.ndim
        if scale.ndim > rank:
            return match.fail(f"scale of rank {scale.ndim} would grow the rank-{rank} output")
        dims = (1,) * (rank - scale.ndim) + scale.shape
        if dims[0] != 1 or any(d != 1 for d in dims[2:]):
            return match.fail(f"scale {list(scale.shape)} varies along batch or spatial axes")
        if dims[1] not in (1, channels):
            return match.fail(f"scale {list(scale.shape)} does not match {channels} channels")
        vector = np.broadcast_to(scale.reshape(-1), (channels,)).astype(np.float64)
        shape = (channels,) + (1,) * (rank - 1)
        match.values["weight"] = (weight.astype(np.float64) * vector.reshape(shape)).astype(
            weight.dtype
        )
        if len(conv.inputs) > 2 and conv.inputs[2].name:
            bias = match.constant(conv.inputs[2])
            if bias is None:
                return match.fail("the Conv bias is not constant")
            match.values["bias"] = (bias.astype(np.float64).reshape(-1) * vector).astype(
                weight.dtype
            )
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """A copy of the Conv with scaled weight (and bias)."""
        conv = match.root
        stem = conv.name or "Conv"
        inputs = [conv.inputs[0], match.new_constant(f"{stem}_weight", match.values["weight"])]
        if "bias" in match.values:
            inputs.append(match.new_constant(f"{stem}_bias", match.values["bias"]))
        return [match.new_node("Conv", inputs, conv.attrs)]


#: The rules of `fold-conv-scale`.
RULES: tuple[Rule, ...] = (ConvMul(),)


@dataclasses.dataclass(frozen=True)
class FoldConvScale(RulePass):
    """Conv -> Mul(constant per-channel scale)  ==>  Conv with the scale folded into W and b.

    Rule `conv-mul` (either Mul operand order): W' = W * s per output channel, b' = b * s.
    A scale that varies along batch or spatial axes, on the wrong axis, of higher rank than
    the output, or a non-constant W, b or s is left alone. The intermediate has no other
    reader and is no graph output. Exact up to float rounding of the scaled weights.
    """

    name = "fold-conv-scale"
    summary = "fold a Mul by a constant per-channel scale into the preceding Conv's weights"
    stage = "fuse"
    exactness = "reassoc"
    opsets = (7, None)
    rules = RULES
