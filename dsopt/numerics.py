"""Check that two ONNX models compute the same outputs, within tolerance, under onnxruntime."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
import re
import tempfile
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from dsopt.errors import CheckFailed, ModelError, UsageError

__all__ = [
    "EquivalenceReport",
    "Feeds",
    "OutputComparison",
    "check_equivalence",
    "compare_outputs",
    "load_inputs",
    "parse_shape_overrides",
    "random_inputs",
    "run_model",
]

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
Feeds = dict[str, Array]
ModelSource = onnx.ModelProto | str | os.PathLike[str]

# Protobuf cannot serialize a message of 2 GiB or more; such models go to onnxruntime as a file.
_PROTO_LIMIT_BYTES = 2**31 - 1

# Random integer inputs are drawn from [0, _INT_HIGH). Integer inputs are usually indices, token
# ids, lengths or axes; small non-negative values stay in range for typical models (an embedding
# table of at least 4 rows, a Gather over an axis of size >= 4) where uniform int32 noise fails.
_INT_HIGH = 4

# onnxruntime's Python binding cannot convert these element types to or from numpy (ml_dtypes), so
# they travel as raw bits in OrtValues. Maps the ORT type string to (onnx elem type, bit container).
_RAW_BIT_TYPES: dict[str, tuple[int, type[np.generic]]] = {
    "tensor(bfloat16)": (onnx.TensorProto.BFLOAT16, np.uint16),
    "tensor(float8e4m3fn)": (onnx.TensorProto.FLOAT8E4M3FN, np.uint8),
    "tensor(float8e4m3fnuz)": (onnx.TensorProto.FLOAT8E4M3FNUZ, np.uint8),
    "tensor(float8e5m2)": (onnx.TensorProto.FLOAT8E5M2, np.uint8),
    "tensor(float8e5m2fnuz)": (onnx.TensorProto.FLOAT8E5M2FNUZ, np.uint8),
}


# --------------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _InputSpec:
    """What a model declares about one true graph input.

    Attributes:
        name: The input name.
        kind: The ValueInfo type case: "tensor_type", "sequence_type", ... ("" when unset).
        elem_type: The ONNX element type (tensors only; 0 when undefined).
        dims: Per dimension an int (fixed), a str (dim_param) or None (unknown); None for
            unknown rank.
    """

    name: str
    kind: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None

    @property
    def elem_type_name(self) -> str:
        """The element type as a lower-case name, e.g. "float" or "int64"."""
        return _elem_type_name(self.elem_type)

    def describe_shape(self) -> str:
        """The declared shape as text, e.g. "[N,3,224,224]"."""
        if self.dims is None:
            return "[unknown rank]"
        return "[" + ",".join("?" if d is None else str(d) for d in self.dims) + "]"


#: Largest random sample dsopt makes for one input (2**28 elements: 1 GiB of float32).
MAX_RANDOM_ELEMENTS = 2**28


def _elem_type_name(elem_type: int) -> str:
    try:
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()
    except ValueError:
        return f"elem_type {elem_type}"


def _np_dtype(elem_type: int) -> np.dtype[Any]:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _input_specs(model: onnx.ModelProto) -> list[_InputSpec]:
    """The model's true inputs, in order: graph inputs that are not also initializers."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    weights.update(t.values.name for t in graph.sparse_initializer)
    specs = []
    for value in graph.input:
        if value.name in weights:
            continue
        kind = value.type.WhichOneof("value") or ""
        elem_type = 0
        dims: tuple[int | str | None, ...] | None = None
        if kind == "tensor_type":
            tensor_type = value.type.tensor_type
            elem_type = tensor_type.elem_type
            if tensor_type.HasField("shape"):
                dims = tuple(_dim(d) for d in tensor_type.shape.dim)
        specs.append(_InputSpec(value.name, kind, elem_type, dims))
    return specs


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value") and dim.dim_value >= 0:  # Paddle writes -1 for "dynamic"
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        return str(dim.dim_param)
    return None


def _names(specs: Sequence[_InputSpec]) -> str:
    return ", ".join(s.name for s in specs) or "none"


def parse_shape_overrides(specs: Sequence[str]) -> dict[str, list[int]]:
    """Parses `--shape` values of the form `NAME=D1,D2,...` into a name-to-shape mapping.

    `NAME=` with no dims stands for a scalar. The name is everything before the last `=`, so input
    names that contain `=` still work.

    Args:
        specs: Override strings such as `["x=1,3,224,224", "ids=1,128"]`.

    Returns:
        Each input name mapped to its list of dims.

    Raises:
        UsageError: A spec is malformed, has a negative or non-integer dim, or repeats a name.
    """
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims_text = spec.strip().rpartition("=")
        name = name.strip()
        try:
            if not sep or not name:
                raise ValueError(spec)
            dims = [int(d) for d in dims_text.split(",")] if dims_text.strip() else []
            if any(d < 0 for d in dims):
                raise ValueError(spec)
        except ValueError:
            raise UsageError(
                f"bad shape override '{spec}': expected NAME=D1,D2,... with non-negative "
                "integer dims",
                hint="for example --shape x=1,3,224,224 (NAME= with no dims is a scalar)",
            ) from None
        if name in shapes:
            raise UsageError(f"shape override for input '{name}' is given twice ('{spec}')")
        shapes[name] = dims
    return shapes


def random_inputs(
    model: ModelSource,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    default_dim: int = 1,
) -> Feeds:
    """Makes one deterministic random value for every true graph input of a model.

    Inputs that are also initializers are skipped (models with IR version < 4 list every weight
    as an input). Shapes come from `shapes` when given for an input; otherwise fixed dims are kept,
    each dim_param gets one value for all its occurrences (taken from an override that binds it,
    else `default_dim`) and unknown dims become `default_dim`.

    Values: floating types (float16/32/64, bfloat16, float8) are standard normal; complex types
    have standard normal real and imaginary parts; integers are uniform in [0, 4), because integer
    inputs are mostly indices, ids, lengths or axes and small non-negative values keep them valid
    for typical models (below a constant table's size when they index one through Gather, and
    0/1 for inputs named `*mask`); bools are fair coin flips.

    Args:
        model: The model whose inputs to fill, as a ModelProto or path.
        shapes: Whole-shape overrides by input name, e.g. from `parse_shape_overrides`.
        seed: Seed of the generator; equal seeds give equal feeds.
        default_dim: Value for dim_params and unknown dims that no override fixes.

    Returns:
        A value for each true input, keyed by input name, in the model's input order.

    Raises:
        UsageError: An override names no input, has the wrong rank or contradicts a fixed dim; an
            input has unknown rank and no override; an input is a string or non-tensor input;
            `default_dim` is negative.
    """
    proto = _load_proto(model, "")
    if default_dim < 0:
        raise UsageError(f"default dim must be non-negative, got {default_dim}")
    specs = _input_specs(proto)
    overrides = {name: [int(d) for d in dims] for name, dims in (shapes or {}).items()}
    by_name = {s.name: s for s in specs}
    for name, dims in overrides.items():
        if name not in by_name:
            raise UsageError(
                f"shape override names '{name}', which is not an input of the model "
                f"(inputs: {_names(specs)})"
            )
        _check_shape_against(by_name[name], dims, f"shape override for input '{name}'")

    bindings: dict[str, int] = {}
    for spec in specs:
        if spec.name in overrides and spec.dims is not None:
            for declared, given in zip(spec.dims, overrides[spec.name], strict=True):
                if isinstance(declared, str):
                    bindings.setdefault(declared, given)

    rng = np.random.default_rng(seed)
    bounds = _index_bounds(proto)
    feeds: Feeds = {}
    for spec in specs:
        if spec.kind != "tensor_type":
            raise UsageError(
                f"input '{spec.name}' is a {spec.kind or 'untyped'} input; random values are "
                "made only for tensors",
                hint="pass real input values with --inputs",
            )
        if spec.name in overrides:
            shape = overrides[spec.name]
        elif spec.dims is None:
            raise UsageError(
                f"input '{spec.name}' has unknown rank, so its random value needs a shape",
                hint=f"give one with --shape {spec.name}=D1,D2,...",
            )
        else:
            shape = []
            for declared in spec.dims:
                if isinstance(declared, int):
                    shape.append(declared)
                elif isinstance(declared, str):
                    shape.append(bindings.setdefault(declared, default_dim))
                else:
                    shape.append(default_dim)
        elements = math.prod(shape)
        if elements > MAX_RANDOM_ELEMENTS:
            raise UsageError(
                f"input '{spec.name}' of shape {list(shape)} has {elements} elements, too many "
                f"for a random sample (the limit is {MAX_RANDOM_ELEMENTS})",
                hint=f"give a smaller one with --shape {spec.name}=D1,D2,... or pass --inputs",
            )
        feeds[spec.name] = _random_array(rng, spec, shape, bounds.get(spec.name, _INT_HIGH))
    return feeds


#: Ops that pass integer indices through unchanged on the way to a Gather.
_INDEX_PASSTHROUGH = frozenset(
    {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose"}
)


def _index_bounds(proto: onnx.ModelProto) -> dict[str, int]:
    """Integer inputs that index a constant table (Gather, maybe via Cast/Reshape/...): bounds.

    An input named `*mask` gets bound 2 too: masks are 0/1 (random 0-3 values in an additive
    attention mask overflow to inf).
    """
    graph = proto.graph
    tables = {t.name: list(t.dims) for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    bounds: dict[str, int] = {}
    for graph_input in graph.input:
        if graph_input.name.lower().endswith("mask"):
            bounds[graph_input.name] = 2
        frontier, seen = [graph_input.name], set()
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in readers.get(name, ()):
                if node.op_type in _INDEX_PASSTHROUGH and node.input[0] == name:
                    frontier.extend(node.output)
                elif node.op_type == "Gather" and node.input[1:2] == [name]:
                    dims = tables.get(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                        limit = min(bounds.get(graph_input.name, _INT_HIGH), int(dims[axis]))
                        bounds[graph_input.name] = limit
    return bounds


def _check_shape_against(spec: _InputSpec, dims: Sequence[int], what: str) -> None:
    """Raises UsageError when `dims` cannot be a value of the declared input shape."""
    if spec.dims is None:
        return
    if len(dims) != len(spec.dims):
        raise UsageError(
            f"{what} has rank {len(dims)} ({list(dims)}) but the model declares rank "
            f"{len(spec.dims)} {spec.describe_shape()}"
        )
    for axis, (declared, given) in enumerate(zip(spec.dims, dims, strict=True)):
        if isinstance(declared, int) and declared != given:
            raise UsageError(
                f"{what} has {given} at axis {axis} ({list(dims)}) but the model fixes it to "
                f"{declared} {spec.describe_shape()}"
            )


def _random_array(
    rng: np.random.Generator, spec: _InputSpec, shape: Sequence[int], int_high: int = 4
) -> Array:
    type_name = str(onnx.TensorProto.DataType.Name(spec.elem_type)) if spec.elem_type else ""
    if type_name in ("", "UNDEFINED"):
        raise UsageError(
            f"input '{spec.name}' has no element type, so no random value can be made for it",
            hint="pass real input values with --inputs",
        )
    if type_name == "STRING":
        raise UsageError(
            f"input '{spec.name}' is a string tensor; random strings are not meaningful input",
            hint="pass real input values with --inputs",
        )
    dtype = _np_dtype(spec.elem_type)
    size = tuple(int(d) for d in shape)
    if type_name == "BOOL":
        return rng.integers(0, 2, size=size).astype(np.bool_)
    if type_name.startswith("COMPLEX"):
        real = rng.standard_normal(size)
        imag = rng.standard_normal(size)
        return (real + 1j * imag).astype(dtype)
    if type_name.startswith(("FLOAT", "BFLOAT")) or type_name == "DOUBLE":
        return np.asarray(rng.standard_normal(size)).astype(dtype)
    if type_name.startswith(("INT", "UINT")):
        return rng.integers(0, int_high, size=size).astype(dtype)
    raise UsageError(
        f"input '{spec.name}' has element type {type_name.lower()}, for which random values are "
        "not made",
        hint="pass real input values with --inputs",
    )


# --------------------------------------------------------------------------------------------------
# Loading inputs from files
# --------------------------------------------------------------------------------------------------


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_inputs(path: str | os.PathLike[str], model: ModelSource | None = None) -> list[Feeds]:
    """Reads input samples from a `.npz` file or a directory.

    Accepted layouts:

    * `x.npz`: one sample; arrays are named after model inputs. Arrays saved positionally
      (`arr_0`, `arr_1`, ... from `np.savez(f, a, b)`) map to the true inputs in order.
    * a directory of `.npz` files: one sample per file, in natural sort order.
    * an ONNX backend `test_data_set_N` folder: `input_0.pb`, `input_1.pb`, ... are TensorProtos,
      one sample; a tensor's name picks its input when set, else its position does.
    * an ONNX backend test folder holding `test_data_set_*` folders: one sample per folder.

    Args:
        path: The file or directory.
        model: When given, each sample is checked against the model's true inputs: every input
            present, no extra arrays, the declared dtype, rank and fixed dims.

    Returns:
        The samples, in order.

    Raises:
        UsageError: The path is missing or unreadable, holds no samples, or a sample does not fit
            the model (the message names the file and the input).
    """
    root = Path(path)
    specs = _input_specs(_load_proto(model, "")) if model is not None else None
    if not root.exists():
        raise UsageError(f"inputs path '{root}' does not exist")
    if root.is_file():
        if root.suffix == ".npz":
            return [_load_npz(root, specs)]
        if root.suffix == ".pb":
            return [_load_pb_files([root], specs)]
        raise UsageError(
            f"cannot read inputs from '{root}': expected a .npz file or a directory",
            hint="save inputs with numpy.savez(path, **{input_name: array})",
        )
    npz_files = sorted(root.glob("*.npz"), key=_natural_key)
    if npz_files:
        return [_load_npz(f, specs) for f in npz_files]
    pb_files = _input_pb_files(root)
    if pb_files:
        return [_load_pb_files(pb_files, specs)]
    data_sets = sorted(
        (d for d in root.glob("test_data_set_*") if d.is_dir() and _input_pb_files(d)),
        key=_natural_key,
    )
    if data_sets:
        return [_load_pb_files(_input_pb_files(d), specs) for d in data_sets]
    raise UsageError(
        f"inputs directory '{root}' holds no .npz files, no input_N.pb files and no "
        "test_data_set_N folders"
    )


def _input_pb_files(folder: Path) -> list[Path]:
    found = [
        (int(m.group(1)), f)
        for f in folder.glob("input_*.pb")
        if (m := re.fullmatch(r"input_(\d+)\.pb", f.name))
    ]
    return [f for _, f in sorted(found)]


def _load_npz(path: Path, specs: Sequence[_InputSpec] | None) -> Feeds:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: np.asarray(archive[name]) for name in archive.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read inputs file '{path}': {e}") from e
    if specs is not None:
        input_names = [s.name for s in specs]
        positional = [f"arr_{i}" for i in range(len(arrays))]
        if (
            sorted(arrays, key=lambda n: (len(n), n)) == positional
            and len(arrays) == len(specs)
            and not set(arrays) & set(input_names)
        ):
            arrays = {name: arrays[f"arr_{i}"] for i, name in enumerate(input_names)}
        _validate_sample(arrays, specs, f"'{path}'")
    return arrays


def _load_pb_files(files: Sequence[Path], specs: Sequence[_InputSpec] | None) -> Feeds:
    feeds: Feeds = {}
    file_of: dict[str, str] = {}
    for position, file in enumerate(files):
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(file.read_bytes())
            array = np.asarray(onnx.numpy_helper.to_array(tensor))
        except Exception as e:  # protobuf's DecodeError and numpy_helper's errors share no base
            raise UsageError(f"cannot read TensorProto from '{file}': {e}") from e
        if tensor.name:
            name = tensor.name
        elif specs is None:
            raise UsageError(
                f"'{file}' holds an unnamed tensor, so its input is known only by position",
                hint="pass the model too, so inputs can be matched in order",
            )
        elif position < len(specs):
            name = specs[position].name
        else:
            raise UsageError(
                f"'{file}' is input number {position} but the model has only {len(specs)} inputs "
                f"({_names(specs)})"
            )
        if name in feeds:
            raise UsageError(f"'{file}' gives input '{name}' a second time")
        feeds[name] = array
        file_of[name] = f"'{file}'"
    if specs is not None:
        _validate_sample(feeds, specs, f"'{files[0].parent}'", file_of)
    return feeds


def _validate_sample(
    sample: Feeds,
    specs: Sequence[_InputSpec],
    source: str,
    file_of: Mapping[str, str] | None = None,
) -> None:
    """Checks one sample against the model's inputs.

    Arrays of ml_dtypes types, which numpy saves as raw void bytes, are viewed as their declared
    dtype in place.

    Args:
        sample: The sample, keyed by input name.
        specs: The model's true inputs.
        source: How messages name the sample's file or folder.
        file_of: How messages name the file of each input, when inputs come from separate files.
    """
    names = {s.name for s in specs}
    for name in sample:
        if name not in names:
            where = (file_of or {}).get(name, source)
            raise UsageError(
                f"{where}: tensor '{name}' is not an input of the model (inputs: {_names(specs)})"
            )
    for spec in specs:
        if spec.name not in sample:
            raise UsageError(
                f"{source}: no value for input '{spec.name}' (inputs: {_names(specs)})"
            )
        if spec.kind != "tensor_type":
            raise UsageError(
                f"{where}: input '{spec.name}' is a {spec.kind or 'untyped'} input; only tensor "
                "inputs are supported"
            )
        array = sample[spec.name]
        where = (file_of or {}).get(spec.name, source)
        if spec.elem_type:
            expected = _np_dtype(spec.elem_type)
            if array.dtype.kind == "V" and array.dtype.itemsize == expected.itemsize:
                # numpy saves ml_dtypes arrays (bfloat16, float8) as raw void bytes.
                array = sample[spec.name] = array.view(expected)
            same = (array.dtype.kind in "OUS") if expected.kind == "O" else array.dtype == expected
            if not same:
                raise UsageError(
                    f"{where}: input '{spec.name}' is {array.dtype} but the model expects "
                    f"{spec.elem_type_name}",
                    hint=f"convert it, e.g. array.astype(numpy.{expected})",
                )
        _check_shape_against(spec, array.shape, f"{where}: input '{spec.name}'")


# --------------------------------------------------------------------------------------------------
# Running models
# --------------------------------------------------------------------------------------------------


def _load_proto(model: ModelSource, label: str) -> onnx.ModelProto:
    """The model's proto; from a file, without loading its external data."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    kind = f"{label} model".strip()
    if not path.is_file():
        raise ModelError(f"cannot read {kind} '{path}': no such file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError has no public base class to name
        raise ModelError(f"cannot read {kind} '{path}': {_first_line(e)}") from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensors(sub)


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _iter_tensors(model.graph))


class _Session:
    """An onnxruntime CPU session for one model, reused over samples.

    Use as a context manager: a ModelProto too large to serialize is written to a temporary
    directory (with external data) that must outlive the session.
    """

    def __init__(
        self, model: ModelSource, *, label: str, threads: int = 1, optimize: bool = False
    ) -> None:
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        kind = f"{label} model".strip()
        if isinstance(model, onnx.ModelProto):
            proto, path, self.label = model, None, kind
        else:
            # onnxruntime reads the file itself, so external data resolves next to it.
            proto, path = None, Path(model)
            self.label = f"{kind} '{path.name}'"
            if not path.is_file():
                raise ModelError(f"cannot read {kind} '{path}': no such file")
        # No bf16 kernels on the CPU provider: run the float32 twin that rounds like bf16
        # hardware, unoptimized so that no rewrite can drop its rounding Casts.
        from dsopt import bfloat16

        if bfloat16.needs_emulation(proto or onnx.load(str(path), load_external_data=False)):
            proto = bfloat16.emulate(proto or onnx.load(str(path)))
            self.label, optimize = f"{self.label} (bf16 emulated)", False
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Fatal only: onnxruntime's own error lines would precede dsopt's one-line message.
        options.log_severity_level = 4
        # Pre-packed constant MatMul/Gemm weights round differently from computed operands;
        # without pre-packing, folding a weight cannot move outputs by an ulp.
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimize
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        source: str | bytes
        if proto is None:
            source = str(path)
        elif _has_external_data(proto):
            raise ModelError(
                f"{self.label} references external data files, which cannot be located "
                "from an in-memory ModelProto",
                hint="pass the model's file path instead, or load it with load_external_data=True",
            )
        elif proto.ByteSize() > _PROTO_LIMIT_BYTES:
            source = self._save_large(proto)
        else:
            source = proto.SerializeToString()
        try:
            self.session = ort.InferenceSession(
                source, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime's errors derive from Exception only
            self.close()
            raise ModelError(f"onnxruntime cannot load {self.label}: {_first_line(e)}") from e
        self.output_names = [o.name for o in self.session.get_outputs()]
        io_types = [v.type for v in (*self.session.get_inputs(), *self.session.get_outputs())]
        self._raw_bits = any(t in _RAW_BIT_TYPES for t in io_types)

    def _save_large(self, proto: onnx.ModelProto) -> str:
        self._tempdir = tempfile.TemporaryDirectory(prefix="dsopt-check-")
        target = os.path.join(self._tempdir.name, "model.onnx")
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)  # save_model with external data rewrites the proto it is given
        onnx.save_model(
            copy,
            target,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
        )
        return target

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        """Runs the model on one sample and returns its outputs keyed by output name."""
        try:
            if self._raw_bits:
                values = self._run_raw_bits(feeds)
            else:
                values = self.session.run(None, dict(feeds))
        except Exception as e:  # onnxruntime's errors derive from Exception only
            raise ModelError(f"onnxruntime failed to run {self.label}: {_first_line(e)}") from e
        return {name: _as_array(v) for name, v in zip(self.output_names, values, strict=True)}

    def _run_raw_bits(self, feeds: Mapping[str, Array]) -> list[Any]:
        """Runs through OrtValues, for element types the numpy binding cannot convert."""
        types_by_input = {i.name: i.type for i in self.session.get_inputs()}
        ort_feeds = {}
        for name, array in feeds.items():
            raw = _RAW_BIT_TYPES.get(types_by_input.get(name, ""))
            if raw is not None:
                elem_type, container = raw
                ort_feeds[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.ascontiguousarray(array).view(container), elem_type
                )
            else:
                ort_feeds[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
        results = self.session.run_with_ort_values(self.output_names, ort_feeds)
        outputs = []
        for info, value in zip(self.session.get_outputs(), results, strict=True):
            raw = _RAW_BIT_TYPES.get(info.type)
            if raw is None:
                outputs.append(value.numpy())
                continue
            elem_type, _ = raw
            dtype = _np_dtype(elem_type)
            nbytes = math.prod(value.shape()) * dtype.itemsize
            data = ctypes.string_at(value.data_ptr(), nbytes) if nbytes else b""
            outputs.append(np.frombuffer(data, dtype=dtype).reshape(value.shape()).copy())
        return outputs

    def close(self) -> None:
        """Removes the temporary copy of a large model, if one was written."""
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> _Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        self.close()


def _as_array(value: Any) -> Array:
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except ValueError:  # ragged sequence outputs
        return np.asarray(value, dtype=object)


def run_model(
    model: ModelSource,
    feeds: Feeds,
    *,
    threads: int = 1,
    optimize: bool = False,
    label: str | None = None,
) -> dict[str, Array]:
    """Runs a model once with onnxruntime's CPU provider.

    Graph optimizations are off unless `optimize` is set, so the result is what the model
    computes rather than what onnxruntime's own rewriter makes of it. A path is handed to
    onnxruntime as a path (so external data resolves); a ModelProto goes as bytes, or through a
    temporary file with external data when it is too large to serialize.

    Args:
        model: A ModelProto or the path of a `.onnx` file.
        feeds: A value for each input, keyed by input name.
        threads: onnxruntime's intra-op thread count.
        optimize: Let onnxruntime optimize the graph (ORT_ENABLE_ALL) before running it.
        label: What messages call the model, e.g. "candidate"; its file name is added.

    Returns:
        The outputs, keyed by output name, in the model's output order.

    Raises:
        ModelError: The file cannot be read, or onnxruntime cannot load or run the model (the
            message names the model and quotes onnxruntime's first line).
    """
    with _Session(model, label=label or "", threads=threads, optimize=optimize) as session:
        return session.run(feeds)


# --------------------------------------------------------------------------------------------------
# Comparing outputs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OutputComparison:
    """How one output of the candidate compares with the reference.

    Error metrics are computed in float64 (complex128 for complex outputs) over the elements that
    are finite in both tensors; NaN and infinity disagreements are counted separately. They are
    None when the output cannot be compared elementwise (missing, different shape, or strings).

    Attributes:
        name: The output name.
        shape_ref: The reference output's shape (None when the reference lacks the output).
        shape_cand: The candidate output's shape (None when the candidate lacks the output).
        dtype: The reference output's dtype (the candidate's when only it has the output).
        dtype_cand: The candidate output's dtype (None when the candidate lacks the output).
        max_abs_error: Largest |candidate - reference|.
        rel_l2_error: ||candidate - reference|| / max(||reference||, tiny).
        cosine: Cosine similarity; 1.0 when both are all zero or empty, 0.0 when one is.
        within_tolerance: Every element passes and names, shapes and dtypes agree.
        nan_mismatch: Elements that are NaN in exactly one of the two.
        inf_mismatch: Elements where an infinity in either is not matched exactly.
        mismatched: Elements outside tolerance, including NaN and infinity mismatches.
        elements: Elements compared.
        problem: Why the output is not comparable or not equal, in a few words; None when fine.
        sample: Index of the sample this comparison (the worst one, once aggregated) came from.
    """

    name: str
    shape_ref: tuple[int, ...] | None
    shape_cand: tuple[int, ...] | None
    dtype: str
    max_abs_error: float | None
    rel_l2_error: float | None
    cosine: float | None
    within_tolerance: bool
    dtype_cand: str | None = None
    nan_mismatch: int = 0
    inf_mismatch: int = 0
    mismatched: int = 0
    elements: int = 0
    problem: str | None = None
    sample: int = 0

    def describe(self) -> str:
        """One line for people, e.g. "y: 6/6 elements outside tolerance, max abs error 1e-03"."""
        parts = []
        if self.problem:
            parts.append(self.problem)
        elif not self.within_tolerance:
            parts.append(f"{self.mismatched}/{self.elements} elements outside tolerance")
        else:
            parts.append("within tolerance")
        if self.max_abs_error is not None:
            parts.append(f"max abs error {self.max_abs_error:.3g}")
        if self.rel_l2_error is not None:
            parts.append(f"rel L2 error {self.rel_l2_error:.3g}")
        if self.cosine is not None:
            parts.append(f"cosine {self.cosine:.6f}")
        where = f" (sample {self.sample})" if not self.within_tolerance and self.sample else ""
        return f"{self.name}: " + ", ".join(parts) + where

    def to_dict(self) -> dict[str, Any]:
        """The comparison as plain JSON types; non-finite floats become "nan", "inf", "-inf"."""
        data = dataclasses.asdict(self)
        for key in ("shape_ref", "shape_cand"):
            if data[key] is not None:
                data[key] = [int(d) for d in data[key]]
        for key in ("max_abs_error", "rel_l2_error", "cosine"):
            data[key] = _json_float(data[key])
        return data


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


@dataclasses.dataclass
class EquivalenceReport:
    """The result of `check_equivalence`: per output, the worst comparison over all samples.

    Attributes:
        outputs: One comparison per output name.
        samples: How many input samples were run.
        rtol: Relative tolerance used.
        atol: Absolute tolerance used.
        relative: The whole-output bound used (see `compare_outputs`), if any.
    """

    outputs: list[OutputComparison]
    samples: int
    rtol: float
    atol: float
    relative: float | None = None

    @property
    def ok(self) -> bool:
        """Every output is within tolerance."""
        return all(o.within_tolerance for o in self.outputs)

    def failures(self) -> list[OutputComparison]:
        """The outputs not within tolerance, in output order."""
        return [o for o in self.outputs if not o.within_tolerance]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (see `OutputComparison.to_dict`)."""
        return {
            "ok": self.ok,
            "samples": int(self.samples),
            "rtol": float(self.rtol),
            "atol": float(self.atol),
            **({"relative": float(self.relative)} if self.relative is not None else {}),
            "outputs": [o.to_dict() for o in self.outputs],
        }

    def raise_for_failures(self) -> None:
        """Raises CheckFailed naming the first output outside tolerance, if any.

        Raises:
            CheckFailed: At least one output is not within tolerance.
        """
        failed = self.failures()
        if not failed:
            return
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise CheckFailed(
            f"{len(failed)} of {len(self.outputs)} outputs differ beyond rtol={self.rtol:g}, "
            f"atol={self.atol:g}: {failed[0].describe()}{more}",
            hint="inspect with `dsopt verify ORIGINAL CANDIDATE`, or loosen --rtol/--atol",
        )


def compare_outputs(
    reference: Mapping[str, Array],
    candidate: Mapping[str, Array],
    *,
    rtol: float,
    atol: float,
    relative: float | None = None,
) -> list[OutputComparison]:
    """Compares outputs matched by name.

    A float element passes when `|c - r| <= atol + rtol * |r|` (in float64), NaN positions agree
    and infinities agree exactly; integer, bool and string elements must be equal. A missing
    output, a shape mismatch or a dtype mismatch makes the output fail; it is recorded, not
    raised. With `relative` (the bound of lossy passes such as int8 quantization) a float
    output that fails elementwise still passes as a whole when its cosine is at least
    `1 - relative` and its relative L2 error at most `sqrt(2 * relative)` (both catch outputs
    rounded to zero), and at most a `relative` fraction of an integer output's elements (e.g.
    argmax) may differ.

    Args:
        reference: Outputs of the original model.
        candidate: Outputs of the candidate model.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        relative: The whole-output bound described above; None compares elementwise.

    Returns:
        One comparison per reference output, then one per output only the candidate has.
    """
    results = [
        _compare_one(name, np.asarray(ref), candidate.get(name), rtol, atol, relative)
        for name, ref in reference.items()
    ]
    for name, cand in candidate.items():
        if name not in reference:
            cand = np.asarray(cand)
            results.append(
                OutputComparison(
                    name=name,
                    shape_ref=None,
                    shape_cand=tuple(cand.shape),
                    dtype=str(cand.dtype),
                    dtype_cand=str(cand.dtype),
                    max_abs_error=None,
                    rel_l2_error=None,
                    cosine=None,
                    within_tolerance=False,
                    problem="output missing from the reference",
                )
            )
    return results


def _compare_one(
    name: str,
    ref: Array,
    cand_value: Array | None,
    rtol: float,
    atol: float,
    relative: float | None = None,
) -> OutputComparison:
    result = OutputComparison(
        name=name,
        shape_ref=tuple(ref.shape),
        shape_cand=None,
        dtype=str(ref.dtype),
        max_abs_error=None,
        rel_l2_error=None,
        cosine=None,
        within_tolerance=False,
    )
    if cand_value is None:
        result.problem = "output missing from the candidate"
        return result
    cand = np.asarray(cand_value)
    result.shape_cand = tuple(cand.shape)
    result.dtype_cand = str(cand.dtype)
    if ref.shape != cand.shape:
        result.problem = f"shape {list(cand.shape)} differs from the reference's {list(ref.shape)}"
        return result
    result.elements = int(ref.size)
    ref_kind, cand_kind = _value_kind(ref.dtype), _value_kind(cand.dtype)
    if ref.dtype != cand.dtype:
        result.problem = f"dtype {cand.dtype} differs from the reference's {ref.dtype}"
    if ref_kind == "other" or cand_kind == "other":
        # Strings and objects: only equality means anything.
        same = ref.dtype.kind == cand.dtype.kind or {ref.dtype.kind, cand.dtype.kind} <= {"O", "U"}
        result.mismatched = int(np.count_nonzero(ref != cand)) if ref.size and same else ref.size
        result.within_tolerance = result.mismatched == 0 and result.problem is None
        return result
    _fill_metrics(result, ref, cand, rtol, atol, exact=ref_kind == cand_kind == "exact")
    if relative is not None and result.problem is None and not result.within_tolerance:
        result.within_tolerance = _within_relative(result, relative, ref_kind == "exact")
    if result.problem is not None:
        result.within_tolerance = False
    elif result.nan_mismatch or result.inf_mismatch:
        result.problem = (
            f"NaN differs at {result.nan_mismatch}, infinity at {result.inf_mismatch} elements"
        )
    return result


def _within_relative(result: OutputComparison, relative: float, exact: bool) -> bool:
    if result.nan_mismatch or result.inf_mismatch:
        return False
    if exact:
        return result.mismatched <= relative * max(result.elements, 1)
    cosine = 1.0 if result.cosine is None else result.cosine
    rel_l2 = 0.0 if result.rel_l2_error is None else result.rel_l2_error
    return cosine >= 1.0 - relative and rel_l2 <= math.sqrt(2.0 * relative)


def _value_kind(dtype: np.dtype[Any]) -> str:
    """Classifies a dtype as "exact" (ints, bools), "float" (complex, bfloat16...) or "other"."""
    if dtype.kind in "biu":
        return "exact"
    if dtype.kind in "fc":
        return "float"
    if dtype.kind == "V" and dtype.type.__module__.startswith("ml_dtypes"):
        return "exact" if "int" in dtype.name else "float"
    return "other"


def _fill_metrics(
    result: OutputComparison, ref: Array, cand: Array, rtol: float, atol: float, *, exact: bool
) -> None:
    wide = np.complex128 if ref.dtype.kind == "c" or cand.dtype.kind == "c" else np.float64
    r = ref.astype(wide).ravel()
    c = cand.astype(wide).ravel()
    with np.errstate(over="ignore", invalid="ignore"):
        r_nan, c_nan = np.isnan(r), np.isnan(c)
        either_nan = r_nan | c_nan
        either_inf = (np.isinf(r) | np.isinf(c)) & ~either_nan
        finite = ~(either_nan | either_inf)
        result.nan_mismatch = int(np.count_nonzero(r_nan != c_nan))
        result.inf_mismatch = int(np.count_nonzero(either_inf & (r != c)))
        r_fin, c_fin = r[finite], c[finite]
        diff = np.abs(c_fin - r_fin)
        if exact:
            bad = int(np.count_nonzero(ref.ravel()[finite] != cand.ravel()[finite]))
        else:
            bad = int(np.count_nonzero(~(diff <= atol + rtol * np.abs(r_fin))))
    result.mismatched = bad + result.nan_mismatch + result.inf_mismatch
    result.within_tolerance = result.mismatched == 0
    result.max_abs_error = float(diff.max()) if diff.size else 0.0
    ref_norm = _norm(r_fin)
    result.rel_l2_error = _norm(c_fin - r_fin) / max(ref_norm, float(np.finfo(np.float64).tiny))
    result.cosine = _cosine(r_fin, c_fin)


def _norm(x: Array) -> float:
    """Euclidean norm that neither overflows nor underflows for extreme float64 values."""
    if x.size == 0:
        return 0.0
    scale = float(np.max(np.abs(x)))
    if scale == 0.0 or not math.isfinite(scale):
        return scale
    return scale * float(np.sqrt(np.sum(np.abs(x / scale) ** 2)))


def _cosine(r: Array, c: Array) -> float:
    r_scale = float(np.max(np.abs(r))) if r.size else 0.0
    c_scale = float(np.max(np.abs(c))) if c.size else 0.0
    if (r_scale == 0.0 and c_scale == 0.0) or np.array_equal(r, c):
        return 1.0
    if r_scale == 0.0 or c_scale == 0.0:
        return 0.0
    if not (math.isfinite(r_scale) and math.isfinite(c_scale)):
        return math.nan
    r_unit, c_unit = r / r_scale, c / c_scale
    dot = float(np.real(np.vdot(r_unit, c_unit)))
    denom = float(np.sqrt(np.sum(np.abs(r_unit) ** 2)) * np.sqrt(np.sum(np.abs(c_unit) ** 2)))
    return max(-1.0, min(1.0, dot / denom))


def _worst(per_sample: Sequence[OutputComparison]) -> OutputComparison:
    """Merges one output's comparisons over samples: worst metrics, counts summed."""
    failing = [c for c in per_sample if not c.within_tolerance]
    chosen = failing[0] if failing else max(per_sample, key=lambda c: c.max_abs_error or 0.0)
    merged = dataclasses.replace(chosen)

    def pick(values: list[float | None], worst: Any) -> float | None:
        if any(v is None for v in values):
            return None
        numbers = [float(v) for v in values if v is not None]
        if any(math.isnan(v) for v in numbers):
            return math.nan
        return float(worst(numbers))

    merged.max_abs_error = pick([c.max_abs_error for c in per_sample], max)
    merged.rel_l2_error = pick([c.rel_l2_error for c in per_sample], max)
    merged.cosine = pick([c.cosine for c in per_sample], min)
    merged.within_tolerance = not failing
    merged.nan_mismatch = sum(c.nan_mismatch for c in per_sample)
    merged.inf_mismatch = sum(c.inf_mismatch for c in per_sample)
    merged.mismatched = sum(c.mismatched for c in per_sample)
    merged.elements = sum(c.elements for c in per_sample)
    return merged


# --------------------------------------------------------------------------------------------------
# Equivalence check
# --------------------------------------------------------------------------------------------------


def check_equivalence(
    original: ModelSource,
    candidate: ModelSource,
    *,
    inputs: Sequence[Feeds] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    samples: int = 1,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    threads: int = 1,
    relative: float | None = None,
) -> EquivalenceReport:
    """Runs both models on the same inputs and compares every output.

    Args:
        original: The reference model (ModelProto or path).
        candidate: The model to check against it (ModelProto or path).
        inputs: Input samples to use (e.g. from `load_inputs`); when None, `samples` random
            samples are made from the original's inputs, sample k with seed `seed + k`.
        shapes: Input shape overrides for random samples (not allowed together with `inputs`).
        samples: Number of random samples.
        seed: Seed of the first random sample.
        rtol: Relative tolerance (see `compare_outputs`).
        atol: Absolute tolerance.
        threads: onnxruntime's intra-op thread count.
        relative: Whole-output bound of lossy passes (see `compare_outputs`).

    Returns:
        The report; per output, the worst comparison over all samples.

    Raises:
        UsageError: The models' inputs differ in names or element types, an option is out of
            range, or a given sample lacks an input.
        ModelError: A model cannot be read, loaded or run by onnxruntime.
    """
    if not (rtol >= 0 and atol >= 0):
        raise UsageError(f"tolerances must be non-negative numbers, got rtol={rtol}, atol={atol}")
    orig_proto = _load_proto(original, "original")
    cand_proto = _load_proto(candidate, "candidate")
    orig_specs = _input_specs(orig_proto)
    _check_same_inputs(orig_specs, _input_specs(cand_proto))

    if inputs is not None:
        if shapes:
            raise UsageError(
                "input shapes cannot be overridden when input values are given; the values "
                "fix the shapes",
                hint="drop --shape, or drop --inputs to use random inputs",
            )
        feeds_list = list(inputs)
        if not feeds_list:
            raise UsageError("no input samples were given")
        for k, feeds in enumerate(feeds_list):
            missing = [s.name for s in orig_specs if s.name not in feeds]
            if missing:
                raise UsageError(
                    f"input sample {k} has no value for input '{missing[0]}' "
                    f"(inputs: {_names(orig_specs)})"
                )
    else:
        if samples < 1:
            raise UsageError(f"number of samples must be at least 1, got {samples}")
        feeds_list = [
            random_inputs(orig_proto, shapes=shapes, seed=seed + k) for k in range(samples)
        ]

    per_output: dict[str, list[OutputComparison]] = {}
    with (
        _Session(original, label="original", threads=threads) as reference,
        _Session(candidate, label="candidate", threads=threads) as checked,
    ):
        for k, feeds in enumerate(feeds_list):
            comparisons = compare_outputs(
                reference.run(feeds), checked.run(feeds), rtol=rtol, atol=atol, relative=relative
            )
            for comparison in comparisons:
                comparison.sample = k
                per_output.setdefault(comparison.name, []).append(comparison)
            logger.debug("sample %d: %s", k, [c.describe() for c in comparisons])
    outputs = [_worst(group) for group in per_output.values()]
    return EquivalenceReport(
        outputs=outputs, samples=len(feeds_list), rtol=rtol, atol=atol, relative=relative
    )


def _check_same_inputs(original: Sequence[_InputSpec], candidate: Sequence[_InputSpec]) -> None:
    orig_names = {s.name for s in original}
    cand_names = {s.name for s in candidate}
    if orig_names != cand_names:
        only_orig = sorted(orig_names - cand_names)
        only_cand = sorted(cand_names - orig_names)
        parts = []
        if only_orig:
            parts.append("only the original has " + ", ".join(f"'{n}'" for n in only_orig))
        if only_cand:
            parts.append("only the candidate has " + ", ".join(f"'{n}'" for n in only_cand))
        raise UsageError(
            "the models have different inputs: " + "; ".join(parts),
            hint="the candidate must take the same inputs as the original to be compared",
        )
    cand_by_name = {s.name: s for s in candidate}
    for spec in original:
        other = cand_by_name[spec.name]
        if spec.elem_type and other.elem_type and spec.elem_type != other.elem_type:
            raise UsageError(
                f"input '{spec.name}' is {spec.elem_type_name} in the original but "
                f"{other.elem_type_name} in the candidate",
                hint="the candidate must take the same input types as the original to be compared",
            )
