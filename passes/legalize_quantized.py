"""Rewrite quantized ops TVM's ONNX importer rejects (QLinear*, *Integer, MatMulNBits, int4)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import fresh_name, read_constant

__all__ = ["LegalizeQuantized", "LEGALIZED_OPS"]

#: float32 holds every integer below this exactly; integer sums below it add exactly.
_EXACT = float(2**24)
#: A big conv bias splits into a low part below this and a high part, a multiple of it.
_BIAS_STEP = 4096
#: The activation split base of the wide-sum path (x = 16 * hi + lo, lo in [0, 16)).
_SPLIT = 16.0
#: Assumed image size bound when QLinearGlobalAveragePool's input shape is unknown.
_MAX_IMAGE = 65536
_MS = "com.microsoft"
_RANGES = {
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint16): (0, 65535),
    np.dtype(np.int16): (-32768, 32767),
}


class _NotApplicable(Exception):
    """The node needs no rewrite (TVM imports it as it is)."""


class _Skip(Exception):
    """The node cannot be legalized exactly; it is left as it is (counted as `skipped-*`)."""

    def __init__(self, stat: str) -> None:
        super().__init__(stat)
        self.stat = stat


@dataclasses.dataclass(frozen=True)
class LegalizeQuantized(Pass):
    """Spells quantized ops in ops TVM's Relax ONNX frontend imports, keeping int8 storage.

    Accumulations run on integer-valued tensors whose partial sums stay below 2**24 (checked
    from the constant weights), so they are exact in float32; requantization multiplies by the
    float32 scale onnxruntime computes and rounds half to even in `QuantizeLinear(v, 1, zp)`.

    Rules:
      1. `QLinearConv` (also com.microsoft, NCHW) -> `x - xz` and `w - wz` as float, `Conv`
         with the int32 bias as float, `* (xs * ws / ys)`, `QuantizeLinear(., 1, yz)`. When
         `max|x - xz| * sum|w - wz| + |bias|` may reach 2**24 the activation is split into
         `16 * hi + lo` and two convs summed (one rounding, as float(int32) rounds);
         still too wide: `skipped-range`. Only the bias too big (tiny scales)? It splits
         into `bias mod 4096` inside the conv and the rest added after (`split-bias`). For
         targets whose TVM lowering has int8 kernels (option `int8_kernels=vnni`, set by the
         driver for x86 CPUs with AVX-512 VNNI), ungrouped convs stay one conv whatever their
         range: the kernel sums in int32 (counted as `int32-kernel-sums`; a bias then rounds
         once more, within one step).
      2. `ConvInteger` -> the same accumulation, cast to int32 (hi/lo partials cast first).
      3. `QLinearMatMul` -> `MatMulInteger` (int32), `Cast`, `* (as * bs / ys)`, quantize.
      4. com.microsoft `QGemm` -> `MatMulInteger` (B transposed as a constant), `+ C` in int32,
         `* (alpha * as * bs [/ ys])`, quantize when it has a `y_zero_point`.
      5. com.microsoft `QLinearGlobalAveragePool` -> sum of `x - xz` over the image,
         `* (xs / (ys * size))`, quantize (onnxruntime's MLAS formula).
      6. com.microsoft `QLinearAdd`/`QLinearMul` -> onnxruntime's float formulas (Add:
         `a * (as/cs) + (b * (bs/cs) + (cz - (as/cs * az + bs/cs * bz)))`; Mul: centered product
         times `as * bs / cs`), quantize; `QLinearSigmoid`/`QLinearLeakyRelu`/
         `QLinearAveragePool`/`QLinearConcat`/`QLinearSoftmax` -> `DequantizeLinear`, the float
         op, `QuantizeLinear`.
      7. com.microsoft `MatMulNBits` (2/4/8 bits, constant B, no g_idx) -> B unpacked into a
         uint8 constant [blocks, block, N], widened to float (`DequantizeLinear(q, 1)`, which
         TVM's importer does not fold away), `- zp`, `* scale` per block, `Reshape`
         (and `Slice` to K), `MatMul`, `+ bias`.
      8. `DequantizeLinear` with `block_size` (opset 21) on a constant -> the constant
         (int4/uint4 widened to int8/uint8) reshaped to [.., blocks, block, ..], widened to
         float as in 7, `- zp`, `* scale`, `Reshape` (and `Slice`); unblocked int4/uint4
         `DequantizeLinear` -> the same op on the widened constant.
    With `fold_weights=true`, rules 7-8 store the dequantized weight as a float constant.

    Rules 1-5, 7-8 compute what onnxruntime's reference kernels compute (bit-exact, except
    that MatMulNBits and matmuls sum floats in another order); rule 6 copies onnxruntime's
    formulas without its FMA contractions and lookup tables, so an output can differ by one
    quantization step when a value lies within an ulp of a rounding tie: hence `lossy`, with
    a tolerance of one step.
    """

    name: ClassVar[str] = "legalize-quantized"
    summary: ClassVar[str] = (
        "spell QLinear*/ConvInteger/MatMulNBits/blocked int4 DequantizeLinear in ops TVM imports"
    )
    stage: ClassVar[str] = "qdq"
    exactness: ClassVar[str] = "lossy"
    tolerance: ClassVar[float | None] = 1.0

    fold_weights: bool = dataclasses.field(
        default=False,
        metadata={"help": "store dequantized MatMulNBits/blocked weights as float constants"},
    )

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Rewrites every legalizable quantized node of every graph."""
        stats: dict[str, int | float | str] = {}
        # The target's TVM lowering computes ungrouped integer convs in int32 (dsopt/_tvm.py).
        int32_kernels = ctx.options.get("int8_kernels") == "vnni"
        names = {t.name for g in module.graphs() for t in g.tensors().values() if t.name}
        names |= {n.name for g in module.graphs() for n in g.nodes if n.name}
        changed = False
        for graph in module.graphs():
            for node in list(graph.nodes):
                rule = _RULES.get((node.domain or "", node.op))
                if rule is None:
                    continue
                builder = _Builder(
                    graph, node, names, module.opset, self.fold_weights, int32_kernels
                )
                try:
                    rule(builder, node)
                except _NotApplicable:
                    continue
                except _Skip as skip:
                    key = f"skipped-{skip.stat}"
                    stats[key] = int(stats.get(key, 0)) + 1
                    continue
                builder.commit()
                key = node.op if not node.domain else f"{node.domain}::{node.op}"
                for note in (key, *builder.notes):
                    stats[note] = int(stats.get(note, 0)) + 1
                changed = True
        return PassResult(changed, stats)


# -- building replacements ---------------------------------------------------------------------
class _Builder:
    """Collects the replacement of one node; `commit` swaps it in (it writes the node's outputs)."""

    def __init__(
        self,
        graph: gs.Graph,
        node: gs.Node,
        names: set[str],
        opset: int,
        fold: bool,
        int32_kernels: bool = False,
    ) -> None:
        self.graph, self.node, self.names, self.opset, self.fold = graph, node, names, opset, fold
        self.int32_kernels = int32_kernels
        self.base = node.name or (node.outputs[0].name if node.outputs else "q")
        self.notes: list[str] = []
        self.specs: list[tuple[str, str, dict[str, Any], list[gs.Tensor], gs.Tensor]] = []

    def fresh(self, hint: str) -> str:
        return fresh_name(self.names, f"{self.base}/{hint}")

    def const(self, hint: str, value: Any, dtype: Any = None) -> gs.Constant:
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        return gs.Constant(self.fresh(hint), array)

    def op(
        self,
        op: str,
        inputs: list[gs.Tensor],
        attrs: dict[str, Any] | None = None,
        out: gs.Tensor | None = None,
    ) -> gs.Tensor:
        """Appends `op`; returns its (new, or the given) output tensor."""
        out = out if out is not None else gs.Variable(self.fresh(op.lower()))
        self.specs.append((op, self.fresh(op), dict(attrs or {}), list(inputs), out))
        return out

    def output(self, index: int = 0) -> gs.Tensor:
        return self.node.outputs[index]

    def commit(self) -> None:
        """Disconnects the node and connects the replacement (nothing is wired before this)."""
        self.node.inputs.clear()
        self.node.outputs.clear()
        self.graph.nodes.remove(self.node)
        for op, name, attrs, inputs, out in self.specs:
            self.graph.nodes.append(gs.Node(op, name, attrs, inputs, [out]))

    # -- helpers --------------------------------------------------------------------------
    def input(self, index: int) -> gs.Tensor | None:
        inputs = self.node.inputs
        if index >= len(inputs) or not inputs[index].name:
            return None
        return inputs[index]

    def value(self, index: int, *, required: bool = True) -> np.ndarray | None:
        """The constant value of input `index` (None when absent and not `required`)."""
        tensor = self.input(index)
        if tensor is None:
            if required:
                raise _Skip("missing-input")
            return None
        value = read_constant(tensor)
        if value is None:
            raise _Skip("dynamic-parameter")
        return np.asarray(value)

    def cast(self, tensor: gs.Tensor, to: int) -> gs.Tensor:
        return self.op("Cast", [tensor], {"to": to})

    def widen_weight(self, q: np.ndarray, dtype: np.dtype) -> gs.Tensor:
        """The integer constant `q` as float: `DequantizeLinear(q, 1)` for float32 (exact).

        Not a Cast: TVM's importer folds a Cast of a constant (and the ops after it) into a
        float32 weight, while it keeps a DequantizeLinear, so dsopt's CPU kernels can read
        the 1-byte weight in the matmul (dsopt/_tvm.py, `_dequantized_weight`).
        """
        if np.dtype(dtype) != np.float32:
            return self.cast(self.const("x_q", q), _onnx_float(dtype))
        one = gs.Constant(self.fresh("one"), np.array(1.0, np.float32))  # a true scalar
        return self.op("DequantizeLinear", [self.const("x_q", q), one])

    def centered(self, tensor: gs.Tensor, zero_point: np.ndarray | None, shape: Any = ()) -> Any:
        """`tensor - zero_point` as float32 (exact: both are small integers)."""
        value = self.cast(tensor, _FLOAT)
        if zero_point is not None and np.any(zero_point != 0):
            zp = np.asarray(zero_point, np.float32).reshape(shape)
            value = self.op("Sub", [value, self.const("zp", zp)])
        return value

    def quantize(self, value: gs.Tensor, zero_point: np.ndarray, out: gs.Tensor) -> None:
        """Round half to even, add the zero point, saturate: `QuantizeLinear(v, 1, zp)`."""
        zp = np.asarray(zero_point).reshape(())
        one = self.const("one", np.float32(1.0))
        self.op("QuantizeLinear", [value, one, self.const("y_zp", zp)], out=out)

    def reduce_sum(self, value: gs.Tensor, axes: list[int]) -> gs.Tensor:
        if self.opset >= 13:
            return self.op("ReduceSum", [value, self.const("axes", np.array(axes, np.int64))])
        return self.op("ReduceSum", [value], {"axes": axes})


_FLOAT, _INT32, _DOUBLE = 1, 6, 11


def _range(zero_point: np.ndarray) -> tuple[int, int]:
    found = _RANGES.get(np.asarray(zero_point).dtype)
    if found is None:
        raise _Skip("dtype")
    return found


def _scalar(value: np.ndarray) -> np.ndarray:
    if value.size != 1:
        raise _Skip("per-tensor-expected")
    return value.reshape(())


def _activation_span(zero_point: np.ndarray) -> float:
    """The largest |x - zp| over the type's range."""
    low, high = _range(zero_point)
    zp = float(np.asarray(zero_point).reshape(-1)[0])
    return max(zp - low, high - zp)


# -- rules ---------------------------------------------------------------------------------------
def _conv_accumulate(
    b: _Builder,
    x: gs.Tensor,
    xz: np.ndarray | gs.Tensor,
    w: np.ndarray,
    wz: np.ndarray,
    bias: np.ndarray | None,
    attrs: dict[str, Any],
    *,
    as_int32: bool,
) -> gs.Tensor:
    """The exact integer convolution of `x - xz` with `w - wz` (+ bias), float32 or int32.

    A dynamic `xz` (a tensor, from DynamicQuantizeLinear) bounds `|x - xz|` by the type's
    full width.
    """
    centered_w = w.astype(np.int64) - np.asarray(wz, np.int64).reshape((-1,) + (1,) * (w.ndim - 1))
    per_channel = np.abs(centered_w).reshape(centered_w.shape[0], -1).sum(axis=1).max()
    if isinstance(xz, gs.Tensor):
        low, high = _range(np.zeros((), _input_dtype(x) or np.uint8))
        span = float(high - low)
    else:
        span = _activation_span(xz)
    bias_max = float(np.abs(bias).max()) if bias is not None and bias.size else 0.0
    wz_shape = (-1,) + (1,) * (w.ndim - 1)
    weight: gs.Tensor
    if b.fold:
        weight = b.const("w", centered_w.astype(np.float32))
    else:
        weight = b.centered(b.const("w_q", w), np.asarray(wz), wz_shape)
    bias_inputs = [b.const("bias", bias.astype(np.float32))] if bias is not None else []
    if isinstance(xz, gs.Tensor):
        xc = b.op("Sub", [b.cast(x, _FLOAT), b.cast(xz, _FLOAT)])
    else:
        xc = b.centered(x, xz)
    if (
        bias is not None
        and not as_int32
        and span * per_channel + bias_max >= _EXACT
        and span * per_channel + _BIAS_STEP < _EXACT
    ):
        # A big bias (tiny scales): the conv adds its low part exactly, then one float add of
        # the high part (a multiple of _BIAS_STEP, exact in float32) rounds once, as ORT does.
        low = np.mod(bias.astype(np.int64), _BIAS_STEP)
        b.notes.append("split-bias")
        acc = b.op("Conv", [xc, weight, b.const("bias_low", low.astype(np.float32))], attrs)
        high = (bias.astype(np.int64) - low).astype(np.float32)
        return b.op("Add", [acc, b.const("bias_high", high.reshape((-1,) + (1,) * (w.ndim - 2)))])
    if span * per_channel + bias_max < _EXACT or (b.int32_kernels and attrs.get("group", 1) == 1):
        if span * per_channel + bias_max >= _EXACT:
            b.notes.append("int32-kernel-sums")
        acc = b.op("Conv", [xc, weight, *bias_inputs], attrs)
        return b.cast(acc, _INT32) if as_int32 else acc
    if _SPLIT * per_channel >= _EXACT or (_SPLIT - 1) * per_channel + bias_max >= _EXACT:
        raise _Skip("range")
    b.notes.append("split-wide-sums")
    hi = b.op("Floor", [b.op("Mul", [xc, b.const("inv16", np.float32(1 / _SPLIT))])])
    lo = b.op("Sub", [xc, b.op("Mul", [hi, b.const("sixteen", np.float32(_SPLIT))])])
    acc_hi = b.op("Mul", [b.op("Conv", [hi, weight], attrs), b.const("k16", np.float32(_SPLIT))])
    acc_lo = b.op("Conv", [lo, weight, *bias_inputs], attrs)
    if as_int32:
        return b.op("Add", [b.cast(acc_hi, _INT32), b.cast(acc_lo, _INT32)])
    return b.op("Add", [acc_hi, acc_lo])


def _conv_attrs(node: gs.Node) -> dict[str, Any]:
    return {k: v for k, v in node.attrs.items() if k != "channels_last"}


def _qlinear_conv(b: _Builder, node: gs.Node) -> None:
    if node.attrs.get("channels_last", 0):
        raise _Skip("channels-last")
    xs, xz = _scalar(b.value(1)), _scalar(b.value(2))
    w, ws, wz = b.value(3), b.value(4).reshape(-1), b.value(5).reshape(-1)
    ys, yz = _scalar(b.value(6)), _scalar(b.value(7))
    bias = b.value(8, required=False)
    if wz.size > 1 and np.any(wz != wz[0]):
        raise _Skip("per-channel-weight-zero-point")
    x = b.input(0)
    assert x is not None
    acc = _conv_accumulate(b, x, xz, w, wz[:1], bias, _conv_attrs(node), as_int32=False)
    scale = (np.float32(xs) * ws.astype(np.float32) / np.float32(ys)).astype(np.float32)
    shape = (-1,) + (1,) * (w.ndim - 2)
    scaled = b.op("Mul", [acc, b.const("scale", scale.reshape(shape if scale.size > 1 else ()))])
    b.quantize(scaled, yz, b.output())


def _conv_integer(b: _Builder, node: gs.Node) -> None:
    x = b.input(0)
    assert x is not None
    w = b.value(1)
    xz_tensor = b.input(2)
    xz: np.ndarray | gs.Tensor
    if xz_tensor is not None and read_constant(xz_tensor) is None:
        xz = xz_tensor  # DynamicQuantizeLinear's zero point
    else:
        xz = _scalar(_zero_point(b, 2, _input_dtype(x) or np.uint8))
    wz = _zero_point(b, 3, w.dtype)
    acc = _conv_accumulate(b, x, xz, w, wz, None, dict(node.attrs), as_int32=True)
    b.op("Identity", [acc], out=b.output())


def _zero_point(b: _Builder, index: int, dtype: Any) -> np.ndarray:
    """The constant zero point at `index` (a zero of `dtype` when absent), flattened."""
    value = b.value(index, required=False)
    return np.zeros(1, dtype) if value is None else value.reshape(-1)


def _input_dtype(tensor: gs.Tensor) -> np.dtype | None:
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        return None


def _qlinear_matmul(b: _Builder, node: gs.Node) -> None:
    a_s, a_z = _scalar(b.value(1)), b.value(2)
    b_s, b_z = b.value(4), b.value(5)
    ys, yz = _scalar(b.value(6)), _scalar(b.value(7))
    if a_z.size != 1 or b_s.ndim > 1 or b_z.ndim > 1:
        raise _Skip("per-tensor-expected")
    a, w = b.input(0), b.input(3)
    assert a is not None and w is not None
    acc = b.op("MatMulInteger", [a, w, b.const("a_zp", a_z.reshape(())), _zp_const(b, b_z)])
    scale = (np.float32(a_s) * b_s.astype(np.float32) / np.float32(ys)).astype(np.float32)
    scaled = b.op("Mul", [b.cast(acc, _FLOAT), b.const("scale", scale)])
    b.quantize(scaled, yz, b.output())


def _zp_const(b: _Builder, zp: np.ndarray) -> gs.Constant:
    return b.const("b_zp", zp.reshape(()) if zp.size == 1 else zp.reshape(-1))


def _qgemm(b: _Builder, node: gs.Node) -> None:
    a_s, a_z = _scalar(b.value(1)), _scalar(b.value(2))
    w, b_s, b_z = b.value(3), b.value(4).reshape(-1), b.value(5).reshape(-1)
    bias = b.value(6, required=False)
    ys = b.value(7, required=False)
    yz = b.value(8, required=False)
    a = b.input(0)
    assert a is not None
    if node.attrs.get("transA", 0):
        a = b.op("Transpose", [a], {"perm": [1, 0]})
    if node.attrs.get("transB", 0):
        w = np.ascontiguousarray(w.T)
    alpha = np.float32(node.attrs.get("alpha", 1.0))
    acc = b.op("MatMulInteger", [a, b.const("w_q", w), b.const("a_zp", a_z), _zp_const(b, b_z)])
    if bias is not None:
        acc = b.op("Add", [acc, b.const("bias", bias.astype(np.int32))])
    scale = (alpha * np.float32(a_s) * b_s.astype(np.float32)).astype(np.float32)
    if ys is not None:
        scale = (scale / np.float32(_scalar(ys))).astype(np.float32)
    scale_c = b.const("scale", scale.reshape(()) if scale.size == 1 else scale)
    if yz is None:
        b.op("Mul", [b.cast(acc, _FLOAT), scale_c], out=b.output())
        return
    b.quantize(b.op("Mul", [b.cast(acc, _FLOAT), scale_c]), _scalar(yz), b.output())


def _qlinear_global_average_pool(b: _Builder, node: gs.Node) -> None:
    if node.attrs.get("channels_last", 0):
        raise _Skip("channels-last")
    xs, xz = _scalar(b.value(1)), _scalar(b.value(2))
    ys, yz = _scalar(b.value(3)), _scalar(b.value(4))
    x = b.input(0)
    assert x is not None
    static = x.shape is not None and all(isinstance(d, int) for d in x.shape[2:])
    size_bound = int(np.prod(x.shape[2:], dtype=np.int64)) if static else _MAX_IMAGE
    if _activation_span(xz) * size_bound >= _EXACT:
        raise _Skip("range")
    # Rank-agnostic and shape-agnostic (folded to constants once shapes are static):
    # sum over [N, C, -1], then reshape to [N, C, 1, ...]; size = prod(spatial dims).
    i64 = np.int64
    shape = b.op("Shape", [x])
    spatial = _slice(b, shape, 0, 2, int(np.iinfo(np.int64).max))
    head = _slice(b, shape, 0, 0, 2)
    ones = b.op("Div", [spatial, spatial])
    flat = b.op("Reshape", [b.centered(x, xz), b.const("nc1", np.array([0, 0, -1], i64))])
    total = b.reduce_sum(flat, [2])
    total = b.op("Reshape", [total, b.op("Concat", [head, ones], {"axis": 0})])
    size = b.cast(b.op("ReduceProd", [spatial], {"keepdims": 0}), _FLOAT)
    # onnxruntime (MLAS): scale = xs / (ys * float(size)); float(sum) * scale.
    denominator = b.op("Mul", [b.const("y_scale", np.float32(ys)), size])
    scale = b.op("Div", [b.const("x_scale", np.float32(xs)), denominator])
    b.quantize(b.op("Mul", [total, scale]), yz, b.output())


def _qlinear_add(b: _Builder, node: gs.Node) -> None:
    dtype = _input_dtype(b.input(0)) or np.uint8
    a_s, a_z = _scalar(b.value(1)), _scalar(_zero_point(b, 2, dtype))
    b_s, b_z = _scalar(b.value(4)), _scalar(_zero_point(b, 5, dtype))
    c_s, c_z = _scalar(b.value(6)), _scalar(_zero_point(b, 7, dtype))
    ra = np.float32(np.float32(a_s) / np.float32(c_s))
    rb = np.float32(np.float32(b_s) / np.float32(c_s))
    fixed = np.float32(
        np.float32(c_z) - np.float32(np.float32(ra * np.float32(a_z)) + rb * np.float32(b_z))
    )
    a_in, b_in = b.input(0), b.input(3)
    assert a_in is not None and b_in is not None
    a_f = b.op("Mul", [b.cast(a_in, _FLOAT), b.const("ra", ra)])
    b_f = b.op("Add", [b.op("Mul", [b.cast(b_in, _FLOAT), b.const("rb", rb)]), b.const("k", fixed)])
    b.quantize(b.op("Add", [a_f, b_f]), np.zeros((), c_z.dtype), b.output())


def _qlinear_mul(b: _Builder, node: gs.Node) -> None:
    dtype = _input_dtype(b.input(0)) or np.uint8
    a_s, a_z = _scalar(b.value(1)), _scalar(_zero_point(b, 2, dtype))
    b_s, b_z = _scalar(b.value(4)), _scalar(_zero_point(b, 5, dtype))
    c_s, c_z = _scalar(b.value(6)), _scalar(_zero_point(b, 7, dtype))
    a_in, b_in = b.input(0), b.input(3)
    assert a_in is not None and b_in is not None
    scale = np.float32(np.float32(a_s) * np.float32(b_s) / np.float32(c_s))
    product = b.op("Mul", [b.centered(a_in, a_z), b.centered(b_in, b_z)])
    b.quantize(b.op("Mul", [product, b.const("scale", scale)]), c_z, b.output())


def _qdq_unary(op: str, keep: tuple[str, ...] = ()) -> Callable[[_Builder, gs.Node], None]:
    """DQ -> `op` -> Q for a com.microsoft QLinear<op>(X, Xs, Xz, Ys, Yz)."""

    def rule(b: _Builder, node: gs.Node) -> None:
        if node.attrs.get("channels_last", 0):
            raise _Skip("channels-last")
        xs, ys = _scalar(b.value(1)), _scalar(b.value(3))
        xz = b.value(2, required=False)
        yz = b.value(4, required=False)
        x = b.input(0)
        assert x is not None
        xz = np.zeros((), _input_dtype(x) or np.uint8) if xz is None else _scalar(xz)
        yz = np.zeros((), xz.dtype) if yz is None else _scalar(yz)
        attrs = {k: v for k, v in node.attrs.items() if k in keep}
        if op == "Softmax" and (int(node.attrs.get("opset", 13)) >= 13) != (b.opset >= 13):
            raise _Skip("softmax-opset")
        deq = b.op("DequantizeLinear", [x, b.const("x_scale", xs), b.const("x_zp", xz)])
        value = b.op(op, [deq], attrs)
        b.op("QuantizeLinear", [value, b.const("y_scale", ys), b.const("y_zp", yz)], out=b.output())

    return rule


def _qlinear_concat(b: _Builder, node: gs.Node) -> None:
    ys, yz = _scalar(b.value(0)), _scalar(b.value(1))
    parts = []
    for i in range(2, len(node.inputs), 3):
        x = b.input(i)
        assert x is not None
        xs, xz = _scalar(b.value(i + 1)), _scalar(b.value(i + 2))
        parts.append(b.op("DequantizeLinear", [x, b.const("x_scale", xs), b.const("x_zp", xz)]))
    value = b.op("Concat", parts, {"axis": node.attrs["axis"]})
    b.op("QuantizeLinear", [value, b.const("y_scale", ys), b.const("y_zp", yz)], out=b.output())


# -- weight-only int4 -----------------------------------------------------------------------------
def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned `bits`-wide values packed low bits first along the last axis, first `count`."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


def _blocked_weight(
    b: _Builder, q: np.ndarray, zp: np.ndarray | float, scale: np.ndarray, rows: int
) -> gs.Tensor:
    """`(q - zp) * scale` for q [blocks, block, N], zp/scale [blocks, 1, N]; rows [K, N]."""
    blocks, block, n = q.shape
    if b.fold:
        value = ((q.astype(np.float32) - np.float32(zp)) * scale).astype(scale.dtype)
        weight: gs.Tensor = b.const("w", value.reshape(blocks * block, n)[:rows])
        return weight
    value = b.widen_weight(q, scale.dtype)
    if np.any(np.asarray(zp) != 0):
        value = b.op("Sub", [value, b.const("zp", np.asarray(zp, scale.dtype))])
    value = b.op("Mul", [value, b.const("scale", scale)])
    value = b.op("Reshape", [value, b.const("shape", np.array([blocks * block, n], np.int64))])
    if blocks * block != rows:
        value = _slice(b, value, 0, 0, rows)
    return value


def _slice(
    b: _Builder, value: gs.Tensor, axis: int, start: int, end: int, out: gs.Tensor | None = None
) -> gs.Tensor:
    """`value[start:end]` along `axis` (Slice with constant inputs)."""
    bounds = (("start", start), ("end", end), ("axis", axis))
    starts, ends, axes = (b.const(h, np.array([v], np.int64)) for h, v in bounds)
    return b.op("Slice", [value, starts, ends, axes], out=out)


def _onnx_float(dtype: np.dtype) -> int:
    return {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}[
        np.dtype(dtype)
    ]


def _matmul_nbits(b: _Builder, node: gs.Node) -> None:
    k, n = int(node.attrs["K"]), int(node.attrs["N"])
    bits, block = int(node.attrs.get("bits", 4)), int(node.attrs["block_size"])
    if bits not in (2, 4, 8) or b.input(4) is not None:
        raise _Skip("bits-or-g_idx")
    packed = b.value(1)
    scales = b.value(2)
    zps = b.value(3, required=False)
    bias = b.value(5, required=False)
    blocks = (k + block - 1) // block
    if scales.dtype not in (np.float32, np.float16):
        raise _Skip("dtype")
    q = _unpack(packed.astype(np.uint8).reshape(n, blocks, -1), bits, block)  # [N, blocks, block]
    scales = scales.reshape(n, blocks)
    if zps is None:
        zp: Any = float(1 << (bits - 1))
    elif zps.dtype == np.uint8:
        zp = _unpack(zps.reshape(n, -1), bits, blocks).astype(scales.dtype)  # [N, blocks]
        zp = np.ascontiguousarray(zp.T[:, None, :])
    else:
        zp = np.ascontiguousarray(zps.reshape(n, blocks).T[:, None, :]).astype(scales.dtype)
    q_t = np.ascontiguousarray(q.transpose(1, 2, 0))  # [blocks, block, N]
    s_t = np.ascontiguousarray(scales.T[:, None, :])
    weight = _blocked_weight(b, q_t, zp, s_t, k)
    a = b.input(0)
    assert a is not None
    if bias is None:
        b.op("MatMul", [a, weight], out=b.output())
        return
    product = b.op("MatMul", [a, weight])
    b.op("Add", [product, b.const("bias", bias)], out=b.output())


def _dequantize_linear(b: _Builder, node: gs.Node) -> None:
    x = b.input(0)
    assert x is not None
    block = int(node.attrs.get("block_size", 0))
    raw = read_constant(x)
    kind = str(getattr(x, "dtype", "") or "")
    narrow = raw is not None and raw.dtype.name in ("int4", "uint4")
    if not block and not narrow:
        raise _NotApplicable
    if raw is None:
        raise _Skip("dynamic-blocked" if block else f"dynamic-{kind}")
    scale = b.value(1)
    zp = b.value(2, required=False)
    wide = np.int8 if raw.dtype.name.startswith("int") else np.uint8
    q = raw.astype(wide) if narrow else raw
    zp = zp.astype(wide) if zp is not None and narrow else zp
    axis = int(node.attrs.get("axis", 1))
    if not block:
        zp_c = [b.const("zp", zp)] if zp is not None else []
        attrs = {k: v for k, v in node.attrs.items() if k != "block_size"}
        b.op("DequantizeLinear", [b.const("x_q", q), b.input(1), *zp_c], attrs, out=b.output())
        return
    axis %= q.ndim
    size = q.shape[axis]
    blocks = (size + block - 1) // block
    pad = [(0, 0)] * q.ndim
    pad[axis] = (0, blocks * block - size)
    zero = zp if zp is not None else np.zeros(scale.shape, q.dtype)
    blocked_shape = q.shape[:axis] + (blocks, block) + q.shape[axis + 1 :]
    param_shape = q.shape[:axis] + (blocks, 1) + q.shape[axis + 1 :]
    q_b = np.pad(q, pad).reshape(blocked_shape)
    scale_b = scale.reshape(param_shape)
    zero_b = zero.reshape(param_shape)
    out_shape = list(q.shape[:axis]) + [blocks * block] + list(q.shape[axis + 1 :])
    if b.fold:
        value = (q_b.astype(np.float32) - zero_b.astype(np.float32)) * scale_b
        flat = value.astype(scale.dtype).reshape(out_shape)
        b.op("Identity", [b.const("w", np.take(flat, range(size), axis=axis))], out=b.output())
        return
    value = b.widen_weight(q_b, scale.dtype)
    if np.any(zero_b != 0):
        value = b.op("Sub", [value, b.const("zp", zero_b.astype(scale.dtype))])
    value = b.op("Mul", [value, b.const("scale", scale_b)])
    shape_c = b.const("shape", np.array(out_shape, np.int64))
    if blocks * block == size:
        b.op("Reshape", [value, shape_c], out=b.output())
        return
    _slice(b, b.op("Reshape", [value, shape_c]), axis, 0, size, out=b.output())


_RULES: dict[tuple[str, str], Callable[[_Builder, gs.Node], None]] = {
    ("", "QLinearConv"): _qlinear_conv,
    (_MS, "QLinearConv"): _qlinear_conv,
    ("", "ConvInteger"): _conv_integer,
    ("", "QLinearMatMul"): _qlinear_matmul,
    (_MS, "QGemm"): _qgemm,
    (_MS, "QLinearGlobalAveragePool"): _qlinear_global_average_pool,
    (_MS, "QLinearAdd"): _qlinear_add,
    (_MS, "QLinearMul"): _qlinear_mul,
    (_MS, "QLinearSigmoid"): _qdq_unary("Sigmoid"),
    (_MS, "QLinearLeakyRelu"): _qdq_unary("LeakyRelu", ("alpha",)),
    (_MS, "QLinearAveragePool"): _qdq_unary(
        "AveragePool",
        ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides"),
    ),
    (_MS, "QLinearSoftmax"): _qdq_unary("Softmax", ("axis",)),
    (_MS, "QLinearConcat"): _qlinear_concat,
    (_MS, "MatMulNBits"): _matmul_nbits,
    ("", "DequantizeLinear"): _dequantize_linear,
}

#: The ops this pass rewrites, `domain::Op` for contrib ops.
LEGALIZED_OPS = frozenset(f"{d}::{o}" if d else o for d, o in _RULES)
