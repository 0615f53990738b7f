"""Impose the 2:4 semi-structured sparsity pattern on MatMul, Gemm (and Conv) weights."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import is_graph_output, read_constant

__all__ = ["CAPABILITY", "METADATA_KEY", "Sparsify2to4", "mask_2to4"]

#: The capability (`Target.fused_ops` entry) of targets whose kernels use 2:4 sparsity.
CAPABILITY = "sparse-2:4"
#: Model metadata entry listing the 2:4-sparse weights (comma-separated initializer names).
METADATA_KEY = "dsopt.sparsity.2:4"


def mask_2to4(weight: np.ndarray, axis: int) -> np.ndarray:
    """Keeps, in every group of 4 consecutive elements along `axis`, the 2 largest |w|.

    Ties keep the earlier element. `weight.shape[axis]` must be a multiple of 4.
    """
    moved = np.moveaxis(weight, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    masked = np.where(keep, groups, np.zeros((), weight.dtype)).reshape(moved.shape)
    return np.ascontiguousarray(np.moveaxis(masked, -1, axis))


@dataclasses.dataclass(frozen=True)
class Sparsify2to4(Pass):
    """Zeroes 2 of every 4 consecutive weights along the reduction axis K (2:4 sparsity).

    Rules:
      1. MatMul with a constant 2-D B [K, N] (K = axis 0), Gemm with a constant B (K = axis
         0, or 1 with transB) and, with `conv=True`, Conv weights [M, C/group, k...] (K = the
         input channels, axis 1): in every group of 4 consecutive K elements the 2 largest
         magnitudes stay and the others become 0 (`mask_2to4`; ties keep the earlier one).
      2. Weights are stored dense, with the zeros, and listed in the model metadata entry
         `dsopt.sparsity.2:4` (comma-separated initializer names), which the CUDA and Jetson
         targets (capability `sparse-2:4` in `Target.fused_ops`) read as a request for
         sparse tensor-core kernels; other runtimes just run the dense weights.
      3. Left alone, counted: K not a multiple of 4 (`skipped-k`), non-float or computed
         weights (`skipped-non-constant`), weights with fewer than `min_elements` elements
         (`skipped-small`) and nodes named in `exclude`. A weight shared by several readers
         is masked once when they agree on K (else `skipped-shared`); a weight that is also
         a graph output is copied.
    Statistics: `weights` (masked), `zeros-before`/`zeros-after` (zero elements of them),
    `target-sparse` (1 when the target declares `sparse-2:4`).

    Numerics: lossy, with no accuracy guarantee. Each masked group loses at most half its
    energy (the 2 smallest of 4), but products of untrained random weights through a few
    layers reach a relative L2 error near 1 (3 Relu-separated random layers: cosine down to
    about 0.55). The declared `relative` bound is therefore loose (tolerance 1.0: cosine
    >= 0, relative L2 <= 1.41), catching only gross breakage (zeroed, mis-shaped or
    sign-flipped outputs); 2:4 models need sparse fine-tuning, and their accuracy a
    measurement (`--check`, `benchmarks/bench_pruning.py`).
    """

    name: ClassVar[str] = "sparsify-2to4"
    summary: ClassVar[str] = "2:4 semi-structured sparsity on MatMul/Gemm (and Conv) weights"
    stage: ClassVar[str] = "prune"
    exactness: ClassVar[Literal["lossy"]] = "lossy"
    tolerance: ClassVar[float] = 1.0
    bound: ClassVar[Literal["relative"]] = "relative"

    conv: bool = dataclasses.field(
        default=False, metadata={"help": "also sparsify Conv weights over input channels"}
    )
    min_elements: int = dataclasses.field(
        default=0, metadata={"help": "leave weights with fewer elements dense"}
    )
    exclude: str = dataclasses.field(
        default="", metadata={"help": "comma-separated node names left dense"}
    )

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Masks every eligible weight in place and lists it in the model metadata."""
        stats: dict[str, int | float | str] = {"weights": 0, "zeros-before": 0, "zeros-after": 0}
        stats.update(
            dict.fromkeys(("skipped-k", "skipped-non-constant", "skipped-small"), 0),
            **{"skipped-shared": 0, "skipped-excluded": 0},
        )
        stats["target-sparse"] = int(ctx.supports(CAPABILITY))
        excluded = {n.strip() for n in self.exclude.split(",") if n.strip()}
        listed = [n for n in module.facts.metadata_props.get(METADATA_KEY, "").split(",") if n]
        marked = set(listed)
        changed = False
        for graph in module.graphs():
            sites: dict[int, list[tuple[gs.Node, int]]] = {}
            tensors: dict[int, gs.Tensor] = {}
            for node in graph.nodes:
                axis = self._k_axis(node)
                if axis is None:
                    continue
                if node.name and node.name in excluded:
                    stats["skipped-excluded"] += 1
                    continue
                weight = node.inputs[1]
                if not isinstance(weight, gs.Constant):
                    stats["skipped-non-constant"] += 1
                    continue
                sites.setdefault(id(weight), []).append((node, axis))
                tensors[id(weight)] = weight
            readers: dict[int, int] = {}
            for node in graph.nodes:
                for tensor in node.inputs:
                    readers[id(tensor)] = readers.get(id(tensor), 0) + 1
            used = {t.name for t in graph.tensors().values()}
            for key, found in sites.items():
                tensor = tensors[key]
                axes = {axis for _, axis in found}
                if len(axes) != 1 or readers.get(key, 0) != len(found):
                    stats["skipped-shared"] += 1
                    continue
                value = read_constant(tensor)
                if value is None or value.dtype.kind != "f":
                    stats["skipped-non-constant"] += 1
                    continue
                (axis,) = axes
                if value.shape[axis] % 4:
                    stats["skipped-k"] += 1
                    continue
                if value.size < self.min_elements:
                    stats["skipped-small"] += 1
                    continue
                masked = mask_2to4(value, axis)
                stats["weights"] += 1
                stats["zeros-before"] += int((value == 0).sum())
                stats["zeros-after"] += int((masked == 0).sum())
                name = tensor.name
                if not np.array_equal(masked, value):
                    if is_graph_output(graph, tensor):
                        base, i = f"{tensor.name}_2to4", 0
                        name = base
                        while name in used:
                            i += 1
                            name = f"{base}_{i}"
                        used.add(name)
                    replacement = gs.Constant(name, masked)
                    for node, _ in found:
                        node.inputs[1] = replacement
                    changed = True
                if name not in marked:
                    marked.add(name)
                    listed.append(name)
                    changed = True
        if changed:
            module.facts.metadata_props[METADATA_KEY] = ",".join(listed)
        return PassResult(changed, stats)

    def _k_axis(self, node: gs.Node) -> int | None:
        """The reduction axis of the node's weight input, or None for other nodes."""
        if node.domain or len(node.inputs) < 2:
            return None
        shape = node.inputs[1].shape
        rank = len(shape) if shape is not None else None
        if node.op == "MatMul" and rank == 2:
            return 0
        if node.op == "Gemm" and rank == 2:
            return 1 if int(node.attrs.get("transB", 0)) else 0
        if node.op == "Conv" and self.conv and rank is not None and rank >= 3:
            return 1
        return None
