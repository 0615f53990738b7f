"""Fold an Add of a constant per-channel bias into the Conv, ConvTranspose or Gemm before it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.rewrite import Match, MatchResult, Op, Rule, RulePass

__all__ = ["RULES", "FoldBiasAdd"]

_ADD = Op("Add", slot=None)


def _bias_constant(match: Match, dtype: np.dtype | None) -> np.ndarray | MatchResult:
    bias = match.constant(match.side_input(1))
    if bias is None:
        return match.fail("the other Add operand is not constant")
    if bias.dtype.kind != "f":
        return match.fail(f"the Add bias is {bias.dtype}, not a float type")
    if dtype is not None and bias.dtype != dtype:
        return match.fail(f"the Add bias is {bias.dtype}, the weight {dtype}")
    return bias


class ConvAdd(Rule):
    """Conv(x, W, b) + c  ==>  Conv(x, W, b + c) for c broadcast per output channel.

    The same for ConvTranspose, whose M output channels are W's dim 1 times `group`
    (Paddle exports its transposed convs' bias as such an Add).

    c may be [M,1,...,1], [1,M,1,...,1], a scalar or all-ones shape: aligned right against
    the Conv output [N, M, d1, ...], it must be 1 on the batch and every spatial axis and 1
    or M on the channel axis, and no longer than the output's rank.
    """

    name = "conv-add"
    pattern = (Op("Conv", "ConvTranspose"), _ADD)

    def check(self, match: Match) -> MatchResult:
        """A per-channel constant c of the Conv's dtype, and a constant b (or none)."""
        conv = match.root
        weight_shape = match.shape(conv.inputs[1])
        axis = 1 if conv.op == "ConvTranspose" else 0
        if weight_shape is None or len(weight_shape) < 3 or not isinstance(weight_shape[axis], int):
            return match.fail(f"the {conv.op} weight shape is unknown")
        channels, rank = int(weight_shape[axis]), len(weight_shape)
        if conv.op == "ConvTranspose":
            channels *= int(conv.attrs.get("group", 1))
        weight = match.constant(conv.inputs[1])
        bias = _bias_constant(match, None if weight is None else weight.dtype)
        if isinstance(bias, MatchResult):
            return bias
        if bias.ndim > rank:
            return match.fail(f"bias of rank {bias.ndim} would grow the rank-{rank} Conv output")
        dims = (1,) * (rank - bias.ndim) + bias.shape
        if dims[0] != 1:
            return match.fail(f"bias {list(bias.shape)} varies along the batch axis")
        if any(d != 1 for d in dims[2:]):
            return match.fail(f"bias {list(bias.shape)} varies along spatial axes")
        if dims[1] not in (1, channels):
            return match.fail(f"bias {list(bias.shape)} does not match {channels} channels")
        old = None
        if len(conv.inputs) > 2 and conv.inputs[2].name:
            old = match.constant(conv.inputs[2])
            if old is None:
                return match.fail("the Conv bias is not constant")
        vector = np.broadcast_to(bias.reshape(-1), (channels,)).astype(np.float64)
        total = vector if old is None else np.asarray(old, np.float64).reshape(-1) + vector
        match.values["bias"] = total.astype(bias.dtype)
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """A copy of the Conv with the summed bias."""
        conv = match.root
        bias = match.new_constant(f"{conv.name or conv.op}_bias", match.values["bias"])
        return [match.new_node(conv.op, [conv.inputs[0], conv.inputs[1], bias], conv.attrs)]


class GemmAdd(Rule):
    """Gemm(a, B, C) + c  ==>  Gemm(a, B, beta * C + c, beta=1) for c broadcast per column.

    c may be a scalar, [1], [N], [1, 1] or [1, N]; a bias varying along rows is left alone.
    """

    name = "gemm-add"
    pattern = (Op("Gemm"), _ADD)

    def check(self, match: Match) -> MatchResult:
        """A per-column constant c and a constant C (or none)."""
        gemm = match.root
        bias = _bias_constant(match, None)
        if isinstance(bias, MatchResult):
            return bias
        if bias.ndim > 2:
            return match.fail(f"bias of rank {bias.ndim} would grow the 2-D Gemm output")
        if bias.ndim == 2 and bias.shape[0] != 1:
            return match.fail(f"bias {list(bias.shape)} varies along rows")
        columns = self._columns(match)
        if bias.ndim and bias.shape[-1] != 1 and bias.shape[-1] != columns:
            return match.fail(f"bias {list(bias.shape)} does not broadcast to {columns} columns")
        old = None
        if len(gemm.inputs) > 2 and gemm.inputs[2].name:
            old = match.constant(gemm.inputs[2])
            if old is None:
                return match.fail("the Gemm C is not constant")
            if old.dtype != bias.dtype:
                return match.fail(f"the Gemm C is {old.dtype}, the bias {bias.dtype}")
        beta = float(gemm.attrs.get("beta", 1.0))
        total = np.asarray(bias, np.float64)
        if old is not None:
            total = beta * np.asarray(old, np.float64) + total
        match.values["c"] = total.astype(bias.dtype)
        return match.ok()

    @staticmethod
    def _columns(match: Match) -> int | None:
        shape = match.shape(match.root.outputs[0])
        if shape is not None and len(shape) == 2 and isinstance(shape[1], int):
            return shape[1]
        weight = match.shape(match.root.inputs[1])
        if weight is not None and len(weight) == 2:
            dim = weight[0] if int(match.root.attrs.get("transB", 0)) else weight[1]
            return dim if isinstance(dim, int) else None
        return None

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """A copy of the Gemm with C' and beta 1."""
        gemm = match.root
        c = match.new_constant(f"{gemm.name or 'Gemm'}_bias", match.values["c"])
        attrs = {k: v for k, v in gemm.attrs.items() if k != "beta"}
        return [match.new_node("Gemm", [gemm.inputs[0], gemm.inputs[1], c], attrs)]


#: The rules of `fold-bias-add`, tried in this order at each root node.
RULES: tuple[Rule, ...] = (ConvAdd(), GemmAdd())


@dataclasses.dataclass(frozen=True)
class FoldBiasAdd(RulePass):
    """Conv/ConvTranspose/Gemm -> Add(constant bias)  ==>  the same op with the bias folded in.

    Rules (`RULES`, one statistic each):
      1. `conv-add`: Conv or ConvTranspose (with or without bias) + c, where c broadcasts per
         output channel ([M,1,1], [1,M,1,1], [1,M,1] for a 1-D conv, a scalar): b' = b + c.
      2. `gemm-add`: Gemm (C constant or absent) + c, where c broadcasts per column ([N],
         [1,N], a scalar): C' = beta * C + c, beta 1.

    Broadcasting must not change the result: a bias varying along batch, spatial axes or
    rows (per-element [C,H,W], [M,N]), on the wrong axis, or of a higher rank than the
    output is left alone. Constant float operands only; the intermediate has no other
    reader and is no graph output. Exact up to float re-association (b + c is summed first).
    """

    name = "fold-bias-add"
    summary = "fold an Add of a constant per-channel bias into the preceding Conv(Transpose)/Gemm"
    stage = "fuse"
    exactness = "reassoc"
    opsets = (7, None)
    rules = RULES
