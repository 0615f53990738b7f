"""Fuse a 2-D MatMul by a constant weight and the Add of a bias into one Gemm."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_graphsurgeon as gs

from dsopt.rewrite import Match, MatchResult, Op, Rule, RulePass

__all__ = ["RULES", "FuseMatmulAdd"]


class MatMulAdd(Rule):
    """MatMul(a[M,K], B[K,N]) + c  ==>  Gemm(a, B, c) when c broadcasts to [M,N] unchanged.

    Gemm needs a 2-D `a` (rank from shape inference); a MatMul of rank >= 3 (or unknown
    rank) is left alone and counted in `skipped-rank`.
    """

    name = "matmul-add"
    pattern = (Op("MatMul"), Op("Add", slot=None))
    stats = ("skipped-rank",)

    def check(self, match: Match) -> MatchResult:
        """Constant 2-D float B, 2-D a, constant c of B's dtype broadcasting to [M,N]."""
        matmul = match.root
        weight = match.constant(matmul.inputs[1])
        if weight is None:
            return match.fail("MatMul weight is not constant")
        if weight.dtype.kind != "f" or weight.ndim != 2:
            return match.fail(f"MatMul weight is {weight.dtype}[{weight.ndim}-D], not 2-D float")
        shape = match.shape(matmul.inputs[0])
        if shape is None or len(shape) != 2:
            rank = "unknown" if shape is None else str(len(shape))
            return match.fail(f"MatMul input rank is {rank}, Gemm needs 2", stat="skipped-rank")
        bias = match.constant(match.side_input(1))
        if bias is None:
            return match.fail("the other Add operand is not constant")
        if bias.dtype != weight.dtype:
            return match.fail(f"the Add bias is {bias.dtype}, the weight {weight.dtype}")
        rows, columns = shape[0], weight.shape[1]
        if bias.ndim > 2:
            return match.fail(f"bias of rank {bias.ndim} would grow the 2-D product")
        if bias.ndim >= 1 and bias.shape[-1] not in (1, columns):
            return match.fail(f"bias {list(bias.shape)} does not broadcast to {columns} columns")
        if bias.ndim == 2 and bias.shape[0] != 1 and bias.shape[0] != rows:
            return match.fail(f"bias {list(bias.shape)} does not broadcast to {rows} rows")
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """Gemm(a, B, c) reusing the weight and bias tensors."""
        matmul = match.root
        return [match.new_node("Gemm", [matmul.inputs[0], matmul.inputs[1], match.side_input(1)])]


#: The rules of `fuse-matmul-add`.
RULES: tuple[Rule, ...] = (MatMulAdd(),)


@dataclasses.dataclass(frozen=True)
class FuseMatmulAdd(RulePass):
    """MatMul(a[M,K], B[K,N]) -> Add(c)  ==>  Gemm(a, B, c).

    Rule `matmul-add`: B a constant 2-D float weight, c a constant of B's dtype that
    broadcasts to [M,N] without growing it ([N], [1,N], [M,N], [M,1], a scalar), and `a`
    2-D by shape inference (Gemm is only defined for matrices); a MatMul of rank >= 3 or
    unknown rank is left alone and counted in `skipped-rank`. The intermediate has no other
    reader and is no graph output. Exact up to float re-association (Gemm may accumulate
    the bias in a different order).
    """

    name = "fuse-matmul-add"
    summary = "fuse a 2-D MatMul by a constant weight and a bias Add into Gemm"
    stage = "fuse"
    exactness = "reassoc"
    opsets = (7, None)
    rules = RULES
