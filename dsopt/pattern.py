"""Small rewrite kit over onnx-graphsurgeon graphs: rewire uses, remove nodes, walk in order.

graphsurgeon compares tensors by name and nodes by value (`==`), and a nested If/Loop/Scan
body reads outer tensors through the *same* `gs.Variable` objects. The helpers here compare by
identity and follow those shared objects, so a rewrite in one graph reaches the consumers in
its subgraphs too.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from dsopt.ir import constant_node_value

__all__ = [
    "can_take_name",
    "dropout_in_training",
    "fresh_name",
    "is_graph_output",
    "is_used",
    "node_subgraphs",
    "read_constant",
    "redirect_readers",
    "remove_nodes",
    "replace_all_uses",
    "topological_order",
]


def node_subgraphs(node: gs.Node) -> Iterator[gs.Graph]:
    """The graphs held in `node`'s attributes (If branches, Loop/Scan bodies)."""
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, list):
            yield from (item for item in value if isinstance(item, gs.Graph))


def read_constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None.

    Unlike `dsopt.ir.constant_value` this never caches the loaded array on the tensor:
    graphsurgeon exports a loaded initializer differently (raw_data), so merely looking at
    a weight would change the model's bytes, and a pass that changed nothing must leave
    them identical. Sparse and string-valued Constant nodes give None.
    """
    if isinstance(tensor, gs.Constant):
        return _peek(tensor)
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Constant" or tensor.inputs[0].domain:
        return None
    node = tensor.inputs[0]
    value = node.attrs.get("value")
    if isinstance(value, gs.Constant):
        return _peek(value)
    return constant_node_value(node)


def _peek(constant: gs.Constant) -> np.ndarray | None:
    values = constant._values  # the public `.values` would cache the loaded array
    if isinstance(values, LazyValues):
        values = values.load()
    return values if isinstance(values, np.ndarray) else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether `tensor` (by identity, not by name) is one of `graph`'s outputs."""
    return any(t is tensor for t in graph.outputs)


def is_used(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether any node (subgraphs included) reads `tensor`, or it is an output of `graph`."""
    return bool(tensor.outputs) or is_graph_output(graph, tensor)


def can_take_name(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether `tensor` may be renamed: a Variable made by a node of `graph`, not graph I/O."""
    if not isinstance(tensor, gs.Variable) or not tensor.name or len(tensor.inputs) != 1:
        return False
    producer = tensor.inputs[0]
    if not any(n is producer for n in graph.nodes):
        return False  # made in an outer graph: renaming it would change that graph
    return not any(t is tensor for t in [*graph.inputs, *graph.outputs])


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Makes every reader of `old` read `new`; False (and no change) when that is impossible.

    `old` must be produced in `graph` (the caller then removes its producer). Readers inside
    nested subgraphs follow, since they hold the same tensor objects. Graph outputs keep their
    names: when `old` is an output of `graph`, `new` takes over the name `old` instead (its
    producer writes `old`, and its other readers read `old`) -- possible only when
    `can_take_name(graph, new)`. An output fed by a graph input, an initializer, another graph
    output or an outer-scope value cannot be renamed, so the answer is False.

    After a True return nothing reads the output of `old`'s former producer any more (in
    the renaming case that node and `new`'s producer both write `old` for the moment): the
    caller detaches it, e.g. with `remove_nodes`.
    """
    if old is new:
        return False
    if is_graph_output(graph, old):
        if not can_take_name(graph, new) or is_graph_output(graph, new):
            return False
        producer = new.inputs[0]
        redirect_readers(new, old)
        index = next(i for i, t in enumerate(producer.outputs) if t is new)
        producer.outputs[index] = old
        # `old` now has two producers until the caller removes the old one; make ours first
        # so that readers of `old.inputs[0]` see the node that stays.
        old.inputs.sort(key=lambda node: node is not producer)
        return True
    redirect_readers(old, new)
    return True


def redirect_readers(old: gs.Tensor, new: gs.Tensor) -> None:
    """Makes every node that reads `old` (by identity, subgraphs included) read `new`.

    Graph outputs are left alone; see `replace_all_uses` for the whole job.
    """
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new


def remove_nodes(graph: gs.Graph, nodes: Iterable[gs.Node]) -> int:
    """Detaches `nodes` from their tensors and drops them from `graph`; returns how many."""
    doomed = {id(n): n for n in nodes}
    for node in doomed.values():
        node.inputs.clear()
        node.outputs.clear()
    before = len(graph.nodes)
    graph.nodes = [n for n in graph.nodes if id(n) not in doomed]
    return before - len(graph.nodes)


def topological_order(graph: gs.Graph) -> list[gs.Node]:
    """`graph.nodes` in a stable topological order, without reordering the graph itself.

    A node with subgraphs depends on every outer tensor its subgraphs read. Nodes on a cycle
    (an invalid graph) come last, in their original order.
    """
    nodes = list(graph.nodes)
    producer_of: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for tensor in node.outputs:
            if tensor.name:
                producer_of[tensor.name] = i
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for i, node in enumerate(nodes):
        deps = {producer_of[name] for name in _names_read(node) if name in producer_of}
        deps.discard(i)
        pending[i] = len(deps)
        for d in deps:
            users[d].append(i)
    ready = [i for i, count in enumerate(pending) if count == 0]
    order: list[int] = []
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            pending[j] -= 1
            if pending[j] == 0:
                heapq.heappush(ready, j)
    seen = set(order)
    order.extend(i for i in range(len(nodes)) if i not in seen)
    return [nodes[i] for i in order]


def _names_read(node: gs.Node) -> set[str]:
    """Names of the tensors `node` reads, its subgraphs' reads of outer tensors included."""
    names = {t.name for t in node.inputs if t.name}
    for sub in node_subgraphs(node):
        local = {t.name for t in sub.inputs}
        local.update(t.name for n in sub.nodes for t in n.outputs)
        inner: set[str] = {t.name for t in sub.outputs}
        for inner_node in sub.nodes:
            inner |= _names_read(inner_node)
        names |= {name for name in inner if name and name not in local}
    return names


def dropout_in_training(node: gs.Node, opset: int) -> bool:
    """Whether a Dropout node may drop values: a training_mode input that is not constant False.

    Before opset 7 Dropout had an `is_test` attribute whose default (0) means training.
    """
    if opset < 7:
        return not node.attrs.get("is_test", 0)
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return False
    value = read_constant(node.inputs[2])
    return value is None or value.size != 1 or bool(value.reshape(()))


def fresh_name(used: set[str], base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first not in `used`, which it then joins."""
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name
