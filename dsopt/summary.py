"""Static facts about an ONNX model: ops, parameters, bytes and FLOPs, for `dsopt inspect`."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.shape_inference
import rich.box
import rich.console
import rich.markup
import rich.panel
import rich.table

__all__ = [
    "Counts",
    "DtypeTotals",
    "ExternalDataFile",
    "ModelSummary",
    "OpStats",
    "TensorSummary",
    "ValueSummary",
    "count",
    "dtype_name",
    "human_bytes",
    "human_count",
    "render",
    "summarize",
]

Dim = int | str
Shape = tuple[Dim, ...]
StaticShape = tuple[int, ...]
ShapeLookup = Callable[[str], StaticShape | None]

_LARGEST_TENSORS = 10
# Protobuf refuses to serialize more than 2 GiB; shape inference serializes the model first.
_PROTOBUF_LIMIT = 2**31 - 1
# External integer tensors this small are shape constants that data propagation needs.
_SHAPE_CONSTANT_MAX_ELEMENTS = 64
_STRIPPED_LOCATION = "<dsopt: data not loaded>"
# In-memory initializers above this size are replaced by stubs when the model is too big.
_STUB_MIN_BYTES = 1024

_BITS_PER_ELEMENT: dict[int, int] = {
    onnx.TensorProto.FLOAT: 32,
    onnx.TensorProto.UINT8: 8,
    onnx.TensorProto.INT8: 8,
    onnx.TensorProto.UINT16: 16,
    onnx.TensorProto.INT16: 16,
    onnx.TensorProto.INT32: 32,
    onnx.TensorProto.INT64: 64,
    onnx.TensorProto.BOOL: 8,
    onnx.TensorProto.FLOAT16: 16,
    onnx.TensorProto.DOUBLE: 64,
    onnx.TensorProto.UINT32: 32,
    onnx.TensorProto.UINT64: 64,
    onnx.TensorProto.COMPLEX64: 64,
    onnx.TensorProto.COMPLEX128: 128,
    onnx.TensorProto.BFLOAT16: 16,
    onnx.TensorProto.FLOAT8E4M3FN: 8,
    onnx.TensorProto.FLOAT8E4M3FNUZ: 8,
    onnx.TensorProto.FLOAT8E5M2: 8,
    onnx.TensorProto.FLOAT8E5M2FNUZ: 8,
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.FLOAT4E2M1: 4,
}
# Newer element types, present only in newer onnx releases.
for _name, _bits in (
    ("FLOAT8E8M0", 8),
    ("UINT2", 2),
    ("INT2", 2),
    ("FLOAT6E2M3", 6),
    ("FLOAT6E3M2", 6),
):
    if hasattr(onnx.TensorProto, _name):
        _BITS_PER_ELEMENT[getattr(onnx.TensorProto, _name)] = _bits

_DEFAULT_DOMAINS = ("", "ai.onnx")

# FLOP model, one entry per op of the default domain. Each cost function returns (MACs, FLOPs), or
# None when a shape it needs is not static.
_UNARY_OPS = frozenset(
    {
        "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Ceil", "Celu", "Clip", "Cos",
        "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "IsInf", "IsNaN",
        "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Shrink",
        "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh",
        "ThresholdedRelu",
    }
)  # fmt: skip
_BINARY_OPS = frozenset(
    {
        "Add", "And", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater",
        "GreaterOrEqual", "Less", "LessOrEqual", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Xor",
    }
)  # fmt: skip
_VARIADIC_OPS = frozenset({"Max", "Mean", "Min", "Sum"})
_WINDOW_POOL_OPS = frozenset({"AveragePool", "LpPool", "MaxPool"})
_GLOBAL_POOL_OPS = frozenset({"GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool"})
_REDUCE_OPS = frozenset(
    {
        "ArgMax", "ArgMin", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
        "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    }
)  # fmt: skip
_NORMALIZATION_OPS = frozenset(
    {"GroupNormalization", "InstanceNormalization", "LayerNormalization"}
)
_SOFTMAX_OPS = frozenset({"LogSoftmax", "Softmax"})
# FLOPs per element: BatchNormalization in inference is one multiply-add with folded scale and
# shift; the other normalizations compute mean, variance, subtract, divide and an affine step;
# softmax computes exp, a sum and a divide.
_BATCH_NORM_FLOPS_PER_ELEMENT = 2
_NORMALIZATION_FLOPS_PER_ELEMENT = 5
_SOFTMAX_FLOPS_PER_ELEMENT = 3


@dataclasses.dataclass(frozen=True)
class Counts:
    """Cheap size facts about a model, for `dsopt inspect` and the per-pass report.

    Attributes:
        nodes: Nodes in the main graph and in every If/Loop/Scan subgraph, recursively.
        initializers: Dense plus sparse initializers of the main graph and of every subgraph.
        parameters: Elements of all initializers and Constant-node tensors (sparse ones count their
            stored values).
        bytes: Bytes of those tensors, computed from dims and dtype (external data is never read).
    """

    nodes: int
    initializers: int
    parameters: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class ValueSummary:
    """A graph input or output.

    Attributes:
        name: The value name.
        dtype: Element type name such as ``float``; ``seq(float)`` and similar for non-tensors;
            ``?`` when undeclared.
        shape: One entry per dim: an int, the dim_param string, or ``"?"``; None for unknown rank.
    """

    name: str
    dtype: str
    shape: Shape | None


@dataclasses.dataclass(frozen=True)
class TensorSummary:
    """A stored tensor: initializer, sparse initializer or Constant-node value.

    Attributes:
        name: Initializer name, or the output name of the Constant node.
        kind: ``initializer``, ``sparse_initializer`` or ``constant``.
        dtype: Element type name.
        shape: The (dense) dims.
        parameters: Number of stored elements.
        bytes: Size of the stored data (values plus indices for sparse tensors).
        external: Whether the data lives in an external file.
    """

    name: str
    kind: str
    dtype: str
    shape: StaticShape
    parameters: int
    bytes: int
    external: bool


@dataclasses.dataclass(frozen=True)
class DtypeTotals:
    """Parameters and bytes of stored tensors of one element type.

    Attributes:
        dtype: Element type name.
        tensors: Number of tensors.
        parameters: Number of elements.
        bytes: Size in bytes.
    """

    dtype: str
    tensors: int
    parameters: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class OpStats:
    """Count and cost of one op type across the main graph and its subgraphs.

    Attributes:
        op_type: The op type, written ``domain.OpType`` outside the default domain.
        count: Number of nodes.
        macs: Multiply-accumulates of the nodes whose shapes are static.
        flops: Floating-point operations of the nodes whose shapes are static.
        modeled: Whether dsopt has a FLOP model for this op type; False means cost is not counted.
        unknown: Nodes with a FLOP model whose shapes are not static, left out of ``flops``.
    """

    op_type: str
    count: int
    macs: int
    flops: int
    modeled: bool
    unknown: int


@dataclasses.dataclass(frozen=True)
class ExternalDataFile:
    """An external data file the model refers to.

    Attributes:
        location: The location recorded in the model, relative to the model's directory.
        referenced_bytes: Bytes of tensor data the model stores in it.
        file_bytes: The file's size on disk, or None when no base_dir was given or it is missing.
    """

    location: str
    referenced_bytes: int
    file_bytes: int | None


@dataclasses.dataclass
class ModelSummary:
    """Everything `dsopt inspect` reports about a model.

    Attributes:
        ir_version: The model's IR version.
        producer_name: Producer name as recorded in the model.
        producer_version: Producer version as recorded in the model.
        model_domain: The model's domain field.
        model_version: The model's version field.
        graph_name: Name of the main graph.
        proto_bytes: Serialized size of the proto as given (without data not loaded).
        opset_imports: Domain to version; the default domain is written ``ai.onnx``.
        inputs: Graph inputs, without initializers listed as inputs.
        outputs: Graph outputs.
        initializer_inputs: Graph inputs that are also initializers (IR < 4 style), left out above.
        counts: Node, initializer, parameter and byte counts (see `count`).
        ops: Op histogram, by count descending then name.
        params_by_dtype: Parameters and bytes per element type, by bytes descending then name.
        largest_tensors: The largest stored tensors, by bytes descending then name.
        functions: Number of model-local functions.
        subgraphs: Number of subgraphs (If branches, Loop and Scan bodies), recursively.
        macs: Total multiply-accumulates of nodes with static shapes.
        flops: Total FLOPs of nodes with static shapes.
        unknown_flops_nodes: Op type to the number of its nodes whose FLOPs are unknown because a
            shape is dynamic or could not be inferred.
        external_data: External data files referenced by the model.
        shape_inference_error: Why shape inference failed, or None when it ran.
    """

    ir_version: int
    producer_name: str
    producer_version: str
    model_domain: str
    model_version: int
    graph_name: str
    proto_bytes: int
    opset_imports: dict[str, int]
    inputs: list[ValueSummary]
    outputs: list[ValueSummary]
    initializer_inputs: int
    counts: Counts
    ops: list[OpStats]
    params_by_dtype: list[DtypeTotals]
    largest_tensors: list[TensorSummary]
    functions: int
    subgraphs: int
    macs: int
    flops: int
    unknown_flops_nodes: dict[str, int]
    external_data: list[ExternalDataFile]
    shape_inference_error: str | None

    def to_dict(self) -> dict[str, Any]:
        """Returns the summary as JSON-serializable data with a stable key order."""
        return {
            field.name: _jsonable(getattr(self, field.name)) for field in dataclasses.fields(self)
        }


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------------
# Graph walking and tensor sizes


def _subgraphs_of(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Yields the graph and every subgraph below it, depth first."""
    yield graph
    for node in graph.node:
        for subgraph in _subgraphs_of(node):
            yield from _all_graphs(subgraph)


def dtype_name(elem_type: int) -> str:
    """Returns the lower-case ONNX name of an element type, e.g. ``float16``."""
    try:
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()
    except ValueError:
        return f"dtype{elem_type}"


def _storage_bytes(elem_type: int, elements: int, tensor: onnx.TensorProto | None = None) -> int:
    if elem_type == onnx.TensorProto.STRING:
        return sum(len(item) for item in tensor.string_data) if tensor is not None else 0
    return (elements * _BITS_PER_ELEMENT.get(elem_type, 0) + 7) // 8


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _dense_tensor(name: str, kind: str, tensor: onnx.TensorProto) -> TensorSummary:
    shape = tuple(int(dim) for dim in tensor.dims)
    elements = math.prod(shape)
    return TensorSummary(
        name=name,
        kind=kind,
        dtype=dtype_name(tensor.data_type),
        shape=shape,
        parameters=elements,
        bytes=_storage_bytes(tensor.data_type, elements, tensor),
        external=_is_external(tensor),
    )


def _sparse_tensor(name: str, kind: str, sparse: onnx.SparseTensorProto) -> TensorSummary:
    values = _dense_tensor(name, kind, sparse.values)
    indices = _dense_tensor(name, kind, sparse.indices)
    return TensorSummary(
        name=name,
        kind=kind,
        dtype=values.dtype,
        shape=tuple(int(dim) for dim in sparse.dims),
        parameters=values.parameters,
        bytes=values.bytes + indices.bytes,
        external=values.external or indices.external,
    )


def _constant_tensors(node: onnx.NodeProto) -> Iterator[TensorSummary]:
    """Yields the tensor a Constant node holds, whichever attribute carries it."""
    name = node.output[0] if node.output else node.name
    for attribute in node.attribute:
        if attribute.name == "value":
            yield _dense_tensor(name, "constant", attribute.t)
        elif attribute.name == "sparse_value":
            yield _sparse_tensor(name, "constant", attribute.sparse_tensor)
        elif attribute.name in ("value_float", "value_int"):
            elem_type = (
                onnx.TensorProto.FLOAT
                if attribute.name == "value_float"
                else onnx.TensorProto.INT64
            )
            bytes_ = _storage_bytes(elem_type, 1)
            yield TensorSummary(name, "constant", dtype_name(elem_type), (), 1, bytes_, False)
        elif attribute.name in ("value_floats", "value_ints"):
            is_float = attribute.name == "value_floats"
            elem_type = onnx.TensorProto.FLOAT if is_float else onnx.TensorProto.INT64
            elements = len(attribute.floats) if is_float else len(attribute.ints)
            bytes_ = _storage_bytes(elem_type, elements)
            yield TensorSummary(
                name, "constant", dtype_name(elem_type), (elements,), elements, bytes_, False
            )
        elif attribute.name == "value_string":
            yield TensorSummary(name, "constant", "string", (), 1, len(attribute.s), False)
        elif attribute.name == "value_strings":
            strings = list(attribute.strings)
            bytes_ = sum(len(item) for item in strings)
            yield TensorSummary(
                name, "constant", "string", (len(strings),), len(strings), bytes_, False
            )


def _is_constant_node(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS


def _stored_tensors(
    model: onnx.ModelProto,
) -> Iterator[tuple[TensorSummary, onnx.TensorProto | None]]:
    """Yields every stored tensor of all graphs, with its proto when it is one dense tensor."""
    for graph in _all_graphs(model.graph):
        for tensor in graph.initializer:
            yield _dense_tensor(tensor.name, "initializer", tensor), tensor
        for sparse in graph.sparse_initializer:
            yield _sparse_tensor(sparse.values.name, "sparse_initializer", sparse), None
        for node in graph.node:
            if _is_constant_node(node):
                for tensor_summary in _constant_tensors(node):
                    yield tensor_summary, None


def count(model: onnx.ModelProto) -> Counts:
    """Counts nodes, initializers, parameters and bytes without shape inference or loading data.

    Args:
        model: The model; external data need not be loaded.

    Returns:
        The counts; subgraph nodes and initializers are included, model-local functions are not.
    """
    nodes = 0
    initializers = 0
    for graph in _all_graphs(model.graph):
        nodes += len(graph.node)
        initializers += len(graph.initializer) + len(graph.sparse_initializer)
    parameters = 0
    bytes_ = 0
    for tensor, _ in _stored_tensors(model):
        parameters += tensor.parameters
        bytes_ += tensor.bytes
    return Counts(nodes=nodes, initializers=initializers, parameters=parameters, bytes=bytes_)


# --------------------------------------------------------------------------------------------------
# Inputs, outputs and shapes


def _type_name(type_proto: onnx.TypeProto) -> str:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        elem_type = type_proto.tensor_type.elem_type
        return dtype_name(elem_type) if elem_type else "?"
    if kind == "sparse_tensor_type":
        elem_type = type_proto.sparse_tensor_type.elem_type
        return f"sparse({dtype_name(elem_type) if elem_type else '?'})"
    if kind == "sequence_type":
        return f"seq({_type_name(type_proto.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({_type_name(type_proto.optional_type.elem_type)})"
    if kind == "map_type":
        key = dtype_name(type_proto.map_type.key_type)
        return f"map({key},{_type_name(type_proto.map_type.value_type)})"
    return "?"


def _shape_of(type_proto: onnx.TypeProto) -> Shape | None:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        tensor_type: Any = type_proto.tensor_type
    elif kind == "sparse_tensor_type":
        tensor_type = type_proto.sparse_tensor_type
    else:
        return None
    if not tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(str(dim.dim_param))
        else:
            dims.append("?")
    return tuple(dims)


def _value_summary(value: onnx.ValueInfoProto) -> ValueSummary:
    return ValueSummary(name=value.name, dtype=_type_name(value.type), shape=_shape_of(value.type))


def _static(shape: Shape | None) -> StaticShape | None:
    if shape is None or not all(isinstance(dim, int) and dim >= 0 for dim in shape):
        return None
    return tuple(int(dim) for dim in shape)


def _local_shapes(graph: onnx.GraphProto) -> dict[str, StaticShape | None]:
    """Maps each value name the graph declares or stores to its static shape, or None."""
    shapes: dict[str, StaticShape | None] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        shapes[value.name] = _static(_shape_of(value.type))
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(int(dim) for dim in tensor.dims)
    for sparse in graph.sparse_initializer:
        shapes[sparse.values.name] = tuple(int(dim) for dim in sparse.dims)
    for node in graph.node:
        if _is_constant_node(node) and node.output:
            for tensor in _constant_tensors(node):
                shapes[node.output[0]] = tensor.shape
    return shapes


def _copy_fields(source: Any, target: Any, *, skip: str) -> None:
    """Copies every set field of a proto message except one, without copying that one's data."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        # protobuf 5.28 added is_repeated; later releases dropped label.
        if (
            getattr(field, "is_repeated", None)
            or getattr(field, "label", None) == field.LABEL_REPEATED
        ):
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _inference_input(
    model: onnx.ModelProto, base_dir: str | os.PathLike[str] | None
) -> onnx.ModelProto:
    """Returns the model, or a copy that shape inference can serialize and use.

    The copy replaces big in-memory initializers by data-less external stubs (so a model over the
    protobuf limit still serializes) and, when base_dir is given, loads tiny external integer
    tensors, which are shape constants that data propagation needs. The caller's proto is never
    modified, and large external data is never read.
    """
    too_big = model.ByteSize() > _PROTOBUF_LIMIT
    tiny_external = [
        tensor
        for tensor in model.graph.initializer
        if _is_external(tensor)
        and tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        and math.prod(tensor.dims) <= _SHAPE_CONSTANT_MAX_ELEMENTS
    ]
    if not too_big and (base_dir is None or not tiny_external):
        return model
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    _copy_fields(model.graph, copy.graph, skip="initializer")
    tiny_names = {tensor.name for tensor in tiny_external}
    for tensor in model.graph.initializer:
        entry = copy.graph.initializer.add()
        if tensor.name in tiny_names and base_dir is not None:
            entry.CopyFrom(tensor)
            try:
                onnx.external_data_helper.load_external_data_for_tensor(entry, os.fspath(base_dir))
                entry.data_location = onnx.TensorProto.DEFAULT
                del entry.external_data[:]
            except (OSError, ValueError):
                entry.CopyFrom(tensor)
        elif too_big and not _is_external(tensor) and tensor.ByteSize() > _STUB_MIN_BYTES:
            entry.name = tensor.name
            entry.data_type = tensor.data_type
            entry.dims.extend(tensor.dims)
            entry.data_location = onnx.TensorProto.EXTERNAL
            entry.external_data.add(key="location", value=_STRIPPED_LOCATION)
        else:
            entry.CopyFrom(tensor)
    return copy


def _infer_shapes(
    model: onnx.ModelProto, base_dir: str | os.PathLike[str] | None
) -> tuple[onnx.ModelProto, str | None]:
    """Runs non-strict shape inference, falling back to no data propagation, then to none."""
    try:
        candidate = _inference_input(model, base_dir)
    except Exception as error:  # noqa: BLE001 - inspecting must survive any malformed model
        return model, f"{type(error).__name__}: {error}"
    error_text: str | None = None
    for data_prop in (True, False):
        try:
            return onnx.shape_inference.infer_shapes(candidate, data_prop=data_prop), None
        except Exception as error:  # noqa: BLE001 - shape inference raises many kinds of error
            error_text = error_text or f"{type(error).__name__}: {error}"
    return model, error_text


# --------------------------------------------------------------------------------------------------
# FLOPs


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


def _output(node: onnx.NodeProto, index: int = 0) -> str:
    return node.output[index] if index < len(node.output) else ""


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def _ints_attribute(node: onnx.NodeProto, name: str) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == name:
            return [int(value) for value in attribute.ints]
    return None


def _multiply_accumulate(macs: int) -> tuple[int, int]:
    return macs, 2 * macs


def _conv_cost(
    weight_index: int,
) -> Callable[[onnx.NodeProto, ShapeLookup], tuple[int, int] | None]:
    def cost(node: onnx.NodeProto, shape: ShapeLookup) -> tuple[int, int] | None:
        # Weight is [M, C/group, k...]: every output element reads C/group * prod(k) inputs.
        output, weight = shape(_output(node)), shape(_input(node, weight_index))
        if output is None or weight is None or len(weight) < 2:
            return None
        return _multiply_accumulate(math.prod(output) * math.prod(weight[1:]))

    return cost


def _conv_transpose_cost(node: onnx.NodeProto, shape: ShapeLookup) -> tuple[int, int] | None:
    # Weight is [C, M/group, k...]: every input element scatters into M/group * prod(k) outputs.
    data, weight = shape(_input(node, 0)), shape(_input(node, 1))
    if data is None or weight is None or len(weight) < 2:
        return None
    return _multiply_accumulate(math.prod(data) * math.prod(weight[1:]))


def _matmul_cost(b_index: int) -> Callable[[onnx.NodeProto, ShapeLookup], tuple[int, int] | None]:
    def cost(node: onnx.NodeProto, shape: ShapeLookup) -> tuple[int, int] | None:
        a, b = shape(_input(node, 0)), shape(_input(node, b_index))
        if a is None or b is None or not a or not b:
            return None
        a_matrix = a if len(a) > 1 else (1, *a)
        b_matrix = b if len(b) > 1 else (*b, 1)
        try:
            batch = np.broadcast_shapes(a_matrix[:-2], b_matrix[:-2])
        except ValueError:
            return None
        m, k, n = a_matrix[-2], a_matrix[-1], b_matrix[-1]
        return _multiply_accumulate(math.prod(batch) * m * k * n)

    return cost


def _gemm_cost(node: onnx.NodeProto, shape: ShapeLookup) -> tuple[int, int] | None:
    a, b = shape(_input(node, 0)), shape(_input(node, 1))
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if _int_attribute(node, "transA", 0) else a
    n = b[0] if _int_attribute(node, "transB", 0) else b[1]
    return _multiply_accumulate(m * k * n)


def _per_output_element(
    flops_per_element: int,
) -> Callable[[onnx.NodeProto, ShapeLookup], tuple[int, int] | None]:
    def cost(node: onnx.NodeProto, shape: ShapeLookup) -> tuple[int, int] | None:
        output = shape(_output(node))
        return None if output is None else (0, flops_per_element * math.prod(output))

    return cost


def _per_input_element(
    flops_per_element: int,
) -> Callable[[onnx.NodeProto, ShapeLookup], tuple[int, int] | None]:
    def cost(node: onnx.NodeProto, shape: ShapeLookup) -> tuple[int, int] | None:
        data = shape(_input(node, 0))
        return None if data is None else (0, flops_per_element * math.prod(data))

    return cost


def _variadic_cost(node: onnx.NodeProto, shape: ShapeLookup) -> tuple[int, int] | None:
    output = shape(_output(node))
    operands = sum(1 for name in node.input if name)
    return None if output is None else (0, max(1, operands - 1) * math.prod(output))


def _window_pool_cost(node: onnx.NodeProto, shape: ShapeLookup) -> tuple[int, int] | None:
    output, kernel = shape(_output(node)), _ints_attribute(node, "kernel_shape")
    if output is None or not kernel:
        return None
    return 0, math.prod(kernel) * math.prod(output)


_CostFunction = Callable[[onnx.NodeProto, ShapeLookup], tuple[int, int] | None]
_COST_FUNCTIONS: dict[str, _CostFunction] = {
    "Conv": _conv_cost(1),
    "ConvInteger": _conv_cost(1),
    "QLinearConv": _conv_cost(3),
    "ConvTranspose": _conv_transpose_cost,
    "MatMul": _matmul_cost(1),
    "MatMulInteger": _matmul_cost(1),
    "QLinearMatMul": _matmul_cost(3),
    "Gemm": _gemm_cost,
    "BatchNormalization": _per_output_element(_BATCH_NORM_FLOPS_PER_ELEMENT),
    **{op: _per_output_element(1) for op in _UNARY_OPS | _BINARY_OPS},
    **{op: _variadic_cost for op in _VARIADIC_OPS},
    **{op: _window_pool_cost for op in _WINDOW_POOL_OPS},
    **{op: _per_input_element(1) for op in _GLOBAL_POOL_OPS | _REDUCE_OPS},
    **{op: _per_input_element(_NORMALIZATION_FLOPS_PER_ELEMENT) for op in _NORMALIZATION_OPS},
    **{op: _per_output_element(_SOFTMAX_FLOPS_PER_ELEMENT) for op in _SOFTMAX_OPS},
}


def _qualified_op_type(node: onnx.NodeProto) -> str:
    if node.domain in _DEFAULT_DOMAINS:
        return node.op_type
    return f"{node.domain}.{node.op_type}"


@dataclasses.dataclass
class _OpTally:
    count: int = 0
    macs: int = 0
    flops: int = 0
    unknown: int = 0
    modeled: bool = False


def _tally_ops(
    graph: onnx.GraphProto,
    outer_shapes: collections.ChainMap[str, StaticShape | None],
    tallies: dict[str, _OpTally],
) -> int:
    """Adds the graph's nodes (and subgraphs') to tallies; returns the number of subgraphs."""
    shapes = outer_shapes.new_child(_local_shapes(graph))

    def lookup(name: str) -> StaticShape | None:
        return shapes.get(name) if name else None

    subgraphs = 0
    for node in graph.node:
        tally = tallies.setdefault(_qualified_op_type(node), _OpTally())
        tally.count += 1
        cost_function = (
            _COST_FUNCTIONS.get(node.op_type) if node.domain in _DEFAULT_DOMAINS else None
        )
        if cost_function is not None:
            tally.modeled = True
            cost = cost_function(node, lookup)
            if cost is None:
                tally.unknown += 1
            else:
                tally.macs += cost[0]
                tally.flops += cost[1]
        for subgraph in _subgraphs_of(node):
            subgraphs += 1 + _tally_ops(subgraph, shapes, tallies)
    return subgraphs


# --------------------------------------------------------------------------------------------------
# Summary


def _external_data_files(
    tensors: list[tuple[TensorSummary, onnx.TensorProto | None]],
    model: onnx.ModelProto,
    base_dir: str | os.PathLike[str] | None,
) -> list[ExternalDataFile]:
    referenced: dict[str, int] = collections.defaultdict(int)
    protos: list[onnx.TensorProto] = [proto for _, proto in tensors if proto is not None]
    for graph in _all_graphs(model.graph):
        for sparse in graph.sparse_initializer:
            protos.extend((sparse.values, sparse.indices))
    for proto in protos:
        if not _is_external(proto):
            continue
        entries = {entry.key: entry.value for entry in proto.external_data}
        location = entries.get("location", "")
        elements = math.prod(int(dim) for dim in proto.dims)
        referenced[location] += _storage_bytes(proto.data_type, elements)
    files = []
    for location in sorted(referenced):
        file_bytes: int | None = None
        if base_dir is not None and location:
            path = os.path.join(os.fspath(base_dir), location)
            file_bytes = os.path.getsize(path) if os.path.isfile(path) else None
        files.append(ExternalDataFile(location, referenced[location], file_bytes))
    return files


def _params_by_dtype(tensors: list[TensorSummary]) -> list[DtypeTotals]:
    totals: dict[str, list[int]] = {}
    for tensor in tensors:
        entry = totals.setdefault(tensor.dtype, [0, 0, 0])
        entry[0] += 1
        entry[1] += tensor.parameters
        entry[2] += tensor.bytes
    rows = [DtypeTotals(dtype, *entry) for dtype, entry in totals.items()]
    return sorted(rows, key=lambda row: (-row.bytes, row.dtype))


def summarize(
    model: onnx.ModelProto, *, base_dir: str | os.PathLike[str] | None = None
) -> ModelSummary:
    """Analyzes a model for `dsopt inspect`.

    Shape inference runs on the side (never strict, never modifying `model`); FLOPs are reported
    only for nodes whose shapes it makes fully static, the rest are listed in
    `ModelSummary.unknown_flops_nodes`.

    Args:
        model: The model. It may have been loaded with ``load_external_data=False``; external
            data is then sized from dims and dtype and never read.
        base_dir: Directory of the model file, used to size external data files and to read tiny
            external shape constants that shape inference needs.

    Returns:
        The summary.
    """
    inferred, shape_error = _infer_shapes(model, base_dir)
    tallies: dict[str, _OpTally] = {}
    subgraphs = _tally_ops(inferred.graph, collections.ChainMap(), tallies)
    ops = sorted(
        (
            OpStats(op_type, tally.count, tally.macs, tally.flops, tally.modeled, tally.unknown)
            for op_type, tally in tallies.items()
        ),
        key=lambda stats: (-stats.count, stats.op_type),
    )
    unknown = {stats.op_type: stats.unknown for stats in ops if stats.unknown}

    stored = list(_stored_tensors(model))
    tensors = [tensor for tensor, _ in stored]
    largest = sorted(tensors, key=lambda tensor: (-tensor.bytes, tensor.name))[:_LARGEST_TENSORS]
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    initializer_names.update(sparse.values.name for sparse in model.graph.sparse_initializer)
    inputs = [
        _value_summary(value) for value in model.graph.input if value.name not in initializer_names
    ]

    return ModelSummary(
        ir_version=int(model.ir_version),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        model_domain=model.domain,
        model_version=int(model.model_version),
        graph_name=model.graph.name,
        proto_bytes=model.ByteSize(),
        opset_imports={
            (opset.domain or "ai.onnx"): int(opset.version) for opset in model.opset_import
        },
        inputs=inputs,
        outputs=[_value_summary(value) for value in model.graph.output],
        initializer_inputs=len(model.graph.input) - len(inputs),
        counts=count(model),
        ops=ops,
        params_by_dtype=_params_by_dtype(tensors),
        largest_tensors=largest,
        functions=len(model.functions),
        subgraphs=subgraphs,
        macs=sum(stats.macs for stats in ops),
        flops=sum(stats.flops for stats in ops),
        unknown_flops_nodes=unknown,
        external_data=_external_data_files(stored, model, base_dir),
        shape_inference_error=shape_error,
    )


# --------------------------------------------------------------------------------------------------
# Rendering


def _scaled(number: int, base: int, units: tuple[str, ...]) -> tuple[float, str]:
    value = float(number)
    exponent = 0
    while abs(value) >= base and exponent < len(units) - 1:
        value /= base
        exponent += 1
    return value, units[exponent]


def human_bytes(size: int) -> str:
    """Formats a byte count with binary units, e.g. ``1.5 MiB``."""
    value, unit = _scaled(size, 1024, ("B", "KiB", "MiB", "GiB", "TiB"))
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


def human_count(number: int) -> str:
    """Formats a count with decimal SI prefixes, e.g. ``4.09 G``."""
    value, prefix = _scaled(number, 1000, ("", "K", "M", "G", "T", "P"))
    return str(number) if not prefix else f"{value:.3g} {prefix}"


def _shape_text(shape: Shape | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(dim) for dim in shape) + "]"


def _header(summary: ModelSummary) -> rich.panel.Panel:
    counts = summary.counts
    producer = " ".join(part for part in (summary.producer_name, summary.producer_version) if part)
    opsets = ", ".join(f"{domain} {version}" for domain, version in summary.opset_imports.items())
    lines = [
        f"IR version {summary.ir_version}   producer {producer or '-'}   opsets {opsets or '-'}",
        f"graph {summary.graph_name or '-'}   nodes {counts.nodes}   initializers "
        f"{counts.initializers}   parameters {human_count(counts.parameters)}   "
        f"tensor data {human_bytes(counts.bytes)}   proto {human_bytes(summary.proto_bytes)}",
        f"functions {summary.functions}   subgraphs {summary.subgraphs}",
    ]
    if summary.initializer_inputs:
        lines.append(f"{summary.initializer_inputs} initializers are also listed as graph inputs")
    for file in summary.external_data:
        on_disk = "missing" if file.file_bytes is None else human_bytes(file.file_bytes)
        lines.append(
            f"external data {file.location}: {human_bytes(file.referenced_bytes)} referenced, "
            f"file {on_disk}"
        )
    cost = f"MACs {human_count(summary.macs)}   FLOPs {human_count(summary.flops)}"
    unknown_nodes = sum(summary.unknown_flops_nodes.values())
    if unknown_nodes:
        listed = ", ".join(f"{op} x{number}" for op, number in summary.unknown_flops_nodes.items())
        cost += f"   (+ {unknown_nodes} nodes with dynamic shapes not counted: {listed})"
    lines.append(cost)
    if summary.shape_inference_error:
        lines.append(f"shape inference failed: {summary.shape_inference_error}")
    return rich.panel.Panel(rich.markup.escape("\n".join(lines)), title="model", expand=False)


def _values_table(summary: ModelSummary) -> rich.table.Table:
    table = rich.table.Table(title="Inputs and outputs", box=rich.box.SIMPLE)
    for column in ("", "name", "dtype", "shape"):
        table.add_column(column)
    for kind, values in (("input", summary.inputs), ("output", summary.outputs)):
        for value in values:
            table.add_row(
                kind,
                rich.markup.escape(value.name),
                value.dtype,
                rich.markup.escape(_shape_text(value.shape)),
            )
    return table


def _ops_table(summary: ModelSummary) -> rich.table.Table:
    table = rich.table.Table(title="Ops", box=rich.box.SIMPLE)
    table.add_column("op")
    for column in ("count", "MACs", "FLOPs", "unknown"):
        table.add_column(column, justify="right")
    for stats in summary.ops:
        macs = human_count(stats.macs) if stats.modeled and stats.macs else "-"
        flops = human_count(stats.flops) if stats.modeled else "-"
        table.add_row(
            rich.markup.escape(stats.op_type),
            str(stats.count),
            macs,
            flops,
            str(stats.unknown) if stats.unknown else "",
        )
    return table


def _dtype_table(summary: ModelSummary) -> rich.table.Table:
    table = rich.table.Table(title="Parameters by dtype", box=rich.box.SIMPLE)
    table.add_column("dtype")
    for column in ("tensors", "parameters", "bytes"):
        table.add_column(column, justify="right")
    for row in summary.params_by_dtype:
        table.add_row(
            row.dtype, str(row.tensors), human_count(row.parameters), human_bytes(row.bytes)
        )
    return table


def _largest_table(summary: ModelSummary) -> rich.table.Table:
    table = rich.table.Table(title="Largest tensors", box=rich.box.SIMPLE)
    for column in ("name", "kind", "dtype", "shape"):
        table.add_column(column)
    table.add_column("bytes", justify="right")
    for tensor in summary.largest_tensors:
        kind = tensor.kind + (" (external)" if tensor.external else "")
        table.add_row(
            rich.markup.escape(tensor.name),
            kind,
            tensor.dtype,
            _shape_text(tensor.shape),
            human_bytes(tensor.bytes),
        )
    return table


def render(summary: ModelSummary, console: rich.console.Console) -> None:
    """Prints the summary as a header panel and rich tables.

    Args:
        summary: What `summarize` returned.
        console: Where to print.
    """
    console.print(_header(summary))
    console.print(_values_table(summary))
    console.print(_ops_table(summary))
    if summary.params_by_dtype:
        console.print(_dtype_table(summary))
    if summary.largest_tensors:
        console.print(_largest_table(summary))
