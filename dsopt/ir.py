"""The dsopt IR: an onnx-graphsurgeon graph plus the model-level facts graphsurgeon drops."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.ir.tensor import LazyValues

from dsopt.errors import ModelError
from dsopt.limits import discard_on_abort

__all__ = ["TWO_GB", "ModelFacts", "Module", "is_stub", "iter_graphs", "load", "save_model"]

#: protobuf's hard limit; models beyond it must keep weights as external data.
TWO_GB = 2**31

#: Safety margin: switch to external data a little before protobuf's limit.
_EXTERNAL_DATA_THRESHOLD = TWO_GB - 64 * 2**20


@dataclasses.dataclass
class ModelFacts:
    """ModelProto fields that live outside the graph (graphsurgeon does not keep them all)."""

    ir_version: int
    opset_imports: dict[str, int]
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_proto(cls, model: onnx.ModelProto) -> ModelFacts:
        """Reads the facts of `model`; a missing default-domain import is an error."""
        imports = {(imp.domain or ""): int(imp.version) for imp in model.opset_import}
        return cls(
            ir_version=int(model.ir_version),
            opset_imports=imports,
            producer_name=model.producer_name,
            producer_version=model.producer_version,
            domain=model.domain,
            model_version=int(model.model_version),
            doc_string=model.doc_string,
            metadata_props={p.key: p.value for p in model.metadata_props},
        )


class Module:
    """A model being optimized: `graph` (onnx-graphsurgeon) plus `facts` (opsets, metadata).

    Weights that old (IR < 4) models also list as graph inputs become plain initializers:
    callers that feed only the real inputs see the same outputs.

    `generation` increases every time a pass reports a change; analyses are cached per
    generation. `base_dir` is where external data of the source model lives.
    """

    def __init__(self, graph: gs.Graph, facts: ModelFacts, *, base_dir: Path | None = None) -> None:
        self.graph = graph
        self.facts = facts
        self.base_dir = base_dir
        self.source: Path | None = None
        self.generation = 0

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_proto(cls, model: onnx.ModelProto, *, base_dir: Path | None = None) -> Module:
        """Imports a ModelProto (external data already loaded) into a Module."""
        facts = ModelFacts.from_proto(model)
        if "" not in facts.opset_imports and "ai.onnx" not in facts.opset_imports:
            facts.opset_imports[""] = _infer_default_opset(model)
        initializer_names = {t.name for t in model.graph.initializer}
        if any(vi.name in initializer_names for vi in model.graph.input):
            # graphsurgeon treats weights listed as inputs (IR < 4 style) as constants and drops
            # them from the inputs; IR 4 is the first version where that is valid.
            facts.ir_version = max(facts.ir_version, 4)
        try:
            graph = gs.import_onnx(model)
        except Exception as e:  # graphsurgeon raises assorted errors on malformed graphs
            raise ModelError(f"cannot import the graph: {_first_line(e)}") from e
        # Exporters sometimes write nodes out of order; runtimes accept that, the checker not.
        from dsopt.pattern import topological_order

        for sub in iter_graphs(graph):
            _check_text(sub)
            sub.nodes = topological_order(sub)
        return cls(graph, facts, base_dir=base_dir)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Module:
        """Loads `path` (with its external data) into a Module.

        External weights are read from their file straight into numpy arrays (one copy in
        memory, not a protobuf copy plus an array copy per look).
        """
        path = Path(path)
        proto = load(path, external_data=False)
        module = cls.from_proto(proto, base_dir=path.parent)
        _read_external_constants(module, path)
        _load_external_data(proto, path.parent, path)  # what is left: attributes, odd dtypes
        module.source = path
        return module

    def clone(self) -> Module:
        """A deep copy that shares nothing mutable with this module."""
        twin = Module(self.graph.copy(), copy.deepcopy(self.facts), base_dir=self.base_dir)
        twin.generation = self.generation
        return twin

    # -- facts ------------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        """The default-domain (ai.onnx) opset version."""
        return self.facts.opset_imports.get("", self.facts.opset_imports.get("ai.onnx", 1))

    def graphs(self) -> Iterator[gs.Graph]:
        """The main graph, then every nested If/Loop/Scan body, depth first."""
        yield from iter_graphs(self.graph)

    def node_count(self) -> int:
        """Nodes in the main graph and all subgraphs."""
        return sum(len(g.nodes) for g in self.graphs())

    # -- export -----------------------------------------------------------------------------
    def to_proto(self) -> onnx.ModelProto:
        """Exports to a ModelProto with the original model-level facts restored."""
        graph = self.graph
        imports = dict(self.facts.opset_imports)
        for domain, version in _domains_used(self).items():
            imports.setdefault(domain, version)
        opset_imports = [onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items())]
        try:
            model = gs.export_onnx(graph, do_type_check=False, opset_imports=opset_imports)
        except Exception as e:
            raise ModelError(f"cannot export the graph: {_first_line(e)}") from e
        facts = self.facts
        model.ir_version = facts.ir_version
        if model.ir_version < 4 and model.graph.initializer:
            # IR < 4 requires every initializer to be a graph input; 4 lifted that rule.
            model.ir_version = 4
        model.producer_name = facts.producer_name
        model.producer_version = facts.producer_version
        model.domain = facts.domain
        model.model_version = facts.model_version
        model.doc_string = facts.doc_string
        del model.metadata_props[:]
        for key, value in facts.metadata_props.items():
            model.metadata_props.add(key=key, value=value)
        _drop_stale_value_info(model.graph)
        return model

    def skeleton_proto(self, max_bytes: int = 4096, *, main_only: bool = False) -> onnx.ModelProto:
        """Like `to_proto`, but float weights over `max_bytes` carry only dims and dtype.

        For analyses such as shape inference that need the structure, not the weights: the
        export cost no longer grows with the model size. Integer tensors keep their data
        (they may be shapes that data propagation reads). Not a valid model to run or check.
        `main_only` stubs only the main graph's weights.
        """
        swapped: list[tuple[gs.Constant, object]] = []
        try:
            for graph in [self.graph] if main_only else self.graphs():
                for tensor in graph.tensors().values():
                    if not isinstance(tensor, gs.Constant) or _is_shape_like(tensor):
                        continue
                    values = tensor._values
                    if isinstance(values, LazyValues):
                        nbytes = values.nbytes
                    elif isinstance(values, np.ndarray):
                        nbytes = values.nbytes
                    else:
                        continue
                    if nbytes <= max_bytes:
                        continue
                    stub = onnx.TensorProto(
                        name=tensor.name, dims=list(tensor.shape), data_type=_onnx_dtype(tensor)
                    )
                    swapped.append((tensor, values))
                    tensor._values = LazyValues(stub)
            return self.to_proto()
        finally:
            for tensor, values in swapped:
                tensor._values = values

    def structure_proto(self, max_bytes: int = 4096) -> onnx.ModelProto:
        """A checkable stand-in whose export cost does not grow with the weights.

        The main graph's float weights over `max_bytes` become graph inputs with their dims and
        dtype, so onnx.checker and strict shape inference see the same structure and types
        without serializing the weights; `weight_data_error` checks what the checker would
        have checked of their data (its size).
        """
        model = self.skeleton_proto(max_bytes, main_only=True)
        graph = model.graph
        stubs = [t for t in graph.initializer if is_stub(t)]
        if not stubs:
            return model
        stub_names = {t.name for t in stubs}
        kept = [t for t in graph.initializer if t.name not in stub_names]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        listed = {i.name for i in graph.input}
        for tensor in stubs:
            if tensor.name not in listed:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(
                        tensor.name, tensor.data_type, list(tensor.dims)
                    )
                )
        return model

    def weight_data_error(self) -> str | None:
        """The first weight whose stored data does not fill its declared dims, else None."""
        for graph in self.graphs():
            for tensor in graph.tensors().values():
                if not isinstance(tensor, gs.Constant):
                    continue
                values = tensor._values
                if not isinstance(values, LazyValues):
                    continue
                error = _data_size_error(values.tensor)
                if error is not None:
                    return error
        return None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the module to `path` atomically; see `save_model`.

        Past protobuf's 2 GB limit the weights stream to `<name>.data` one tensor at a time,
        so saving never holds a second copy of the model in memory.
        """
        if _weight_bytes(self) < _EXTERNAL_DATA_THRESHOLD:
            return save_model(self.to_proto(), path)
        return _save_streamed(self, Path(path))

    def fingerprint(self) -> str:
        """SHA-256 of the exported model bytes (weights included)."""
        model = self.to_proto()
        digest = hashlib.sha256()
        for tensor in _all_tensors(model):
            digest.update(tensor.raw_data or tensor.SerializeToString())
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(model)
        for tensor in _all_tensors(skeleton):
            tensor.ClearField("raw_data")
        digest.update(skeleton.SerializeToString(deterministic=True))
        return digest.hexdigest()


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """`graph` and all its nested subgraphs (node attributes holding graphs), depth first."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from iter_graphs(value)
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, gs.Graph):
                        yield from iter_graphs(item)


def load(path: str | os.PathLike[str], *, external_data: bool = True) -> onnx.ModelProto:
    """Reads an ONNX file with its external data; every failure is a one-line ModelError.

    With `external_data=False` external tensors stay references (their locations are still
    checked).
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file", hint="check the path to the model")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as e:
        raise ModelError(
            f"{path}: not a readable ONNX model ({_first_line(e)})",
            hint="check the file is a complete .onnx protobuf",
        ) from e
    if not model.HasField("graph") or not model.opset_import:
        raise ModelError(f"{path}: not an ONNX model (no graph or no opset_import)")
    for tensor in _all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            _external_file(tensor, path.parent.resolve(), path)
    if external_data:
        _load_external_data(model, path.parent, path)
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Writes `model` atomically (temp file + rename), as external data past 2 GB.

    With external data the weights go to `<name>.data` beside the model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(len(t.raw_data) for t in _all_tensors(model)) + 1024 * len(model.graph.node)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_data = path.parent / f".{path.name}.data.tmp"
    try:
        with discard_on_abort(tmp), discard_on_abort(tmp_data):
            _write(model, path, Path(tmp), tmp_data, external=size >= _EXTERNAL_DATA_THRESHOLD)
    finally:
        for leftover in (Path(tmp), tmp_data):
            leftover.unlink(missing_ok=True)
    return path


def _save_streamed(module: Module, path: Path) -> Path:
    """Module.save for models past 2 GB: weights go straight from the graph to the data file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_data = path.parent / f".{data_name}.tmp"
    swapped: list[tuple[gs.Constant, object]] = []
    try:
        with discard_on_abort(tmp), discard_on_abort(tmp_data):
            with open(tmp_data, "wb") as data:
                for constant in _streamable_constants(module):
                    payload = _raw_bytes(constant)
                    offset = -data.tell() % _DATA_ALIGNMENT + data.tell()
                    data.write(b"\0" * (offset - data.tell()))
                    data.write(payload)
                    length = len(payload)
                    del payload  # one tensor's bytes in memory at a time
                    stub = onnx.TensorProto(
                        name=constant.name,
                        dims=constant.shape,
                        data_type=_onnx_dtype(constant),
                        data_location=onnx.TensorProto.EXTERNAL,
                    )
                    for key, value in (("location", data_name), ("offset", offset)):
                        stub.external_data.add(key=key, value=str(value))
                    stub.external_data.add(key="length", value=str(length))
                    swapped.append((constant, constant._values))
                    constant._values = LazyValues(stub)
            with open(tmp, "wb") as f:
                f.write(module.to_proto().SerializeToString(deterministic=True))
            os.replace(tmp_data, path.parent / data_name)
            os.replace(tmp, path)
    finally:
        for constant, values in swapped:
            constant._values = values
        for leftover in (Path(tmp), tmp_data):
            leftover.unlink(missing_ok=True)
    return path


#: External tensors start at page boundaries, so runtimes can map them instead of copying.
_DATA_ALIGNMENT = 4096
_STREAMED_DTYPES = frozenset(
    onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t))
    for t in ("float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
)


def _constants(module: Module) -> Iterator[gs.Constant]:
    """Every constant tensor of the module once (subgraphs see outer ones too)."""
    seen: set[int] = set()
    for graph in module.graphs():
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


def _streamable_constants(module: Module) -> Iterator[gs.Constant]:
    """Constants of 1 KB or more whose bytes `_raw_bytes` can write as stored."""
    for tensor in _constants(module):
        values = tensor._values
        if isinstance(values, LazyValues):
            stored = values.tensor
            plain = stored.data_location == onnx.TensorProto.DEFAULT
            plain = plain and stored.HasField("raw_data")  # (reading raw_data copies it)
            if plain and values.nbytes >= 1024:
                yield tensor
        elif isinstance(values, np.ndarray) and values.nbytes >= 1024:
            if _onnx_dtype(tensor) in _STREAMED_DTYPES:
                yield tensor


def _raw_bytes(constant: gs.Constant) -> bytes | memoryview:
    """The tensor's little-endian bytes as ONNX stores them in raw_data."""
    values = constant._values
    if isinstance(values, LazyValues):
        return values.tensor.raw_data
    array = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    return memoryview(array).cast("B")


def _weight_bytes(module: Module) -> int:
    """Bytes of every constant in the module (without loading lazy values)."""
    total = 0
    for tensor in _constants(module):
        values = tensor._values
        total += values.nbytes if isinstance(values, LazyValues) else np.asarray(values).nbytes
    return total


def _write(model: onnx.ModelProto, path: Path, tmp: Path, tmp_data: Path, external: bool) -> None:
    """save_model's body: writes `tmp` (and `tmp_data`), then renames them into place."""
    if external:
        data_name = f"{path.name}.data"
        big = onnx.ModelProto()
        big.CopyFrom(model)
        onnx.external_data_helper.convert_model_to_external_data(
            big, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024
        )
        onnx.save_model(big, tmp)
        # Point the model at the final data file name, then move both into place.
        fixed = onnx.load_model(tmp, load_external_data=False)
        for tensor in _all_tensors(fixed):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
        onnx.save_model(fixed, tmp)
        if tmp_data.exists():
            os.replace(tmp_data, path.parent / data_name)
    else:
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString(deterministic=True))
    os.replace(tmp, path)


# -- helpers ---------------------------------------------------------------------------------
def _is_shape_like(tensor: gs.Constant) -> bool:
    try:
        return np.dtype(tensor.dtype) in (np.dtype(np.int64), np.dtype(np.int32))
    except TypeError:  # graphsurgeon reports bfloat16/float8 as onnx types numpy cannot name
        return False


def is_stub(tensor: onnx.TensorProto) -> bool:
    """Whether `tensor` is a `skeleton_proto` stub: dims and dtype, no data anywhere."""
    if tensor.raw_data or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    fields = ("float_data", "double_data", "int32_data", "int64_data", "uint64_data")
    return not any(len(getattr(tensor, f)) for f in fields) and not tensor.string_data


def _data_size_error(tensor: onnx.TensorProto) -> str | None:
    """Why `tensor`'s stored data does not match its dims (raw and typed fields), else None."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, TypeError, ValueError):
        return None
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.raw_data:
        if tensor.data_type in _SUBBYTE or len(tensor.raw_data) == count * dtype.itemsize:
            return None
        return _size_message(tensor, count)
    field = {1: "float_data", 11: "double_data", 7: "int64_data", 6: "int32_data"}.get(
        tensor.data_type
    )
    if field is not None and len(getattr(tensor, field)) not in (0, count):
        return _size_message(tensor, count)
    return None


#: Sub-byte element types (int4, uint4, float4): their raw size is not count * itemsize.
_SUBBYTE = frozenset({21, 22, 23})


def _size_message(tensor: onnx.TensorProto, count: int) -> str:
    return (
        f"weight '{tensor.name}' declares dims {list(tensor.dims)} ({count} elements) but its "
        "stored data has a different size"
    )


def _onnx_dtype(tensor: gs.Constant) -> int:
    values = tensor._values
    if isinstance(values, LazyValues):
        return int(values.tensor.data_type)
    return int(onnx.helper.np_dtype_to_tensor_dtype(np.asarray(values).dtype))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from onnx.external_data_helper._get_all_tensors(model)


def _external_file(tensor: onnx.TensorProto, root: Path, path: Path) -> Path:
    """The file holding `tensor`'s external data; refuses locations outside `root`."""
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    target = (root / info.location).resolve()
    if root != target and root not in target.parents:
        raise ModelError(
            f"{path}: tensor '{tensor.name}' points to external data outside the model's "
            f"folder ({info.location})",
            hint="keep external data files next to the model",
        )
    if not target.is_file():
        raise ModelError(
            f"{path}: external data file '{info.location}' of tensor '{tensor.name}' is missing",
            hint="copy the .data file next to the model",
        )
    return target


def _read_external_constants(module: Module, path: Path) -> None:
    """Replaces lazily held external initializers of plain numeric types by numpy arrays."""
    root = path.parent.resolve()
    for constant in _constants(module):
        values = constant._values
        if not isinstance(values, LazyValues):
            continue
        tensor = values.tensor
        external = onnx.external_data_helper.uses_external_data(tensor)
        if not external or tensor.data_type not in _STREAMED_DTYPES:
            continue
        file = _external_file(tensor, root, path)
        constant._values = _read_external_array(tensor, file, path)
        constant.data_location = None  # graphsurgeon would export it as EXTERNAL again
        tensor.data_location = onnx.TensorProto.DEFAULT  # the proto copy is no longer read
        del tensor.external_data[:]


def _read_external_array(tensor: onnx.TensorProto, file: Path, path: Path) -> np.ndarray:
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    count = int(np.prod(tensor.dims, dtype=np.int64))
    offset = int(info.offset or 0)
    length = info.length if info.length else count * dtype.itemsize
    if length != count * dtype.itemsize or offset + length > file.stat().st_size:
        raise ModelError(
            f"{path}: weight '{tensor.name}' declares dims {list(tensor.dims)} ({count} elements) "
            f"but its external data ({file.name}, offset {offset}, {length} bytes) does not hold "
            "them",
            hint="re-export the model with its matching .data file",
        )
    array = np.fromfile(file, dtype=dtype, count=count, offset=offset)
    return array.astype(dtype.newbyteorder("="), copy=False).reshape(tuple(tensor.dims))


def _load_external_data(model: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    """Loads external tensors, refusing locations that escape the model's folder."""
    root = base_dir.resolve()
    for tensor in _all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        _external_file(tensor, root, path)
        try:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(root))
        except (OSError, ValueError) as e:
            raise ModelError(
                f"{path}: cannot read external data of tensor '{tensor.name}': {_first_line(e)}"
            ) from e
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _infer_default_opset(model: onnx.ModelProto) -> int:
    return max(
        (imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), default=1
    )


def _check_text(graph: gs.Graph) -> None:
    """Op types, domains and names must be text (protobuf hands back bytes for bad UTF-8)."""
    for node in graph.nodes:
        for field in ("op", "domain", "name"):
            value = getattr(node, field)
            if value is not None and not isinstance(value, str):
                raise ModelError(
                    f"node {node.name!r} has a {field} that is not valid UTF-8 text: {value!r}",
                    hint="the file is corrupt; export the model again",
                )
        for tensor in (*node.inputs, *node.outputs):
            if not isinstance(tensor.name, str):
                raise ModelError(
                    f"node {node.name!r} reads or writes a tensor whose name is not valid UTF-8 "
                    f"text: {tensor.name!r}",
                    hint="the file is corrupt; export the model again",
                )


def _domains_used(module: Module) -> dict[str, int]:
    """Domains of ops in the graph that have no opset import yet (version 1 by convention)."""
    used: dict[str, int] = {}
    for graph in module.graphs():
        for node in graph.nodes:
            if node.domain and node.domain not in module.facts.opset_imports:
                used[node.domain] = 1
    return used


def _drop_stale_value_info(graph: onnx.GraphProto) -> None:
    """Removes value_info entries of tensors that no node produces any more."""
    produced = {out for node in graph.node for out in node.output}
    keep = [vi for vi in graph.value_info if vi.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _drop_stale_value_info(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _drop_stale_value_info(sub)


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of `tensor` if it is constant (initializer or Constant-node output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if (
        len(tensor.inputs) == 1
        and tensor.inputs[0].op == "Constant"
        and not tensor.inputs[0].domain
    ):
        return constant_node_value(tensor.inputs[0])
    return None


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value a `Constant` node produces (any of its value_* attributes), else None."""
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return np.asarray(attrs["value"].values)
    scalars = {
        "value_float": np.float32,
        "value_int": np.int64,
        "value_floats": np.float32,
        "value_ints": np.int64,
    }
    for key, dtype in scalars.items():
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None  # sparse_value and value_string(s) are left alone


__all__ += ["constant_value", "constant_node_value"]
