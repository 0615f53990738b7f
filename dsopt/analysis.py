"""Cached, read-only analyses of a Module, invalidated when a pass reports a change."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dsopt.errors import ModelError
from dsopt.ir import Module

__all__ = [
    "Analysis",
    "AnalysisManager",
    "GraphView",
    "Shapes",
    "TensorType",
    "TopologicalOrder",
    "match_chain",
    "match_subgraphs",
]

T = TypeVar("T")


class Analysis(Generic[T]):
    """Computes a fact about a module; results are cached by the AnalysisManager.

    Subclasses implement `compute`. Calls to `am.get(Other)` made inside `compute` are
    recorded, so invalidating `Other` invalidates this analysis too.
    """

    name: ClassVar[str] = ""

    def compute(self, module: Module, am: AnalysisManager) -> T:  # pragma: no cover - abstract
        """Returns the analysis result for `module`."""
        raise NotImplementedError


class AnalysisManager:
    """Caches analysis results per module generation and tracks their dependencies."""

    def __init__(self, module: Module) -> None:
        self.module = module
        self._cache: dict[type[Analysis[Any]], tuple[int, Any]] = {}
        self._dependents: dict[type[Analysis[Any]], set[type[Analysis[Any]]]] = {}
        self._computing: list[type[Analysis[Any]]] = []
        self.hits = 0
        self.misses = 0

    def get(self, analysis: type[Analysis[T]]) -> T:
        """The result of `analysis` for the current module, computed at most once per change."""
        if self._computing:
            self._dependents.setdefault(analysis, set()).add(self._computing[-1])
        cached = self._cache.get(analysis)
        if cached is not None and cached[0] == self.module.generation:
            self.hits += 1
            return cached[1]  # type: ignore[no-any-return]
        self.misses += 1
        self._computing.append(analysis)
        try:
            result = analysis().compute(self.module, self)
        finally:
            self._computing.pop()
        self._cache[analysis] = (self.module.generation, result)
        return result

    def cached(self, analysis: type[Analysis[Any]]) -> bool:
        """Whether a result for the current generation is cached."""
        entry = self._cache.get(analysis)
        return entry is not None and entry[0] == self.module.generation

    def invalidate(self, preserved: Sequence[type[Analysis[Any]]] = ()) -> None:
        """Drops every result not in `preserved` (and everything that depends on a dropped one).

        Preserved results are re-keyed to the module's current generation.
        """
        keep = set(preserved)
        dropped = [a for a in self._cache if a not in keep]
        while dropped:
            analysis = dropped.pop()
            self._cache.pop(analysis, None)
            for dependent in self._dependents.get(analysis, ()):
                if dependent in self._cache:
                    dropped.append(dependent)
        for analysis, (_, result) in list(self._cache.items()):
            self._cache[analysis] = (self.module.generation, result)


# -- core analyses ---------------------------------------------------------------------------
class GraphView(Analysis["nx.DiGraph"]):
    """A frozen networkx DiGraph of the main graph: node ids are positions in `graph.nodes`.

    Edges carry `tensor` (the tensor name). Node attributes: `op`, `node` (the gs.Node).
    """

    name = "graph-view"

    def compute(self, module: Module, am: AnalysisManager) -> nx.DiGraph:
        """Builds the view and fails with ModelError when the graph has a cycle."""
        graph = nx.DiGraph()
        nodes = module.graph.nodes
        index = {id(node): i for i, node in enumerate(nodes)}
        for i, node in enumerate(nodes):
            graph.add_node(i, op=node.op, node=node)
        for i, node in enumerate(nodes):
            for tensor in node.outputs:
                for consumer in tensor.outputs:
                    j = index.get(id(consumer))
                    if j is not None:
                        graph.add_edge(i, j, tensor=tensor.name)
        return nx.freeze(graph)


class TopologicalOrder(Analysis[list[gs.Node]]):
    """Main-graph nodes in a deterministic topological order; a cycle is a ModelError."""

    name = "topological-order"

    def compute(self, module: Module, am: AnalysisManager) -> list[gs.Node]:
        """Sorts lexicographically by original position among ready nodes."""
        view = am.get(GraphView)
        try:
            order = list(nx.lexicographical_topological_sort(view))
        except nx.NetworkXUnfeasible as e:
            cycle = nx.find_cycle(view)
            names = [view.nodes[u]["node"].name or view.nodes[u]["op"] for u, _ in cycle]
            raise ModelError(
                f"the graph has a cycle through nodes {' -> '.join(names[:6])}",
                hint="ONNX graphs must be acyclic; re-export the model",
            ) from e
        return [view.nodes[i]["node"] for i in order]


@dataclasses.dataclass(frozen=True)
class TensorType:
    """Element type and shape of a tensor; dims are ints, dim_param strings, or None (unknown)."""

    dtype: np.dtype[Any] | None
    shape: tuple[int | str | None, ...] | None

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        """The shape when every dim is a known int, else None."""
        if self.shape is None or not all(isinstance(d, int) for d in self.shape):
            return None
        return tuple(int(d) for d in self.shape)  # type: ignore[arg-type]


class Shapes(Analysis[dict[str, TensorType]]):
    """Types of all tensors (all graphs) from ONNX shape inference with data propagation.

    Large initializers are replaced by dims-only stubs before inference, so the cost does not
    grow with the weights. Failing inference yields what the model itself declares.
    """

    name = "shapes"

    def compute(self, module: Module, am: AnalysisManager) -> dict[str, TensorType]:
        """Runs onnx.shape_inference (non-strict) and collects every value_info."""
        model = module.skeleton_proto()
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is best effort; declared types remain
            inferred = model
        types: dict[str, TensorType] = {}
        for graph in _proto_graphs(inferred.graph):
            for tensor in graph.initializer:
                types[tensor.name] = TensorType(
                    onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                    if tensor.data_type
                    else None,
                    tuple(int(d) for d in tensor.dims),
                )
            for vi in [*graph.input, *graph.value_info, *graph.output]:
                found = _value_info_type(vi)
                if found is not None:
                    types[vi.name] = found
        return types


def _value_info_type(vi: onnx.ValueInfoProto) -> TensorType | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
    except (KeyError, ValueError):
        dtype = None
    if not tt.HasField("shape"):
        return TensorType(dtype, None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorType(dtype, tuple(dims))


def _proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _proto_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _proto_graphs(sub)


# -- pattern helpers -------------------------------------------------------------------------
def match_chain(start: gs.Node, ops: Sequence[str]) -> list[gs.Node] | None:
    """Follows single-consumer edges from `start` through `ops` (start must be ops[0]).

    Returns the matched nodes, or None if any op differs, a node has more than one output
    consumer, or an intermediate tensor is a graph output (checked by the caller's graph).
    """
    if start.op != ops[0]:
        return None
    chain = [start]
    node = start
    for op in ops[1:]:
        if len(node.outputs) != 1 or len(node.outputs[0].outputs) != 1:
            return None
        node = node.outputs[0].outputs[0]
        if node.op != op:
            return None
        chain.append(node)
    return chain


def match_subgraphs(view: nx.DiGraph, pattern: nx.DiGraph) -> Iterator[dict[int, Any]]:
    """Every embedding of `pattern` in a GraphView, as {view node id: pattern node}.

    Pattern nodes carry `op` (an op type, or a tuple of alternatives); edges are data
    dependencies. Uses networkx's VF2 monomorphism search, so extra edges in the model (a
    tensor with other consumers) do not block a match: rules check single use themselves.
    """
    from networkx.algorithms import isomorphism

    def node_match(model_attrs: dict[str, Any], pattern_attrs: dict[str, Any]) -> bool:
        wanted = pattern_attrs.get("op")
        if wanted is None:
            return True
        return model_attrs["op"] in (wanted if isinstance(wanted, tuple) else (wanted,))

    matcher = isomorphism.DiGraphMatcher(view, pattern, node_match=node_match)
    yield from matcher.subgraph_monomorphisms_iter()
