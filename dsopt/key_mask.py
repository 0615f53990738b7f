"""Attention masks that do not vary over queries, recomputed at (…, 1, L) instead of (…, S, L).

Exporters often build a key padding mask and then broadcast it to every query row:
transformers' `Where(Expand(And(ones(1, 1, S, 1), pad(1, 1, 1, L)), (1, 1, S, L)), 0, -max)`
costs O(S·L) memory and, gathered blockwise, O(S·L) work in every layer. When every leaf of
the mask expression is constant along the query axis (a dim of 1, or equal rows), the same
expression evaluated on the leaves' first row gives the (…, 1, L) mask, which broadcasts to
the original exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.pattern import fresh_name, read_constant

__all__ = ["KeyMaskReducer"]

#: Elementwise ops: broadcasting aligns their query axis (-2) across inputs.
_ELEMENTWISE = frozenset(
    {
        "Where", "And", "Or", "Xor", "Not", "Cast", "Add", "Sub", "Mul", "Div", "Neg", "Equal",
        "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Min", "Max", "Identity", "Abs",
    }
)  # fmt: skip
_MAX_DEPTH = 24


class KeyMaskReducer:
    """Rebuilds row-invariant mask expressions at one query row; shares results between sites."""

    def __init__(self, graph: gs.Graph, names: set[str], shapes: Mapping[str, Any]) -> None:
        """`shapes` maps tensor names to inferred types with a `.shape` (the Shapes analysis)."""
        self.graph = graph
        self.names = names
        self.shapes = shapes
        self.nodes: list[gs.Node] = []
        self._done: dict[int, gs.Tensor | None] = {}

    def reduce(self, tensor: gs.Tensor) -> gs.Tensor | None:
        """A tensor equal to `tensor[..., :1, :]` that is O(L) to compute, or None."""
        shape = self._shape(tensor)
        if shape is None or len(shape) < 2:
            return None
        if shape[-2] == 1:
            return tensor
        return self._reduce(tensor, 0)

    def _shape(self, tensor: gs.Tensor) -> tuple[Any, ...] | None:
        found = self.shapes.get(tensor.name)
        if found is not None and found.shape is not None:
            return tuple(found.shape)
        return tuple(tensor.shape) if tensor.shape is not None else None

    def _reduce(self, tensor: gs.Tensor, depth: int) -> gs.Tensor | None:
        key = id(tensor)
        if key not in self._done:
            self._done[key] = self._build(tensor, depth)
        return self._done[key]

    def _build(self, tensor: gs.Tensor, depth: int) -> gs.Tensor | None:
        value = read_constant(tensor)
        if value is not None:
            return self._constant_row(value)
        shape = self._shape(tensor)
        if shape is not None and (len(shape) < 2 or shape[-2] == 1):
            return tensor  # graph input or computed value that is already one row
        if depth > _MAX_DEPTH or len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        if node.domain or len(node.outputs) != 1:
            return None
        if node.op in _ELEMENTWISE:
            inputs = [self._reduce(t, depth + 1) for t in node.inputs]
            if any(t is None for t in inputs):
                return None
            return self._clone(node, inputs)
        if node.op == "ConstantOfShape":  # one value everywhere: every row is the same
            target = self._one_row_shape(node.inputs[0])
            return None if target is None else self._clone(node, [target])
        if node.op == "Expand" and len(node.inputs) == 2:
            source = self._reduce(node.inputs[0], depth + 1)
            if source is None:
                return None
            target = self._one_row_shape(node.inputs[1])
            return None if target is None else self._clone(node, [source, target])
        return None

    def _constant_row(self, value: np.ndarray) -> gs.Tensor | None:
        if value.ndim < 2 or value.shape[-2] == 1:
            return gs.Constant(self._fresh("row"), value)
        if not (value == value[..., :1, :]).all():
            return None
        return gs.Constant(self._fresh("row"), np.ascontiguousarray(value[..., :1, :]))

    def _one_row_shape(self, shape: gs.Tensor) -> gs.Tensor | None:
        """An Expand target with its query dim (-2) set to 1 (None if its length is unknown)."""
        known = read_constant(shape)
        if known is not None:
            fixed = np.array(known, np.int64)
            if fixed.size >= 2:
                fixed[-2] = 1
            return gs.Constant(self._fresh("shape"), fixed)
        dims = self._shape(shape)
        rank = dims[0] if dims and isinstance(dims[0], int) else None
        if rank is None:
            return None
        if rank < 2:
            return shape
        keep = np.ones(rank, np.int64)
        keep[-2] = 0
        scaled = self._node("Mul", [shape, gs.Constant(self._fresh("keep"), keep)])
        return self._node("Add", [scaled, gs.Constant(self._fresh("one"), 1 - keep)])

    def _clone(self, node: gs.Node, inputs: list[gs.Tensor]) -> gs.Tensor:
        out = node.outputs[0]
        return self._node(node.op, inputs, dict(node.attrs), out.dtype)

    def _node(
        self, op: str, inputs: list[gs.Tensor], attrs: dict | None = None, dtype: object = None
    ) -> gs.Variable:
        out = gs.Variable(self._fresh(op.lower()), dtype=dtype)
        self.nodes.append(
            gs.Node(op, name=self._fresh(op), attrs=attrs or {}, inputs=inputs, outputs=[out])
        )
        return out

    def _fresh(self, hint: str) -> str:
        return fresh_name(self.names, f"key_mask/{hint}")
