"""Fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.rewrite import Match, MatchResult, Op, Rule, RulePass

__all__ = ["RULES", "FuseBatchNorm"]

_BN = Op("BatchNormalization", slot=0)


def _batch_norm_affine(match: Match) -> tuple[np.ndarray, np.ndarray] | MatchResult:
    """BN(y) = s * y + t per channel, from constant scale/bias/mean/var (float64).

    Fails for training mode: `training_mode=1` (opset >= 14), more than one output (before
    opset 14 that selects training mode), or per-activation statistics (`spatial=0`, opset < 9).
    """
    bn = match.last
    if len([t for t in bn.outputs if t.name]) > 1:
        return match.fail(f"BatchNormalization has {len(bn.outputs)} outputs (training mode)")
    if match.opset >= 14 and int(bn.attrs.get("training_mode", 0)):
        return match.fail("BatchNormalization has training_mode=1")
    if match.opset < 9 and int(bn.attrs.get("spatial", 1)) == 0:
        return match.fail("BatchNormalization has spatial=0 (per-activation statistics)")
    if len(bn.inputs) != 5:
        return match.fail(f"BatchNormalization has {len(bn.inputs)} inputs, expected 5")
    params = [match.constant(t) for t in bn.inputs[1:]]
    for label, value in zip(("scale", "bias", "mean", "var"), params, strict=True):
        if value is None:
            return match.fail(f"BatchNormalization {label} is not constant")
        if value.dtype.kind != "f" or value.ndim != 1:
            return match.fail(f"BatchNormalization {label} is not a 1-D float tensor")
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64) for p in params)  # type: ignore[arg-type]
    if not (scale.shape == bias.shape == mean.shape == var.shape):
        return match.fail("BatchNormalization parameters differ in length")
    epsilon = float(bn.attrs.get("epsilon", 1e-5))
    s = scale / np.sqrt(var + epsilon)
    if not np.all(np.isfinite(s)):
        return match.fail("BatchNormalization scale is not finite (var + epsilon <= 0)")
    return s, bias - mean * s


def _float_weight(match: Match, tensor: gs.Tensor, what: str) -> np.ndarray | MatchResult:
    value = match.constant(tensor)
    if value is None:
        return match.fail(f"{what} is not constant")
    if value.dtype.kind != "f":
        return match.fail(f"{what} is {value.dtype}, not a float type")
    return value


def _optional_constant(match: Match, node: gs.Node, index: int) -> np.ndarray | None | MatchResult:
    """The constant at input `index` (None when absent), or a failure when not constant."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    value = match.constant(node.inputs[index])
    if value is None:
        return match.fail(f"{node.op} input {index} is not constant")
    return value


class ConvBatchNorm(Rule):
    """Conv(x, W, b) -> BN  ==>  Conv(x, W * s[m], (b - mean) * s + beta), any group."""

    name = "conv-bn"
    pattern = (Op("Conv", "ConvTranspose"), _BN)

    def check(self, match: Match) -> MatchResult:
        """Constant float W and b (or none), and one BN channel per output channel."""
        conv = match.root
        weight = _float_weight(match, conv.inputs[1], f"{conv.op} weight")
        if isinstance(weight, MatchResult):
            return weight
        bias = _optional_constant(match, conv, 2)
        if isinstance(bias, MatchResult):
            return bias
        affine = _batch_norm_affine(match)
        if isinstance(affine, MatchResult):
            return affine
        s, t = affine
        group = int(conv.attrs.get("group", 1))
        if weight.ndim < 3:
            return match.fail(f"{conv.op} weight has rank {weight.ndim}")
        channels = weight.shape[0] if conv.op == "Conv" else weight.shape[1] * group
        if s.size != channels:
            return match.fail(
                f"BatchNormalization has {s.size} channels, {conv.op} makes {channels}"
            )
        if conv.op == "Conv":
            scaled = weight * s.reshape(-1, *[1] * (weight.ndim - 1))
        else:  # W is [C_in, M/group, k...]; output channel g * M/group + j uses W[group g, j]
            if weight.shape[0] % group:
                return match.fail(f"ConvTranspose weight does not split into {group} groups")
            grouped = weight.reshape(group, weight.shape[0] // group, *weight.shape[1:])
            factor = s.reshape(group, 1, weight.shape[1], *[1] * (weight.ndim - 2))
            scaled = (grouped * factor).reshape(weight.shape)
        shift = t if bias is None else np.asarray(bias, np.float64).reshape(-1) * s + t
        match.values["weight"] = scaled.astype(weight.dtype)
        match.values["bias"] = shift.astype(weight.dtype)
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """A copy of the conv with the scaled weight and the new bias."""
        conv = match.root
        weight = match.new_constant(f"{conv.inputs[1].name}_bn", match.values["weight"])
        bias = match.new_constant(f"{conv.name or conv.op}_bn_bias", match.values["bias"])
        return [match.new_node(conv.op, [conv.inputs[0], weight, bias], conv.attrs)]


class GemmBatchNorm(Rule):
    """Gemm(a, B, C) -> BN  ==>  Gemm(a, B * s[n], beta * C * s + t, beta=1)."""

    name = "gemm-bn"
    pattern = (Op("Gemm"), _BN)

    def check(self, match: Match) -> MatchResult:
        """Constant float B and C (or none), and one BN channel per output column."""
        gemm = match.root
        weight = _float_weight(match, gemm.inputs[1], "Gemm B")
        if isinstance(weight, MatchResult):
            return weight
        if weight.ndim != 2:
            return match.fail(f"Gemm B has rank {weight.ndim}")
        c = _optional_constant(match, gemm, 2)
        if isinstance(c, MatchResult):
            return c
        affine = _batch_norm_affine(match)
        if isinstance(affine, MatchResult):
            return affine
        s, t = affine
        trans_b = int(gemm.attrs.get("transB", 0))
        columns = weight.shape[0] if trans_b else weight.shape[1]
        if s.size != columns:
            return match.fail(f"BatchNormalization has {s.size} channels, Gemm makes {columns}")
        scaled = weight * (s[:, None] if trans_b else s[None, :])
        beta = float(gemm.attrs.get("beta", 1.0))
        shift = t if c is None else beta * np.asarray(c, np.float64) * s + t
        match.values["weight"] = scaled.astype(weight.dtype)
        match.values["c"] = shift.astype(weight.dtype)
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """A copy of the Gemm with scaled B, the new C and beta 1."""
        gemm = match.root
        weight = match.new_constant(f"{gemm.inputs[1].name}_bn", match.values["weight"])
        c = match.new_constant(f"{gemm.name or 'Gemm'}_bn_bias", match.values["c"])
        attrs = {k: v for k, v in gemm.attrs.items() if k != "beta"}
        return [match.new_node("Gemm", [gemm.inputs[0], weight, c], attrs)]


class MatMulBatchNorm(Rule):
    """MatMul(a[M,K], W[K,N]) -> BN  ==>  Gemm(a, W * s[n], t) (a must be 2-D).

    BN normalizes axis 1; only for a 2-D product is that the weight's column axis. For a
    rank >= 3 `a` BN scales rows of `a`, which no constant weight can absorb
    (`skipped-rank`).
    """

    name = "matmul-bn"
    pattern = (Op("MatMul"), _BN)
    stats = ("skipped-rank",)

    def check(self, match: Match) -> MatchResult:
        """Constant 2-D float W and a 2-D `a` (rank from shape inference)."""
        matmul = match.root
        weight = _float_weight(match, matmul.inputs[1], "MatMul weight")
        if isinstance(weight, MatchResult):
            return weight
        if weight.ndim != 2:
            return match.fail(f"MatMul weight has rank {weight.ndim}, not 2")
        rank = match.rank(matmul.inputs[0])
        if rank != 2:
            known = "unknown" if rank is None else str(rank)
            return match.fail(
                f"MatMul input rank is {known}: BN's channel axis is not the weight's columns",
                stat="skipped-rank",
            )
        affine = _batch_norm_affine(match)
        if isinstance(affine, MatchResult):
            return affine
        s, t = affine
        if s.size != weight.shape[1]:
            return match.fail(
                f"BatchNormalization has {s.size} channels, MatMul makes {weight.shape[1]}"
            )
        match.values["weight"] = (weight * s[None, :]).astype(weight.dtype)
        match.values["c"] = t.astype(weight.dtype)
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """Gemm(a, W', t)."""
        matmul = match.root
        weight = match.new_constant(f"{matmul.inputs[1].name}_bn", match.values["weight"])
        c = match.new_constant(f"{matmul.name or 'MatMul'}_bn_bias", match.values["c"])
        return [match.new_node("Gemm", [matmul.inputs[0], weight, c])]


#: The rules of `fuse-batch-norm`, tried in this order at each root node.
RULES: tuple[Rule, ...] = (ConvBatchNorm(), GemmBatchNorm(), MatMulBatchNorm())


@dataclasses.dataclass(frozen=True)
class FuseBatchNorm(RulePass):
    """Conv/ConvTranspose/Gemm/MatMul -> BatchNormalization  ==>  one op with folded weights.

    Rules (`RULES`, one statistic each):
      1. `conv-bn`: Conv (any group) or ConvTranspose (any group), with or without bias,
         followed by BN: W is scaled per output channel, b' = (b - mean) * s + beta.
      2. `gemm-bn`: Gemm (transA/transB, alpha, beta) followed by BN: B's output columns
         scaled, C' = beta * C * s + t with beta 1.
      3. `matmul-bn`: MatMul by a constant 2-D weight with a 2-D left operand (rank from
         shape inference) followed by BN becomes Gemm; other ranks count in `skipped-rank`.

    Preconditions: BN in inference mode (one output, `training_mode=0`, `spatial=1` before
    opset 9) with constant float scale/bias/mean/var; constant float weights and bias; the
    intermediate has no other reader and is no graph output. s = scale / sqrt(var + epsilon),
    t = bias - mean * s, computed in float64 and stored in the weight's dtype. Exact up to
    float re-association.
    """

    name = "fuse-batch-norm"
    summary = "fold inference BatchNormalization into the preceding Conv, Gemm or MatMul"
    stage = "fuse"
    exactness = "reassoc"
    opsets = (7, None)
    rules = RULES
