"""Dynamic int8 quantization: activations quantized at run time, int8 MatMul weights."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.analysis import AnalysisManager, Shapes
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import fresh_name, read_constant, topological_order
from dsopt.quant.grid import INT7, INT8, Grid, per_channel_symmetric

__all__ = ["QuantizeDynamic"]


@dataclasses.dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """MatMul/Gemm(x, constant W)  ==>  DynamicQuantizeLinear + MatMulInteger + scale.

    1. `matmul`: MatMul with a constant float32 2-D W: W int8 symmetric per column (zero
       point 0, one copy per weight tensor), `x` quantized to uint8 per tensor at run time
       by one DynamicQuantizeLinear shared by every MatMul reading it (measured on BERT:
       faster than one per MatMul, although onnxruntime then fuses only lone readers into
       DynamicQuantizeMatMul); `Cast(MatMulInteger(xq, Wq, xz, 0)) * (xs * ws)`.
    2. `gemm`: Gemm(x, W, C) with transA = 0 and alpha = 1: the same with W (transposed when
       transB) and `+ beta * C` after.
    Weights smaller than `min_elements` stay float (their matmuls are too small to gain).
    With `reduce_range` (the default) weights take 7 bits, [-64, 63]: onnxruntime's u8s8 GEMM
    on x86 CPUs without VNNI (`vpmaddubsw`) sums pairs of uint8 x int8 products in int16 with
    saturation, so full-range int8 weights give wrong sums there (measured on an AVX2 EPYC: a
    random 128x768x768 MatMulInteger was off by up to 1.5e5); 255 * 64 * 2 fits int16. A model
    only run where int8 dot products are exact (VNNI, ARM) can turn it off.
    Needs no calibration. Bound (relative): outputs keep cosine >= 0.98 and relative L2 error
    <= 0.2.
    """

    name: ClassVar[str] = "quantize-dynamic"
    summary: ClassVar[str] = "int8 MatMul/Gemm weights with activations quantized at run time"
    stage: ClassVar[str] = "quantize"
    exactness: ClassVar[str] = "lossy"
    tolerance: ClassVar[float | None] = 0.02
    bound: ClassVar[str] = "relative"
    opsets: ClassVar[tuple[int | None, int | None]] = (11, None)

    min_elements: int = dataclasses.field(
        default=0, metadata={"help": "keep weights with fewer elements than this in float"}
    )
    exclude: str = dataclasses.field(
        default="", metadata={"help": "comma-separated node names or op types to keep in float"}
    )
    reduce_range: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "7-bit weights, so onnxruntime's u8s8 kernels on x86 without VNNI (int16 "
            "pair sums) cannot saturate; false: full int8, for CPUs with VNNI or ARM only"
        },
    )

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Rewrites every eligible MatMul/Gemm of every graph."""
        excluded = {part.strip() for part in self.exclude.split(",") if part.strip()}
        shapes = (ctx.analyses or AnalysisManager(module)).get(Shapes)
        counts = {"matmul": 0, "gemm": 0}
        for graph in module.graphs():
            rewriter = _Rewriter(graph, shapes, INT7 if self.reduce_range else INT8)
            for node in topological_order(graph):
                if node.name in excluded or node.op in excluded:
                    continue
                weight = self._weight(node)
                if weight is not None and rewriter.float_input(node.inputs[0]):
                    rewriter.rewrite(node, weight)
                    counts[node.op.lower()] += 1
            if rewriter.changed:
                graph.nodes = topological_order(graph)
        return PassResult(any(counts.values()), counts)

    def _weight(self, node: gs.Node) -> np.ndarray | None:
        """W as [K, N] float32, or None when the node is not eligible."""
        if node.domain or node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            return None
        value = read_constant(node.inputs[1])
        if value is None or value.dtype != np.float32 or value.ndim != 2:
            return None
        if value.size < self.min_elements or read_constant(node.inputs[0]) is not None:
            return None
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0:
                return None
            if int(node.attrs.get("transB", 0)):
                value = value.T
        return np.ascontiguousarray(value)


class _Rewriter:
    """Emits the integer chains, one DynamicQuantizeLinear per activation tensor."""

    def __init__(self, graph: gs.Graph, shapes: dict, grid: Grid) -> None:
        self.graph = graph
        self.shapes = shapes
        self.grid = grid
        self.used = set(graph.tensors()) | {n.name for n in graph.nodes if n.name}
        self.quantized: dict[int, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
        self.weights: dict[tuple[int, tuple[int, ...]], tuple[gs.Constant, ...]] = {}
        self.changed = False

    def float_input(self, tensor: gs.Tensor) -> bool:
        dtype = tensor.dtype
        if dtype is None and tensor.name in self.shapes:
            dtype = self.shapes[tensor.name].dtype
        try:
            return np.dtype(dtype) == np.float32
        except TypeError:
            return False

    def _name(self, base: str) -> str:
        return fresh_name(self.used, base)

    def _dynamic(self, tensor: gs.Tensor) -> tuple[gs.Variable, gs.Variable, gs.Variable]:
        key = id(tensor)
        if key not in self.quantized:
            q = gs.Variable(self._name(f"{tensor.name}_quantized"), np.uint8, tensor.shape)
            scale = gs.Variable(self._name(f"{tensor.name}_scale"), np.float32, [])
            zero = gs.Variable(self._name(f"{tensor.name}_zero_point"), np.uint8, [])
            self.graph.nodes.append(
                gs.Node(
                    "DynamicQuantizeLinear",
                    self._name(f"{tensor.name}_DynamicQuantize"),
                    inputs=[tensor],
                    outputs=[q, scale, zero],
                )
            )
            self.quantized[key] = (q, scale, zero)
        return self.quantized[key]

    def rewrite(self, node: gs.Node, weight: np.ndarray) -> None:
        x, out = node.inputs[0], node.outputs[0]
        q, x_scale, x_zero = self._dynamic(x)
        base = node.name or out.name
        shape = out.shape
        product = gs.Variable(self._name(f"{base}_int32"), np.int32, shape)
        as_float = gs.Variable(self._name(f"{base}_float"), np.float32, shape)
        scale = gs.Variable(self._name(f"{base}_scale"), np.float32, [weight.shape[1]])
        w_int8, w_scale = self._int8(node.inputs[1], weight)
        nodes = [
            gs.Node(
                "MatMulInteger",
                self._name(f"{base}_MatMulInteger"),
                inputs=[q, w_int8, x_zero],
                outputs=[product],
            ),
            gs.Node("Cast", self._name(f"{base}_Cast"), {"to": 1}, [product], [as_float]),
            gs.Node(
                "Mul",
                self._name(f"{base}_scales"),
                inputs=[x_scale, w_scale],
                outputs=[scale],
            ),
        ]
        bias = self._bias(node)
        if bias is None:
            nodes.append(
                gs.Node(
                    "Mul", self._name(f"{base}_rescale"), inputs=[as_float, scale], outputs=[out]
                )
            )
        else:
            scaled = gs.Variable(self._name(f"{base}_scaled"), np.float32, shape)
            nodes += [
                gs.Node(
                    "Mul", self._name(f"{base}_rescale"), inputs=[as_float, scale], outputs=[scaled]
                ),
                gs.Node("Add", self._name(f"{base}_bias"), inputs=[scaled, bias], outputs=[out]),
            ]
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.remove(node)
        self.graph.nodes += nodes
        self.changed = True

    def _int8(self, tensor: gs.Tensor, weight: np.ndarray) -> tuple[gs.Constant, gs.Constant]:
        """The int8 weight and its scales, made once per weight tensor."""
        key = (id(tensor), weight.shape)  # a Gemm with transB reads it transposed
        if key not in self.weights:
            wq, w_scale = per_channel_symmetric(weight, 1, self.grid)
            base = tensor.name or "weight"
            self.weights[key] = (
                gs.Constant(self._name(f"{base}_int8"), wq),
                gs.Constant(self._name(f"{base}_scale"), w_scale),
            )
        return self.weights[key]

    def _bias(self, node: gs.Node) -> gs.Tensor | None:
        if node.op != "Gemm" or len(node.inputs) < 3 or not node.inputs[2].name:
            return None
        beta = float(node.attrs.get("beta", 1.0))
        bias = node.inputs[2]
        if beta == 1.0:
            return bias
        value = read_constant(bias)
        if value is not None:
            return gs.Constant(
                self._name(f"{node.name or node.outputs[0].name}_bias"),
                np.asarray(value * np.float32(beta), value.dtype),
            )
        scaled = gs.Variable(
            self._name(f"{node.name or node.outputs[0].name}_beta_bias"), bias.dtype, bias.shape
        )
        self.graph.nodes.append(
            gs.Node(
                "Mul",
                self._name(f"{node.name}_beta"),
                inputs=[
                    bias,
                    gs.Constant(self._name(f"{node.name}_beta"), np.asarray(beta, np.float32)),
                ],
                outputs=[scaled],
            )
        )
        return scaled
