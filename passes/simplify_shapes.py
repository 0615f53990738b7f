"""Replace shape computations on statically known dims by constants."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from dsopt import Module, Pass, PassContext, PassResult
from dsopt.analysis import AnalysisManager, Shapes, TensorType
from dsopt.passes.fold_constants import constant_node_supports, replace_with_constants
from dsopt.pattern import read_constant

__all__ = ["SimplifyShapes"]

Dims = Sequence[int | str | None]


@dataclasses.dataclass(frozen=True)
class SimplifyShapes(Pass):
    """Shape/Size of static dims  ==>  constants; Reshape(x, [0, -1])  ==>  Reshape(x, [2, 6]).

    Rules (types come from the `Shapes` analysis; a dim_param is never taken as a number):
      1. `Shape(x)` (with `start`/`end`) whose dims in the range are all ints -> int64 constant.
      2. `Size(x)` of a fully static x -> int64 scalar constant.
      3. `Gather(Shape(x), idx)` and `Slice(Shape(x), ...)` with constant indices/bounds that
         pick only static dims -> constant, even when other dims of x are symbolic.
      4. `Reshape(x, shape)` with static input and output shapes, where `shape` is computed
         (inference pinned it down) or constant with 0 (without `allowzero`) or -1 entries ->
         the same Reshape with the explicit output shape as a new initializer (checked: same
         element count, a 0 copies the input dim, other entries unchanged). A 0 in the output
         with `allowzero=0` is left alone: written out it would mean "copy".

    Whatever consumes the new constants (ConstantOfShape, Expand, Range, Concat, ...) is left
    to fold-constants. Exact: only values the declared shapes already fix are written down.
    """

    name = "simplify-shapes"
    summary = "replace Shape/Size (and Gather/Slice of Shape) on static dims by constants"
    stage = "canonicalize"
    exactness = "exact"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Rewrites every graph; removed nodes are dropped in place, order is kept."""
        analyses = ctx.analyses if ctx.analyses is not None else AnalysisManager(module)
        types = analyses.get(Shapes)
        names: set[str] | None = None
        folded = explicit = 0
        # Any graph's outputs: a subgraph may name an outer tensor as its output.
        graph_outputs = {id(t) for g in module.graphs() for t in g.outputs}
        for graph in list(module.graphs()):
            replacements: dict[int, list[gs.Node]] = {}
            for node in list(graph.nodes):
                if (node.domain or "") not in ("", "ai.onnx") or len(node.outputs) != 1:
                    continue
                if node.op == "Reshape":
                    shape = _explicit_reshape(node, types)
                    if shape is not None:
                        if names is None:
                            names = {t for g in module.graphs() for t in g.tensors()}
                        name = _unique(f"{node.outputs[0].name}_shape", names)
                        node.inputs[1] = gs.Constant(name, shape)
                        explicit += 1
                    continue
                value = _static_value(node, types)
                if value is not None and (
                    id(node.outputs[0]) not in graph_outputs
                    or constant_node_supports(module.opset, value.dtype)
                ):
                    replacements[id(node)] = replace_with_constants(node, [value], graph_outputs)
                    folded += 1
            if replacements:
                graph.nodes = [
                    new for node in graph.nodes for new in replacements.get(id(node), [node])
                ]
        changed = bool(folded or explicit)
        return PassResult(changed, {"shapes-folded": folded, "reshapes-made-explicit": explicit})


# -- rules -------------------------------------------------------------------------------------
def _static_value(node: gs.Node, types: dict[str, TensorType]) -> np.ndarray | None:
    """The constant value of a Shape, Size, or Gather/Slice of a Shape; None if not static."""
    if node.op == "Shape":
        dims = _shape_dims(node, types)
        return _ints(dims) if dims is not None else None
    if node.op == "Size":
        dims = _dims_of(node.inputs[0], types)
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        return np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
    if node.op not in ("Gather", "Slice") or not node.inputs:
        return None
    source = node.inputs[0]
    if isinstance(source, gs.Constant) or len(source.inputs) != 1:
        return None
    producer = source.inputs[0]
    if producer.op != "Shape" or (producer.domain or "") not in ("", "ai.onnx"):
        return None
    dims = _shape_dims(producer, types, partial=True)
    if dims is None:
        return None
    positions = _gather(node, len(dims)) if node.op == "Gather" else _slice(node, len(dims))
    if positions is None:
        return None
    picked = [dims[int(p)] for p in positions.reshape(-1)]
    if not all(isinstance(d, int) for d in picked):
        return None
    return np.array(picked, dtype=np.int64).reshape(positions.shape)


def _dims_of(tensor: gs.Tensor, types: dict[str, TensorType]) -> Dims | None:
    found = types.get(tensor.name)
    return None if found is None else found.shape


def _shape_dims(node: gs.Node, types: dict[str, TensorType], partial: bool = False) -> Dims | None:
    """Dims a Shape node reports (its start/end applied); all ints unless `partial`."""
    dims = _dims_of(node.inputs[0], types) if node.inputs else None
    if dims is None:
        return None
    rank = len(dims)
    start = _clamp(int(node.attrs.get("start", 0)), rank)
    end = _clamp(int(node.attrs.get("end", rank)), rank)
    picked = list(dims[start:end])
    if not partial and not all(isinstance(d, int) for d in picked):
        return None
    return picked


def _clamp(axis: int, rank: int) -> int:
    if axis < 0:
        axis += rank
    return min(max(axis, 0), rank)


def _ints(dims: Dims) -> np.ndarray:
    return np.array([int(d) for d in dims], dtype=np.int64)  # type: ignore[arg-type]


def _gather(node: gs.Node, length: int) -> np.ndarray | None:
    """Positions a Gather over a 1-D tensor of `length` picks; None when not constant/valid."""
    if len(node.inputs) != 2 or int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    indices = read_constant(node.inputs[1])
    if indices is None or indices.dtype.kind not in "iu":
        return None
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < -length or indices.max() >= length):
        return None
    return np.where(indices < 0, indices + length, indices)


def _slice(node: gs.Node, length: int) -> np.ndarray | None:
    """Positions a Slice over a 1-D tensor of `length` keeps; None when not constant/valid."""
    if len(node.inputs) >= 3:
        values = []
        for tensor in node.inputs[1:5]:
            value = None if not tensor.name else read_constant(tensor)
            if tensor.name and (value is None or value.dtype.kind not in "iu"):
                return None
            values.append(None if value is None else value.astype(np.int64).reshape(-1))
        values += [None] * (4 - len(values))
        starts, ends, axes, steps = values
    elif len(node.inputs) == 1 and "starts" in node.attrs:  # opset < 10: attributes
        starts = np.array(node.attrs["starts"], dtype=np.int64)
        ends = np.array(node.attrs.get("ends", []), dtype=np.int64)
        axes = np.array(node.attrs["axes"], dtype=np.int64) if "axes" in node.attrs else None
        steps = None
    else:
        return None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if axes is not None and (axes.size != 1 or int(axes[0]) not in (0, -1)):
        return None
    step = 1 if steps is None else int(steps[0]) if steps.size == 1 else 0
    if step == 0:
        return None
    # Python slicing clamps out-of-range bounds exactly as ONNX Slice does.
    return np.arange(length, dtype=np.int64)[int(starts[0]) : int(ends[0]) : step]


def _explicit_reshape(node: gs.Node, types: dict[str, TensorType]) -> np.ndarray | None:
    """The explicit target shape for a Reshape with 0/-1 entries, when provably correct."""
    if len(node.inputs) != 2:
        return None
    allowzero = bool(node.attrs.get("allowzero", 0))
    source = types.get(node.inputs[0].name)
    result = types.get(node.outputs[0].name)
    src = None if source is None else source.static_shape
    out = None if result is None else result.static_shape
    if src is None or out is None:
        return None
    if int(np.prod(src, dtype=np.int64)) != int(np.prod(out, dtype=np.int64)):
        return None
    if 0 in out and not allowzero:
        return None  # written out, a 0 would mean "copy the input dim"
    shape = read_constant(node.inputs[1])
    if shape is None:
        # A computed shape that inference (with data propagation) pinned down completely.
        computed = types.get(node.inputs[1].name)
        if computed is None or computed.static_shape != (len(out),):
            return None
        return np.array(out, dtype=np.int64)
    if shape.dtype.kind not in "iu" or shape.ndim != 1:
        return None
    requested = [int(s) for s in shape]
    if -1 not in requested and (allowzero or 0 not in requested):
        return None  # already explicit
    if len(out) != len(requested) or (0 in out and -1 in requested):
        return None  # -1 next to a 0-sized dim is ambiguous
    for i, (want, got) in enumerate(zip(requested, out, strict=True)):
        if want == 0 and not allowzero:
            if i >= len(src) or src[i] != got:
                return None
        elif want != -1 and want != got:
            return None
    return np.array(out, dtype=np.int64)


def _unique(base: str, names: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first name not in `names` (which it joins)."""
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name
