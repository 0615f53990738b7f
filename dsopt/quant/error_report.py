"""Per-tensor quantization error: which tensors of a quantized model lost the most (SQNR).

`tensor_errors` runs the float reference and the quantized model side by side in onnxruntime
over calibration samples and compares every tensor both compute, plus each quantized weight
against the float weight it replaced. Statistics stream per sample (sums of squares, dot
products, the largest error), so memory stays one sample's activations of the two models.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from dsopt.numerics import (
    ModelSource,
    _check_same_inputs,
    _input_specs,
    _json_float,
    _load_proto,
    _Session,
)
from dsopt.quant.calibration import CalibrationData, _with_outputs
from dsopt.quant.grid import unpack

__all__ = ["QuantErrorReport", "TensorError", "WeightError", "render", "tensor_errors"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
)
#: Suffixes dsopt's quantize passes add to a weight's name (`w` -> `w_int8` -> `w_dequantized`).
_WEIGHT_SUFFIXES = ("_dequantized", "_quantized", "_int8", "_int32")


@dataclasses.dataclass(frozen=True)
class TensorError:
    """How far one tensor of the quantized model is from the reference's, over all samples.

    Attributes:
        name: The tensor's name in the reference.
        op_type: The reference op that computes it.
        compared: The quantized model's tensor it was compared with: `name`, or the output of
            the QuantizeLinear -> DequantizeLinear pair its consumers read instead.
        output: Whether it is a graph output.
        elements: Values compared, summed over samples.
        sqnr_db: 10 log10(sum x^2 / sum (x - xq)^2); inf when exact.
        rel_l2_error: ||x - xq|| / ||x||.
        cosine: Cosine similarity of x and xq.
        max_abs_error: Largest |x - xq|.
    """

    name: str
    op_type: str
    compared: str
    output: bool
    elements: int
    sqnr_db: float
    rel_l2_error: float
    cosine: float
    max_abs_error: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (inf and nan as strings)."""
        return _metrics_dict(self)


@dataclasses.dataclass(frozen=True)
class WeightError:
    """How far one dequantized weight is from the float weight it replaced.

    Attributes:
        name: The float weight's initializer name in the reference.
        stored: The integer initializer the quantized model keeps instead.
        dtype: Its element type (`int8`, `int4`, `int32`, ...).
        node: The node reading the weight, in the quantized model.
        op_type: That node's op type.
        elements: Values compared.
        sqnr_db: As `TensorError.sqnr_db`.
        rel_l2_error: As `TensorError.rel_l2_error`.
        cosine: As `TensorError.cosine`.
        max_abs_error: As `TensorError.max_abs_error`.
    """

    name: str
    stored: str
    dtype: str
    node: str
    op_type: str
    elements: int
    sqnr_db: float
    rel_l2_error: float
    cosine: float
    max_abs_error: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (inf and nan as strings)."""
        return _metrics_dict(self)


@dataclasses.dataclass(frozen=True)
class QuantErrorReport:
    """The result of `tensor_errors`; both lists are sorted worst SQNR first.

    Attributes:
        tensors: One entry per tensor both models compute.
        weights: One entry per quantized weight matched to its float original.
        samples: How many input samples were run.
    """

    tensors: list[TensorError]
    weights: list[WeightError]
    samples: int

    @property
    def outputs(self) -> list[TensorError]:
        """The graph outputs' entries, worst first."""
        return [t for t in self.tensors if t.output]

    def to_dict(self, worst: int | None = None) -> dict[str, Any]:
        """JSON-ready form; `worst` keeps only that many tensors and weights (None: all)."""
        return {
            "samples": self.samples,
            "tensors_compared": len(self.tensors),
            "tensors": [t.to_dict() for t in self.tensors[:worst]],
            "outputs": [t.to_dict() for t in self.outputs],
            "weights_compared": len(self.weights),
            "weights": [w.to_dict() for w in self.weights[:worst]],
        }


def tensor_errors(
    reference: ModelSource,
    quantized: ModelSource,
    data: CalibrationData | Iterable[Mapping[str, np.ndarray]],
    *,
    limit: int | None = None,
) -> QuantErrorReport:
    """Compares every tensor of `quantized` with the same tensor of the float `reference`.

    Tensors match by name: dsopt's quantize passes keep the reference's names for the float
    values they still compute and give new names to what they add. A matched tensor that the
    quantized model feeds through QuantizeLinear -> DequantizeLinear is compared where its
    consumers read it, after that pair. Graph outputs are always compared. Weights: each
    integer initializer behind a DequantizeLinear is compared, dequantized by onnxruntime, with
    the float weight at the same input of the same-named node in the reference (or, failing
    that, the reference initializer whose name it extends, `w` for `w_int8`); so are
    MatMulInteger, MatMulNBits and GatherBlockQuantized weights. Both graphs run as written
    (onnxruntime's graph optimizations off, as in `dsopt verify`), so Q/DQ pairs compute
    simulated int8, not onnxruntime's fused int8 kernels.

    Args:
        reference: The float model (ModelProto or path).
        quantized: The quantized model (ModelProto or path), taking the same inputs.
        data: Input samples: CalibrationData or feeds.
        limit: Use at most this many samples (None: all).

    Returns:
        The report, worst SQNR first.

    Raises:
        UsageError: The models' inputs differ (names, types, ranks or fixed dims), they
            share no output, or there are no samples.
        ModelError: A model cannot be read, loaded or run by onnxruntime.
    """
    from dsopt.errors import UsageError

    ref = _load_proto(reference, "reference")
    quant = _load_proto(quantized, "quantized")
    _check_same_inputs(_input_specs(ref), _input_specs(quant))
    _check_same_shapes(_input_specs(ref), _input_specs(quant))
    samples = data if isinstance(data, CalibrationData) else CalibrationData.from_feeds(list(data))
    if limit is not None:
        samples = samples.limited(limit)
    ref, quant = _with_types(ref), _with_types(quant)
    pairs = _matched_tensors(ref, quant)
    if not any(output for _, _, output in pairs):
        raise UsageError(
            "the reference and the quantized model share no float output name",
            hint="compare a quantized model with the float model it was made from",
        )
    producers = {out: node.op_type for node in ref.graph.node for out in node.output}
    sums = {name: _ErrorSums() for name, _, _ in pairs}
    runs = 0
    ref_probe = _with_outputs(ref, [name for name, _, _ in pairs])
    quant_probe = _with_outputs(quant, [compared for _, compared, _ in pairs])
    with (
        _Session(ref_probe, label="reference") as ref_session,
        _Session(quant_probe, label="quantized") as quant_session,
    ):
        for feed in samples:
            runs += 1
            expected, got = ref_session.run(feed), quant_session.run(feed)
            for name, compared, _ in pairs:
                sums[name].add(expected[name], got[compared])
    if runs == 0:
        raise UsageError("no input samples were given")
    tensors = [
        TensorError(
            name=name,
            op_type=producers.get(name, ""),
            compared=compared,
            output=output,
            elements=sums[name].elements,
            **sums[name].metrics(),
        )
        for name, compared, output in pairs
        if sums[name].comparable
    ]
    tensors.sort(key=lambda t: (t.sqnr_db, t.name))
    weights = _weight_errors(ref, quant)
    weights.sort(key=lambda w: (w.sqnr_db, w.name))
    return QuantErrorReport(tensors=tensors, weights=weights, samples=runs)


def render(report: QuantErrorReport, console: Any, worst: int = 20) -> None:
    """Prints the `worst` tensors and weights as rich tables."""
    from rich.table import Table

    table = Table(
        title=f"quantization error: worst {min(worst, len(report.tensors))} of "
        f"{len(report.tensors)} tensors ({report.samples} samples)"
    )
    for column in ("tensor", "op", *_METRIC_COLUMNS):
        table.add_column(column, justify="right" if column in _METRIC_COLUMNS else "left")
    for t in report.tensors[:worst]:
        name = f"{t.name} (output)" if t.output else t.name
        table.add_row(name, t.op_type, *_metric_cells(t))
    console.print(table)
    if not report.weights:
        console.print("no quantized weights matched to float weights")
        return
    table = Table(
        title=f"quantized weights: worst {min(worst, len(report.weights))} of {len(report.weights)}"
    )
    for column in ("weight", "stored", "node", *_METRIC_COLUMNS):
        table.add_column(column, justify="right" if column in _METRIC_COLUMNS else "left")
    for w in report.weights[:worst]:
        table.add_row(w.name, w.dtype, f"{w.node} ({w.op_type})", *_metric_cells(w))
    console.print(table)


def _check_same_shapes(reference: Sequence[Any], quantized: Sequence[Any]) -> None:
    from dsopt.errors import UsageError

    declared = {spec.name: spec for spec in quantized}
    for spec in reference:
        other = declared[spec.name]
        if spec.dims is None or other.dims is None:
            continue
        fixed = zip(spec.dims, other.dims, strict=False)
        if len(spec.dims) != len(other.dims) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in fixed
        ):
            raise UsageError(
                f"the models have different inputs: '{spec.name}' is "
                f"{spec.describe_shape()} in the reference but {other.describe_shape()} in the "
                "quantized model",
                hint="compare a quantized model with the float model it was made from",
            )


# -- matching ----------------------------------------------------------------------------------
def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with inferred value types, so only float tensors become outputs."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError) as e:  # ValueError: proto > 2 GB
        logger.debug("shape inference failed (%s); comparing the declared types only", e)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    values = (*graph.input, *graph.value_info, *graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}


def _matched_tensors(ref: onnx.ModelProto, quant: onnx.ModelProto) -> list[tuple[str, str, bool]]:
    """(reference name, quantized name to compare with, is graph output) per matched tensor.

    Adds a type-only value_info to `quant` for matched names it has no type for, so they are
    exposed with the reference's type.
    """
    ref_types, quant_types = _elem_types(ref.graph), _elem_types(quant.graph)
    quant_produced = {out for node in quant.graph.node for out in node.output}
    quant_outputs = {o.name for o in quant.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in quant.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = [o.name for o in ref.graph.output]
    names = [out for n in ref.graph.node if n.op_type != "Constant" for out in n.output if out]
    pairs: list[tuple[str, str, bool]] = []
    for name in dict.fromkeys([*names, *outputs]):
        output = name in outputs and name in quant_outputs
        if ref_types.get(name) not in _FLOAT_TYPES or not (output or name in quant_produced):
            continue
        if quant_types.get(name, ref_types[name]) not in _FLOAT_TYPES:
            continue
        if name not in quant_types:
            quant.graph.value_info.append(
                onnx.helper.make_tensor_value_info(name, ref_types[name], None)
            )
        compared = name if output else _dequantized(name, readers)
        pairs.append((name, compared, output))
    return pairs


def _dequantized(name: str, readers: Mapping[str, Sequence[onnx.NodeProto]]) -> str:
    """The DequantizeLinear output that re-produces `name` after its QuantizeLinear, or `name`."""
    for quantize in readers.get(name, ()):
        if quantize.op_type != "QuantizeLinear" or quantize.input[0] != name:
            continue
        for dequantize in readers.get(quantize.output[0], ()):
            if dequantize.op_type == "DequantizeLinear":
                return dequantize.output[0]
    return name


@dataclasses.dataclass(frozen=True)
class _StoredWeight:
    """An integer weight of the quantized model and where its float original is read."""

    stored: str  # the integer initializer
    reader: onnx.NodeProto  # the quantized node computing with the weight
    index: int  # input index of the float weight at the reference node of the same name
    decode: onnx.NodeProto | None  # the node dequantizing it in onnxruntime (None: numpy)
    decode_inputs: tuple[onnx.TensorProto, ...] = ()  # constants `decode` adds (row indices)
    scale: str = ""  # MatMulInteger: the weight's scale, applied by a Mul after it


def _weight_errors(ref: onnx.ModelProto, quant: onnx.ModelProto) -> list[WeightError]:
    """Each integer weight against the float weight it replaced.

    Covers weights behind DequantizeLinear, MatMulInteger (quantize-dynamic), MatMulNBits and
    GatherBlockQuantized.
    """
    ref_weights = {t.name: t for t in ref.graph.initializer}
    ref_nodes = {n.name: n for n in ref.graph.node if n.name}
    constants = {t.name: t for t in quant.graph.initializer}
    found: list[tuple[_StoredWeight, onnx.TensorProto]] = []
    for weight in _stored_weights(quant, constants):
        twin = ref_nodes.get(weight.reader.name) if weight.reader.name else None
        original = None
        if twin is not None and weight.index < len(twin.input):
            original = ref_weights.get(twin.input[weight.index])
        if original is None:  # renamed node: the stored name extends the original's
            original = next(
                (ref_weights[base] for base in _base_names(weight.stored) if base in ref_weights),
                None,
            )
        if original is not None and original.data_type in _FLOAT_TYPES:
            found.append((weight, original))
    decoded = _dequantize(quant, [w for w, _ in found if w.decode is not None])
    errors = []
    for weight, original in found:
        expected = onnx.numpy_helper.to_array(original)
        if weight.decode is not None:
            got = decoded[weight.decode.output[0]]
        elif weight.reader.op_type == "MatMulInteger":
            got = _matmul_integer_weight(weight, constants)
        else:
            got = _matmul_nbits_weight(weight.reader, constants)
        if got.shape != expected.shape and got.T.shape == expected.shape:
            got = got.T  # a Gemm with transB=1 stores W [N, K]; MatMulNBits decodes [K, N]
        sums = _ErrorSums()
        sums.add(expected, got)
        if not sums.comparable:
            logger.debug(
                "weight %s: %s vs %s, not compared", original.name, expected.shape, got.shape
            )
            continue
        errors.append(
            WeightError(
                name=original.name,
                stored=weight.stored,
                dtype=_storage(weight, constants[weight.stored]),
                node=weight.reader.name,
                op_type=weight.reader.op_type,
                elements=sums.elements,
                **sums.metrics(),
            )
        )
    return errors


def _stored_weights(
    quant: onnx.ModelProto, constants: Mapping[str, onnx.TensorProto]
) -> list[_StoredWeight]:
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in quant.graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    weights = []
    for node in quant.graph.node:
        stored = constants.get(node.input[0]) if node.input else None
        if node.op_type == "MatMulNBits" and len(node.input) > 2:
            stored = constants.get(node.input[1])
            if stored is not None and all(i in constants for i in node.input[2:5] if i):
                weights.append(_StoredWeight(stored.name, node, 1, None))
        elif node.op_type == "MatMulInteger" and node.input[1] in constants:
            scale = _weight_scale(node, quant.graph.node, constants)
            if scale:
                weights.append(_StoredWeight(node.input[1], node, 1, None, scale=scale))
        elif stored is None or stored.data_type in _FLOAT_TYPES:
            continue
        elif node.op_type == "DequantizeLinear" and all(i in constants for i in node.input if i):
            for reader, index in readers.get(node.output[0], ())[:1]:
                weights.append(_StoredWeight(stored.name, reader, index, node))
        elif node.op_type == "GatherBlockQuantized" and all(
            i in constants for i in node.input[2:] if i
        ):
            weights.append(_StoredWeight(stored.name, node, 0, *_every_row(node, stored)))
    return weights


def _every_row(
    gather: onnx.NodeProto, data: onnx.TensorProto
) -> tuple[onnx.NodeProto, tuple[onnx.TensorProto, ...]]:
    """A copy of a GatherBlockQuantized gathering every row of `data` (the whole table)."""
    axis = next((a.i for a in gather.attribute if a.name == "gather_axis"), 0)
    decode = onnx.NodeProto()
    decode.CopyFrom(gather)
    decode.input[1] = f"{data.name}/every_row"
    decode.output[:] = [f"{data.name}/dequantized_table"]
    rows = np.arange(data.dims[axis], dtype=np.int64)
    return decode, (onnx.numpy_helper.from_array(rows, decode.input[1]),)


def _storage(weight: _StoredWeight, stored: onnx.TensorProto) -> str:
    """The stored element type; packed uint8 of MatMulNBits/GatherBlockQuantized as uintN."""
    dtype = onnx.TensorProto.DataType.Name(stored.data_type).lower()
    bits = next((a.i for a in weight.reader.attribute if a.name == "bits"), 4)
    packed = weight.reader.op_type in ("MatMulNBits", "GatherBlockQuantized")
    return f"uint{bits}" if packed and dtype == "uint8" else dtype


def _base_names(stored: str) -> list[str]:
    return [stored.removesuffix(s) for s in (*_WEIGHT_SUFFIXES, "_nbits") if stored.endswith(s)]


def _dequantize(quant: onnx.ModelProto, weights: Sequence[_StoredWeight]) -> dict[str, np.ndarray]:
    """Runs the dequantizing nodes alone on their constants in onnxruntime; outputs by name."""
    if not weights:
        return {}
    constants = {t.name: t for t in quant.graph.initializer}
    constants.update((t.name, t) for w in weights for t in w.decode_inputs)
    nodes = [w.decode for w in weights if w.decode is not None]
    needed = dict.fromkeys(i for node in nodes for i in node.input if i)
    outputs = []
    for node in nodes:
        scale = node.input[2 if node.op_type == "GatherBlockQuantized" else 1]
        outputs.append(
            onnx.helper.make_tensor_value_info(node.output[0], constants[scale].data_type, None)
        )
    graph = onnx.helper.make_graph(
        nodes, "dequantize_weights", [], outputs, [constants[name] for name in needed]
    )
    model = onnx.helper.make_model(graph, opset_imports=list(quant.opset_import))
    model.ir_version = quant.ir_version
    with _Session(model, label="dequantized weights") as session:
        return session.run({})


def _weight_scale(
    matmul: onnx.NodeProto,
    nodes: Sequence[onnx.NodeProto],
    constants: Mapping[str, onnx.TensorProto],
) -> str:
    """The constant scale quantize-dynamic multiplies the activation scale with, or ""."""
    quantize = next((n for n in nodes if matmul.input[0] in n.output), None)
    if quantize is None or quantize.op_type != "DynamicQuantizeLinear":
        return ""
    for node in nodes:
        if node.op_type == "Mul" and quantize.output[1] in node.input:
            other = [name for name in node.input if name != quantize.output[1]]
            if other and other[0] in constants:
                return other[0]
    return ""


def _matmul_integer_weight(
    weight: _StoredWeight, constants: Mapping[str, onnx.TensorProto]
) -> np.ndarray:
    """W of a MatMulInteger weight: (q - zero point) * scale, per output column."""
    node = weight.reader
    q = onnx.numpy_helper.to_array(constants[node.input[1]]).astype(np.float32)
    zero: np.ndarray | float = 0.0
    if len(node.input) > 3 and node.input[3] in constants:
        zero = onnx.numpy_helper.to_array(constants[node.input[3]]).astype(np.float32)
    scale = onnx.numpy_helper.to_array(constants[weight.scale]).astype(np.float32)
    return np.asarray((q - zero) * scale, np.float32)


def _matmul_nbits_weight(
    node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]
) -> np.ndarray:
    """W [K, N] of a com.microsoft.MatMulNBits: unsigned blocks along K, (q - zero) * scale."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    packed = onnx.numpy_helper.to_array(constants[node.input[1]])
    blocks = packed.shape[1]
    q = unpack(packed, bits, n * blocks * block, signed=False).reshape(n, blocks, block)
    scale = onnx.numpy_helper.to_array(constants[node.input[2]]).reshape(n, blocks, 1)
    zero: np.ndarray | int = 2 ** (bits - 1)
    if len(node.input) > 3 and node.input[3]:
        zero_packed = onnx.numpy_helper.to_array(constants[node.input[3]]).reshape(n, -1)
        zero = np.stack([unpack(row, bits, blocks, signed=False) for row in zero_packed])
        zero = zero.reshape(n, blocks, 1)
    weight = (q.astype(np.float32) - zero) * scale.astype(np.float32)
    return weight.reshape(n, blocks * block)[:, :k].T


# -- statistics --------------------------------------------------------------------------------
class _ErrorSums:
    """Sums over samples from which SQNR, relative L2 error and cosine follow."""

    def __init__(self) -> None:
        self.signal = 0.0  # sum x^2
        self.noise = 0.0  # sum (xq - x)^2
        self.quantized = 0.0  # sum xq^2
        self.dot = 0.0  # sum x * xq
        self.max_abs = 0.0
        self.elements = 0
        self.comparable = True

    def add(self, expected: np.ndarray, got: np.ndarray) -> None:
        """Adds one sample's values; a shape mismatch marks the tensor not comparable."""
        if expected.shape != got.shape or got.dtype.kind != "f" or expected.dtype.kind != "f":
            self.comparable = False
            return
        x = expected.astype(np.float64).ravel()
        xq = got.astype(np.float64).ravel()
        finite = np.isfinite(x) & np.isfinite(xq)
        if not finite.all():
            # Non-finite values the models agree on (mask fill values) carry no error.
            same = (x == xq) | (np.isnan(x) & np.isnan(xq))
            if not same[~finite].all():
                self.noise = math.inf
                self.max_abs = math.inf
            x, xq = x[finite], xq[finite]
        error = xq - x
        self.signal += float(np.dot(x, x))
        self.noise += float(np.dot(error, error))
        self.quantized += float(np.dot(xq, xq))
        self.dot += float(np.dot(x, xq))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(error), initial=0.0)))
        self.elements += int(expected.size)

    def metrics(self) -> dict[str, float]:
        """SQNR in dB, relative L2 error, cosine and max abs error."""
        if self.noise == 0.0:
            sqnr, rel_l2 = math.inf, 0.0
        elif self.signal == 0.0:
            sqnr, rel_l2 = -math.inf, math.inf
        else:
            sqnr = 10.0 * math.log10(self.signal / self.noise)
            rel_l2 = math.sqrt(self.noise / self.signal)
        if self.signal == 0.0 or self.quantized == 0.0:
            cosine = 1.0 if self.signal == self.quantized else 0.0
        else:
            cosine = max(-1.0, min(1.0, self.dot / math.sqrt(self.signal * self.quantized)))
        return {
            "sqnr_db": sqnr,
            "rel_l2_error": rel_l2,
            "cosine": cosine,
            "max_abs_error": self.max_abs,
        }


_METRICS = ("sqnr_db", "rel_l2_error", "cosine", "max_abs_error")
_METRIC_COLUMNS = ("SQNR dB", "rel L2 err", "cosine", "max abs err")


def _metrics_dict(entry: TensorError | WeightError) -> dict[str, Any]:
    data = dataclasses.asdict(entry)
    for key in _METRICS:
        data[key] = _json_float(data[key])
    return data


def _metric_cells(entry: TensorError | WeightError) -> list[str]:
    return [
        f"{entry.sqnr_db:.1f}",
        f"{entry.rel_l2_error:.3g}",
        f"{entry.cosine:.6f}",
        f"{entry.max_abs_error:.3g}",
    ]
