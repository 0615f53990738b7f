"""Fuse decomposed scaled-dot-product attention into one Attention or MultiHeadAttention node."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.analysis import AnalysisManager
from dsopt.attention import AttentionSite, Mask, scan_attention
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import fresh_name, remove_nodes, topological_order

__all__ = ["FuseAttention"]

ATTENTION_ONNX = "attention-onnx"
MULTI_HEAD_ATTENTION = "multi-head-attention"
_MHA_OP = "com.microsoft::MultiHeadAttention"
_SKIPS = (
    "skipped-pattern",
    "skipped-no-target",
    "skipped-layout",
    "skipped-dtype",
    "skipped-mask",
    "fused-sites",
)


class _Skip(Exception):
    """Internal: a site cannot be rewritten; args are (statistic, reason)."""


@dataclasses.dataclass(frozen=True)
class FuseAttention(Pass):
    """softmax(scale · Q Kᵀ + mask) V, found by `dsopt.attention`  ==>  one attention node.

    Rules (statistics of the same name count the sites rewritten):
      1. `attention-onnx` (model opset >= 23): ONNX `Attention` with `scale`; 3-D q, k, v
         get `q_num_heads`/`kv_num_heads`, 4-D ones are fed as they are (a given Kᵀ is
         transposed back). The mask becomes the additive `attn_mask`; a causal pattern is
         `is_causal` when no other mask is present, else a triangular bias added to it.
      2. `multi-head-attention` (opset < 23, the target declares
         `com.microsoft::MultiHeadAttention`, 3-D q, k, v, float32):
         MultiHeadAttention(q, k, v, attention_bias=mask) with `num_heads`, `scale`,
         `unidirectional` for a causal pattern.
    A boolean mask Where(m, scores, fill) becomes the bias Where(m, 0, fill); masks are
    expanded to (B|1, N|1, S, L), the only shapes onnxruntime's kernels accept. torch's
    Where(IsNaN(p), 0, p) guard moves to the output. A site is left alone when anything
    outside it reads an intermediate (`dsopt.attention` refuses those). Float re-association
    only (the scales are multiplied into one).
    """

    name = "fuse-attention"
    summary = "decomposed attention (MatMul, scale, mask, Softmax, MatMul) -> one attention op"
    stage = "fuse"
    exactness = "reassoc"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Rewrites every attention site the model opset or the target can express."""
        analyses = ctx.analyses if ctx.analyses is not None else AnalysisManager(module)
        sites, rejected = scan_attention(module, analyses)
        stats: collections.Counter[str] = collections.Counter()
        stats["skipped-pattern"] = len(rejected)
        for node, reason in rejected:
            ctx.logger.debug("fuse-attention: Softmax '%s': %s", node.name, reason)
        names = _Names(module)
        touched: list[gs.Graph] = []
        for site in sites:
            if site.kind == "fused":
                stats["fused-sites"] += 1
                continue
            try:
                rule = self._rule(site, module, ctx)
                _Rewriter(site, names, module.opset).apply(rule)
            except _Skip as skip:
                stat, reason = skip.args
                stats[stat] += 1
                ctx.logger.debug("fuse-attention: site at '%s': %s", site.output.name, reason)
                continue
            stats[rule] += 1
            touched.append(site.graph)
        for graph in {id(g): g for g in touched}.values():
            graph.nodes = topological_order(graph)
        out = {ATTENTION_ONNX: stats[ATTENTION_ONNX], MULTI_HEAD_ATTENTION: 0}
        out[MULTI_HEAD_ATTENTION] = stats[MULTI_HEAD_ATTENTION]
        out.update({name: stats[name] for name in _SKIPS})
        return PassResult(bool(touched), out)

    @staticmethod
    def _rule(site: AttentionSite, module: Module, ctx: PassContext) -> str:
        if module.opset >= 23:
            if site.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
                raise _Skip("skipped-dtype", f"dtype {site.dtype}")
            return ATTENTION_ONNX
        if not ctx.supports(_MHA_OP):
            raise _Skip("skipped-no-target", "opset < 23 and no MultiHeadAttention")
        if site.layout != "bsd":
            raise _Skip("skipped-layout", "MultiHeadAttention needs 3-D q, k, v")
        if site.dtype != np.dtype(np.float32):
            raise _Skip("skipped-dtype", f"dtype {site.dtype}")
        return MULTI_HEAD_ATTENTION


class _Names:
    """Module-unique tensor names."""

    def __init__(self, module: Module) -> None:
        self.used: set[str] = set()
        for graph in module.graphs():
            self.used.update(graph.tensors().keys())

    def fresh(self, hint: str) -> str:
        return fresh_name(self.used, hint)


class _Rewriter:
    """Builds the replacement of one site, then swaps it in."""

    def __init__(self, site: AttentionSite, names: _Names, opset: int) -> None:
        self.site = site
        self.names = names
        self.opset = opset
        self.dtype = site.dtype
        self.nodes: list[gs.Node] = []
        self.base = site.output.name or "attention"

    def var(self, hint: str) -> gs.Variable:
        """A new intermediate tensor (no declared type: shape inference finds it)."""
        return gs.Variable(self.names.fresh(f"{self.base}/{hint}"))

    def const(self, hint: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names.fresh(f"{self.base}/{hint}"), np.ascontiguousarray(value))

    def node(
        self,
        op: str,
        inputs: list[gs.Tensor],
        out: gs.Tensor,
        attrs: dict[str, Any] | None = None,
        domain: str | None = None,
    ) -> gs.Tensor:
        self.nodes.append(
            gs.Node(
                op,
                name=self.names.fresh(f"{self.base}/{op}"),
                attrs=attrs or {},
                inputs=inputs,
                outputs=[out],
                domain=domain,
            )
        )
        return out

    # -- the mask --------------------------------------------------------------------------
    def bias(self, causal_in_bias: bool) -> gs.Tensor | None:
        """The additive (B|1, N|1, S, L) bias, or None without a mask."""
        site, mask = self.site, self.site.mask
        if mask is None and not causal_in_bias:
            return None
        tensor: gs.Tensor | None = None
        shape = None
        if mask is not None:
            tensor, shape = self._additive(mask), mask.shape
            s, l_ = site.seq_lengths
            if not (
                shape is not None
                and len(shape) == 4
                and _known_eq(shape[2], s)
                and _known_eq(shape[3], l_)
            ):
                tensor = self.node("Expand", [tensor, self._score_shape()], self.var("mask"))
        if causal_in_bias:
            s, l_ = site.seq_lengths
            if not (isinstance(s, int) and isinstance(l_, int)):
                raise _Skip("skipped-mask", "causal plus mask needs static sequence lengths")
            tri = np.where(np.tril(np.ones((s, l_), bool)), 0, -np.inf).astype(self.dtype)
            causal = self.const("causal", tri.reshape(1, 1, s, l_))
            if tensor is None:
                return causal
            tensor = self.node("Add", [tensor, causal], self.var("bias"))
        return tensor

    def _additive(self, mask: Mask) -> gs.Tensor:
        if mask.kind == "additive":
            dtype = mask.tensor.dtype
            if dtype is not None and np.dtype(dtype) != self.dtype:
                raise _Skip("skipped-mask", f"mask dtype {dtype} differs from {self.dtype}")
            return mask.tensor
        zero = self.const("zero", np.zeros((), self.dtype))
        fill = self.const("fill", np.asarray(mask.fill, self.dtype))
        branches = [zero, fill] if mask.attend else [fill, zero]
        return self.node("Where", [mask.tensor, *branches], self.var("bias"))

    def _score_shape(self) -> gs.Tensor:
        """[1, 1, S, L] as a constant, or built from the input shapes."""
        site = self.site
        s, l_ = site.seq_lengths
        if isinstance(s, int) and isinstance(l_, int):
            return self.const("mask_shape", np.array([1, 1, s, l_], np.int64))
        if self.opset < 15:
            raise _Skip("skipped-mask", "dynamic sequence lengths need Shape(start, end)")
        if site.layout == "bsd":
            q_axis, k_axis = 1, 1
        else:
            q_axis, k_axis = 2, 3 if site.k_transposed else 2
        s_t = self.node("Shape", [site.q], self.var("s"), {"start": q_axis, "end": q_axis + 1})
        l_t = self.node("Shape", [site.k], self.var("l"), {"start": k_axis, "end": k_axis + 1})
        ones = self.const("ones", np.array([1, 1], np.int64))
        return self.node("Concat", [ones, s_t, l_t], self.var("mask_shape"), {"axis": 0})

    # -- the fused node --------------------------------------------------------------------
    def apply(self, rule: str) -> None:
        site = self.site
        fused_out = self.var("out")
        if rule == ATTENTION_ONNX:
            causal_flag = site.causal and site.mask is None
            bias = self.bias(site.causal and not causal_flag)
            k = site.k
            if site.k_transposed:
                k = self.node("Transpose", [k], self.var("k"), {"perm": [0, 1, 3, 2]})
            attrs: dict[str, Any] = {"scale": float(site.scale or 1.0)}
            if causal_flag:
                attrs["is_causal"] = 1
            if site.layout == "bsd":
                attrs["q_num_heads"] = site.num_heads
                attrs["kv_num_heads"] = site.num_heads
            inputs = [site.q, k, site.v] + ([bias] if bias is not None else [])
            self.node("Attention", inputs, fused_out, attrs)
        else:
            bias = self.bias(False)
            attrs = {"num_heads": site.num_heads, "scale": float(site.scale or 1.0)}
            if site.causal:
                attrs["unidirectional"] = 1
            inputs = [site.q, site.k, site.v]
            if bias is not None:
                inputs += [gs.Variable.empty(), gs.Variable.empty(), bias]
            self.node("MultiHeadAttention", inputs, fused_out, attrs, domain="com.microsoft")
        result: gs.Tensor = fused_out
        final = site.output
        steps = []
        if site.nan_guard:
            steps.append("guard")
        if site.output_shape is not None:
            steps.append("reshape")
        # the nodes writing `final` are created after the old ones are detached
        old_inputs = [t for n in site.nodes for t in n.inputs]
        pending: list[tuple[str, gs.Tensor]] = []
        for i, step in enumerate(steps):
            out = final if i == len(steps) - 1 else self.var(step)
            pending.append((step, out))
        if not steps:
            self.nodes[-1].outputs.clear()
        graph = site.graph
        remove_nodes(graph, site.nodes)
        if not steps:
            self.nodes[-1].outputs.append(final)
        for step, out in pending:
            if step == "guard":
                isnan = self.node("IsNaN", [result], self.var("isnan"))
                zero = self.const("zero", np.zeros((), self.dtype))
                result = self.node("Where", [isnan, zero, result], out)
            else:
                assert site.output_shape is not None
                result = self.node("Reshape", [result, site.output_shape], out)
        graph.nodes.extend(self.nodes)
        _drop_orphan_constants(graph, old_inputs)


def _known_eq(a: object, b: object) -> bool:
    return a is not None and a == b


def _drop_orphan_constants(graph: gs.Graph, tensors: list[gs.Tensor]) -> None:
    outputs = {id(t) for t in graph.outputs}
    doomed = [
        t.inputs[0]
        for t in tensors
        if isinstance(t, gs.Variable)
        and len(t.inputs) == 1
        and t.inputs[0].op == "Constant"
        and not t.outputs
        and id(t) not in outputs
    ]
    if doomed:
        remove_nodes(graph, doomed)
