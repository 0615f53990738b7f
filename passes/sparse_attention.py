"""Rewrite dense scaled-dot-product attention into blockwise local-global sparse attention."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.analysis import AnalysisManager, Shapes
from dsopt.attention import AttentionSite, scan_attention
from dsopt.errors import UsageError
from dsopt.ir import Module
from dsopt.key_mask import KeyMaskReducer
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import fresh_name, remove_nodes, topological_order
from dsopt.quant import calibration

__all__ = ["SparseAttention", "sparse_pattern"]

_SKIPS = (
    "skipped-pattern",
    "skipped-fused",
    "skipped-cross",
    "skipped-dtype",
    "skipped-mask",
    "skipped-causal",
    "skipped-shape",
)
_INT_MAX = np.iinfo(np.int64).max


class _Skip(Exception):
    """Internal: a site cannot be rewritten; args are (statistic, reason)."""


def sparse_pattern(
    s: int, window: int, global_tokens: int, causal: bool, dilation: int = 1
) -> np.ndarray:
    """The (s, s) boolean pattern the rewrite computes: True where query i attends key j."""
    i = np.arange(s)[:, None]
    j = np.arange(s)[None, :]
    back = i - j
    if causal:
        local = (back >= 0) & (back <= dilation * (window - 1)) & (back % dilation == 0)
    else:
        local = (np.abs(back) <= dilation * (window // 2)) & (back % dilation == 0)
    allowed = local | (j < global_tokens) | (i < global_tokens)
    return allowed & (back >= 0) if causal else allowed


@dataclasses.dataclass(frozen=True)
class SparseAttention(Pass):
    """softmax(scale · Q Kᵀ + mask) V, O(n²)  ==>  local-global sparse attention, O(n·(w+g)).

    The pattern (`sparse_pattern`): with w = window, g = global_tokens, d = dilation,
      1. local, bidirectional: query i attends key j when |i - j| <= d·(w // 2) and
         (i - j) % d == 0; causal: 0 <= i - j <= d·(w - 1) and (i - j) % d == 0
         (w keys including i itself, i.e. i - w < j <= i for d = 1);
      2. global keys: every query attends keys 0..g-1 (only j <= i when causal);
      3. global queries: queries 0..g-1 attend every key (only j <= i when causal).
    The model's mask (additive or boolean) still applies to every key; a (…, S, L) mask
    whose rows are all equal (transformers' broadcast padding mask) is recomputed at
    (…, 1, L) first (`dsopt.key_mask`, stat `masks-per-key`). Sites are decomposed attention
    or single MultiHeadAttention (com.microsoft) / Attention (opset 23) nodes, e.g. from
    `fuse-attention`; a fused node with past key/values, packed projections, grouped-query
    heads or softcap is left alone (`skipped-fused`). `causal=auto` keeps the site's causal
    flag; `true` makes every site causal; `false` uses the bidirectional pattern and skips
    causal sites.

    Built from standard ops (opset >= 13): the sequence is padded in the graph to nb·block
    (dynamic lengths work), queries are cut into blocks (B, N, nb, block, H) and scored
    against their neighbour key blocks (b-1, b, b+1; causal b-1, b) followed by the g
    global keys, in one MatMul and one Softmax; one bias (mask + pattern, shared by every
    site with the same mask and length) removes keys outside the window, past the sequence
    end, and keys < g from the local part (they are counted once, as globals). Global query
    rows are computed densely (g × n) and replace the first g rows. Every tensor is
    O(n · (block + g)). Needs block >= d·(w // 2) (causal: block >= d·(w - 1)); the default
    block is that reach rounded up to a multiple of 16 (128 for a bidirectional w = 256:
    3·128 local keys per query, not 3·256).

    Lossy: when the window covers the sequence (w // 2 >= n - 1, causal w >= n, d = 1) the
    result equals the dense attention within fp32 rounding (`tolerance`); otherwise the
    dropped attention mass is the error, measured on calibration data when given
    (`dropped-mass`: mean over sites, samples and query rows of the dense softmax
    probability outside the pattern; `dropped-mass-max`: worst site).
    """

    name: ClassVar[str] = "sparse-attention"
    summary: ClassVar[str] = "dense attention -> blockwise local-global sparse attention"
    stage: ClassVar[str] = "attention"
    exactness: ClassVar[str] = "lossy"
    tolerance: ClassVar[float | None] = 1e-4
    opsets: ClassVar[tuple[int | None, int | None]] = (13, None)

    window: int = dataclasses.field(default=256, metadata={"help": "local window width w"})
    global_tokens: int = dataclasses.field(
        default=16, metadata={"help": "first g positions attend to and are attended by all"}
    )
    causal: str = dataclasses.field(
        default="auto", metadata={"help": "auto (keep the site's), true, or false"}
    )
    dilation: int = dataclasses.field(default=1, metadata={"help": "local window dilation"})
    block: int = dataclasses.field(
        default=0, metadata={"help": "block size (0: the window reach, rounded up to 16)"}
    )
    samples: int = dataclasses.field(
        default=4, metadata={"help": "calibration samples for dropped-mass (0: skip)"}
    )

    def _validate(self) -> None:
        if self.window < 1:
            raise UsageError(
                f"sparse-attention: window must be >= 1, not {self.window}",
                hint="try window=256",
            )
        if self.global_tokens < 0:
            raise UsageError(
                f"sparse-attention: global_tokens must be >= 0, not {self.global_tokens}",
                hint="0 disables global tokens",
            )
        if self.dilation < 1:
            raise UsageError(
                f"sparse-attention: dilation must be >= 1, not {self.dilation}",
                hint="1 is a contiguous window",
            )
        if self.causal not in ("auto", "true", "false"):
            raise UsageError(
                f"sparse-attention: causal must be auto, true or false, not '{self.causal}'",
                hint="auto keeps each site's causal flag",
            )
        if self.block < 0:
            raise UsageError(
                f"sparse-attention: block must be >= 0, not {self.block}",
                hint="0 picks the window reach",
            )
        if self.samples < 0:
            raise UsageError(
                f"sparse-attention: samples must be >= 0, not {self.samples}",
                hint="0 skips the dropped-mass measurement",
            )
        need = self._reach(self.causal == "true")
        if self.block and self.block < max(1, need):
            raise UsageError(
                f"sparse-attention: block={self.block} is smaller than the window reach {need}",
                hint=f"use block >= {need} (or 0 for the default)",
            )

    def _reach(self, causal: bool) -> int:
        """How far back (or forward) a local window reaches."""
        return self.dilation * ((self.window - 1) if causal else (self.window // 2))

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Rewrites every decomposed self-attention site."""
        self._validate()
        analyses = ctx.analyses if ctx.analyses is not None else AnalysisManager(module)
        sites, rejected = scan_attention(module, analyses)
        stats: collections.Counter[str] = collections.Counter()
        stats["skipped-pattern"] = len(rejected)
        chosen: list[tuple[AttentionSite, bool]] = []
        for site in sites:
            try:
                chosen.append((site, self._check(site)))
            except _Skip as skip:
                stat, reason = skip.args
                stats[stat] += 1
                ctx.logger.debug("sparse-attention: site at '%s': %s", site.output.name, reason)
        out: dict[str, int | float | str] = {}
        if chosen and ctx.calibration is not None and self.samples:
            out.update(self._dropped_mass(module, chosen, ctx))
        names = {n for g in module.graphs() for n in g.tensors()}
        reducers: dict[int, KeyMaskReducer] = {}
        shared: dict[Any, Any] = {}
        per_key = 0
        for site, causal in chosen:
            reduced = _per_key_mask(site, reducers, names, analyses.get(Shapes))
            per_key += reduced is not site
            _Builder(reduced, names, self, causal, shared).apply()
        for reducer in reducers.values():
            reducer.graph.nodes.extend(reducer.nodes)
        for graph in {id(s.graph): s.graph for s, _ in chosen}.values():
            graph.nodes = topological_order(graph)
        result: dict[str, int | float | str] = {"sites-rewritten": len(chosen)}
        result["masks-per-key"] = per_key
        result.update({name: stats[name] for name in _SKIPS})
        result.update(out)
        return PassResult(bool(chosen), result)

    def _check(self, site: AttentionSite) -> bool:
        """The causal flag the site is rewritten with, or _Skip."""
        if site.unsupported:
            raise _Skip("skipped-fused", site.unsupported)
        s, l_ = site.seq_lengths
        if s is None or s != l_:
            raise _Skip("skipped-cross", f"query length {s} and key length {l_} differ")
        if site.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise _Skip("skipped-dtype", f"dtype {site.dtype}")
        if site.num_heads is None or site.head_size is None:
            raise _Skip("skipped-shape", "unknown head count or size")
        mask = site.mask
        if mask is not None:
            shape = mask.shape
            if (
                shape is None
                or not shape
                or (len(shape) >= 2 and shape[-2] != 1 and (shape[-2] != s or shape[-1] != l_))
            ):
                raise _Skip("skipped-mask", f"mask of shape {shape} does not fit (S, L)")
            if mask.kind == "additive" and mask.tensor.dtype is not None:
                if np.dtype(mask.tensor.dtype) != site.dtype:
                    raise _Skip("skipped-mask", "additive mask dtype differs from the scores")
        if self.causal == "false" and site.causal:
            raise _Skip("skipped-causal", "causal=false would drop the site's causal mask")
        causal = site.causal or self.causal == "true"
        need = self._reach(causal)
        if self.block and self.block < max(1, need):
            raise _Skip("skipped-shape", f"block {self.block} < reach {need}")
        return causal

    def _dropped_mass(
        self, module: Module, chosen: list[tuple[AttentionSite, bool]], ctx: PassContext
    ) -> dict[str, float | int]:
        """Mean/max dense softmax mass outside the pattern, on a few calibration samples."""
        data = ctx.calibration
        if not isinstance(data, calibration.CalibrationData):
            data = calibration.CalibrationData.from_feeds(list(data or []))
        probes = {}
        for site, causal in chosen:
            softmax = next(n for n in site.nodes if n.op == "Softmax")
            probes[softmax.outputs[0].name] = causal
        totals = dict.fromkeys(probes, 0.0)
        count = 0
        with calibration.Probe(module.to_proto(), list(probes), label=self.name) as probe:
            for values in probe.stream(data.limited(self.samples)):
                count += 1
                for name, causal in probes.items():
                    p = np.nan_to_num(values[name].astype(np.float64))
                    s, length = p.shape[-2:]
                    keep = sparse_pattern(
                        max(s, length), self.window, self.global_tokens, causal, self.dilation
                    )[:s, :length]
                    totals[name] += float(p[..., ~keep].sum() / max(1, p[..., 0].size))
        if not count:
            return {}
        per_site = [t / count for t in totals.values()]
        return {
            "dropped-mass": round(float(np.mean(per_site)), 6),
            "dropped-mass-max": round(float(np.max(per_site)), 6),
            "calibration-samples": count,
        }


def _default_block(reach: int) -> int:
    """The smallest block that holds the window's reach, rounded up to 16 for vector loops."""
    return max(1, reach) if reach < 16 else -(-reach // 16) * 16


def _per_key_mask(
    site: AttentionSite,
    reducers: dict[int, KeyMaskReducer],
    names: set[str],
    shapes: Mapping[str, Any],
) -> AttentionSite:
    """The site with its (…, S, L) mask recomputed at (…, 1, L) when no row differs."""
    mask = site.mask
    if mask is None or mask.shape is None or len(mask.shape) < 2 or mask.shape[-2] == 1:
        return site
    reducer = reducers.setdefault(id(site.graph), KeyMaskReducer(site.graph, names, shapes))
    row = reducer.reduce(mask.tensor)
    if row is None:
        return site
    shape = (*mask.shape[:-2], 1, mask.shape[-1])
    return dataclasses.replace(site, mask=dataclasses.replace(mask, tensor=row, shape=shape))


class _Builder:
    """Builds the blockwise sparse replacement of one site, then swaps it in.

    `shared` holds the pattern/mask bias of earlier sites: sites with the same mask tensor,
    causal flag and sequence dim (e.g. every layer of an encoder) add the same bias tensor.
    """

    def __init__(
        self,
        site: AttentionSite,
        names: set[str],
        opts: SparseAttention,
        causal: bool,
        shared: dict[Any, Any],
    ):
        self.site = site
        self.names = names
        self.causal = causal
        self.shared = shared
        self.dtype = np.dtype(site.dtype)
        self.g = opts.global_tokens
        self.w = opts.window
        self.d = opts.dilation
        self.blk = opts.block or _default_block(opts._reach(causal))
        self.width = (2 if causal else 3) * self.blk  # local keys per query block
        self.nodes: list[gs.Node] = []
        self.base = site.output.name or "attention"

    def fresh(self, hint: str) -> str:
        return fresh_name(self.names, f"{self.base}/sparse/{hint}")

    def const(self, value: Any, dtype: Any = np.int64) -> gs.Constant:
        return gs.Constant(self.fresh("c"), np.array(value, dtype=dtype))

    def op(self, op: str, *inputs: gs.Tensor, **attrs: Any) -> gs.Variable:
        out = gs.Variable(self.fresh(op.lower()))
        self.nodes.append(
            gs.Node(op, name=self.fresh(op), attrs=attrs, inputs=list(inputs), outputs=[out])
        )
        return out

    # -- helpers ---------------------------------------------------------------------------
    def heads(self, tensor: gs.Tensor) -> gs.Tensor:
        """(B, S, N·H) -> (B, N, S, H)."""
        n, h = self.site.num_heads, self.site.head_size
        split = self.op("Reshape", tensor, self.const([0, 0, n, h]))
        return self.op("Transpose", split, perm=[0, 2, 1, 3])

    def pad_seq(self, x: gs.Tensor, front: int, back: gs.Tensor, axis: int, rank: int) -> Any:
        """Pads axis `axis` of a rank-`rank` tensor by `front` and the 1-D `back`."""
        before = np.zeros(rank, np.int64)
        before[axis] = front
        parts = [self.const(before), self.const(np.zeros(axis, np.int64)), back]
        parts.append(self.const(np.zeros(rank - axis - 1, np.int64)))
        pads = self.op("Concat", *[p for p in parts if p.shape != (0,)], axis=0)
        return self.op("Pad", x, pads)

    def neighbours(self, blocks: gs.Tensor, axis: int) -> gs.Tensor:
        """Blocks (…, nb+2|nb+1, blk, …) -> (…, nb, 3|2·blk, …): each block with its neighbours."""
        count = 2 if self.causal else 3
        parts = []
        for i in range(count):
            end = _INT_MAX if i == count - 1 else i - count + 1
            parts.append(
                self.op("Slice", blocks, self.const([i]), self.const([end]), self.const([axis]))
            )
        return self.op("Concat", *parts, axis=axis + 1)

    def dims(self, tensor: gs.Tensor, start: int, end: int) -> gs.Tensor:
        """Shape(tensor)[start:end], 1-D int64."""
        return self.op(
            "Slice",
            self.op("Shape", tensor),
            self.const([start]),
            self.const([end]),
            self.const([0]),
        )

    def blocks_of(self, s: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor]:
        """(nb, tail) for a 1-D length s: nb = ceil(s / blk) blocks, tail = nb·blk - s."""
        blk = self.const([self.blk])
        nb = self.op("Div", self.op("Add", s, self.const([self.blk - 1])), blk)
        return nb, self.op("Sub", self.op("Mul", nb, blk), s)

    def with_globals(self, local: gs.Tensor, glob: gs.Tensor, axis: int) -> gs.Tensor:
        """Concat(local, glob broadcast to local's leading dims) on `axis` (the last two kept)."""
        target = self.op("Concat", self.dims(local, 0, axis), self.dims(glob, axis, 5), axis=0)
        return self.op("Concat", local, self.op("Expand", glob, target), axis=axis)

    # -- the rewrite -----------------------------------------------------------------------
    def apply(self) -> None:
        site = self.site
        h = site.head_size
        if site.layout == "bsd":
            q, k, v = (self.heads(t) for t in (site.q, site.k, site.v))
        else:
            q, k, v = site.q, site.k, site.v
            if site.k_transposed:
                k = self.op("Transpose", k, perm=[0, 1, 3, 2])
        q = self.op("Mul", q, self.const(site.scale or 1.0, self.dtype))
        s = self.op("Gather", self.op("Shape", q), self.const([2]), axis=0)
        nb, tail = self.blocks_of(s)
        q_blocks = self.op(
            "Reshape", self.pad_seq(q, 0, tail, 2, 4), self.const([0, 0, -1, self.blk, h])
        )
        # every query block meets its neighbour key blocks, then the g global keys:
        # (B, N, nb, width + g, H); scores (B, N, nb, blk, width + g)
        keys, values = (self.block_keys(t, tail) for t in (k, v))
        scores = self.op("MatMul", q_blocks, self.op("Transpose", keys, perm=[0, 1, 2, 4, 3]))
        probs = self.op("Softmax", self.masked(scores, s), axis=-1)
        out = self.op("Reshape", self.op("MatMul", probs, values), self.const([0, 0, -1, h]))
        out = self.op("Slice", out, self.const([self.g]), s, self.const([2]))
        if self.g:
            s_scalar = self.op("Reshape", s, self.const([]))
            out = self.op("Concat", self._global_rows(q, k, v, s_scalar), out, axis=2)
        if site.nan_guard:
            out = self.op("Where", self.op("IsNaN", out), self.const(0.0, self.dtype), out)
        if site.layout == "bsd":
            merged = self.op("Transpose", out, perm=[0, 2, 1, 3])
            out = self.op("Reshape", merged, self.const([0, 0, site.num_heads * site.head_size]))
            if site.output_shape is not None:
                out = self.op("Reshape", out, site.output_shape)
        self._swap_in(out)

    def block_keys(self, t: gs.Tensor, tail: gs.Tensor) -> gs.Tensor:
        """(B, N, L, H) keys or values -> (B, N, nb, width + g, H): neighbours, then globals."""
        h = self.site.head_size
        after = self.op("Add", tail, self.const([self.blk * (0 if self.causal else 1)]))
        blocks = self.op(
            "Reshape", self.pad_seq(t, self.blk, after, 2, 4), self.const([0, 0, -1, self.blk, h])
        )
        near = self.neighbours(blocks, 2)
        if not self.g:
            return near
        glob = self.op("Slice", t, self.const([0]), self.const([self.g]), self.const([2]))
        return self.with_globals(near, self.op("Unsqueeze", glob, self.const([2])), 3)

    def masked(self, scores: gs.Tensor, s: gs.Tensor) -> gs.Tensor:
        """Scores with the model's mask and the sparsity pattern (-inf outside) applied."""
        mask = self.site.mask
        seq = self.site.seq_lengths[0]
        key = None
        if seq is not None:
            key = (id(self.site.graph), id(mask.tensor) if mask else None, self.causal, seq)
        if key is None or key not in self.shared:
            built = self._bias(s)
            if key is not None:
                self.shared[key] = built
        replace, bias = self.shared[key] if key is not None else built
        if replace is not None:
            fill = self.const(mask.fill, self.dtype)
            scores = self.op("Where", replace, *([scores, fill] if mask.attend else [fill, scores]))
        return self.op("Add", scores, bias)

    def _bias(self, s: gs.Tensor) -> tuple[gs.Tensor | None, gs.Tensor]:
        """(boolean mask to Where with, or None; additive bias) in the blocked score layout."""
        allowed = self.op("Unsqueeze", self._allowed(s), self.const([0, 1]))
        mask = self.site.mask
        if mask is None:
            low = self.const(-np.inf, self.dtype)
            return None, self.op("Where", allowed, self.const(0.0, self.dtype), low)
        m = self._key_blocks(mask)
        if mask.kind == "boolean":
            low = self.const(-np.inf, self.dtype)
            return m, self.op("Where", allowed, self.const(0.0, self.dtype), low)
        return None, self.op("Where", allowed, m, self.const(-np.inf, self.dtype))

    def _allowed(self, s: gs.Tensor) -> gs.Tensor:
        """(nb, blk, width + min(g, s)) bool: which key of each query row the pattern keeps."""
        nb, _ = self.blocks_of(s)
        nb_scalar = self.op("Reshape", nb, self.const([]))
        starts = self.op(
            "Mul", self.op("Range", self.const(0), nb_scalar, self.const(1)), self.const(self.blk)
        )
        # key positions of the local part: j = b·blk + c - blk, shape (nb, 1, width)
        j = self.op(
            "Add",
            self.op("Reshape", starts, self.const([-1, 1, 1])),
            self.const(np.arange(self.width) - self.blk),
        )
        s_scalar = self.op("Reshape", s, self.const([]))
        valid = self.op(
            "And",
            self.op("Less", j, s_scalar),
            self.op("Not", self.op("Less", j, self.const(self.g))),  # globals come later
        )
        local = self.op("And", valid, self.const(self._band(), bool))  # (nb, blk, width)
        if not self.g:
            return local
        keys = self.op("Min", s, self.const([self.g]))
        if self.causal:  # query i sees global key j only when j <= i
            qpos = self.op(
                "Reshape",
                self.op("Range", self.const(0), self.op("Mul", nb_scalar, self.const(self.blk)),
                        self.const(1)),
                self.const([-1, self.blk, 1]),
            )  # fmt: skip
            glob = self.op("Not", self.op("Less", qpos, self.const(np.arange(self.g)[None, None])))
            glob = self.op("Slice", glob, self.const([0]), keys, self.const([2]))
        else:
            target = self.op("Concat", self.dims(local, 0, 2), keys, axis=0)
            glob = self.op("Expand", self.const(np.ones((1, 1, 1), bool), bool), target)
        return self.op("Concat", local, glob, axis=-1)

    def _band(self) -> np.ndarray:
        """(blk, width) table: local key c of query row r lies in the window."""
        r = np.arange(self.blk)[:, None]
        back = r + self.blk - np.arange(self.width)[None, :]  # i - j
        if self.causal:
            ok = (back >= 0) & (back <= self.d * (self.w - 1))
        else:
            ok = np.abs(back) <= self.d * (self.w // 2)
        return ok & (back % self.d == 0)

    def _key_blocks(self, mask: Any) -> gs.Tensor:
        """The model's mask in the blocked score layout (B|1, N|1, nb|1, blk|1, width + g)."""
        shape = mask.shape
        boolean = mask.kind == "boolean"
        m4 = self._rank4(mask.tensor, len(shape))
        if len(shape) >= 2 and shape[-2] != 1:
            parts = [self._per_query(m4, boolean, local=True)]
            if self.g:
                parts.append(self._per_query(m4, boolean, local=False))
            return self.op("Concat", *parts, axis=-1) if len(parts) > 1 else parts[0]
        if shape[-1] == 1:
            return self.op("Reshape", m4, self.const([0, 0, 1, 1, 1]))
        if boolean:
            m4 = self.op("Cast", m4, to=1)
        blk = self.blk
        _, tail = self.blocks_of(self.op("Gather", self.op("Shape", m4), self.const([3]), axis=0))
        tail = self.op("Add", tail, self.const([0 if self.causal else blk]))
        blocks = self.op("Reshape", self.pad_seq(m4, blk, tail, 3, 4), self.const([0, 0, -1, blk]))
        m = self.op("Reshape", self.neighbours(blocks, 2), self.const([0, 0, 0, 1, -1]))
        if self.g:
            glob = self.op("Slice", m4, self.const([0]), self.const([self.g]), self.const([3]))
            m = self.with_globals(m, self.op("Reshape", glob, self.const([0, 0, 1, 1, -1])), 4)
        return self.op("Cast", m, to=9) if boolean else m

    def _split_rows(self, x: gs.Tensor) -> gs.Tensor:
        """(A, B, nb·blk, C) -> (A, B, nb, blk, C) for a dynamic C."""
        target = self.op(
            "Concat", self.dims(x, 0, 2), self.const([-1, self.blk]), self.dims(x, 3, 4), axis=0
        )
        return self.op("Reshape", x, target)

    def _per_query(self, m4: gs.Tensor, boolean: bool, local: bool) -> gs.Tensor:
        """A (B|1, N|1, S, S) mask laid out like the local or global-key scores (banded gather)."""
        blk = self.blk
        if boolean:
            m4 = self.op("Cast", m4, to=1)
        nb, tail = self.blocks_of(self.op("Gather", self.op("Shape", m4), self.const([3]), axis=0))
        rows = self.pad_seq(m4, 0, tail, 2, 4)
        if local:
            back = self.op("Add", tail, self.const([0 if self.causal else blk]))
            m5 = self._split_rows(self.pad_seq(rows, blk, back, 3, 4))
            starts = self.op(
                "Mul",
                self.op(
                    "Range", self.const(0), self.op("Reshape", nb, self.const([])), self.const(1)
                ),
                self.const(blk),
            )
            index = self.op(
                "Add",
                self.op("Reshape", starts, self.const([-1, 1, 1])),
                self.const(np.broadcast_to(np.arange(self.width), (1, blk, self.width))),
            )
            full = self.op("Concat", self.dims(m5, 0, 2), self.op("Shape", index), axis=0)
            m = self.op("GatherElements", m5, self.op("Expand", index, full), axis=4)
        else:
            cols = self.op("Slice", rows, self.const([0]), self.const([self.g]), self.const([3]))
            m = self._split_rows(cols)
        return self.op("Cast", m, to=9) if boolean else m

    def _global_rows(self, q: gs.Tensor, k: gs.Tensor, v: gs.Tensor, s: gs.Tensor) -> gs.Tensor:
        """Queries 0..g-1 against every key, dense (rank 5 so detectors leave them alone)."""
        h = self.site.head_size
        q_g = self.op("Slice", q, self.const([0]), self.const([self.g]), self.const([2]))
        q5 = self.op("Reshape", q_g, self.const([0, 0, 1, -1, h]))
        # Kᵀ transposed at rank 4, where onnxruntime's Transpose is fast, then made rank 5
        k_t = self.op("Transpose", k, perm=[0, 1, 3, 2])
        k5 = self.op("Reshape", k_t, self.const([0, 0, 1, h, -1]))
        v5 = self.op("Reshape", v, self.const([0, 0, 1, -1, h]))
        scores = self.op("MatMul", q5, k5)
        mask = self.site.mask
        if mask is not None:
            scores = self._user_mask_dense(scores, mask)
        if self.causal:
            rows = self.op("Range", self.const(0), self.const(self.g), self.const(1))
            cols = self.op("Range", self.const(0), s, self.const(1))
            ok = self.op(
                "Not",
                self.op(
                    "Less",
                    self.op("Reshape", rows, self.const([-1, 1])),
                    self.op("Reshape", cols, self.const([1, -1])),
                ),
            )
            ok = self.op(
                "Slice",
                ok,
                self.const([0]),
                self.op("Reshape", s, self.const([1])),
                self.const([0]),
            )
            bias = self.op(
                "Where", ok, self.const(0.0, self.dtype), self.const(-np.inf, self.dtype)
            )
            scores = self.op("Add", scores, bias)
        probs = self.op("Softmax", scores, axis=-1)
        return self.op("Reshape", self.op("MatMul", probs, v5), self.const([0, 0, -1, h]))

    def _rank4(self, tensor: gs.Tensor, rank: int) -> gs.Tensor:
        if rank == 4:
            return tensor
        return self.op("Unsqueeze", tensor, self.const(list(range(4 - rank))))

    def _user_mask_dense(self, scores: gs.Tensor, mask: Any) -> gs.Tensor:
        shape = mask.shape
        m4 = self._rank4(mask.tensor, len(shape))
        if len(shape) >= 2 and shape[-2] != 1:
            m4 = self.op("Slice", m4, self.const([0]), self.const([self.g]), self.const([2]))
            m = self.op("Unsqueeze", m4, self.const([2]))
        else:
            m = self.op("Reshape", m4, self.const([0, 0, 1, 1, -1]))
        if mask.kind == "additive":
            return self.op("Add", scores, m)
        fill = self.const(mask.fill, self.dtype)
        return self.op("Where", m, *([scores, fill] if mask.attend else [fill, scores]))

    def _swap_in(self, out: gs.Tensor) -> None:
        site = self.site
        last = self.nodes[-1]
        assert last.outputs[0] is out
        last.outputs.clear()
        remove_nodes(site.graph, site.nodes)
        last.outputs.append(site.output)
        site.graph.nodes.extend(self.nodes)
