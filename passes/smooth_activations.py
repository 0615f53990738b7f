"""SmoothQuant: migrate activation outliers of MatMul inputs into their weights, exactly."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.errors import UsageError
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import (
    fresh_name,
    is_graph_output,
    read_constant,
    remove_nodes,
    topological_order,
)
from dsopt.quant import calibration

__all__ = ["SmoothActivations"]

#: Normalizations whose output is `... * gamma (+ beta)` over the last axis: op -> (domains,
#: gamma input, beta input or None). Their other outputs (Mean, InvStdDev, the residual sum
#: of the Skip ops) do not depend on gamma or beta, so they may have readers.
_NORMS: dict[str, tuple[frozenset[str], int, int | None]] = {
    "LayerNormalization": (frozenset({"", "ai.onnx"}), 1, 2),
    "SimplifiedLayerNormalization": (frozenset({"", "ai.onnx"}), 1, None),
    "RMSNormalization": (frozenset({"", "ai.onnx"}), 1, None),
    "SkipLayerNormalization": (frozenset({"com.microsoft"}), 2, 3),
    "SkipSimplifiedLayerNormalization": (frozenset({"com.microsoft"}), 2, None),
}
_KINDS = {
    "LayerNormalization": "layernorm",
    "SimplifiedLayerNormalization": "rmsnorm",
    "RMSNormalization": "rmsnorm",
    "SkipLayerNormalization": "skiplayernorm",
    "SkipSimplifiedLayerNormalization": "rmsnorm",
    "Mul": "mul",
    "MatMul": "matmul",
    "Gemm": "gemm",
}
#: A channel whose factor falls outside [1 / _MAX_FACTOR, _MAX_FACTOR] keeps s = 1. (Clamping
#: it instead would not be idempotent: a second run would move the rest.)
_MAX_FACTOR = 1e6
#: A tensor whose factors all lie within this of 1 (in log) is left alone (already smooth).
_SETTLED = 1e-2
#: The counters every run reports (folded-<kind> ones are added as they fire).
_COUNTS = (
    "smoothed-matmuls",
    "smoothed-tensors",
    "inserted-muls",
    "skipped-producer",
    "skipped-shared",
    "skipped-weight-shared",
    "skipped-uncalibrated",
    "already-smooth",
    "out-of-range-channels",
)


@dataclasses.dataclass(frozen=True)
class _Edit:
    """Scale the constant at `node.inputs[index]` along `axis` by s**power.

    `axis` None means the last axis, broadcast from 1 (or a scalar) to K where needed.
    """

    node: gs.Node
    index: int
    axis: int | None
    power: int


@dataclasses.dataclass
class _Group:
    """One activation X with the MatMul/Gemm consumers that share its smoothing factors."""

    x: gs.Tensor
    k: int
    consumers: list[gs.Node]
    weights: list[_Edit]  # per consumer: its W along K, power +1
    folds: list[_Edit]  # into X's producer chain, power -1; empty with `insert`
    chain: list[gs.Tensor]  # intermediates of the chain, whose last axis must be K too
    kind: str | None  # the producer folded into; None: an explicit Mul is inserted
    order: int  # topological position of X's producer (-1: graph input)


@dataclasses.dataclass(frozen=True)
class SmoothActivations(Pass):
    """MatMul(X, W) with outlier channels in X  ==>  MatMul(X / s, diag(s) W), 1/s folded.

    SmoothQuant (Xiao et al., 2023): per-tensor int8 activation quantization (quantize-static,
    quantize-dynamic) spends its range on a few outlier channels of X; dividing channel j by
    s_j = a_j^alpha / w_j^(1 - alpha) (a_j = max |X[..., j]| over the calibration samples,
    w_j = max_n |W[j, n]|, the largest over every consumer of X) moves that range into the
    weights, which are quantized per output channel.

    1. Consumers: MatMul with a constant float32 2-D W [K, N], and Gemm with transA = 0
       (W = B, or B^T with transB), reading X as their first input. Every reader of X must
       be one (else `skipped-shared`), and each W must have no other reader
       (else `skipped-weight-shared`); W becomes diag(s) W.
    2. 1/s is folded exactly into the producer of X (X must not be a graph output):
       LayerNormalization / SkipLayerNormalization (gamma and beta / s),
       SimplifiedLayerNormalization / RMSNormalization / SkipSimplifiedLayerNormalization
       (gamma / s), Mul by a constant (c / s), or a MatMul / Gemm with a constant weight not
       read elsewhere (its output columns / s, with the Gemm's C); through any chain of Relu
       (positive scaling commutes) and Add of a constant (b / s) whose intermediates have no
       other reader. Any other producer, or a graph input: `skipped-producer`.
    3. With `insert`, X that cannot be folded gets an explicit Mul(X, 1/s) before its
       smoothable consumers (a run-time cost, so off by default).
    s_j = 1 where a_j or w_j is 0 or not finite, or s_j falls outside [1e-6, 1e6] (a dead
    channel or an all-zero weight row; counted in `out-of-range-channels`); a tensor whose
    factors are all within 1% of 1 is left alone, so a second run changes nothing.
    With `pow2` the factors are rounded to powers of two, which makes the rewrite bit-exact.
    Only the top-level graph is walked (If/Loop bodies are left alone). Needs calibration
    data (`--calib`); place it right before quantize-static or quantize-dynamic.
    """

    name: ClassVar[str] = "smooth-activations"
    summary: ClassVar[str] = (
        "SmoothQuant: migrate MatMul activation outliers into the weights before int8"
    )
    stage: ClassVar[str] = "quantize"
    exactness: ClassVar[str] = "reassoc"

    alpha: float = dataclasses.field(
        default=0.5,
        metadata={"help": "migration strength in (0, 1]: s = a^alpha / w^(1 - alpha)"},
    )
    samples: int = dataclasses.field(
        default=64, metadata={"help": "use at most this many calibration samples (0: all)"}
    )
    insert: bool = dataclasses.field(
        default=False,
        metadata={"help": "insert Mul(X, 1/s) where 1/s cannot be folded into X's producer"},
    )
    pow2: bool = dataclasses.field(
        default=False, metadata={"help": "round factors to powers of two (bit-exact rewrite)"}
    )

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Finds the groups, calibrates their channel maxima and rescales the constants."""
        if not 0.0 < self.alpha <= 1.0:
            raise UsageError(
                f"smooth-activations: alpha must be in (0, 1], not {self.alpha}",
                hint="0.5 balances activations and weights; larger moves more into the weights",
            )
        if self.samples < 0:
            raise UsageError(
                f"smooth-activations: samples must be >= 0, not {self.samples}",
                hint="0 uses every calibration sample",
            )
        if ctx.calibration is None:
            raise UsageError(
                "smooth-activations needs calibration data",
                hint="pass --calib DIR|FILE.npz (--calib synthetic for random data)",
            )
        data = ctx.calibration
        if not isinstance(data, calibration.CalibrationData):
            data = calibration.CalibrationData.from_feeds(list(data))
        graph = module.graph
        finder = _Finder(graph, self.insert)
        groups = finder.groups()
        counts = Counter({key: 0 for key in _COUNTS}) + finder.skipped
        if not groups:
            return PassResult(False, _stats(counts))
        maxima, samples = _channel_maxima(module, groups, data.limited(self.samples))
        working: dict[tuple[int, int], np.ndarray] = {}
        modified: dict[tuple[int, int], _Edit] = {}
        applied: list[tuple[_Group, np.ndarray]] = []
        for group in sorted(groups, key=lambda g: -g.order):
            amax = maxima.get(id(group.x))
            if amax is None:
                counts["skipped-uncalibrated"] += 1
                continue
            wmax = np.zeros(group.k)
            for edit in group.weights:
                w = np.moveaxis(_value(working, edit), edit.axis or 0, 0)
                wmax = np.maximum(wmax, np.abs(w).max(axis=1))
            factors, outside = self._factors(amax, wmax)
            if np.all(np.abs(np.log(factors)) < _SETTLED):
                counts["already-smooth"] += 1
                continue
            counts["out-of-range-channels"] += outside
            for edit in (*group.weights, *group.folds):
                key = (id(edit.node), edit.index)
                working[key] = _scaled(_value(working, edit), edit, factors, group.k)
                modified[key] = edit
            applied.append((group, factors))
        stats = _stats(counts, samples)
        if not applied:
            return PassResult(False, stats)
        writer = _Writer(graph)
        for key, edit in modified.items():
            writer.write(edit, working[key])
        for group, factors in applied:
            if group.kind is None:
                writer.insert_mul(group, factors)
                counts["inserted-muls"] += 1
            else:
                counts[f"folded-{group.kind}"] += 1
            counts["smoothed-matmuls"] += len(group.consumers)
            counts["smoothed-tensors"] += 1
        everything = np.concatenate([f for _, f in applied])
        stats = _stats(counts, samples)
        stats["max-factor"] = float(f"{everything.max():.4g}")
        stats["min-factor"] = float(f"{everything.min():.4g}")
        return PassResult(True, stats)

    def _factors(self, amax: np.ndarray, wmax: np.ndarray) -> tuple[np.ndarray, int]:
        """The factors s (1 where a or w is 0 or not finite) and how many were out of range."""
        valid = np.isfinite(amax) & np.isfinite(wmax) & (amax > 0) & (wmax > 0)
        with np.errstate(all="ignore"):
            raw = np.where(
                valid,
                np.power(amax, self.alpha) / np.power(wmax, 1.0 - self.alpha),
                1.0,
            )
        raw = np.where(np.isfinite(raw), raw, 1.0)
        inside = (raw >= 1.0 / _MAX_FACTOR) & (raw <= _MAX_FACTOR)
        factors = np.where(inside, raw, 1.0)
        hits = int(np.count_nonzero(~inside))
        if self.pow2:
            factors = np.exp2(np.round(np.log2(factors)))
        return factors, hits


def _stats(counts: Counter[str], samples: int | None = None) -> dict[str, int | float | str]:
    stats: dict[str, int | float | str] = {key: counts[key] for key in _COUNTS}
    stats.update(sorted((k, v) for k, v in counts.items() if k.startswith("folded-")))
    if samples is not None:
        stats["calibration-samples"] = samples
    return stats


def _value(working: dict[tuple[int, int], np.ndarray], edit: _Edit) -> np.ndarray:
    """The constant of the edit's slot, with the edits so far applied (float64)."""
    key = (id(edit.node), edit.index)
    if key not in working:
        value = read_constant(edit.node.inputs[edit.index])
        assert value is not None  # the finder checked
        working[key] = value.astype(np.float64)
    return working[key]


def _scaled(value: np.ndarray, edit: _Edit, factors: np.ndarray, k: int) -> np.ndarray:
    """`value` times factors**power along the edit's axis (the last one broadcast to K)."""
    vector = factors if edit.power > 0 else 1.0 / factors
    if edit.axis is None:
        if value.ndim == 0:
            value = value.reshape(1)
        if value.shape[-1] != k:
            value = np.broadcast_to(value, (*value.shape[:-1], k))
        return value * vector
    shape = [1] * value.ndim
    shape[edit.axis] = k
    return value * vector.reshape(shape)


def _sole_reader(tensor: gs.Tensor, node: gs.Node, graph: gs.Graph) -> bool:
    """Whether `node` reads `tensor` once and nothing else does (nor is it a graph output)."""
    return (
        all(reader is node for reader in tensor.outputs)
        and sum(1 for t in node.inputs if t is tensor) == 1
        and not is_graph_output(graph, tensor)
    )


def _float_constant(tensor: gs.Tensor) -> np.ndarray | None:
    value = read_constant(tensor)
    return value if value is not None and value.dtype == np.float32 else None


class _Finder:
    """Groups MatMul/Gemm consumers by activation and plans where 1/s goes."""

    def __init__(self, graph: gs.Graph, insert: bool) -> None:
        self.graph = graph
        self.insert = insert
        self.order = topological_order(graph)
        self.position = {id(node): i for i, node in enumerate(self.order)}
        self.skipped: Counter[str] = Counter()

    def consumer_axis(self, node: gs.Node) -> int | None:
        """The K axis of the node's constant weight, or None when it is no consumer."""
        if node.domain or node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            return None
        x, b = node.inputs[0], node.inputs[1]
        if sum(1 for t in node.inputs if t is x) != 1 or read_constant(x) is not None:
            return None  # a Gemm whose C is X too would change with X
        weight = _float_constant(b)
        if weight is None or weight.ndim != 2:
            return None
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)):
                return None
            return 1 if int(node.attrs.get("transB", 0)) else 0
        return 0

    def groups(self) -> list[_Group]:
        """The groups to smooth; skipped ones are counted in `self.skipped`."""
        readers: dict[int, tuple[gs.Tensor, list[gs.Node]]] = {}
        for node in self.order:
            if self.consumer_axis(node) is not None:
                x = node.inputs[0]
                readers.setdefault(id(x), (x, []))[1].append(node)
        groups = []
        for x, consumers in readers.values():
            group = self._group(x, consumers)
            if group is not None:
                groups.append(group)
        return groups

    def _group(self, x: gs.Tensor, candidates: list[gs.Node]) -> _Group | None:
        consumers, weights, k = [], [], None
        weight_shared = False
        for node in candidates:
            axis = self.consumer_axis(node)
            assert axis is not None
            size = int(read_constant(node.inputs[1]).shape[axis])  # type: ignore[union-attr]
            if not _sole_reader(node.inputs[1], node, self.graph) or k not in (None, size):
                weight_shared = True
                continue
            k = size
            consumers.append(node)
            weights.append(_Edit(node, 1, axis, 1))
        if not consumers or k is None:
            self.skipped["skipped-weight-shared"] += 1
            return None
        chosen = {id(n) for n in consumers}
        shared = is_graph_output(self.graph, x) or any(
            id(reader) not in chosen for reader in x.outputs
        )
        order = self.position.get(id(x.inputs[0]), -1) if x.inputs else -1
        if shared:
            if not self.insert:
                key = "skipped-weight-shared" if weight_shared else "skipped-shared"
                self.skipped[key] += 1
                return None
            return _Group(x, k, consumers, weights, [], [], None, order)
        plan = self._fold(x, k)
        if plan is None:
            if not self.insert:
                self.skipped["skipped-producer"] += 1
                return None
            return _Group(x, k, consumers, weights, [], [], None, order)
        folds, chain, kind = plan
        return _Group(x, k, consumers, weights, folds, chain, kind, order)

    def _fold(self, x: gs.Tensor, k: int) -> tuple[list[_Edit], list[gs.Tensor], str] | None:
        """Where X / s is computed exactly: edits of the producer chain, or None."""
        edits: list[_Edit] = []
        chain: list[gs.Tensor] = []
        tensor = x
        while True:
            if len(tensor.inputs) != 1:
                return None  # a graph input
            producer = tensor.inputs[0]
            if not producer.outputs or producer.outputs[0] is not tensor:
                return None
            op = producer.op
            if op in _NORMS:
                edit = self._norm(producer, k)
                return None if edit is None else ([*edits, *edit], chain, _KINDS[op])
            if producer.domain:
                return None
            if op in ("MatMul", "Gemm"):
                edit = self._weight_columns(producer, k)
                return None if edit is None else ([*edits, *edit], chain, _KINDS[op])
            if op in ("Mul", "Add") and len(producer.inputs) == 2:
                index = self._constant_operand(producer, k)
                if index is None:
                    return None
                edits.append(_Edit(producer, index, None, -1))
                if op == "Mul":
                    return edits, chain, _KINDS[op]
                tensor = producer.inputs[1 - index]
            elif op == "Relu" and len(producer.inputs) == 1:
                tensor = producer.inputs[0]
            else:
                return None
            if not _sole_reader(tensor, producer, self.graph):
                return None
            chain.append(tensor)

    def _constant_operand(self, node: gs.Node, k: int) -> int | None:
        """The input index of a per-channel float32 constant (last dim K); the other varies.

        Scalar (or last dim 1) constants are left alone: folding 1/s would turn them into
        vectors and break patterns the runtime fuses (Gelu's 0.5, attention scales).
        """
        found = [i for i in (0, 1) if read_constant(node.inputs[i]) is not None]
        if len(found) != 1:
            return None
        value = _float_constant(node.inputs[found[0]])
        if value is None or value.ndim == 0 or value.shape[-1] != k:
            return None
        return found[0]

    def _norm(self, node: gs.Node, k: int) -> list[_Edit] | None:
        domains, gamma, beta = _NORMS[node.op]
        if (node.domain or "") not in domains:
            return None
        edits = []
        for index in (gamma, beta):
            if index is None or index >= len(node.inputs) or not node.inputs[index].name:
                if index == gamma:
                    return None
                continue
            value = _float_constant(node.inputs[index])
            if value is None or value.ndim == 0 or value.shape[-1] != k:
                return None
            edits.append(_Edit(node, index, None, -1))
        return edits

    def _weight_columns(self, node: gs.Node, k: int) -> list[_Edit] | None:
        if len(node.inputs) < 2 or read_constant(node.inputs[0]) is not None:
            return None
        weight = _float_constant(node.inputs[1])
        if weight is None or weight.ndim != 2:
            return None
        axis = 1
        if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
            axis = 0
        if weight.shape[axis] != k or not _sole_reader(node.inputs[1], node, self.graph):
            return None
        edits = [_Edit(node, 1, axis, -1)]
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            bias = _float_constant(node.inputs[2])
            if bias is None or (bias.ndim and bias.shape[-1] not in (1, k)):
                return None
            edits.append(_Edit(node, 2, None, -1))
        return edits


def _channel_maxima(
    module: Module, groups: Iterable[_Group], data: calibration.CalibrationData
) -> tuple[dict[int, np.ndarray], int]:
    """The maxima |X[..., j]| per group (by id of X) and the sample count.

    Groups whose X or chain tensors are not [..., K] on some sample are absent.

    A NaN anywhere in channel j makes its maximum NaN (that channel then keeps s_j = 1).
    """
    groups = list(groups)
    names = [t.name for g in groups for t in (g.x, *g.chain)]
    maxima: dict[str, np.ndarray] = {}
    broken: set[str] = set()
    sizes = {t.name: g.k for g in groups for t in (g.x, *g.chain)}
    samples = 0
    with calibration.Probe(module.to_proto(), names, label="smooth-activations") as probe:
        for values in probe.stream(data):
            samples += 1
            for name in names:
                value = values.get(name)
                k = sizes[name]
                if value is None or value.ndim == 0 or value.shape[-1] != k:
                    broken.add(name)
                    continue
                if not value.size:
                    continue
                channel = np.abs(value.reshape(-1, k)).max(axis=0).astype(np.float64)
                seen = maxima.get(name)
                maxima[name] = channel if seen is None else np.maximum(seen, channel)
    if samples == 0:
        raise UsageError("smooth-activations: the calibration data holds no samples")
    result = {}
    for group in groups:
        tensors = (group.x, *group.chain)
        if group.x.name in maxima and not any(t.name in broken for t in tensors):
            result[id(group.x)] = maxima[group.x.name]
    return result, samples


class _Writer:
    """Writes the rescaled constants back and inserts the explicit Muls."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.used = set(graph.tensors()) | {n.name for n in graph.nodes if n.name}

    def write(self, edit: _Edit, value: np.ndarray) -> None:
        old = edit.node.inputs[edit.index]
        array = np.ascontiguousarray(value.astype(np.float32))
        if isinstance(old, gs.Constant) and _sole_reader(old, edit.node, self.graph):
            old.values = array
            return
        stem = old.name or f"{edit.node.name or edit.node.op}_{edit.index}"
        edit.node.inputs[edit.index] = gs.Constant(fresh_name(self.used, f"{stem}_smoothed"), array)
        if (
            isinstance(old, gs.Variable)
            and not old.outputs
            and not is_graph_output(self.graph, old)
        ):
            remove_nodes(self.graph, [n for n in old.inputs if n.op == "Constant"])

    def insert_mul(self, group: _Group, factors: np.ndarray) -> None:
        x = group.x
        inverse = gs.Constant(
            fresh_name(self.used, f"{x.name}_smooth_scale"),
            np.ascontiguousarray((1.0 / factors).astype(np.float32)),
        )
        out = gs.Variable(fresh_name(self.used, f"{x.name}_smoothed"), np.float32, x.shape)
        self.graph.nodes.append(
            gs.Node("Mul", fresh_name(self.used, f"{x.name}_Smooth"), inputs=[x, inverse],
                    outputs=[out])
        )  # fmt: skip
        for node in group.consumers:
            node.inputs[0] = out
