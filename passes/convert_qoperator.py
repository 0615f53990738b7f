"""Turn DequantizeLinear -> op -> QuantizeLinear islands into QOperator (QLinear*) nodes."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.passes.fold_qdq import QdqEditor, QuantParams, in_default_domain, producer_of
from dsopt.pattern import read_constant, topological_order

__all__ = ["SKIP_REASONS", "ConvertQoperator"]

_MS = "com.microsoft"
_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_FLOAT = 1
_UINT8, _INT8 = np.dtype(np.uint8), np.dtype(np.int8)
#: (activation, weight) types onnxruntime's QLinearConv/QLinearMatMul CPU kernels take.
_KERNEL_TYPES = {(_UINT8, _UINT8), (_UINT8, _INT8), (_INT8, _INT8)}
_RULES = ("qlinear-conv", "qlinear-matmul", "matmul-integer", "qlinear-add", "qlinear-mul")

#: Why an island was left alone; each counts as a `skipped-<reason>` statistic.
SKIP_REASONS = (
    "operand-not-dq",
    "dynamic-parameters",
    "per-axis-activation",
    "weight-not-constant",
    "weight-axis",
    "weight-zero-points",
    "types",
    "float-bias",
    "bias-scale",
    "no-output-q",
    "output-shared",
    "contrib-disabled",
)


@dataclasses.dataclass(frozen=True)
class ConvertQoperator(Pass):
    """Rewrites QDQ islands as the QOperator nodes of targets that run integer kernels.

    Rules (one statistic each):
      1. `qlinear-conv`: `DQ(x), DQ(W const) [, DQ(bias int32)] -> Conv -> Q`  ==>
         `QLinearConv` (x per tensor; W per tensor or per output channel, axis 0, with
         equal zero points; the bias scale equal to `x_scale * w_scale` in float32).
      2. `qlinear-matmul`: `DQ(a), DQ(b) -> MatMul -> Q`  ==>  `QLinearMatMul` (a per tensor,
         b per tensor or, as a matrix, per column).
      3. `matmul-integer`: `DQ(a), DQ(b int8 const) -> MatMul` with no Q after  ==>
         `MatMulInteger`, `Cast` to float, `* (a_scale * b_scale)`.
      4. `qlinear-add` / `qlinear-mul`: `DQ(a), DQ(b) -> Add/Mul -> Q`  ==>
         `com.microsoft.QLinearAdd/QLinearMul`, only for targets that declare them (or with
         `contrib=true`); otherwise counted as `skipped-contrib-disabled`.
    The types must be ones onnxruntime's kernels take (x/a uint8 with uint8 or int8 weights,
    or int8 with int8; the output type that of x/a). Islands that do not fit are left alone
    and counted under `skipped-<reason>` (`SKIP_REASONS`). Fold QAT weights (`fold-qdq`)
    first: a weight behind Q -> DQ is no constant yet (`skipped-weight-not-constant`).

    Lossy within one output quantization step: the integer kernels sum exactly and round
    once (`acc * (x_scale * w_scale / y_scale)`), while DQ -> float op -> Q rounds every
    product and sum in float before quantizing, so a value near a rounding tie may land one
    step away (tolerance 1.0: one step of an integer output; a float output after a DQ moves
    by that DQ's scale). `matmul-integer` has no output rounding: it differs from the float
    MatMul only by float rounding of the sum.
    """

    name: ClassVar[str] = "convert-qoperator"
    summary: ClassVar[str] = (
        "turn DequantizeLinear->Conv/MatMul/Add/Mul->QuantizeLinear islands into QLinear* ops"
    )
    stage: ClassVar[str] = "qdq"
    exactness: ClassVar[str] = "lossy"
    tolerance: ClassVar[float | None] = 1.0
    opsets: ClassVar[tuple[int | None, int | None]] = (10, None)

    contrib: bool = dataclasses.field(
        default=False,
        metadata={"help": "emit com.microsoft QLinearAdd/QLinearMul whatever the target"},
    )

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Converts every island that fits, in every graph."""
        converter = _Converter(module, ctx, self.contrib)
        for graph in list(module.graphs()):
            converter.convert(graph)
        converter.remove_dead(module)
        stats: dict[str, int | float | str] = dict(converter.fired)
        stats.update((f"skipped-{r}", converter.skipped[r]) for r in SKIP_REASONS)
        return PassResult(any(converter.fired[r] for r in _RULES), stats)


class _Skip(Exception):
    """The island does not fit; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class _Operand:
    """A DQ-fed operand: the integer tensor, its parameters and the DQ node."""

    tensor: gs.Tensor
    params: QuantParams
    dequant: gs.Node


class _Converter(QdqEditor):
    def __init__(self, module: Module, ctx: PassContext, contrib: bool) -> None:
        super().__init__(module, ctx, _RULES)
        self.skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        self.contrib = contrib

    def convert(self, graph: gs.Graph) -> None:
        self.members = {id(n) for n in graph.nodes}
        handlers = {"Conv": self.conv, "MatMul": self.matmul, "Add": self.binary}
        handlers["Mul"] = self.binary
        for node in topological_order(graph):
            handler = handlers.get(node.op)
            if handler is None or not in_default_domain(node) or id(node) in self.removed:
                continue
            if not any(self.dequantized(t) for t in node.inputs[:2]):
                continue  # no island here
            try:
                handler(graph, node)
            except _Skip as skip:
                self.skipped[skip.reason] += 1
        self.flush(graph)

    # -- matching -----------------------------------------------------------------------------
    def dequantized(self, tensor: gs.Tensor) -> gs.Node | None:
        producer = producer_of(tensor)
        if producer is None or producer.op != _DQ or not in_default_domain(producer):
            return None
        return producer

    def operand(self, tensor: gs.Tensor, *, per_tensor: bool = True) -> _Operand:
        """The integer source of a DQ-fed operand (per tensor unless `per_tensor` is False)."""
        dequant = self.dequantized(tensor)
        if dequant is None:
            raise _Skip("operand-not-dq")
        params = self.params(dequant)
        if params is None:
            raise _Skip("dynamic-parameters")
        if per_tensor and not params.per_tensor:
            raise _Skip("per-axis-activation")
        return _Operand(dequant.inputs[0], params, dequant)

    def output_quantizer(self, node: gs.Node) -> tuple[gs.Node, QuantParams]:
        """The one Q reading `node`'s output, with per-tensor positive parameters."""
        value = node.outputs[0]
        readers = list(value.outputs)
        if not readers or not any(r.op == _Q for r in readers):
            raise _Skip("no-output-q")
        if len(readers) != 1 or id(value) in self.protected or len(node.outputs) != 1:
            raise _Skip("output-shared")
        (quant,) = readers
        if not in_default_domain(quant) or id(quant) not in self.members:
            raise _Skip("output-shared")
        params = self.params(quant)
        if params is None:
            raise _Skip("dynamic-parameters")
        if not params.per_tensor:
            raise _Skip("per-axis-activation")
        if not (np.isfinite(params.scale) and float(params.scale) > 0):
            raise _Skip("dynamic-parameters")
        return quant, params

    def constant(self, hint: str, value: Any) -> gs.Constant:
        return gs.Constant(self.fresh(hint), np.array(value, order="C"))

    def parameters(self, hint: str, params: QuantParams, node: gs.Node) -> list[gs.Tensor]:
        """Scale and zero point as the kernels take them (0-D per tensor, 1-D per axis).

        `node`'s own constants are reused when they already have that form.
        """
        wanted = (params.scale, params.zero_point)
        if params.per_tensor:
            wanted = (params.scale.reshape(()), params.zero_point.reshape(()))
        found: list[gs.Tensor] = []
        for index, (suffix, value) in enumerate(zip(("scale", "zero_point"), wanted, strict=True)):
            tensor = node.inputs[index + 1] if len(node.inputs) > index + 1 else None
            if isinstance(tensor, gs.Constant) and tensor.name:
                current = read_constant(tensor)
                if current is not None and current.dtype == value.dtype:
                    if current.shape == value.shape:
                        found.append(tensor)
                        continue
            found.append(self.constant(f"{hint}_{suffix}", value))
        return found

    def replace(self, graph: gs.Graph, old: list[gs.Node], new: list[gs.Node], rule: str) -> None:
        """Swaps `old` for `new` (whose outputs are given after `old` is detached)."""
        outputs = [list(n.outputs) for n in new]
        for node in new:
            node.outputs.clear()
        self.detach(old)
        for node, tensors in zip(new, outputs, strict=True):
            node.outputs.extend(tensors)
            self.add(graph, node)
        self.fired[rule] += 1

    # -- rules --------------------------------------------------------------------------------
    def conv(self, graph: gs.Graph, conv: gs.Node) -> None:
        x = self.operand(conv.inputs[0])
        w = self.operand(conv.inputs[1], per_tensor=False)
        weight = read_constant(w.tensor) if w.tensor.name else None
        if weight is None:
            raise _Skip("weight-not-constant")
        if not w.params.per_tensor and (w.params.axis != 0 or w.params.block_size):
            raise _Skip("weight-axis")
        if np.unique(w.params.zero_point).size != 1:
            raise _Skip("weight-zero-points")
        if (x.params.dtype, w.params.dtype) not in _KERNEL_TYPES:
            raise _Skip("types")
        bias = self.bias(conv, x.params, w.params, weight.shape[0])
        quant, y = self.output_quantizer(conv)
        if y.dtype != x.params.dtype:
            raise _Skip("types")
        name = conv.name or "Conv"
        inputs = [x.tensor, *self.parameters(f"{name}/x", x.params, x.dequant), w.tensor]
        inputs += self.parameters(f"{name}/w", w.params, w.dequant)
        inputs += self.parameters(f"{name}/y", y, quant)
        if bias is not None:
            inputs.append(bias)
        qconv = gs.Node(
            "QLinearConv", self.fresh(name), dict(conv.attrs), inputs, [quant.outputs[0]]
        )
        self.replace(graph, [conv, quant], [qconv], "qlinear-conv")

    def bias(
        self, conv: gs.Node, x: QuantParams, w: QuantParams, channels: int
    ) -> gs.Tensor | None:
        """The int32 bias constant behind a DQ of scale x_scale * w_scale, else None."""
        if len(conv.inputs) < 3 or not conv.inputs[2].name:
            return None
        dequant = self.dequantized(conv.inputs[2])
        if dequant is None:
            raise _Skip("float-bias")
        bias = read_constant(dequant.inputs[0]) if dequant.inputs[0].name else None
        scale = read_constant(dequant.inputs[1]) if len(dequant.inputs) > 1 else None
        zero = None
        if len(dequant.inputs) > 2 and dequant.inputs[2].name:
            zero = read_constant(dequant.inputs[2])
            if zero is None or np.any(zero != 0):
                raise _Skip("bias-scale")
        if bias is None or scale is None or bias.dtype != np.int32 or bias.shape != (channels,):
            raise _Skip("float-bias")
        expected = (np.float32(x.scale) * w.scale.astype(np.float32)).astype(np.float32)
        if scale.dtype != np.float32 or scale.size not in (1, channels):
            raise _Skip("bias-scale")
        have = np.broadcast_to(scale.reshape(-1), (channels,))
        if not np.array_equal(have, np.broadcast_to(expected.reshape(-1), (channels,))):
            raise _Skip("bias-scale")
        return dequant.inputs[0]

    def matmul(self, graph: gs.Graph, matmul: gs.Node) -> None:
        a = self.operand(matmul.inputs[0])
        b = self.operand(matmul.inputs[1], per_tensor=False)
        if not b.params.per_tensor:
            rank = self.rank_of(b.tensor)
            if rank != 2 or b.params.axis != 1 or b.params.block_size:
                raise _Skip("weight-axis")
        if (a.params.dtype, b.params.dtype) not in _KERNEL_TYPES:
            raise _Skip("types")
        value = matmul.outputs[0]
        if any(r.op == _Q for r in value.outputs):
            self.qlinear_matmul(graph, matmul, a, b)
        else:
            self.matmul_integer(graph, matmul, a, b)

    def qlinear_matmul(self, graph: gs.Graph, matmul: gs.Node, a: _Operand, b: _Operand) -> None:
        quant, y = self.output_quantizer(matmul)
        if y.dtype != a.params.dtype:
            raise _Skip("types")
        name = matmul.name or "MatMul"
        inputs = [a.tensor, *self.parameters(f"{name}/a", a.params, a.dequant), b.tensor]
        inputs += self.parameters(f"{name}/b", b.params, b.dequant)
        inputs += self.parameters(f"{name}/y", y, quant)
        node = gs.Node("QLinearMatMul", self.fresh(name), {}, inputs, [quant.outputs[0]])
        self.replace(graph, [matmul, quant], [node], "qlinear-matmul")

    def matmul_integer(self, graph: gs.Graph, matmul: gs.Node, a: _Operand, b: _Operand) -> None:
        weight = read_constant(b.tensor) if b.tensor.name else None
        if weight is None:
            raise _Skip("weight-not-constant")
        if b.params.dtype != _INT8:
            raise _Skip("types")
        if len(matmul.outputs) != 1:
            raise _Skip("output-shared")
        name = matmul.name or "MatMul"
        a_zero = self.parameters(f"{name}/a", a.params, a.dequant)[1]
        b_zero = self.parameters(f"{name}/b", b.params, b.dequant)[1]
        total = gs.Variable(self.fresh(f"{name}/int32"))
        as_float = gs.Variable(self.fresh(f"{name}/float"))
        scale = (np.float32(a.params.scale) * b.params.scale.astype(np.float32)).astype(np.float32)
        nodes = [
            gs.Node(
                "MatMulInteger", self.fresh(name), {}, [a.tensor, b.tensor, a_zero, b_zero], [total]
            ),
            gs.Node("Cast", self.fresh(f"{name}/Cast"), {"to": _FLOAT}, [total], [as_float]),
            gs.Node(
                "Mul",
                self.fresh(f"{name}/Mul"),
                {},
                [as_float, self.constant(f"{name}/scale", scale)],
                [matmul.outputs[0]],
            ),
        ]
        self.replace(graph, [matmul], nodes, "matmul-integer")

    def binary(self, graph: gs.Graph, node: gs.Node) -> None:
        a, b = self.operand(node.inputs[0]), self.operand(node.inputs[1])
        quant, y = self.output_quantizer(node)
        if not a.params.dtype == b.params.dtype == y.dtype or y.dtype not in (_UINT8, _INT8):
            raise _Skip("types")
        op = f"QLinear{node.op}"
        if not (self.contrib or self.ctx.supports(f"{_MS}::{op}")):
            raise _Skip("contrib-disabled")
        name = node.name or node.op
        inputs = [a.tensor, *self.parameters(f"{name}/a", a.params, a.dequant)]
        inputs += [b.tensor, *self.parameters(f"{name}/b", b.params, b.dequant)]
        inputs += self.parameters(f"{name}/y", y, quant)
        fused = gs.Node(op, self.fresh(name), {}, inputs, [quant.outputs[0]], domain=_MS)
        self.replace(graph, [node, quant], [fused], op.replace("QLinear", "qlinear-").lower())
