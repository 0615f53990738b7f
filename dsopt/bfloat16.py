"""bfloat16 emulation: a float32 twin of a bf16 model that onnxruntime's CPU provider runs.

onnxruntime's CPU provider has no bfloat16 kernels (only Cast). bf16 hardware computes and
accumulates in float32 and stores bf16, so the twin does the same: every bfloat16 tensor
becomes float32 holding bf16 values, and each node output that was bfloat16 is rounded by a
`Cast(to=BFLOAT16)`, `Cast(to=FLOAT)` pair (round to nearest even). The main graph's inputs and
outputs keep their declared types, with Casts at the edges.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dsopt.pattern import fresh_name

__all__ = ["emulate", "needs_emulation"]

_BF16, _FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT
#: Ops that never need a bf16 kernel: onnxruntime's CPU provider runs them on bf16.
_NO_COMPUTE = frozenset({"Cast", "Constant"})


def needs_emulation(model: onnx.ModelProto) -> bool:
    """Whether some node other than a Cast (or Constant) reads or writes a bfloat16 tensor."""
    if not _mentions_bf16(model.graph):
        return False  # spares shape inference on every float model a session loads
    types = _elem_types(model)
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.op_type in _NO_COMPUTE and (node.domain or "") in ("", "ai.onnx"):
                continue
            if any(types.get(name) == _BF16 for name in (*node.input, *node.output) if name):
                return True
    return False


def emulate(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float32 twin of `model`: bf16 values in float32, rounded after every bf16 output.

    Initializers and Constant values convert exactly; `dtype` attributes naming bfloat16
    (RandomNormal, EyeLike...) become float. The twin's outputs equal what bf16 hardware
    storing each op's result in bf16 computes.
    """
    twin = copy.deepcopy(model)
    types = _elem_types(model)
    names = {n for g in _graphs(twin.graph) for n in _names(g)}
    _rewrite(twin.graph, types, names, main=True)
    return twin


def _rewrite(graph: onnx.GraphProto, types: Mapping[str, int], names: set[str], main: bool) -> None:
    def unique(base: str) -> str:
        return fresh_name(names, base)

    def round_pair(source: str, target: str, what: str) -> list[onnx.NodeProto]:
        rounded = unique(f"{target}_bf16")
        return [
            helper.make_node("Cast", [source], [rounded], unique(f"{what}_round"), to=_BF16),
            helper.make_node("Cast", [rounded], [target], unique(f"{what}_widen"), to=_FLOAT),
        ]

    # Main-graph bf16 inputs and outputs keep their type; the graph reads float twins.
    renamed: dict[str, str] = {}
    head: list[onnx.NodeProto] = []
    tail: list[onnx.NodeProto] = []
    for value in graph.input:
        if _elem(value) == _BF16:
            if main:
                renamed[value.name] = unique(f"{value.name}_f32")
                head.append(
                    helper.make_node(
                        "Cast", [value.name], [renamed[value.name]], unique("emulate_in"), to=_FLOAT
                    )
                )
            else:
                value.type.tensor_type.elem_type = _FLOAT
    inputs = {i.name for i in graph.input}
    for value in graph.output:
        if _elem(value) == _BF16 and value.name not in inputs:
            if main:
                inner = renamed.setdefault(value.name, unique(f"{value.name}_f32"))
                tail.append(
                    helper.make_node("Cast", [inner], [value.name], unique("emulate_out"), to=_BF16)
                )
            else:
                value.type.tensor_type.elem_type = _FLOAT
    for tensor in graph.initializer:
        if tensor.data_type == _BF16 and tensor.name not in inputs:  # else a default input
            values = numpy_helper.to_array(tensor).astype(np.float32)
            replacement = numpy_helper.from_array(values, renamed.get(tensor.name, tensor.name))
            tensor.CopyFrom(replacement)
    nodes: list[onnx.NodeProto] = [*head]
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for attr in node.attribute:
            _widen_attribute(attr)
            for sub in _attribute_graphs(attr):
                _rename_outer(sub, renamed)
                _rewrite(sub, types, names, main=False)
        cast_to_bf16 = node.op_type == "Cast" and _cast_to(node) == _BF16
        nodes.append(node)
        for j, name in enumerate(node.output):
            if not name or types.get(name) != _BF16:
                continue
            target = renamed.get(name, name)
            if cast_to_bf16:  # already rounded: widen only
                node.output[j] = unique(f"{name}_bf16")
                nodes.append(
                    helper.make_node(
                        "Cast", [node.output[j]], [target], unique(f"{name}_widen"), to=_FLOAT
                    )
                )
            else:
                node.output[j] = unique(f"{name}_raw")
                nodes.extend(round_pair(node.output[j], target, name))
        if node.op_type != "Cast":
            for attr in node.attribute:
                if (
                    attr.name == "dtype"
                    and attr.type == onnx.AttributeProto.INT
                    and attr.i == _BF16
                ):
                    attr.i = _FLOAT
    nodes.extend(tail)
    del graph.node[:]
    graph.node.extend(nodes)
    for value in graph.value_info:
        if _elem(value) == _BF16:
            value.type.tensor_type.elem_type = _FLOAT


def _widen_attribute(attr: onnx.AttributeProto) -> None:
    """A bf16 tensor attribute (Constant, ConstantOfShape value) as float32, exactly."""
    if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _BF16:
        values = numpy_helper.to_array(attr.t).astype(np.float32)
        attr.t.CopyFrom(numpy_helper.from_array(values, attr.t.name))


def _rename_outer(graph: onnx.GraphProto, renamed: Mapping[str, str]) -> None:
    """Points a subgraph's reads of renamed outer-scope values at their float twins."""
    if not renamed:
        return
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed and name not in local:
                node.input[i] = renamed[name]
        local |= set(node.output)
        for attr in node.attribute:
            for sub in _attribute_graphs(attr):
                _rename_outer(sub, {k: v for k, v in renamed.items() if k not in local})


def _mentions_bf16(graph: onnx.GraphProto) -> bool:
    """Whether a declared type, initializer, Cast or tensor attribute of any graph is bf16."""
    for g in _graphs(graph):
        values = (*g.input, *g.output, *g.value_info)
        if any(_elem(v) == _BF16 for v in values):
            return True
        if any(t.data_type == _BF16 for t in g.initializer):
            return True
        for node in g.node:
            for attr in node.attribute:
                if (
                    attr.type == onnx.AttributeProto.INT
                    and attr.i == _BF16
                    and attr.name in ("to", "dtype")
                ):
                    return True
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _BF16:
                    return True
    return False


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _elem(value: onnx.ValueInfoProto) -> int | None:
    kind = value.type.WhichOneof("value")
    return value.type.tensor_type.elem_type if kind == "tensor_type" else None


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type per value name (declared, initializers, then inferred where missing)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference gives up on some models; declared types remain
        inferred = model
    types: dict[str, int] = {}
    for graph in _graphs(inferred.graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            elem = _elem(value)
            if elem:
                types.setdefault(value.name, elem)
        for tensor in graph.initializer:
            types.setdefault(tensor.name, tensor.data_type)
        for node in graph.node:
            if node.op_type == "Cast" and (to := _cast_to(node)) is not None:
                for name in node.output:
                    types.setdefault(name, to)
            elif node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        types.setdefault(node.output[0], attr.t.data_type)
    return types


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in _attribute_graphs(attr):
                yield from _graphs(sub)


def _attribute_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _names(graph: onnx.GraphProto) -> Iterator[str]:
    for value in (*graph.input, *graph.output, *graph.value_info):
        yield value.name
    for tensor in graph.initializer:
        yield tensor.name
    for node in graph.node:
        yield from node.input
        yield from node.output
        if node.name:
            yield node.name
