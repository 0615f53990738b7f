"""Structured pruning: remove whole output channels of Conv, Gemm and MatMul by importance."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.analysis import Shapes
from dsopt.errors import UsageError
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import is_graph_output, read_constant
from dsopt.quant import calibration

__all__ = ["METADATA_KEY", "PruneChannels"]

#: Model metadata entry naming the pruning applied (the pass's pipeline text).
METADATA_KEY = "dsopt.pruned"

_CRITERIA = ("l1", "l2", "activation")
#: Elementwise ops of one data input that keep every channel where it is.
_UNARY = frozenset(
    (
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu",
        "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Gelu", "Mish", "Identity", "Abs",
        "Neg", "Erf", "Exp", "Cast",
    )
)  # fmt: skip
#: Ops that work per channel on axis 1 (pooling keeps the channel axis).
_PER_CHANNEL = frozenset(
    ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
)
_BINARY = frozenset(("Add", "Sub", "Mul", "Div"))
_SKIPS = (
    "skipped-residual-group",
    "skipped-graph-output",
    "skipped-consumer",
    "skipped-grouped",
    "skipped-protected",
    "skipped-non-constant",
    "skipped-unknown-shape",
    "skipped-kept-all",
)

#: One planned edit: node input `index` keeps the True entries of `mask` along `axis`.
_Key = tuple[int, int, int]


class _Fail(Exception):
    """A producer cannot be pruned; `stat` names the reason's statistic."""

    def __init__(self, stat: str, reason: str) -> None:
        super().__init__(reason)
        self.stat = stat


@dataclasses.dataclass
class _Producer:
    node: gs.Node
    weight: np.ndarray
    #: Axis of the weight (and of the bias / C) that holds output channels.
    axis: int
    channels: int
    score: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))


@dataclasses.dataclass
class _Plan:
    """The edits that prune one producer consistently, in original coordinates."""

    edits: dict[_Key, tuple[gs.Node, int, int, np.ndarray]] = dataclasses.field(
        default_factory=dict
    )
    depthwise: list[gs.Node] = dataclasses.field(default_factory=list)
    tensors: list[gs.Variable] = dataclasses.field(default_factory=list)

    def add(self, node: gs.Node, index: int, axis: int, mask: np.ndarray) -> None:
        key = (id(node), index, axis)
        old = self.edits.get(key)
        self.edits[key] = (node, index, axis, mask if old is None else old[3] & mask)


@dataclasses.dataclass(frozen=True)
class PruneChannels(Pass):
    """Removes the least important output channels of Conv, Gemm and MatMul layers.

    Rules:
      1. Producers: Conv (group 1) with a constant weight [M, C, k...] (channels axis 0 of W,
         axis 1 of the output), Gemm with a constant B (the N axis, minding transB) and
         MatMul with a constant 2-D B [K, N] (the last output axis). Channels are ranked by
         `criterion`: the l1 or l2 norm of their weights, or (`activation`, needs calibration
         data) the l1 norm times the mean |output| of the channel over the calibration feeds
         (`dsopt.quant.calibration.Probe`).
      2. `ratio` prunes that fraction of each layer's channels; `target` instead prunes
         channels globally, lowest score first (scores divided by their layer's mean), until
         that fraction of the producers' parameters is gone. Every layer keeps at least
         `min_channels` channels and a multiple of `multiple` (rounded up), so 8 gives
         SIMD-friendly counts. `protect` names nodes whose output channels stay.
      3. Propagation: the pruned channels are removed from every reader, through bias / C,
         BatchNormalization, elementwise ops of one data input (Relu, Clip, Sigmoid, ...),
         pooling, Add/Sub/Mul/Div by a constant (sliced when it spans the channels), Concat
         along the channel axis (the offset channels of its output), Flatten (channels x
         spatial features, static shapes) and the reading Conv's input channels, Gemm's and
         MatMul's weight rows. A depthwise Conv (group = channels) reading them loses the same
         channels (weight, bias, group) and propagation continues through its output.
      4. Anything else leaves the producer whole, counted by reason: a residual Add/Mul of
         two computed tensors (`skipped-residual-group`: the group would need one consistent
         choice), a graph output (`skipped-graph-output`), another reader or one inside
         If/Loop/Scan (`skipped-consumer`), a grouped producer (`skipped-grouped`),
         `protect`ed nodes, non-constant weights and unknown ranks or shapes.
    Only the main graph is pruned. The model metadata entry `dsopt.pruned` records the
    pass's pipeline text; a model carrying the same text is left alone (`already-pruned`),
    since ratios are of the original layers and must not compound. Statistics:
    `channels-removed` and `removed-<op>` per producer op type, `layers-pruned`,
    `params-before` and `params-after` (elements of all constants of the main graph) and
    one count per skip reason.

    Numerics: lossy and unbounded in general -- the pruned channels' contributions are gone
    (measure with `--check` or `benchmarks/bench_pruning.py`). The declared `relative` bound
    0.1 (cosine >= 0.9) holds when the pruned channels are nearly dead; channels whose
    weights and bias are zero are removed exactly. With ratio 0 (and no target) the model
    is unchanged.
    """

    name: ClassVar[str] = "prune-channels"
    summary: ClassVar[str] = "structured pruning: remove low-importance Conv/Gemm/MatMul channels"
    stage: ClassVar[str] = "prune"
    exactness: ClassVar[Literal["lossy"]] = "lossy"
    tolerance: ClassVar[float] = 0.1
    bound: ClassVar[Literal["relative"]] = "relative"

    criterion: str = dataclasses.field(
        default="l1", metadata={"help": "channel importance: l1, l2 or activation (calibrated)"}
    )
    ratio: float = dataclasses.field(
        default=0.0, metadata={"help": "fraction of each layer's channels to remove, 0 to <1"}
    )
    target: float = dataclasses.field(
        default=0.0,
        metadata={"help": "global fraction of prunable parameters to remove (instead of ratio)"},
    )
    protect: str = dataclasses.field(
        default="", metadata={"help": "comma-separated node names never pruned"}
    )
    min_channels: int = dataclasses.field(
        default=1, metadata={"help": "every layer keeps at least this many channels"}
    )
    multiple: int = dataclasses.field(
        default=1, metadata={"help": "kept channel counts are multiples of this (e.g. 8)"}
    )
    samples: int = dataclasses.field(
        default=32, metadata={"help": "activation: use at most this many calibration samples"}
    )

    def __post_init__(self) -> None:
        if self.criterion not in _CRITERIA:
            raise UsageError(
                f"option 'criterion' of pass 'prune-channels' must be l1, l2 or activation, "
                f"not '{self.criterion}'"
            )
        for option, value in (("ratio", self.ratio), ("target", self.target)):
            if not 0 <= value < 1:
                raise UsageError(
                    f"option '{option}' of pass 'prune-channels' must be in [0, 1), not {value}",
                    hint="0.25 removes a quarter",
                )
        if self.ratio and self.target:
            raise UsageError(
                "options 'ratio' and 'target' of pass 'prune-channels' are mutually exclusive",
                hint="ratio prunes every layer alike; target ranks channels globally",
            )
        if self.min_channels < 1 or self.multiple < 1:
            raise UsageError(
                "options 'min_channels' and 'multiple' of pass 'prune-channels' must be >= 1"
            )

    def _protected(self) -> set[str]:
        return {name.strip() for name in self.protect.split(",") if name.strip()}

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Prunes every eligible producer in place."""
        stats: dict[str, int | float | str] = {"channels-removed": 0, "layers-pruned": 0}
        stats.update({f"removed-{op}": 0 for op in ("Conv", "Gemm", "MatMul")})
        stats.update(dict.fromkeys(_SKIPS, 0))
        graph = module.graph
        before = _param_count(graph)
        stats["params-before"] = stats["params-after"] = before
        if not self.ratio and not self.target:
            return PassResult(False, stats)
        if module.facts.metadata_props.get(METADATA_KEY) == self.describe():
            stats["already-pruned"] = 1  # ratios are of the original model: never compound
            return PassResult(False, stats)
        if self.criterion == "activation" and ctx.calibration is None:
            raise UsageError(
                "prune-channels: option criterion=activation needs calibration data",
                hint="pass --calib DIR|FILE.npz, or use criterion=l1",
            )
        assert ctx.analyses is not None
        shapes = ctx.analyses.get(Shapes)
        protected = self._protected()
        producers: list[_Producer] = []
        for node in graph.nodes:
            found = _producer(node)
            if found is None:
                continue
            if isinstance(found, str):
                stats[found] += 1
            elif node.name and node.name in protected:
                stats["skipped-protected"] += 1
            else:
                producers.append(found)
        plans: list[tuple[_Producer, np.ndarray, _Plan]] = []
        probe: list[_Producer] = []
        for producer in producers:
            try:
                _plan(graph, shapes, producer, np.ones(producer.channels, bool))
            except _Fail as failure:
                stats[failure.stat] += 1
                continue
            probe.append(producer)
        self._score(module, ctx, probe)
        for producer, mask in zip(probe, self._masks(probe), strict=True):
            if mask.all():
                stats["skipped-kept-all"] += 1
                continue
            plans.append((producer, mask, _plan(graph, shapes, producer, mask)))
        if not plans:
            return PassResult(False, stats)
        merged = _Plan()
        for producer, mask, plan in plans:
            for node, index, axis, edit in plan.edits.values():
                merged.add(node, index, axis, edit)
            merged.depthwise += plan.depthwise
            merged.tensors += plan.tensors
            removed = int((~mask).sum())
            stats["channels-removed"] += removed
            stats[f"removed-{producer.node.op}"] += removed
            stats["layers-pruned"] += 1
        _apply(graph, merged)
        module.facts.metadata_props[METADATA_KEY] = self.describe()
        stats["params-after"] = _param_count(graph)
        return PassResult(True, stats)

    def _score(self, module: Module, ctx: PassContext, producers: list[_Producer]) -> None:
        for producer in producers:
            moved = np.moveaxis(np.asarray(producer.weight, np.float64), producer.axis, 0)
            flat = moved.reshape(producer.channels, -1)
            if self.criterion == "l2":
                producer.score = np.sqrt((flat**2).sum(axis=1))
            else:
                producer.score = np.abs(flat).sum(axis=1)
        if self.criterion != "activation" or not producers:
            return
        data = ctx.calibration
        if not isinstance(data, calibration.CalibrationData):
            data = calibration.CalibrationData.from_feeds(list(data or ()))
        data = data.limited(self.samples)
        outputs = {p.node.outputs[0].name: p for p in producers}
        sums: dict[str, np.ndarray] = {}
        seen = 0
        with calibration.Probe(module.to_proto(), list(outputs), label="prune-channels") as pr:
            for values in pr.stream(data):
                seen += 1
                for name, producer in outputs.items():
                    value = values.get(name)
                    if value is None or value.ndim < 2:
                        continue
                    axis = 1 if producer.node.op == "Conv" else value.ndim - 1
                    if value.shape[axis] != producer.channels:
                        continue
                    mean = np.abs(np.moveaxis(value, axis, 0).reshape(producer.channels, -1))
                    sums[name] = sums.get(name, 0) + mean.mean(axis=1)
        if seen == 0:
            raise UsageError("prune-channels: the calibration data holds no samples")
        for name, producer in outputs.items():
            if name in sums:
                producer.score = producer.score * (sums[name] / seen)

    def _masks(self, producers: list[_Producer]) -> list[np.ndarray]:
        """Channels kept per producer (True = kept), by `ratio` or by the global `target`."""
        if not self.target:
            return [
                _top(p.score, self._keep(p.channels, p.channels - int(self.ratio * p.channels)))
                for p in producers
            ]
        entries = []  # (normalised score, producer index, channel, parameters)
        total = 0
        for i, producer in enumerate(producers):
            per_channel = producer.weight.size // producer.channels
            total += producer.weight.size
            mean = float(producer.score.mean()) or 1.0
            entries += [(float(s) / mean, i, c, per_channel) for c, s in enumerate(producer.score)]
        entries.sort()
        budget = self.target * total
        removed = [0] * len(producers)
        gone = 0.0
        for _, i, _, params in entries:
            if gone >= budget:
                break
            if producers[i].channels - removed[i] - 1 < self.min_channels:
                continue
            removed[i] += 1
            gone += params
        return [
            _top(p.score, self._keep(p.channels, p.channels - r))
            for p, r in zip(producers, removed, strict=True)
        ]

    def _keep(self, channels: int, keep: int) -> int:
        keep = max(keep, self.min_channels)
        keep = -(-keep // self.multiple) * self.multiple
        return min(keep, channels)


def _top(score: np.ndarray, keep: int) -> np.ndarray:
    """A mask of the `keep` highest scores (ties: the lower index stays)."""
    order = np.argsort(-score, kind="stable")
    mask = np.zeros(score.size, bool)
    mask[order[:keep]] = True
    return mask


def _param_count(graph: gs.Graph) -> int:
    constants = {
        id(t): t
        for node in graph.nodes
        for t in node.inputs
        if isinstance(t, gs.Constant) and t.shape is not None
    }
    return int(sum(int(np.prod(t.shape, dtype=np.int64)) for t in constants.values()))


def _producer(node: gs.Node) -> _Producer | str | None:
    """A prunable producer, a skip statistic, or None for nodes that are no candidates."""
    if node.domain or node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    if len(node.outputs) != 1:
        return None
    if not isinstance(node.inputs[1], gs.Constant):
        return "skipped-non-constant"
    weight = read_constant(node.inputs[1])
    if weight is None or weight.dtype.kind != "f":
        return "skipped-non-constant"
    if node.op == "Conv":
        if weight.ndim < 3:
            return None
        if int(node.attrs.get("group", 1)) != 1:
            return "skipped-grouped"
        axis = 0
    elif weight.ndim != 2:
        return None
    elif node.op == "Gemm":
        axis = 0 if int(node.attrs.get("transB", 0)) else 1
    else:
        axis = 1
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        return "skipped-non-constant"
    if weight.shape[axis] < 2:
        return None
    return _Producer(node, weight, axis, int(weight.shape[axis]))


def _rank(shapes: dict, tensor: gs.Tensor) -> int:
    found = shapes.get(tensor.name)
    if found is None or found.shape is None:
        raise _Fail("skipped-unknown-shape", f"rank of '{tensor.name}' unknown")
    return len(found.shape)


def _plan(graph: gs.Graph, shapes: dict, producer: _Producer, mask: np.ndarray) -> _Plan:
    """The edits that remove the False channels of `mask` from `producer` and its readers."""
    plan = _Plan()
    node = producer.node
    plan.add(node, 1, producer.axis, mask)
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = node.inputs[2]
        dims = list(bias.shape or ())
        if node.op == "Conv":
            plan.add(node, 2, 0, mask)
        elif dims and dims[-1] == producer.channels:
            plan.add(node, 2, len(dims) - 1, mask)
    out = node.outputs[0]
    axis = 1 if node.op == "Conv" else _rank(shapes, out) - 1
    _follow(graph, shapes, out, axis, mask, plan, set())
    return plan


def _follow(
    graph: gs.Graph,
    shapes: dict,
    tensor: gs.Tensor,
    axis: int,
    mask: np.ndarray,
    plan: _Plan,
    seen: set[tuple[int, int, bytes]],
) -> None:
    """Records the edits every reader of `tensor` (channels on `axis`) needs, or raises.

    A tensor reached along two paths (Concat of a tensor and its own successor) is followed
    once per distinct mask; the edits downstream combine (`_Plan.add`).
    """
    key = (id(tensor), axis, np.packbits(mask).tobytes() + bytes([mask.size % 8]))
    if key in seen:
        return
    seen.add(key)
    if is_graph_output(graph, tensor):
        raise _Fail("skipped-graph-output", f"'{tensor.name}' is a graph output")
    if not isinstance(tensor, gs.Variable):
        raise _Fail("skipped-consumer", f"'{tensor.name}' is not computed")
    plan.tensors.append(tensor)
    members = {id(n) for n in graph.nodes}
    readers = list({id(n): n for n in tensor.outputs}.values())
    for reader in readers:
        if id(reader) not in members:
            raise _Fail("skipped-consumer", f"'{tensor.name}' is read in a subgraph")
        indices = [i for i, t in enumerate(reader.inputs) if t is tensor]
        for step in _reader_steps(graph, shapes, reader, indices, tensor, axis, mask, plan):
            _follow(graph, shapes, *step, plan, seen)


def _reader_steps(
    graph: gs.Graph,
    shapes: dict,
    node: gs.Node,
    indices: list[int],
    tensor: gs.Tensor,
    axis: int,
    mask: np.ndarray,
    plan: _Plan,
) -> Iterable[tuple[gs.Tensor, int, np.ndarray]]:
    """Edits for one reader; yields the (tensor, axis, mask) propagation continues with."""
    op = node.op if not node.domain else f"{node.domain}::{node.op}"
    outputs = [t for t in node.outputs if t.name]
    if op in _UNARY or (op in _PER_CHANNEL and axis == 1):
        if indices != [0] or len(outputs) != 1:
            raise _Fail("skipped-consumer", f"{op} reads '{tensor.name}' as a parameter")
        for extra in node.inputs[1:]:
            if extra.name and (read_constant(extra) is None or read_constant(extra).size != 1):
                raise _Fail("skipped-consumer", f"{op} has a per-channel parameter")
        return [(outputs[0], axis, mask)]
    if op == "BatchNormalization" and axis == 1 and indices == [0] and len(outputs) == 1:
        for i in range(1, 5):
            if not isinstance(node.inputs[i], gs.Constant):
                raise _Fail("skipped-consumer", "BatchNormalization parameter not constant")
            plan.add(node, i, 0, mask)
        return [(outputs[0], axis, mask)]
    if op == "Conv" and indices == [0] and axis == 1:
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant) or weight.shape is None:
            raise _Fail("skipped-consumer", "reading Conv has a computed weight")
        group = int(node.attrs.get("group", 1))
        if group == 1:
            plan.add(node, 1, 1, mask)
            return []
        if group == mask.size and weight.shape[0] == group and weight.shape[1] == 1:
            plan.add(node, 1, 0, mask)
            if len(node.inputs) > 2 and node.inputs[2].name:
                if not isinstance(node.inputs[2], gs.Constant):
                    raise _Fail("skipped-consumer", "depthwise Conv bias not constant")
                plan.add(node, 2, 0, mask)
            plan.depthwise.append(node)
            return [(node.outputs[0], 1, mask)]
        raise _Fail("skipped-consumer", f"reading Conv has group {group}")
    if op in ("Gemm", "MatMul") and indices == [0]:
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant) or len(weight.shape or ()) != 2:
            raise _Fail("skipped-consumer", f"reading {op} has no constant 2-D weight")
        if axis != _rank(shapes, tensor) - 1 or int(node.attrs.get("transA", 0)):
            raise _Fail("skipped-consumer", f"channels are not {op}'s reduction axis")
        plan.add(node, 1, 1 if int(node.attrs.get("transB", 0)) else 0, mask)
        return []
    if op in _BINARY and len(node.inputs) == 2 and len(indices) == 1:
        other_index = 1 - indices[0]
        other = node.inputs[other_index]
        value = read_constant(other)
        if value is None or not isinstance(other, gs.Constant) and value.size != 1:
            raise _Fail("skipped-residual-group", f"{op} joins '{tensor.name}' with a tensor")
        rank = _rank(shapes, tensor)
        if value.ndim > rank:
            raise _Fail("skipped-consumer", f"{op} broadcasts to a higher rank")
        local = axis - (rank - value.ndim)
        if local >= 0 and value.shape[local] == mask.size:
            plan.add(node, other_index, local, mask)
        elif local >= 0 and value.shape[local] != 1:
            raise _Fail("skipped-consumer", f"{op} constant does not broadcast")
        return [(outputs[0], axis, mask)]
    if op == "Concat" and len(outputs) == 1:
        rank = _rank(shapes, tensor)
        concat_axis = int(node.attrs.get("axis", 0)) % rank
        if concat_axis != axis:
            raise _Fail("skipped-consumer", "Concat along another axis")
        pieces = []
        for i, piece in enumerate(node.inputs):
            if i in indices:
                pieces.append(mask)
                continue
            found = shapes.get(piece.name)
            size = found.shape[axis] if found is not None and found.shape else None
            if not isinstance(size, int):
                raise _Fail("skipped-unknown-shape", "Concat input size unknown")
            pieces.append(np.ones(size, bool))
        return [(outputs[0], axis, np.concatenate(pieces))]
    if op == "Flatten" and len(outputs) == 1:
        found = shapes.get(tensor.name)
        dims = found.shape if found is not None else None
        if dims is None:
            raise _Fail("skipped-unknown-shape", "Flatten input shape unknown")
        start = int(node.attrs.get("axis", 1)) % max(len(dims), 1)
        tail = dims[start:]
        if axis < start or not all(isinstance(d, int) for d in tail):
            raise _Fail("skipped-unknown-shape", "Flatten of dynamic or leading channels")
        inner = int(np.prod(dims[axis + 1 :], dtype=np.int64))
        outer = int(np.prod(dims[start:axis], dtype=np.int64))
        return [(outputs[0], 1, np.tile(np.repeat(mask, inner), outer))]
    raise _Fail("skipped-consumer", f"{op} reads '{tensor.name}'")


def _apply(graph: gs.Graph, plan: _Plan) -> None:
    """Slices every planned input once (all its axes) and refreshes the touched tensors."""
    per_input: dict[tuple[int, int], tuple[gs.Node, int, dict[int, np.ndarray]]] = {}
    for node, index, axis, mask in plan.edits.values():
        entry = per_input.setdefault((id(node), index), (node, index, {}))
        entry[2][axis] = mask
    readers: dict[int, int] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    used = {t.name for t in graph.tensors().values()}
    for node, index, axes in per_input.values():
        old = node.inputs[index]
        value = read_constant(old)
        assert value is not None
        for axis, mask in axes.items():
            value = np.compress(mask, value, axis=axis)
        name = old.name
        if readers.get(id(old), 0) > 1 or is_graph_output(graph, old):
            base, i = f"{old.name}_pruned", 0
            name = base
            while name in used:
                i += 1
                name = f"{base}_{i}"
            used.add(name)
        node.inputs[index] = gs.Constant(name, np.ascontiguousarray(value))
    for node in plan.depthwise:
        node.attrs["group"] = int(node.inputs[1].shape[0])
    for tensor in plan.tensors:  # their channel counts changed: drop the stale value_info
        tensor.shape = None
