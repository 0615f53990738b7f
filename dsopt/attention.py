"""Recognize scaled-dot-product attention (decomposed or fused) in a graph, for rewriters."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.analysis import AnalysisManager, Shapes, TensorType
from dsopt.ir import Module
from dsopt.pattern import dropout_in_training, read_constant

__all__ = ["AttentionSite", "Mask", "find_attention", "scan_attention"]

Dim = int | str | None

_DEFAULT = ("", "ai.onnx")
_FUSED = {
    ("", "Attention"),
    ("com.microsoft", "Attention"),
    ("com.microsoft", "MultiHeadAttention"),
}
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: Additive mask values at or below this count as "masked out" when reading a causal constant.
_MASKED = -1e4


@dataclasses.dataclass(frozen=True, eq=False)
class Mask:
    """How scores are masked before the softmax.

    Args:
        kind: `additive` (scores + tensor) or `boolean` (Where(tensor, scores, fill)).
        tensor: The mask tensor, as the model feeds it.
        shape: Its shape when known (ints, symbols or None per dim).
        attend: For a boolean mask, the value that lets a score through (False when the
            model spells Where(mask, fill, scores)).
        fill: For a boolean mask, the value written over masked scores.
    """

    kind: Literal["additive", "boolean"]
    tensor: gs.Tensor
    shape: tuple[Dim, ...] | None
    attend: bool = True
    fill: float = 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionSite:
    """One attention found in `graph`: softmax(scale * Q Kᵀ + mask) V over `heads`.

    `layout` is `bsd` when q, k, v are (B, S, hidden) tensors before a Reshape/Transpose head
    split (and `output` is (B, S, hidden) after the merge), or `bnsh` when the model already
    works on (B, N, S, H) heads (then `output` is the 4-D result). `k_transposed` says that
    `k` is given as Kᵀ (B, N, H, L). `output_shape`, when set, is the shape tensor of a merge
    Reshape that does not produce (B, S, hidden) (e.g. (B*S, hidden)): a rewriter reshapes
    its (B, S, hidden) result to it. `nan_guard` marks torch's Where(IsNaN(p), 0, p) after
    the softmax (fully masked rows give 0). `kind="fused"` sites are single Attention /
    MultiHeadAttention nodes; their `nodes` is that node and q, k, v its inputs, with the
    other fields read from its attributes and inputs unless `unsupported` says why not.
    """

    kind: Literal["decomposed", "fused"]
    graph: gs.Graph
    nodes: tuple[gs.Node, ...]
    q: gs.Tensor
    k: gs.Tensor
    v: gs.Tensor
    output: gs.Tensor
    layout: Literal["bsd", "bnsh"] = "bsd"
    num_heads: int | None = None
    head_size: int | None = None
    scale: float | None = None
    mask: Mask | None = None
    causal: bool = False
    k_transposed: bool = False
    nan_guard: bool = False
    output_shape: gs.Tensor | None = None
    seq_lengths: tuple[Dim, Dim] = (None, None)
    dtype: np.dtype | None = None
    unsupported: str | None = None


def find_attention(module: Module, analyses: AnalysisManager | None = None) -> list[AttentionSite]:
    """Every attention site of `module` (all graphs) whose covered nodes nothing else reads."""
    return scan_attention(module, analyses)[0]


def scan_attention(
    module: Module, analyses: AnalysisManager | None = None
) -> tuple[list[AttentionSite], list[tuple[gs.Node, str]]]:
    """Sites found, plus (softmax node, reason) for each softmax that looked like one but failed."""
    am = analyses if analyses is not None else AnalysisManager(module)
    shapes = am.get(Shapes)
    protected = {id(t) for g in module.graphs() for t in g.outputs}
    sites: list[AttentionSite] = []
    rejected: list[tuple[gs.Node, str]] = []
    for graph in module.graphs():
        for node in list(graph.nodes):
            if ((node.domain or ""), node.op) in _FUSED or (
                node.domain == "ai.onnx" and node.op == "Attention"
            ):
                sites.append(_fused_site(graph, node, shapes))
            elif node.op == "Softmax" and (node.domain or "") in _DEFAULT:
                found = _Detector(graph, shapes, protected, module.opset).detect(node)
                if isinstance(found, AttentionSite):
                    sites.append(found)
                elif found:
                    rejected.append((node, found))
    return sites, rejected


def _fused_site(graph: gs.Graph, node: gs.Node, shapes: dict[str, TensorType]) -> AttentionSite:
    """A fused attention node as a site; `unsupported` says why rewriters cannot expand it."""
    inputs = [*node.inputs, None, None, None]
    q = inputs[0]
    packed = node.op == "Attention" and node.domain == "com.microsoft"
    k = q if packed else inputs[1]
    v = q if packed else inputs[2]
    heads = node.attrs.get("num_heads", node.attrs.get("q_num_heads"))
    site = AttentionSite(
        kind="fused",
        graph=graph,
        nodes=(node,),
        q=q,
        k=k if k is not None and k.name else q,
        v=v if v is not None and v.name else q,
        output=node.outputs[0],
        num_heads=heads,
        scale=node.attrs.get("scale"),
        causal=bool(node.attrs.get("is_causal", node.attrs.get("unidirectional", 0))),
    )
    reason = "com.microsoft Attention packs the Q/K/V projection" if packed else None
    if reason is None:
        found = _FusedReader(shapes).read(node, site)
        if isinstance(found, AttentionSite):
            return found
        reason = found
    return dataclasses.replace(site, unsupported=reason)


class _FusedReader:
    """Reads MultiHeadAttention (com.microsoft) and Attention (opset 23) into site fields."""

    def __init__(self, shapes: dict[str, TensorType]) -> None:
        self.shapes = shapes

    def shape(self, tensor: gs.Tensor | None) -> tuple[Dim, ...] | None:
        if tensor is None:
            return None
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        found = self.shapes.get(tensor.name)
        return found.shape if found is not None else None

    def read(self, node: gs.Node, site: AttentionSite) -> AttentionSite | str:
        ins = [t if t is not None and t.name else None for t in node.inputs]
        ins += [None] * (8 - len(ins))
        if any(o.name and o.outputs for o in node.outputs[1:]):
            return "present key/value outputs are read"
        onnx_form = node.op == "Attention"
        if onnx_form:
            extras, mask_input = ins[4:], ins[3]
            if node.attrs.get("softcap", 0.0) or node.attrs.get("qk_matmul_output_mode", 0):
                return "softcap or qk_matmul_output_mode is set"
            if node.attrs.get("kv_num_heads", site.num_heads) != site.num_heads:
                return "grouped-query attention (kv_num_heads differs)"
        else:  # MultiHeadAttention(q, k, v, bias, key_padding_mask, attention_bias, past...)
            if ins[3] is not None or ins[4] is not None:
                return "packed bias or key_padding_mask input"
            extras, mask_input = ins[6:], ins[5]
        if any(t is not None for t in extras) or ins[1] is None or ins[2] is None:
            return "past key/value inputs or a missing key/value"
        q_shape, k_shape = self.shape(ins[0]), self.shape(ins[1])
        v_shape = self.shape(ins[2])
        if q_shape is None or len(q_shape) not in (3, 4) or k_shape is None or v_shape is None:
            return f"q/k/v shapes {q_shape}, {k_shape}, {v_shape} are unknown or not 3-D/4-D"
        if not len(q_shape) == len(k_shape) == len(v_shape):
            return "q, k and v differ in rank"
        if len(q_shape) == 4:
            heads, size, layout = q_shape[1], q_shape[3], "bnsh"
        else:
            heads, layout = site.num_heads, "bsd"
            size = q_shape[2] // heads if isinstance(q_shape[2], int) and heads else None
        if not isinstance(heads, int) or not isinstance(size, int):
            return "unknown head count or size"
        scale = site.scale if site.scale is not None else 1.0 / float(np.sqrt(size))
        mask = None
        if mask_input is not None:
            m_shape = self.shape(mask_input)
            found = self.shapes.get(mask_input.name)
            dtype = found.dtype if found is not None else None
            boolean = dtype is not None and np.dtype(dtype) == np.dtype(bool)
            fill = -np.inf if onnx_form else float(node.attrs.get("mask_filter_value", -10000.0))
            mask = Mask("boolean" if boolean else "additive", mask_input, m_shape, True, fill)
        out = self.shapes.get(node.outputs[0].name)
        return dataclasses.replace(
            site,
            layout=layout,
            num_heads=heads,
            head_size=size,
            scale=scale,
            mask=mask,
            seq_lengths=(q_shape[-2], k_shape[-2]),
            dtype=out.dtype if out is not None else None,
        )


class _Fail(Exception):
    """Internal: the candidate is not an attention site (the message says why)."""


@dataclasses.dataclass
class _Heads:
    """One of q, k, v traced back to its source: the tensor and the nodes on the way."""

    tensor: gs.Tensor
    nodes: list[gs.Node]
    split: bool  # came through a Reshape(B, S, N, H) head split
    heads: int | None
    size: int | None
    transposed: bool = False  # the source holds Kᵀ (bnsh layout only)


class _Detector:
    """Reads one attention DAG upwards from its Softmax and downwards to the merged output."""

    def __init__(
        self, graph: gs.Graph, shapes: dict[str, TensorType], protected: set[int], opset: int
    ) -> None:
        self.graph = graph
        self.shapes = shapes
        self.protected = protected
        self.opset = opset

    # -- helpers ---------------------------------------------------------------------------
    def shape(self, tensor: gs.Tensor) -> tuple[Dim, ...] | None:
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        found = self.shapes.get(tensor.name)
        if found is not None and found.shape is not None:
            return found.shape
        return tuple(tensor.shape) if tensor.shape is not None else None

    def dtype(self, tensor: gs.Tensor) -> np.dtype | None:
        found = self.shapes.get(tensor.name)
        if found is not None and found.dtype is not None:
            return np.dtype(found.dtype)
        try:
            return np.dtype(tensor.dtype) if tensor.dtype is not None else None
        except TypeError:
            return None

    def producer(self, tensor: gs.Tensor, *ops: str) -> gs.Node | None:
        if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        if node.op not in ops or (node.domain or "") not in _DEFAULT:
            return None
        return node

    def scalar(self, tensor: gs.Tensor) -> float | None:
        value = read_constant(tensor) if tensor.name else None
        if value is None or value.size != 1 or value.dtype not in _FLOATS:
            return None
        return float(value.reshape(-1)[0])

    def ints(self, tensor: gs.Tensor) -> list[int] | None:
        value = read_constant(tensor) if tensor.name else None
        if value is None or value.dtype.kind not in "iu" or value.ndim != 1:
            return None
        return [int(x) for x in value]

    @staticmethod
    def perm(node: gs.Node) -> tuple[int, ...] | None:
        perm = node.attrs.get("perm")
        return tuple(perm) if perm is not None else None

    def scaled(self, tensor: gs.Tensor, nodes: list[gs.Node]) -> tuple[float, gs.Tensor]:
        """Peels Mul/Div by scalar constants: (product of the factors, inner tensor)."""
        factor = 1.0
        while (node := self.producer(tensor, "Mul", "Div")) is not None and len(node.inputs) == 2:
            a, b = node.inputs
            if node.op == "Div":
                value = self.scalar(b)
                if not value:
                    break
                factor, tensor = factor / value, a
            elif (value := self.scalar(b)) is not None:
                factor, tensor = factor * value, a
            elif (value := self.scalar(a)) is not None:
                factor, tensor = factor * value, b
            else:
                break
            if self.shape(node.outputs[0]) != self.shape(tensor):
                raise _Fail(f"scale {node.op} '{node.name}' broadcasts")
            nodes.append(node)
        return factor, tensor

    # -- detection -------------------------------------------------------------------------
    def detect(self, softmax: gs.Node) -> AttentionSite | str:
        try:
            return self._detect(softmax)
        except _Fail as e:
            return str(e)

    def _detect(self, softmax: gs.Node) -> AttentionSite:
        nodes: list[gs.Node] = [softmax]
        x = softmax.inputs[0]
        rank = len(self.shape(x) or ())
        axis = softmax.attrs.get("axis", -1 if self.opset >= 13 else 1)
        if rank != 4:
            raise _Fail("")  # not attention-shaped: not worth a reason
        if axis not in (-1, rank - 1):
            raise _Fail(f"softmax axis {axis} is not the last")
        mask, causal, scores = self._mask(x, nodes)
        scale, matmul_out = self.scaled(scores, nodes)
        qk = self.producer(matmul_out, "MatMul")
        if qk is None:
            raise _Fail("softmax input is not a Q·Kᵀ MatMul (after scale and mask)")
        nodes.append(qk)
        qs, qt = self.scaled(qk.inputs[0], nodes)
        ks, kt = self.scaled(qk.inputs[1], nodes)
        scale *= qs * ks
        q = self._heads(qt, nodes, key=False)
        k = self._heads(kt, nodes, key=True)
        probs, guard = self._after_softmax(softmax.outputs[0], nodes)
        (pv,) = self._readers(probs, "MatMul", slot=0)
        nodes.append(pv)
        v = self._heads(pv.inputs[1], nodes, key=False)
        output, output_shape = self._merge(pv.outputs[0], nodes, q)
        if q.split != k.split or q.split != v.split:
            raise _Fail("q, k and v mix 3-D head splits and 4-D inputs")
        if q.heads is None or q.heads != k.heads or q.heads != v.heads:
            raise _Fail(f"head counts q={q.heads} k={k.heads} v={v.heads} differ or are unknown")
        if q.size is None or q.size != k.size:
            raise _Fail(f"head sizes q={q.size} k={k.size} differ or are unknown")
        scores_shape = self.shape(qk.outputs[0]) or (None,) * 4
        if mask is not None:
            self._check_mask_shape(mask, scores_shape, self.shape(softmax.inputs[0]))
        if causal and (scores_shape[2] is None or scores_shape[2] != scores_shape[3]):
            raise _Fail("causal mask on a non-square (or unknown) score matrix")
        self._check_exclusive(nodes, output)
        dtype = self.dtype(output)
        return AttentionSite(
            kind="decomposed",
            graph=self.graph,
            nodes=tuple(nodes),
            q=q.tensor,
            k=k.tensor,
            v=v.tensor,
            output=output,
            layout="bsd" if q.split else "bnsh",
            num_heads=q.heads,
            head_size=q.size,
            scale=scale,
            mask=mask,
            causal=causal,
            k_transposed=k.transposed,
            nan_guard=guard,
            output_shape=output_shape,
            seq_lengths=(scores_shape[2], scores_shape[3]),
            dtype=dtype,
        )

    def _readers(self, tensor: gs.Tensor, op: str, slot: int) -> list[gs.Node]:
        readers = [
            n
            for n in tensor.outputs
            if n.op == op and len(n.inputs) > slot and n.inputs[slot] is tensor
        ]
        if len(readers) != 1:
            raise _Fail(f"'{tensor.name}' does not feed exactly one {op} at input {slot}")
        return readers

    def _mask(self, x: gs.Tensor, nodes: list[gs.Node]) -> tuple[Mask | None, bool, gs.Tensor]:
        """Peels the mask ops before the softmax: (additive/boolean mask, causal, scores)."""
        mask: Mask | None = None
        causal = False
        for _ in range(2):
            where = self.producer(x, "Where")
            add = self.producer(x, "Add")
            if where is not None and len(where.inputs) == 3:
                cond, a, b = where.inputs
                fill_b, fill_a = self.scalar(b), self.scalar(a)
                if fill_b is not None and fill_a is None:
                    attend, fill, x_new = True, fill_b, a
                elif fill_a is not None and fill_b is None:
                    attend, fill, x_new = False, fill_a, b
                else:
                    break
                if self.dtype(cond) != np.dtype(bool):
                    raise _Fail("Where condition is not boolean")
                if attend and self._causal_condition(cond):
                    if causal:
                        break
                    causal = True
                elif mask is None:
                    mask = Mask("boolean", cond, self.shape(cond), attend, fill)
                else:
                    break
                nodes.append(where)
                x = x_new
            elif add is not None and len(add.inputs) == 2 and mask is None:
                a, b = add.inputs
                if self._reaches_matmul(a):
                    x_new, m = a, b
                elif self._reaches_matmul(b):
                    x_new, m = b, a
                else:
                    break
                if self._causal_additive(m):
                    causal = True
                else:
                    mask = Mask("additive", m, self.shape(m))
                nodes.append(add)
                x = x_new
            else:
                break
        return mask, causal, x

    def _reaches_matmul(self, tensor: gs.Tensor) -> bool:
        for _ in range(6):
            node = self.producer(tensor, "MatMul", "Mul", "Div", "Where")
            if node is None or len(node.inputs) < 2:
                return False
            if node.op == "MatMul":
                return True
            a, b = node.inputs[-2:]
            tensor = a if self.scalar(a) is None else b
        return False

    # -- causal masks ---------------------------------------------------------------------
    @staticmethod
    def _lower_triangular(value: np.ndarray) -> bool:
        if value.ndim < 2 or value.shape[-1] != value.shape[-2] or value.size > 1 << 22:
            return False
        tri = np.tril(np.ones(value.shape[-2:], dtype=bool))
        keep = value.astype(bool) if value.dtype == bool else value > _MASKED
        if value.dtype != bool and not np.all(value[..., tri] == 0):
            return False
        return bool(np.all(keep == tri))

    def _causal_condition(self, cond: gs.Tensor) -> bool:
        value = read_constant(cond) if cond.name else None
        if value is not None:
            return value.dtype == bool and self._lower_triangular(value)
        node = self.producer(cond, "Cast")
        inner = node.inputs[0] if node is not None else cond
        trilu = self.producer(inner, "Trilu")
        if trilu is None or trilu.attrs.get("upper", 1) != 0:
            return False
        if len(trilu.inputs) > 1 and trilu.inputs[1].name:
            k = read_constant(trilu.inputs[1])
            if k is None or int(k.reshape(-1)[0]) != 0:
                return False
        source = trilu.inputs[0]
        value = read_constant(source) if source.name else None
        if value is None:
            fill = self.producer(source, "ConstantOfShape")
            if fill is None:
                return False
            raw = fill.attrs.get("value")
            value = np.asarray(raw.values if isinstance(raw, gs.Constant) else 0).reshape(-1)
        return value.size > 0 and bool(np.all(value != 0))

    def _causal_additive(self, mask: gs.Tensor) -> bool:
        value = read_constant(mask) if mask.name else None
        return value is not None and value.dtype in _FLOATS and self._lower_triangular(value)

    def _check_mask_shape(
        self, mask: Mask, scores: tuple[Dim, ...], masked: tuple[Dim, ...] | None
    ) -> None:
        """The mask must broadcast into the scores without growing them.

        A dim that is neither 1 nor the scores' dim (an unknown one) is fine when shape
        inference says the masked scores keep the scores' dim there.
        """
        shape = mask.shape
        if shape is None or len(shape) > 4:
            raise _Fail(f"mask shape {shape} is unknown or has rank > 4")
        masked = masked if masked is not None and len(masked) == 4 else (None,) * 4
        for i, (dim, full) in enumerate(zip(reversed(shape), reversed(scores), strict=False)):
            if dim == 1 or _dim_eq(dim, full):
                continue
            if not isinstance(dim, int) and _dim_eq(masked[3 - i], full):
                continue
            raise _Fail(f"mask shape {shape} does not broadcast into scores {scores}")

    # -- after the softmax ----------------------------------------------------------------
    def _after_softmax(self, probs: gs.Tensor, nodes: list[gs.Node]) -> tuple[gs.Tensor, bool]:
        guard = False
        while True:
            readers = list(probs.outputs)
            if len(readers) == 2 and {r.op for r in readers} == {"IsNaN", "Where"}:
                isnan = next(r for r in readers if r.op == "IsNaN")
                where = next(r for r in readers if r.op == "Where")
                if (
                    len(where.inputs) == 3
                    and where.inputs[0] is isnan.outputs[0]
                    and where.inputs[2] is probs
                    and self.scalar(where.inputs[1]) == 0.0
                    and len(isnan.outputs[0].outputs) == 1
                ):
                    nodes.extend((isnan, where))
                    probs, guard = where.outputs[0], True
                    continue
            if len(readers) != 1:
                return probs, guard
            (node,) = readers
            dtype = self.dtype(probs)
            if node.op == "Identity" or (
                node.op == "Cast" and dtype is not None and self.dtype(node.outputs[0]) == dtype
            ):
                pass
            elif node.op == "Dropout" and not dropout_in_training(node, self.opset):
                if any(t.outputs for t in node.outputs[1:]):
                    return probs, guard
            else:
                return probs, guard
            nodes.append(node)
            probs = node.outputs[0]

    # -- q, k, v --------------------------------------------------------------------------
    def _heads(self, tensor: gs.Tensor, nodes: list[gs.Node], *, key: bool) -> _Heads:
        """Traces q/v (B, N, S, H) or Kᵀ (B, N, H, L) back to a 3-D source or a 4-D tensor."""
        shape = self.shape(tensor)
        if shape is None or len(shape) != 4:
            raise _Fail(f"'{tensor.name}' is not 4-D")
        local: list[gs.Node] = []
        node = self.producer(tensor, "Transpose", "Reshape")
        want = (0, 2, 3, 1) if key else (0, 2, 1, 3)
        if node is not None and node.op == "Transpose" and self.perm(node) == want:
            split = self._split(node.inputs[0])
            if split is not None:
                nodes.extend([node, *split.nodes])
                return split
        if key:
            inner = self._untranspose(tensor, local)
            if inner is not None:
                source = self._heads(inner, local, key=False)
                nodes.extend(local)
                return source
            # Kᵀ given as is: (B, N, H, L)
            return _Heads(tensor, [], False, _int(shape[1]), _int(shape[2]), transposed=True)
        return _Heads(tensor, [], False, _int(shape[1]), _int(shape[3]))

    def _untranspose(self, tensor: gs.Tensor, local: list[gs.Node]) -> gs.Tensor | None:
        """The K (B, N, L, H) that `tensor` = Kᵀ swaps the last two axes of, if spelled so."""
        node = self.producer(tensor, "Transpose", "Reshape")
        if node is None:
            return None
        if node.op == "Transpose":
            if self.perm(node) == (0, 1, 3, 2):
                local.append(node)
                return node.inputs[0]
            return None
        # dynamo: Reshape(K, [-1, L, H]) -> Transpose(0, 2, 1) -> Reshape(., [B, N, H, L])
        mid = self.producer(node.inputs[0], "Transpose")
        if mid is None or self.perm(mid) != (0, 2, 1):
            return None
        first = self.producer(mid.inputs[0], "Reshape")
        if first is None:
            return None
        k = first.inputs[0]
        k_shape, out_shape = self.shape(k), self.shape(tensor)
        if k_shape is None or out_shape is None or len(k_shape) != 4:
            return None
        if tuple(k_shape) != (out_shape[0], out_shape[1], out_shape[3], out_shape[2]):
            return None
        if any(not isinstance(d, int) for d in k_shape) and not _same_dims(k_shape, out_shape):
            return None
        local.extend([node, mid, first])
        return k

    def _split(self, tensor: gs.Tensor) -> _Heads | None:
        """A Reshape (B, S, N*H) -> (B, S, N, H): the source and the head count/size."""
        node = self.producer(tensor, "Reshape")
        if node is None or len(node.inputs) != 2:
            return None
        source = node.inputs[0]
        before, after = self.shape(source), self.shape(tensor)
        if before is None or after is None or len(before) != 3 or len(after) != 4:
            return None
        heads, size, hidden = after[2], after[3], before[2]
        if not (isinstance(heads, int) and isinstance(size, int)):
            return None
        if not _dim_eq(before[0], after[0]) or not _dim_eq(before[1], after[1]):
            return None
        if hidden != heads * size:
            return None
        return _Heads(source, [node], True, heads, size)

    # -- the output -----------------------------------------------------------------------
    def _merge(
        self, out: gs.Tensor, nodes: list[gs.Node], q: _Heads
    ) -> tuple[gs.Tensor, gs.Tensor | None]:
        """Follows (B, N, S, H) -> Transpose(0, 2, 1, 3) -> Reshape; returns (output, shape)."""
        if not q.split:
            return out, None
        local: list[gs.Node] = []
        tensor = out
        readers = list(tensor.outputs)
        if len(readers) == 1 and readers[0].op == "Reshape":
            # a Reshape to the same 4-D shape (torch's sdpa legacy export)
            if self.shape(readers[0].outputs[0]) == self.shape(tensor) and _static(
                self.shape(tensor)
            ):
                local.append(readers[0])
                tensor = readers[0].outputs[0]
                readers = list(tensor.outputs)
        if len(readers) != 1 or readers[0].op != "Transpose":
            raise _Fail("attention output is not merged by Transpose(0, 2, 1, 3)")
        transpose = readers[0]
        if self.perm(transpose) != (0, 2, 1, 3):
            raise _Fail("attention output is not merged by Transpose(0, 2, 1, 3)")
        local.append(transpose)
        readers = list(transpose.outputs[0].outputs)
        if len(readers) != 1 or readers[0].op != "Reshape":
            raise _Fail("merged heads do not feed one Reshape")
        reshape = readers[0]
        local.append(reshape)
        merged = self.shape(reshape.outputs[0])
        heads = self.shape(transpose.outputs[0])
        q_shape = self.shape(q.tensor)
        if merged is None or heads is None or q_shape is None:
            raise _Fail("merged output shape is unknown")
        hidden = heads[2] * heads[3] if _static(heads[2:]) else None
        nodes.extend(local)
        if (
            len(merged) == 3
            and _dim_eq(merged[0], q_shape[0])
            and _dim_eq(merged[1], q_shape[1])
            and hidden is not None
            and merged[2] == hidden
        ):
            return reshape.outputs[0], None
        target = reshape.inputs[1]
        values = self.ints(target)
        if values is None or reshape.attrs.get("allowzero", 0) or 0 in values[2:]:
            raise _Fail(f"merge Reshape to {merged} is not a plain (B, S, hidden) reshape")
        return reshape.outputs[0], target

    def _check_exclusive(self, nodes: list[gs.Node], output: gs.Tensor) -> None:
        covered = {id(n) for n in nodes}
        for node in nodes:
            for tensor in node.outputs:
                if tensor is output:
                    continue
                if id(tensor) in self.protected:
                    raise _Fail(f"intermediate '{tensor.name}' is a graph output")
                if any(id(r) not in covered for r in tensor.outputs):
                    raise _Fail(f"intermediate '{tensor.name}' has a reader outside the site")
            if (node.domain or "") not in _DEFAULT:
                raise _Fail(f"{node.op} '{node.name}' is not in ai.onnx")


def _int(dim: Dim) -> int | None:
    return dim if isinstance(dim, int) else None


def _static(shape: tuple[Dim, ...] | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _dim_eq(a: Dim, b: Dim) -> bool:
    return a is not None and a == b


def _same_dims(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> bool:
    return all(x is not None for x in (*a, *b))
