"""Quantize constant weights to 8, 4 or 2 bits (weight-only, data free)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from dsopt.errors import UsageError
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import fresh_name, node_subgraphs, read_constant, remove_nodes
from dsopt.quant import calibration
from dsopt.quant.gptq import Hessian, gptq_blocks, gptq_matmul_nbits_layout, gptq_per_channel
from dsopt.quant.grid import (
    INT8,
    UINT8,
    Grid,
    affine_params,
    matmul_nbits_layout,
    pack,
    per_channel_symmetric,
    quantize,
    quantize_blocks,
)

__all__ = ["QuantizeWeights"]

_MS = "com.microsoft"
_DOMAINS = ("", "ai.onnx")
#: Lowest default-domain opset with per-axis DequantizeLinear.
_PER_AXIS_OPSET = 13
#: Lowest opset whose DequantizeLinear takes `block_size` and the element type, per width.
_BLOCKED_OPSET = {4: 21, 2: 25}
#: Site kinds: how the weight read at one node input is quantized.
_CHANNEL, _BLOCK, _NBITS, _ROWS, _GBQ = "channel", "block", "nbits", "rows", "gbq"
_CONV_BLOCK, _CONV_CHANNEL = "conv-block", "conv-channel"
_CONV_KINDS = (_CONV_BLOCK, _CONV_CHANNEL)
_RULES = {
    _CHANNEL: "int8-per-channel",
    _BLOCK: "blocked-qdq",
    _CONV_BLOCK: "conv-blocked-qdq",
    _CONV_CHANNEL: "conv-per-channel-qdq",
    _NBITS: "matmul-nbits",
    _ROWS: "embedding",
    _GBQ: "gather-block-quantized",
}
_SKIPS = ("skipped-shared", "skipped-gemm", "skipped-opset", "skipped-small", "skipped-dtype")
_METHODS = ("rtn", "hqq", "gptq")
#: Conv/ConvTranspose weights below 8 bits get blocks along their reduction axis (input
#: channels per group) from this depth on, one scale per channel below it.
_CONV_MIN_DEPTH = 16
#: GPTQ holds one float64 K x K Hessian per weight; wider reduction axes fall back.
_GPTQ_MAX_K = 16384


@dataclasses.dataclass
class _Site:
    """One node input that reads a weight, and how it would be quantized there."""

    graph: gs.Graph
    node: gs.Node
    index: int
    kind: str
    axis: int

    @property
    def key(self) -> tuple[str, int]:
        """Sites sharing a weight must agree on this to share one quantized copy."""
        return self.kind, self.axis


@dataclasses.dataclass
class _Weight:
    """A float constant (initializer or Constant-node output) and the sites reading it."""

    tensor: gs.Tensor
    value: np.ndarray
    sites: list[_Site] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Stores constant weights as low-bit integers that are dequantized where they are read.

    Rules (one statistic each, counting rewritten nodes):
      1. `int8-per-channel` (`bits=8`): Conv (axis 0), ConvTranspose (axis 1, output
         channels), Gemm B (the N axis, minding transB) and a MatMul's constant 2-D B (axis 1)
         become `DequantizeLinear(int8 q, scale, axis)` feeding the op; symmetric (zp 0) or,
         with `symmetric=False`, uint8 with a zero point per channel.
      2. `bits` 4 or 2, MatMul/Gemm with a constant 2-D weight, blocks of `block_size` along
         the reduction axis K: `blocked-qdq` is the opset-21 (int4/uint4) or opset-25
         (int2/uint2) `DequantizeLinear(q, scale, [zp], axis, block_size)`. A model below that
         opset is converted (`upgrade-opset`'s converter, kept only when the model still
         checks, and only up to the target's opset); otherwise those weights fall back to
         rule `matmul-nbits` for the onnxruntime target (`fallback-ort`) or stay float
         (`skipped-opset`). `matmul-nbits` is `com.microsoft.MatMulNBits` (K, N, bits,
         block_size): Gemm's alpha is folded into the scales and beta * C into the bias when C
         is constant per column; transA or another C stays float (`skipped-gemm`).
         Below opset 13 (no per-axis form at all) the model is raised to 21/25 (or 13), or
         every weight stays float (`skipped-opset`).
      3. `bits` 4 or 2, Conv (weight O x I/g x k...) and ConvTranspose (I x O/g x k...):
         the opset-21/25 DequantizeLinear of rule 2 on the 3-5-D weight, converting the
         opset as there (no com.microsoft fallback: `skipped-opset`). `conv-blocked-qdq`:
         blocks of `block_size` along the reduction axis (Conv axis 1, ConvTranspose axis 0)
         when a group reduces over at least 16 input channels; the last block may be partial.
         `conv-per-channel-qdq`: fewer (depthwise, an RGB stem): one scale (and zero point)
         per index of axis 0, that is per output channel of a Conv and per input channel of
         a ConvTranspose (a depthwise one has one output channel per group).
      4. Embeddings (`embeddings=True`): `Gather(constant [V, D] table, indices, axis=0)`,
         quantized by rows (8 bits: one scale per row; fewer: blocks along D). `embedding`:
         the integer table (sub-byte values packed in uint8 rows) and per-row scales (and
         zero points) are gathered and only the gathered rows are dequantized, in float
         arithmetic that equals DequantizeLinear's exactly (unpacking by Floor/Sub of powers
         of two, Sub, Mul). `gather-block-quantized` (format "ort") is
         `com.microsoft.GatherBlockQuantized` on uint8 data (8 bits: one block per row;
         fewer: packed along D, which needs D * bits to fill whole bytes).
      5. Weights held by Constant nodes count, and every graph is walked: a weight read in
         If/Loop/Scan bodies gets one DequantizeLinear in the innermost graph enclosing all
         its readers. A weight shared by several nodes is quantized once; one that is also
         read some other way (or is a graph output), or whose readers need different
         quantizations, stays float (`skipped-shared`).
      6. `method=gptq` (needs calibration data, `--calib`): MatMul/Gemm weights of rules 1
         and 2 are rounded by GPTQ (`dsopt.quant.gptq`, Frantar et al. 2022) against the
         Hessian `sum X^T X` of their activation input X, gathered in one onnxruntime run over
         at most `samples` calibration feeds (one float64 K x K matrix per weight; a weight
         read by several nodes sums theirs), with dampening `damp`. The emitted integers,
         scales and zero points have exactly the formats of rules 1 and 2. `gptq` counts
         these weights; `gptq-fallback` counts the others: Conv and embedding weights, and
         sites GPTQ cannot observe or afford (in If/Loop/Scan bodies, Gemm with transA, an
         input that is not float or never computed, K > 16384), which take HQQ blocks (RTN
         per channel).
    `method` picks round-to-nearest, HQQ (`dsopt.quant.grid.quantize_blocks`, never worse
    than RTN per block) or GPTQ (rule 6; HQQ where it falls back) for every block-wise and
    row-wise rule; rule 1 is RTN unless GPTQ rounds it (its scales stay min-max). 3 bits
    are refused: ONNX has no 3-bit type and onnxruntime 1.32's MatMulNBits rejects bits=3.
    Non-float32 or non-finite weights stay float (`skipped-dtype`), as do those below
    `min_elements` (`skipped-small`). `weights`,
    `bytes-before` and `bytes-after` count the weights quantized and their storage (packed
    integers plus scales and zero points); `opset` is the opset after the pass.

    Numerics: outputs equal the float model with each weight replaced by
    `dequantize(quantize(w))` of `dsopt.quant.grid` (by GPTQ's integers, with method=gptq),
    up to float32 re-association (MatMulNBits and the folded Gemm alpha). Lossy, with a
    `relative` bound: every output keeps cosine >= 0.98 and relative L2 error <= 0.2
    (`tolerance` 0.02). 8 bits meet it
    with room to spare (over 440 random `strategies.models` graphs: worst relative L2 0.063,
    worst cosine 0.999); 4-bit blocks usually do (median relative L2 0.05) but not on every
    graph (a few percent of random graphs, where small outputs amplify the error); 2 bits
    lose more and need a looser check. GPTQ lowers the error where the calibration feeds
    represent the inputs: on `benchmarks/models/bert_6l_384h.onnx` (int4, blocks of 32, 32
    random-token calibration feeds, 8 others measured) the mean relative L2 error of the
    outputs is 0.052 against 0.088 (RTN) and 0.083 (HQQ).
    """

    name: ClassVar[str] = "quantize-weights"
    summary: ClassVar[str] = (
        "store weights as int8/int4/int2 (per-channel or block-wise, RTN/HQQ/GPTQ)"
    )
    stage: ClassVar[str] = "quantize"
    exactness: ClassVar[Literal["lossy"]] = "lossy"
    tolerance: ClassVar[float] = 0.02
    bound: ClassVar[Literal["relative"]] = "relative"
    opsets: ClassVar[tuple[int | None, int | None]] = (_PER_AXIS_OPSET, None)

    bits: int = dataclasses.field(default=8, metadata={"help": "weight bits: 8, 4 or 2"})
    block_size: int = dataclasses.field(
        default=32, metadata={"help": "block length along K for bits < 8 (power of two, 16-256)"}
    )
    symmetric: bool = dataclasses.field(
        default=True, metadata={"help": "zero point 0 (signed); else unsigned with zero points"}
    )
    method: str = dataclasses.field(
        default="rtn",
        metadata={"help": "rtn (round to nearest), hqq, or gptq (calibrated, MatMul/Gemm)"},
    )
    format: str = dataclasses.field(
        default="auto",
        metadata={"help": "qdq (standard ONNX), ort (com.microsoft ops) or auto (ort for ort)"},
    )
    embeddings: bool = dataclasses.field(
        default=True, metadata={"help": "also quantize Gather tables (embeddings)"}
    )
    convs: bool = dataclasses.field(
        default=True, metadata={"help": "below 8 bits, also quantize Conv/ConvTranspose weights"}
    )
    min_elements: int = dataclasses.field(
        default=0, metadata={"help": "keep weights with fewer elements float"}
    )
    exclude: str = dataclasses.field(
        default="", metadata={"help": "comma-separated node names or op types kept float"}
    )
    samples: int = dataclasses.field(
        default=128, metadata={"help": "gptq: use at most this many calibration samples (0: all)"}
    )
    damp: float = dataclasses.field(
        default=0.01,
        metadata={"help": "gptq: dampening, a fraction of the Hessian's mean diagonal"},
    )

    def __post_init__(self) -> None:
        if self.bits == 3:
            raise UsageError(
                "option 'bits' of pass 'quantize-weights' cannot be 3: ONNX has no 3-bit type "
                "and onnxruntime 1.32's MatMulNBits takes only 2, 4 or 8 bits",
                hint="use bits=4 (or bits=2)",
            )
        if self.bits not in (2, 4, 8):
            raise UsageError(
                f"option 'bits' of pass 'quantize-weights' must be 8, 4 or 2, not {self.bits}"
            )
        size = self.block_size
        if size < 16 or size > 256 or size & (size - 1):
            raise UsageError(
                f"option 'block_size' of pass 'quantize-weights' must be a power of two from "
                f"16 to 256, not {size}",
                hint="use 32, 64 or 128",
            )
        if self.method not in _METHODS:
            raise UsageError(
                f"option 'method' of pass 'quantize-weights' must be rtn, hqq or gptq, not "
                f"'{self.method}'"
            )
        if not 0 < self.damp <= 1:
            raise UsageError(
                f"option 'damp' of pass 'quantize-weights' must be in (0, 1], not {self.damp}",
                hint="use 0.01 (raise it if GPTQ overfits few calibration samples)",
            )
        if self.samples < 0:
            raise UsageError("option 'samples' of pass 'quantize-weights' must be >= 0")
        if self.format not in ("auto", "qdq", "ort"):
            raise UsageError(
                f"option 'format' of pass 'quantize-weights' must be auto, qdq or ort, not "
                f"'{self.format}'"
            )
        if self.min_elements < 0:
            raise UsageError("option 'min_elements' of pass 'quantize-weights' must be >= 0")

    def applies_to(self, opset: int) -> bool:
        """Any opset: the pass raises it to the one its forms need (13, or 21/25 for blocks)."""
        return True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Quantizes every eligible weight in place."""
        if self.method == "gptq" and ctx.calibration is None:
            raise UsageError(
                "quantize-weights: method=gptq needs calibration data",
                hint="pass --calib DIR|FILE.npz (--calib synthetic for random data), or use "
                "method=hqq",
            )
        stats: dict[str, int | float | str] = dict.fromkeys(_RULES.values(), 0)
        stats.update({"weights": 0, "bytes-before": 0, "bytes-after": 0, "fallback-ort": 0})
        stats.update({"gptq": 0, "gptq-fallback": 0})
        stats.update(dict.fromkeys(_SKIPS, 0))
        stats["opset"] = module.opset
        if module.opset < _PER_AXIS_OPSET and self.bits == 8:
            # per-axis DequantizeLinear needs opset 13: raise the model once if it has sites
            ort_sites = self._collect(module, "", False, conv=True)
            if not ort_sites or not self._upgrade(module, ctx, _PER_AXIS_OPSET):
                stats["skipped-opset"] = sum(len(w.sites) for w in ort_sites)
                return PassResult(False, stats)
        ort = self.format == "ort" or (self.format == "auto" and ctx.target == "onnxruntime")
        matmul_kind = _NBITS if ort and self.bits < 8 else _BLOCK
        needed = _BLOCKED_OPSET.get(self.bits, 0)
        upgraded, conv = False, self.bits < 8 and self.convs
        if module.opset < needed:
            sites = [s for w in self._collect(module, matmul_kind, ort, conv=conv) for s in w.sites]
            blocked = sum(1 for s in sites if s.kind == _BLOCK)
            convs = sum(1 for s in sites if s.kind in _CONV_KINDS)
            if blocked or convs or (sites and module.opset < _PER_AXIS_OPSET):
                upgraded = self._upgrade(module, ctx, needed)
                if not upgraded and module.opset < _PER_AXIS_OPSET:
                    upgraded = self._upgrade(module, ctx, _PER_AXIS_OPSET)
            if module.opset < _PER_AXIS_OPSET:  # no per-axis or blocked form at all
                stats["skipped-opset"] = len(sites)
                return PassResult(False, stats)
            if module.opset < needed:
                if blocked:
                    fallback = ctx.target == "onnxruntime"
                    stats["fallback-ort" if fallback else "skipped-opset"] = blocked
                    matmul_kind = _NBITS if fallback else ""
                stats["skipped-opset"] = int(stats["skipped-opset"]) + convs
                conv = False
        weights = self._collect(module, matmul_kind, ort, stats, conv=conv)
        stats["opset"] = module.opset
        rounded = self._gptq(module, ctx, weights, stats) if self.method == "gptq" else {}
        emitter = _Emitter(module, self, rounded)
        for weight in weights:
            before = emitter.bytes_after
            emitter.emit(weight)
            stats["weights"] = int(stats["weights"]) + 1
            stats["bytes-before"] = int(stats["bytes-before"]) + int(weight.value.nbytes)
            stats["bytes-after"] = int(stats["bytes-after"]) + emitter.bytes_after - before
            for site in weight.sites:
                rule = _RULES[site.kind]
                stats[rule] = int(stats[rule]) + 1
        return PassResult(upgraded or bool(weights), stats)

    # -- finding the weights -----------------------------------------------------------------
    def _collect(
        self,
        module: Module,
        matmul_kind: str,
        ort: bool,
        stats: dict[str, int | float | str] | None = None,
        *,
        conv: bool = False,
    ) -> list[_Weight]:
        """The weights to quantize with their sites; counts in `stats` why others stay float.

        `conv`: whether Conv/ConvTranspose weights below 8 bits are sites (the opset allows).
        """
        excluded = {part.strip() for part in self.exclude.split(",") if part.strip()}
        found: dict[int, _Weight] = {}
        values: dict[int, np.ndarray | None] = {}
        for graph in module.graphs():
            for node in graph.nodes:
                index = _SITE_INPUT.get(node.op)
                if index is None or (node.domain or "") not in _DOMAINS:
                    continue
                if node.name in excluded or node.op in excluded or len(node.inputs) <= index:
                    continue
                tensor = node.inputs[index]
                if id(tensor) not in values:
                    values[id(tensor)] = read_constant(tensor)
                value = values[id(tensor)]
                if value is None:
                    continue
                if value.dtype.kind != "f":
                    continue
                kind_axis = self._site(node, value.shape, matmul_kind, ort, stats, conv)
                if kind_axis is None:
                    continue
                weight = found.setdefault(id(tensor), _Weight(tensor, value))
                weight.sites.append(_Site(graph, node, index, *kind_axis))
        outputs = {id(t) for g in module.graphs() for t in g.outputs}
        kept: list[_Weight] = []
        for weight in found.values():
            reason = self._keep_float(weight, outputs)
            if reason is None:
                kept.append(weight)
            elif stats is not None:
                stats[reason] = int(stats[reason]) + len(weight.sites)
        return kept

    def _site(
        self,
        node: gs.Node,
        shape: tuple[int, ...],
        matmul_kind: str,
        ort: bool,
        stats: dict[str, int | float | str] | None,
        conv: bool = False,
    ) -> tuple[str, int] | None:
        """(kind, axis) of the weight of `shape` read by `node`, or None when it is no site."""
        rank = len(shape)
        if node.op in ("Conv", "ConvTranspose"):
            if rank < 3:
                return None
            if self.bits == 8:
                return _CHANNEL, 0 if node.op == "Conv" else 1
            if not conv:
                return None
            # Conv (O, I/g, k...) reduces over axis 1; ConvTranspose (I, O/g, k...) over the
            # I/g input channels of a group along axis 0, whose channels also suit one scale
            # each (its axis 1 would put every channel of a depthwise one under one scale).
            group = max(1, int(node.attrs.get("group", 1)))
            depth = shape[1] if node.op == "Conv" else shape[0] // group
            if depth >= _CONV_MIN_DEPTH:
                return _CONV_BLOCK, 1 if node.op == "Conv" else 0
            return _CONV_CHANNEL, 0
        if node.op == "Gather":
            axis = int(node.attrs.get("axis", 0))
            if not self.embeddings or rank != 2 or axis not in (0, -2) or shape[1] < 2:
                return None
            fits = ort and (self.bits == 8 or shape[1] * self.bits % 8 == 0)
            return (_GBQ if fits else _ROWS), 0
        if rank != 2:
            return None
        trans_b = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
        if self.bits == 8:
            return _CHANNEL, 0 if trans_b else 1
        if not matmul_kind:
            return None
        if matmul_kind == _NBITS and node.op == "Gemm" and not _gemm_fits_nbits(node):
            if stats is not None:
                stats["skipped-gemm"] = int(stats["skipped-gemm"]) + 1
            return None
        return matmul_kind, 1 if trans_b else 0

    def _keep_float(self, weight: _Weight, outputs: set[int]) -> str | None:
        """Why `weight` must stay float, as a statistic name, or None."""
        value = weight.value
        if value.dtype != np.float32 or not np.isfinite(value).all():
            return "skipped-dtype"
        if value.size < self.min_elements:
            return "skipped-small"
        if id(weight.tensor) in outputs:
            return "skipped-shared"
        uses = sum(
            sum(1 for t in reader.inputs if t is weight.tensor) for reader in weight.tensor.outputs
        )
        if uses != len(weight.sites) or len({s.key for s in weight.sites}) != 1:
            return "skipped-shared"
        return None

    # -- GPTQ --------------------------------------------------------------------------------
    def _gptq(
        self,
        module: Module,
        ctx: PassContext,
        weights: list[_Weight],
        stats: dict[str, int | float | str],
    ) -> dict[int, tuple]:
        """GPTQ's integer weights (the emitters' constants) per weight id; counts the rest.

        One calibration run gathers the Hessian of every eligible site's activation input;
        a weight read by several sites sums their Hessians.
        """
        inputs = {id(w): _gptq_inputs(module, w) for w in weights}
        hessians: dict[str, Hessian] = {}
        for names in inputs.values():
            for name, k in names or ():
                hessians.setdefault(name, Hessian(k))
        if hessians:
            _observe(module, ctx, hessians, self.samples)
        rounded: dict[int, tuple] = {}
        for weight in weights:
            names = inputs[id(weight)]
            if not names or any(hessians[name].rows == 0 for name, _ in names):
                stats["gptq-fallback"] = int(stats["gptq-fallback"]) + 1
                continue
            hessian = sum(hessians[name].matrix for name, _ in names)
            try:
                rounded[id(weight)] = self._round(weight, hessian)
            except (np.linalg.LinAlgError, ValueError):  # H not finite or not factorable
                stats["gptq-fallback"] = int(stats["gptq-fallback"]) + 1
                continue
            stats["gptq"] = int(stats["gptq"]) + 1
        return rounded

    def _round(self, weight: _Weight, hessian: np.ndarray) -> tuple:
        """The emitter's constants for `weight`, rounded by GPTQ against `hessian`."""
        site, value = weight.sites[0], weight.value
        if site.kind == _NBITS:
            weight_kn = value.T if site.axis == 1 else value
            return gptq_matmul_nbits_layout(
                weight_kn,
                self.bits,
                self.block_size,
                symmetric=self.symmetric,
                hessian=hessian,
                damp=self.damp,
            )
        if site.kind == _BLOCK:
            grid = Grid(self.bits, self.symmetric)
            return gptq_blocks(
                value,
                site.axis,
                self.block_size,
                grid,
                symmetric=self.symmetric,
                hessian=hessian,
                damp=self.damp,
            )
        grid = INT8 if self.symmetric else UINT8
        return gptq_per_channel(
            value, site.axis, grid, symmetric=self.symmetric, hessian=hessian, damp=self.damp
        )

    def _upgrade(self, module: Module, ctx: PassContext, opset: int) -> bool:
        """Raises the model to `opset` when the target allows and the model stays valid."""
        if ctx.max_opset is not None and ctx.max_opset < opset:
            return False
        from dsopt.passes.upgrade_opset import UpgradeOpset

        return UpgradeOpset(to=opset).run(module, ctx).changed


def _gptq_inputs(module: Module, weight: _Weight) -> list[tuple[str, int]] | None:
    """(activation tensor, K) of every site of `weight`, or None when GPTQ cannot round it.

    GPTQ needs MatMul/Gemm sites (not transA) in the main graph whose float activation is
    computed there (or fed), and K <= `_GPTQ_MAX_K`.
    """
    found = []
    for site in weight.sites:
        node = site.node
        if site.graph is not module.graph or node.op not in ("MatMul", "Gemm"):
            return None
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            return None
        if site.kind not in (_BLOCK, _NBITS, _CHANNEL):
            return None
        # blocks run along K; a per-channel axis is N, so K is the other one
        k_axis = site.axis if site.kind in (_BLOCK, _NBITS) else 1 - site.axis
        k = int(weight.value.shape[k_axis])
        x = node.inputs[0]
        if not isinstance(x, gs.Variable) or not x.name or k > _GPTQ_MAX_K:
            return None
        if x.dtype is not None and x.dtype != np.float32:
            return None
        found.append((x.name, k))
    return found


def _observe(module: Module, ctx: PassContext, hessians: dict[str, Hessian], limit: int) -> None:
    """Streams the calibration data once, adding each named activation to its Hessian.

    Graph inputs are read from the feeds; other tensors through a `calibration.Probe`. A
    tensor that is never computed, not float, or whose last axis is not K adds nothing.
    """
    data = ctx.calibration
    assert data is not None
    if not isinstance(data, calibration.CalibrationData):
        data = calibration.CalibrationData.from_feeds(list(data))
    data = data.limited(limit)
    fed = {t.name for t in module.graph.inputs}
    probed = [name for name in hessians if name not in fed]

    def add(values: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> None:
        for name, hessian in hessians.items():
            value = feed.get(name) if name in fed else values.get(name)
            if value is None or value.dtype.kind != "f" or value.ndim < 1 or not value.size:
                continue
            if value.shape[-1] == hessian.k:
                hessian.add(value)

    if not probed:
        for feed in data:
            add({}, dict(feed))
        return
    with calibration.Probe(module.to_proto(), probed, label="gptq calibration") as probe:
        for feed in data:
            (values,) = probe.stream([feed])
            add(values, dict(feed))


#: The input index of the weight at each site op.
_SITE_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}


def _gemm_fits_nbits(node: gs.Node) -> bool:
    """Whether MatMulNBits can express the Gemm: no transA, C absent or constant per column."""
    if int(node.attrs.get("transA", 0)):
        return False
    return _gemm_bias(node) is not False


def _gemm_bias(node: gs.Node) -> np.ndarray | None | bool:
    """The bias `beta * C` (flat), None without C, False when C is not constant per column."""
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    value = read_constant(node.inputs[2])
    if value is None or value.dtype != np.float32 or value.ndim > 2:
        return False
    if value.ndim == 2 and value.shape[0] != 1:
        return False
    beta = np.float32(node.attrs.get("beta", 1.0))
    return (value * beta).astype(np.float32).reshape(-1)


class _Emitter:
    """Builds the quantized constants and nodes for one weight at a time."""

    def __init__(
        self, module: Module, options: QuantizeWeights, rounded: dict[int, tuple] | None = None
    ) -> None:
        self.module = module
        self.options = options
        #: GPTQ's constants per weight id; every other weight is rounded by `method`.
        self.rounded = rounded or {}
        self.method: Literal["rtn", "hqq"] = "rtn" if options.method == "rtn" else "hqq"
        self.bytes_after = 0
        self.names: set[str] = set()
        self.parents: dict[int, tuple[gs.Graph, gs.Node] | None] = {id(module.graph): None}
        self.graphs: dict[int, gs.Graph] = {}
        for graph in module.graphs():
            self.graphs[id(graph)] = graph
            self.names.update(graph.tensors().keys())
            for node in graph.nodes:
                if node.name:
                    self.names.add(node.name)
                for sub in node_subgraphs(node):
                    self.parents[id(sub)] = (graph, node)

    # -- helpers -----------------------------------------------------------------------------
    def name(self, base: str) -> str:
        return fresh_name(self.names, base)

    def constant(self, base: str, array: np.ndarray, onnx_type: int | None = None) -> gs.Constant:
        """A new initializer; sub-byte `onnx_type` stores `array` packed as ONNX does."""
        name = self.name(base)
        if onnx_type is None:
            proto = numpy_helper.from_array(np.ascontiguousarray(array), name)
        else:
            proto = onnx.TensorProto(name=name, dims=list(array.shape), data_type=onnx_type)
            proto.raw_data = pack(array, _BITS_OF_TYPE[onnx_type]).tobytes()
        self.bytes_after += len(proto.raw_data) or array.nbytes
        return gs.Constant(name, LazyValues(proto))

    def node(
        self,
        graph: gs.Graph,
        op: str,
        inputs: list[gs.Tensor],
        base: str,
        attrs: dict | None = None,
        *,
        output: gs.Variable | None = None,
        dtype: type | None = np.float32,
        domain: str = "",
    ) -> gs.Variable:
        out = output or gs.Variable(self.name(f"{base}_{op}"), dtype=dtype)
        graph.nodes.append(
            gs.Node(op, self.name(f"{base}/{op}"), attrs or {}, inputs, [out], domain=domain)
        )
        return out

    def enclosing(self, sites: list[_Site]) -> gs.Graph:
        """The innermost graph that holds, or holds a node whose subgraphs hold, every site."""
        chains = []
        for site in sites:
            chain = [site.graph]
            parent = self.parents.get(id(site.graph))
            while parent is not None:
                chain.append(parent[0])
                parent = self.parents.get(id(parent[0]))
            chains.append(chain[::-1])
        common = chains[0][0]
        for depth in range(min(len(c) for c in chains)):
            if all(c[depth] is chains[0][depth] for c in chains):
                common = chains[0][depth]
        return common

    @staticmethod
    def detach(graph: gs.Graph, node: gs.Node) -> int:
        """Removes `node` from `graph`; returns where it stood."""
        index = next(i for i, n in enumerate(graph.nodes) if n is node)
        remove_nodes(graph, [node])
        return index

    @staticmethod
    def place(graph: gs.Graph, index: int, start: int) -> None:
        """Moves the nodes appended to `graph` since it had `start` nodes to `index`."""
        new = graph.nodes[start:]
        del graph.nodes[start:]
        graph.nodes[index:index] = new

    def retire(self, weight: _Weight) -> None:
        """Removes the Constant node of `weight` when nothing reads it any more."""
        tensor = weight.tensor
        if isinstance(tensor, gs.Variable) and not tensor.outputs and tensor.inputs:
            producer = tensor.inputs[0]
            for graph in self.graphs.values():
                if any(n is producer for n in graph.nodes):
                    remove_nodes(graph, [producer])
                    break

    # -- the rules -----------------------------------------------------------------------------
    def emit(self, weight: _Weight) -> None:
        kind = weight.sites[0].kind
        base = weight.tensor.name or "weight"
        if kind in (_CHANNEL, _BLOCK, *_CONV_KINDS):
            graph = self.enclosing(weight.sites)
            start = len(graph.nodes)
            out = self._dequantize(graph, weight, base)
            self.place(graph, 0, start)
            for site in weight.sites:
                site.node.inputs[site.index] = out
        elif kind == _NBITS:
            self._matmul_nbits(weight, base)
        elif kind == _ROWS:
            self._embedding(weight, base)
        else:
            self._gather_block_quantized(weight, base)
        self.retire(weight)

    def _dequantize(self, graph: gs.Graph, weight: _Weight, base: str) -> gs.Variable:
        """Rules 1, 2 and 3 (qdq): one DequantizeLinear of the integer weight."""
        opts, value = self.options, weight.value
        axis = weight.sites[0].axis
        kind = weight.sites[0].kind
        attrs: dict = {"axis": axis}
        rounded = self.rounded.get(id(weight))
        if opts.bits == 8:
            if rounded is not None:
                q, scale, zero = rounded
            elif opts.symmetric:
                q, scale = per_channel_symmetric(value, axis, INT8)
                zero = None
            else:
                q, scale, zero = _per_channel_affine(value, axis)
            onnx_type = None
        elif kind == _CONV_CHANNEL:
            grid = Grid(opts.bits, opts.symmetric)
            q, scale, zero = _quantize_channels(
                value, axis, grid, symmetric=opts.symmetric, method=self.method
            )
            onnx_type = grid.onnx_dtype
        else:
            grid = Grid(opts.bits, opts.symmetric)
            q, scale, zero = rounded or quantize_blocks(
                value, axis, opts.block_size, grid, symmetric=opts.symmetric, method=self.method
            )
            attrs["block_size"] = opts.block_size
            onnx_type = grid.onnx_dtype
        inputs = [
            self.constant(f"{base}_quantized", q, onnx_type),
            self.constant(f"{base}_scale", scale),
        ]
        if zero is not None:
            inputs.append(self.constant(f"{base}_zero_point", zero, onnx_type))
        out = gs.Variable(self.name(f"{base}_dequantized"), np.float32, list(value.shape))
        return self.node(graph, "DequantizeLinear", inputs, base, attrs, output=out)

    def _matmul_nbits(self, weight: _Weight, base: str) -> None:
        """Rule 2 (ort): MatMulNBits for each MatMul/Gemm reading the weight."""
        opts = self.options
        transposed = weight.sites[0].axis == 1
        weight_kn = weight.value.T if transposed else weight.value
        k, n = weight_kn.shape
        packed, scales, zeros = self.rounded.get(id(weight)) or matmul_nbits_layout(
            weight_kn, opts.bits, opts.block_size, symmetric=opts.symmetric, method=self.method
        )
        b = self.constant(f"{base}_nbits", packed)
        scale_of: dict[float, gs.Constant] = {}  # one scale constant per Gemm alpha
        zero = None if zeros is None else self.constant(f"{base}_zero_point", zeros)
        attrs = {"K": k, "N": n, "bits": opts.bits, "block_size": opts.block_size}
        for site in weight.sites:
            node, graph = site.node, site.graph
            bias = None
            alpha = float(np.float32(node.attrs.get("alpha", 1.0))) if node.op == "Gemm" else 1.0
            if alpha not in scale_of:
                suffix = "_scale" if alpha == 1 else "_scale_alpha"
                scaled = (scales * np.float32(alpha)).astype(np.float32)
                scale_of[alpha] = self.constant(f"{base}{suffix}", scaled)
            scale = scale_of[alpha]
            if node.op == "Gemm":
                beta_c = _gemm_bias(node)
                if isinstance(beta_c, np.ndarray):
                    bias = self.constant(
                        f"{base}_bias", np.broadcast_to(beta_c, (n,)).astype(np.float32)
                    )
            inputs = [node.inputs[0], b, scale]
            if zero is not None or bias is not None:
                inputs.append(zero if zero is not None else gs.Variable.empty())
            if bias is not None:
                inputs += [gs.Variable.empty(), bias]
            outputs = list(node.outputs)
            index = self.detach(graph, node)
            new = gs.Node("MatMulNBits", node.name, attrs, inputs, outputs, domain=_MS)
            graph.nodes.insert(index, new)

    def _embedding(self, weight: _Weight, base: str) -> None:
        """Rule 4 (standard ops): gather integer rows and their scales, then dequantize."""
        tables = self._row_tables(weight.value, base)
        for site in weight.sites:
            self._gather_rows(site, tables, base)

    def _row_tables(self, value: np.ndarray, base: str) -> dict:
        """The integer table, per-block scales and zero points of the standard form."""
        opts = self.options
        depth = value.shape[1]
        grid = Grid(opts.bits, opts.symmetric)
        size = depth if opts.bits == 8 else opts.block_size
        q, scale, zero = quantize_blocks(
            value, 1, size, grid, symmetric=opts.symmetric, method=self.method
        )
        n_blocks = scale.shape[1]
        if n_blocks == 1 and opts.bits < 8:
            # One (partial) block per row: unpack it as a block of `depth` rounded up to whole
            # bytes rather than padding the stored rows to `block_size`.
            per_byte = 8 // opts.bits
            size = min(size, -(-depth // per_byte) * per_byte)
        tables: dict = {"depth": depth, "blocks": n_blocks, "size": size}
        if opts.bits == 8:
            tables["q"] = self.constant(f"{base}_quantized", q)
            tables["scale"] = self.constant(f"{base}_scale", scale)
            if zero is not None:
                tables["zero"] = self.constant(f"{base}_zero_point", zero)
            return tables
        # Sub-byte rows are stored unsigned (q + 2**(bits-1) when signed), packed per row.
        offset = 0 if zero is not None else -grid.qmin
        unsigned = np.full((q.shape[0], n_blocks * size), offset, np.uint8)
        unsigned[:, :depth] = (q.astype(np.int16) + offset).astype(np.uint8)
        tables["q"] = self.constant(
            f"{base}_quantized", pack(unsigned, opts.bits).reshape(q.shape[0], -1)
        )
        tables["scale"] = self.constant(f"{base}_scale", scale[:, :, None])
        if zero is not None:
            tables["zero"] = self.constant(f"{base}_zero_point", zero[:, :, None])
        else:
            tables["offset"] = self.constant(f"{base}_offset", np.array(offset, np.float32))
        return tables

    def _gather_rows(self, site: _Site, tables: dict, base: str) -> None:
        node, graph = site.node, site.graph
        indices, output = node.inputs[1], node.outputs[0]
        index = self.detach(graph, node)
        start = len(graph.nodes)
        self._build_rows(graph, indices, output, tables, base)
        self.place(graph, index, start)

    def _build_rows(
        self, graph: gs.Graph, indices: gs.Tensor, output: gs.Tensor, tables: dict, base: str
    ) -> None:
        """Gather, unpack (sub-byte), Sub zero point, Mul scale, Reshape/Slice to the rows."""
        opts = self.options
        rows = self.node(graph, "Gather", [tables["q"], indices], base, {"axis": 0}, dtype=None)
        values = self.node(graph, "Cast", [rows], base, {"to": onnx.TensorProto.FLOAT})
        index_shape = None
        if opts.bits < 8:
            index_shape = self.node(graph, "Shape", [indices], base, dtype=np.int64)
            values = self._unpack(graph, values, index_shape, tables, base)
        if "zero" in tables:
            zero = self.node(
                graph, "Gather", [tables["zero"], indices], base, {"axis": 0}, dtype=None
            )
            zero = self.node(graph, "Cast", [zero], base, {"to": onnx.TensorProto.FLOAT})
            values = self.node(graph, "Sub", [values, zero], base)
        elif "offset" in tables:
            values = self.node(graph, "Sub", [values, tables["offset"]], base)
        scale = self.node(graph, "Gather", [tables["scale"], indices], base, {"axis": 0})
        if opts.bits == 8:
            self.node(graph, "Mul", [values, scale], base, output=output)
            return
        scaled = self.node(graph, "Mul", [values, scale], base)
        width = tables["blocks"] * tables["size"]
        assert index_shape is not None
        shape = self._shape(graph, index_shape, [width], base)
        if width == tables["depth"]:
            self.node(graph, "Reshape", [scaled, shape], base, output=output)
            return
        flat = self.node(graph, "Reshape", [scaled, shape], base)
        bounds = [
            self._ints(base, [0]),
            self._ints(base, [tables["depth"]]),
            self._ints(base, [-1]),
        ]
        self.node(graph, "Slice", [flat, *bounds], base, output=output)

    def _unpack(
        self,
        graph: gs.Graph,
        values: gs.Variable,
        index_shape: gs.Variable,
        tables: dict,
        base: str,
    ) -> gs.Variable:
        """Bytes (as float) -> [..., blocks, size] values, element 0 in the lowest bits."""
        bits = self.options.bits
        radix = float(2**bits)
        inverse = self.constant(f"{base}_inverse_radix", np.array(1.0 / radix, np.float32))
        scale = self.constant(f"{base}_radix", np.array(radix, np.float32))
        last_axis = self._ints(base, [-1])
        pieces, rest = [], values
        for _ in range(8 // bits - 1):
            high = self.node(graph, "Floor", [self.node(graph, "Mul", [rest, inverse], base)], base)
            low = self.node(
                graph, "Sub", [rest, self.node(graph, "Mul", [high, scale], base)], base
            )
            pieces.append(low)
            rest = high
        pieces.append(rest)
        columns = [self.node(graph, "Unsqueeze", [p, last_axis], base) for p in pieces]
        stacked = self.node(graph, "Concat", columns, base, {"axis": -1})
        shape = self._shape(graph, index_shape, [tables["blocks"], tables["size"]], base)
        return self.node(graph, "Reshape", [stacked, shape], base)

    def _shape(
        self, graph: gs.Graph, index_shape: gs.Variable, tail: list[int], base: str
    ) -> gs.Variable:
        """The shape of the indices followed by `tail`: the shape of the rows they gather."""
        parts = [index_shape, self._ints(base, tail)]
        return self.node(graph, "Concat", parts, base, {"axis": 0}, dtype=np.int64)

    def _ints(self, base: str, values: list[int]) -> gs.Constant:
        return self.constant(f"{base}_const", np.array(values, np.int64))

    def _gather_block_quantized(self, weight: _Weight, base: str) -> None:
        """Rule 4 (ort): GatherBlockQuantized on uint8 data."""
        opts, value = self.options, weight.value
        depth = value.shape[1]
        grid = Grid(opts.bits, opts.symmetric)
        size = max(16, 1 << (depth - 1).bit_length()) if opts.bits == 8 else opts.block_size
        q, scale, zero = quantize_blocks(
            value, 1, size, grid, symmetric=opts.symmetric, method=self.method
        )
        unsigned = (q.astype(np.int16) - grid.qmin).astype(np.uint8) if grid.signed else q
        data = unsigned if opts.bits == 8 else pack(unsigned, opts.bits).reshape(len(q), -1)
        table = self.constant(f"{base}_quantized", data)
        tail = [self.constant(f"{base}_scale", scale)]
        if zero is not None:
            zero_data = zero if opts.bits == 8 else _pack_rows(zero, opts.bits)
            tail.append(self.constant(f"{base}_zero_point", zero_data))
        attrs = {"bits": opts.bits, "block_size": size, "gather_axis": 0, "quantize_axis": 1}
        for site in weight.sites:
            node, graph = site.node, site.graph
            inputs, outputs = [table, node.inputs[1], *tail], list(node.outputs)
            index = self.detach(graph, node)
            new = gs.Node("GatherBlockQuantized", node.name, attrs, inputs, outputs, domain=_MS)
            graph.nodes.insert(index, new)


_BITS_OF_TYPE = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.INT2: 2,
    onnx.TensorProto.UINT2: 2,
}


def _per_channel_affine(value: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric uint8 quantization with one scale and zero point per index along `axis`."""
    others = tuple(i for i in range(value.ndim) if i != axis)
    scale, zero = affine_params(
        value.min(axis=others), value.max(axis=others), UINT8, symmetric=False
    )
    shape = [1] * value.ndim
    shape[axis] = -1
    return quantize(value, scale.reshape(shape), zero.reshape(shape), UINT8), scale, zero


def _quantize_channels(
    value: np.ndarray, axis: int, grid: Grid, *, symmetric: bool, method: Literal["rtn", "hqq"]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sub-byte quantization with one scale (and zero point) per index along `axis`.

    `quantize_blocks` with one block per channel (the channel's values flattened), so RTN
    and HQQ are those of the block rules; scale and zero point are 1-D, as a per-axis
    DequantizeLinear takes them.
    """
    moved = np.moveaxis(value, axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    q, scale, zero = quantize_blocks(
        flat, 1, flat.shape[1], grid, symmetric=symmetric, method=method
    )
    q = np.ascontiguousarray(np.moveaxis(q.reshape(moved.shape), 0, axis))
    return q, scale[:, 0].copy(), None if zero is None else zero[:, 0].copy()


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Each row of unsigned `values` packed on its own (zero padded to whole bytes)."""
    per_byte = 8 // bits
    width = math.ceil(values.shape[1] / per_byte) * per_byte
    padded = np.zeros((values.shape[0], width), np.uint8)
    padded[:, : values.shape[1]] = values
    return pack(padded, bits).reshape(values.shape[0], -1)
