"""Rewrite dense scaled-dot-product attention into blockwise local-global sparse attention."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.analysis import AnalysisManager
from dsopt.attention import AttentionSite, scan_attention
from dsopt.errors import UsageError
from dsopt.ir import Module
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
    The model's mask (a key padding mask: additive or boolean, shape (B|1, N|1, 1, L)) still
    applies to every key. `causal=auto` keeps the site's causal flag; `true` makes every
    site causal; `false` uses the bidirectional pattern and skips causal sites.

    Built from standard ops (opset >= 13): the sequence is padded in the graph to nb·block
    (dynamic lengths work), queries are cut into blocks (B, N, nb, block, H) and scored
    against their neighbour key blocks (b-1, b, b+1; causal b-1, b) concatenated with the
    g global keys; a band mask (Range/compare constants) removes keys outside the window,
    past the sequence end, and keys < g from the local part (they are counted once, in the
    global part). Global query rows are computed densely (g × n) and replace the first g
    rows. Every tensor is O(n · (block + g)). Needs block >= d·(w // 2) (causal:
    block >= d·(w - 1)); default block = d·w.

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
    block: int = dataclasses.field(default=0, metadata={"help": "block size (0: dilation·w)"})
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
                hint="0 picks dilation·window",
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
        for site, causal in chosen:
            _Builder(site, names, self, causal).apply()
        for graph in {id(s.graph): s.graph for s, _ in chosen}.values():
            graph.nodes = topological_order(graph)
        result: dict[str, int | float | str] = {"sites-rewritten": len(chosen)}
        result.update({name: stats[name] for name in _SKIPS})
        result.update(out)
        return PassResult(bool(chosen), result)

    def _check(self, site: AttentionSite) -> bool:
        """The causal flag the site is rewritten with, or _Skip."""
        if site.kind == "fused":
            raise _Skip("skipped-fused", "already a fused attention node")
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


class _Builder:
    """Builds the blockwise sparse replacement of one site, then swaps it in."""

    def __init__(self, site: AttentionSite, names: set[str], opts: SparseAttention, causal: bool):
        self.site = site
        self.names = names
        self.causal = causal
        self.dtype = np.dtype(site.dtype)
        self.g = opts.global_tokens
        self.w = opts.window
        self.d = opts.dilation
        self.blk = opts.block or opts.dilation * opts.window
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

    # -- the rewrite -----------------------------------------------------------------------
    def apply(self) -> None:
        site = self.site
        h = site.head_size
        blk, g = self.blk, self.g
        if site.layout == "bsd":
            q, k, v = (self.heads(t) for t in (site.q, site.k, site.v))
        else:
            q, k, v = site.q, site.k, site.v
            if site.k_transposed:
                k = self.op("Transpose", k, perm=[0, 1, 3, 2])
        q = self.op("Mul", q, self.const(site.scale or 1.0, self.dtype))
        # s, nb = ceil(s / blk), tail = nb·blk - s (1-D int64 tensors)
        s = self.op("Gather", self.op("Shape", q), self.const([2]), axis=0)
        blk_t = self.const([blk])
        nb = self.op("Div", self.op("Add", s, self.const([blk - 1])), blk_t)
        tail = self.op("Sub", self.op("Mul", nb, blk_t), s)
        after = 1 if self.causal else 2  # neighbour blocks on each side, padded in
        k_tail = self.op("Add", tail, self.const([blk * (after - 1)]))
        q_blocks = self.op(
            "Reshape", self.pad_seq(q, 0, tail, 2, 4), self.const([0, 0, -1, blk, h])
        )
        k_n, v_n = (
            self.neighbours(
                self.op(
                    "Reshape",
                    self.pad_seq(t, blk, k_tail, 2, 4),
                    self.const([0, 0, -1, blk, h]),
                ),
                2,
            )
            for t in (k, v)
        )
        width = (2 if self.causal else 3) * blk
        scores = self.op("MatMul", q_blocks, self.op("Transpose", k_n, perm=[0, 1, 2, 4, 3]))
        # key positions of the local part: j = b·blk + c - blk, shape (nb, 1, width)
        starts = self.op(
            "Mul",
            self.op("Range", self.const(0), self.op("Reshape", nb, self.const([])), self.const(1)),
            self.const(blk),
        )
        offsets = self.const(np.arange(width) - blk)
        j = self.op("Add", self.op("Reshape", starts, self.const([-1, 1, 1])), offsets)
        s_scalar = self.op("Reshape", s, self.const([]))
        valid = self.op(
            "And",
            self.op("Less", j, s_scalar),
            self.op("Not", self.op("Less", j, self.const(g))),
        )
        band = self.const(self._band(width), bool)
        allowed = self.op("And", valid, band)  # (nb, blk, width)
        mask = site.mask
        parts_scores = [self._masked(scores, allowed, mask, local=True)]
        if g:
            k_g = self.op("Slice", k, self.const([0]), self.const([g]), self.const([2]))
            k_g5 = self.op("Reshape", k_g, self.const([0, 0, 1, -1, h]))
            g_scores = self.op("MatMul", q_blocks, self.op("Transpose", k_g5, perm=[0, 1, 2, 4, 3]))
            g_allowed = None
            if self.causal:
                qpos = self.op(
                    "Reshape",
                    self.op(
                        "Range",
                        self.const(0),
                        self.op("Mul", self.op("Reshape", nb, self.const([])), self.const(blk)),
                        self.const(1),
                    ),
                    self.const([-1, blk, 1]),
                )
                g_allowed = self.op(
                    "Not", self.op("Less", qpos, self.const(np.arange(g)[None, None, :]))
                )
                g_allowed = self.op("Slice", g_allowed, self.const([0]), s, self.const([2]))
            parts_scores.append(self._masked(g_scores, g_allowed, mask, local=False))
        all_scores = (
            self.op("Concat", *parts_scores, axis=-1) if len(parts_scores) > 1 else parts_scores[0]
        )
        probs = self.op("Softmax", all_scores, axis=-1)
        if g:
            p_loc = self.op("Slice", probs, self.const([0]), self.const([width]), self.const([4]))
            p_glob = self.op(
                "Slice", probs, self.const([width]), self.const([_INT_MAX]), self.const([4])
            )
            v_g5 = self.op(
                "Reshape",
                self.op("Slice", v, self.const([0]), self.const([g]), self.const([2])),
                self.const([0, 0, 1, -1, h]),
            )
            out5 = self.op("Add", self.op("MatMul", p_loc, v_n), self.op("MatMul", p_glob, v_g5))
        else:
            out5 = self.op("MatMul", probs, v_n)
        out = self.op("Reshape", out5, self.const([0, 0, -1, h]))
        out = self.op("Slice", out, self.const([g]), s, self.const([2]))
        if g:
            out = self.op("Concat", self._global_rows(q, k, v, s_scalar), out, axis=2)
        if site.nan_guard:
            out = self.op("Where", self.op("IsNaN", out), self.const(0.0, self.dtype), out)
        if site.layout == "bsd":
            merged = self.op("Transpose", out, perm=[0, 2, 1, 3])
            out = self.op("Reshape", merged, self.const([0, 0, site.num_heads * site.head_size]))
            if site.output_shape is not None:
                out = self.op("Reshape", out, site.output_shape)
        self._swap_in(out)

    def _band(self, width: int) -> np.ndarray:
        """(blk, width) table: local key c of query row r lies in the window."""
        r = np.arange(self.blk)[:, None]
        back = r + self.blk - np.arange(width)[None, :]  # i - j
        if self.causal:
            ok = (back >= 0) & (back <= self.d * (self.w - 1))
        else:
            ok = np.abs(back) <= self.d * (self.w // 2)
        return ok & (back % self.d == 0)

    def _masked(
        self, scores: gs.Tensor, allowed: gs.Tensor | None, mask: Any, *, local: bool
    ) -> gs.Tensor:
        """Applies the model's key mask, then the structural pattern (-inf outside it)."""
        if mask is not None:
            scores = self._user_mask(scores, mask, local)
        if allowed is None:
            return scores
        shaped = self.op("Unsqueeze", allowed, self.const([0, 1]))
        bias = self.op(
            "Where", shaped, self.const(0.0, self.dtype), self.const(-np.inf, self.dtype)
        )
        return self.op("Add", scores, bias)

    def _user_mask(self, scores: gs.Tensor, mask: Any, local: bool) -> gs.Tensor:
        """The model's mask, laid out like the local or the global-key scores and applied."""
        shape = mask.shape
        tensor = mask.tensor
        boolean = mask.kind == "boolean"
        m4 = self._rank4(tensor, len(shape))
        if len(shape) >= 2 and shape[-2] != 1:
            m = self._per_query(m4, boolean, local)
        elif shape[-1] == 1:
            m = self.op("Reshape", m4, self.const([0, 0, 1, 1, 1]))
        else:
            if boolean:
                m4 = self.op("Cast", m4, to=1)
            if local:
                s = self.op("Gather", self.op("Shape", m4), self.const([3]), axis=0)
                blk = self.blk
                nb = self.op("Div", self.op("Add", s, self.const([blk - 1])), self.const([blk]))
                tail = self.op("Sub", self.op("Mul", nb, self.const([blk])), s)
                tail = self.op("Add", tail, self.const([0 if self.causal else blk]))
                padded = self.pad_seq(m4, blk, tail, 3, 4)
                blocks = self.op("Reshape", padded, self.const([0, 0, -1, blk]))
                near = self.neighbours(blocks, 2)
                m = self.op("Reshape", near, self.const([0, 0, 0, 1, -1]))
            else:
                sliced = self.op(
                    "Slice", m4, self.const([0]), self.const([self.g]), self.const([3])
                )
                m = self.op("Reshape", sliced, self.const([0, 0, 1, 1, -1]))
            if boolean:
                m = self.op("Cast", m, to=9)
        if not boolean:
            return self.op("Add", scores, m)
        fill = self.const(mask.fill, self.dtype)
        branches = [scores, fill] if mask.attend else [fill, scores]
        return self.op("Where", m, *branches)

    def _split_rows(self, x: gs.Tensor) -> gs.Tensor:
        """(A, B, nb·blk, C) -> (A, B, nb, blk, C) for a dynamic C."""
        shape = self.op("Shape", x)
        lead = self.op("Slice", shape, self.const([0]), self.const([2]), self.const([0]))
        last = self.op("Slice", shape, self.const([3]), self.const([4]), self.const([0]))
        target = self.op("Concat", lead, self.const([-1, self.blk]), last, axis=0)
        return self.op("Reshape", x, target)

    def _per_query(self, m4: gs.Tensor, boolean: bool, local: bool) -> gs.Tensor:
        """A (B|1, N|1, S, S) mask laid out like the local or global-key scores (banded gather)."""
        blk = self.blk
        if boolean:
            m4 = self.op("Cast", m4, to=1)
        s = self.op("Gather", self.op("Shape", m4), self.const([3]), axis=0)
        nb = self.op("Div", self.op("Add", s, self.const([blk - 1])), self.const([blk]))
        tail = self.op("Sub", self.op("Mul", nb, self.const([blk])), s)
        rows = self.pad_seq(m4, 0, tail, 2, 4)
        if local:
            width = (2 if self.causal else 3) * blk
            back = self.op("Add", tail, self.const([0 if self.causal else blk]))
            padded = self.pad_seq(rows, blk, back, 3, 4)
            m5 = self._split_rows(padded)
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
                self.const(np.broadcast_to(np.arange(width), (1, blk, width))),
            )
            lead = self.op(
                "Slice", self.op("Shape", m5), self.const([0]), self.const([2]), self.const([0])
            )
            full = self.op("Concat", lead, self.op("Shape", index), axis=0)
            index = self.op("Expand", index, full)
            m = self.op("GatherElements", m5, index, axis=4)
        else:
            cols = self.op("Slice", rows, self.const([0]), self.const([self.g]), self.const([3]))
            m = self._split_rows(cols)
        return self.op("Cast", m, to=9) if boolean else m

    def _global_rows(self, q: gs.Tensor, k: gs.Tensor, v: gs.Tensor, s: gs.Tensor) -> gs.Tensor:
        """Queries 0..g-1 against every key, dense (rank 5 so detectors leave them alone)."""
        h = self.site.head_size
        q_g = self.op("Slice", q, self.const([0]), self.const([self.g]), self.const([2]))
        q5 = self.op("Reshape", q_g, self.const([0, 0, 1, -1, h]))
        k5 = self.op("Reshape", k, self.const([0, 0, 1, -1, h]))
        v5 = self.op("Reshape", v, self.const([0, 0, 1, -1, h]))
        scores = self.op("MatMul", q5, self.op("Transpose", k5, perm=[0, 1, 2, 4, 3]))
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
