"""Merge nodes that compute the same value, and initializers that hold the same bytes."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Hashable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from dsopt import Module, Pass, PassContext, PassResult
from dsopt.pattern import (
    can_take_name,
    dropout_in_training,
    is_graph_output,
    read_constant,
    redirect_readers,
    remove_nodes,
    replace_all_uses,
    topological_order,
)

__all__ = ["NONDETERMINISTIC_OPS", "EliminateCommonSubexpressions"]

#: Default-domain ops whose every run may give a different result: never merged.
NONDETERMINISTIC_OPS = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)

_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


class _Unmergeable(Exception):
    """An attribute that this pass does not compare (a subgraph, a sparse tensor)."""


@dataclasses.dataclass(frozen=True)
class EliminateCommonSubexpressions(Pass):
    """op(a, b){attrs} -> y1 ... op(a, b){attrs} -> y2   ==>   op(a, b){attrs} -> y1 (y2 reads y1).

    Two nodes merge when they have the same domain, op type, attributes (compared by value)
    and inputs, and the same outputs present. Initializers with equal dtype, shape and bytes
    are merged first, so `Add(x, c1)` and `Add(x, c2)` merge when c1 and c2 are equal. Nodes
    are visited in topological order with a value-numbering table, so chains of duplicates
    collapse in one run. Runs in every graph; a subgraph is never merged with another.

    Never merged: random ops, Dropout in training mode, nodes with subgraph attributes, and
    (by default) ops outside the standard domains, which may be stateful. When the duplicate's
    output is a graph output, the kept node's output takes that name if it can; if both are
    graph outputs, the duplicate becomes `Identity(kept output)` (`output-identities`). Exact.
    """

    name = "eliminate-common-subexpressions"
    summary = "merge nodes computing the same value and initializers holding the same bytes"
    stage = "canonicalize"
    exactness = "exact"

    max_constant_mb: float = dataclasses.field(
        default=64.0,
        metadata={"help": "initializers larger than this (MiB) are never compared or merged"},
    )
    custom_domains: bool = dataclasses.field(
        default=False,
        metadata={"help": "also merge ops of non-standard domains (assumes they are pure)"},
    )

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Deduplicates constants, then numbers values in each graph and merges repeats."""
        stats: collections.Counter[str] = collections.Counter()
        limit = int(self.max_constant_mb * 2**20)
        for graph in list(module.graphs()):
            stats["merged-constants"] += _merge_constants(graph, limit)
            self._merge_nodes(graph, module.opset, stats)
        result = {
            key: stats[key] for key in ("merged-nodes", "merged-constants", "output-identities")
        }
        return PassResult(stats["merged-nodes"] + stats["merged-constants"] > 0, result)

    def _merge_nodes(self, graph: gs.Graph, opset: int, stats: collections.Counter[str]) -> None:
        """Value numbering over `graph` in topological order."""
        table: dict[Hashable, gs.Node] = {}
        removed: list[gs.Node] = []
        identities: list[gs.Node] = []
        for node in topological_order(graph):
            key = self._key(node, opset)
            if key is None:
                continue
            kept = table.setdefault(key, node)
            if kept is node:
                continue
            pairs = [(d, k) for d, k in zip(node.outputs, kept.outputs, strict=True) if d.name]
            if node.op == "Identity" and not any(_renamable(graph, d, k) for d, k in pairs):
                continue  # it would only be replaced by another Identity
            pending: list[tuple[gs.Tensor, gs.Tensor]] = []
            for dup, keep in pairs:
                if not replace_all_uses(graph, dup, keep):
                    redirect_readers(dup, keep)  # only the graph output keeps the name
                    pending.append((keep, dup))
            node.inputs.clear()
            node.outputs.clear()
            removed.append(node)
            for keep, dup in pending:
                identities.append(gs.Node("Identity", inputs=[keep], outputs=[dup]))
            stats["merged-nodes"] += 1
        remove_nodes(graph, removed)
        graph.nodes.extend(identities)
        stats["output-identities"] += len(identities)

    def _key(self, node: gs.Node, opset: int) -> Hashable | None:
        """What two nodes must share to compute the same values, or None if never merged."""
        domain = "" if node.domain == "ai.onnx" else (node.domain or "")
        if domain not in _STANDARD_DOMAINS and not self.custom_domains:
            return None
        if not domain and node.op in NONDETERMINISTIC_OPS:
            return None
        if not domain and node.op == "Dropout" and dropout_in_training(node, opset):
            return None
        if not node.outputs:
            return None
        try:
            attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
        except _Unmergeable:
            return None
        inputs = _strip_empty(tuple(_value_number(t) for t in node.inputs))
        outputs = _strip_empty(tuple(bool(t.name) for t in node.outputs))
        return (domain, node.op, attrs, inputs, outputs)


def _renamable(graph: gs.Graph, dup: gs.Tensor, keep: gs.Tensor) -> bool:
    """Whether `dup`'s readers can move to `keep` without a new Identity."""
    if not is_graph_output(graph, dup):
        return True
    return can_take_name(graph, keep) and not is_graph_output(graph, keep)


def _value_number(tensor: gs.Tensor) -> Hashable:
    """A node output is numbered by (producer, index), so renaming it keeps its number.

    Graph inputs, initializers and outer-scope values go by name: graphsurgeon may hold
    several objects for one initializer (one per subgraph).
    """
    if not tensor.name:
        return ""
    if isinstance(tensor, gs.Variable) and tensor.inputs:
        producer = tensor.inputs[0]
        index = next(i for i, t in enumerate(producer.outputs) if t is tensor)
        return (id(producer), index)
    return tensor.name


def _strip_empty(items: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drops trailing omitted optional inputs/outputs ("" / False): they mean the same."""
    end = len(items)
    while end and items[end - 1] in ("", False):
        end -= 1
    return items[:end]


def _attr_key(value: object) -> Hashable:
    """A hashable, type-tagged form of an attribute value; floats compare bit-exactly."""
    if isinstance(value, gs.Graph):
        raise _Unmergeable("subgraph")
    if isinstance(value, gs.Constant):
        values = read_constant(value)
        if values is None:
            raise _Unmergeable("sparse tensor")
        return ("tensor", *_array_key(values))
    if isinstance(value, gs.Node.AttributeRef):
        return ("ref", value.name, str(value.type))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_attr_key(v) for v in value))
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, (bool, int, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, (np.ndarray, np.generic)):
        return ("array", *_array_key(np.asarray(value)))
    raise _Unmergeable(type(value).__name__)


def _array_key(values: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype, shape, SHA-256 of the contents); strings hash their text, not pointers."""
    if values.dtype.kind in "OSU":
        data = repr(values.ravel().tolist()).encode()
    else:
        data = np.ascontiguousarray(values).tobytes()
    return (values.dtype.str, tuple(values.shape), hashlib.sha256(data).digest())


def _merge_constants(graph: gs.Graph, limit: int) -> int:
    """Makes `graph`'s nodes read one initializer per distinct value; returns how many merged.

    Candidates are bucketed by dtype and shape first, so only tensors that could be equal
    are loaded and hashed; equal hashes are confirmed byte for byte.
    """
    by_name: dict[str, gs.Constant] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and tensor.name:
                by_name.setdefault(tensor.name, tensor)
    buckets: dict[tuple[str, tuple[int, ...]], list[gs.Constant]] = collections.defaultdict(list)
    for constant in by_name.values():
        shape = tuple(int(d) for d in constant.shape)
        try:
            dtype = np.dtype(constant.dtype)
        except TypeError:
            continue
        if dtype.kind in "OSUV" or int(np.prod(shape)) * dtype.itemsize > limit:
            continue
        buckets[(dtype.str, shape)].append(constant)
    canonical: dict[str, gs.Constant] = {}
    for group in buckets.values():
        if len(group) < 2:
            continue
        seen: dict[bytes, list[tuple[gs.Constant, bytes]]] = collections.defaultdict(list)
        for constant in group:
            values = read_constant(constant)
            if values is None:
                continue
            data = np.ascontiguousarray(values).tobytes()
            digest = hashlib.sha256(data).digest()
            for first, first_data in seen[digest]:
                if first_data == data:
                    canonical[constant.name] = first
                    break
            else:
                seen[digest].append((constant, data))
    if not canonical:
        return 0
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and tensor.name in canonical:
                node.inputs[i] = canonical[tensor.name]
    return len(canonical)
