"""Per-node sensitivity: each weight lowered alone, its bytes and the outputs' error.

A *unit* is one constant float32 weight and the weight-bearing nodes reading it (MatMul,
Gemm, Conv, ConvTranspose, Gather on a table); its precision is chosen as one. Lowering a
unit runs the usual pass on a clone with every other weight-bearing node excluded
(`quantize-weights{bits=8|4,exclude=...}`; fp16/bf16 compute and fp16 weight storage through
`convert-float16{dtype=...,weights_only=...}` with every other node blocked), so sensitivities
and the combined model use exactly the precision stage's numerics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dsopt.analysis import AnalysisManager
from dsopt.errors import UsageError
from dsopt.ir import Module
from dsopt.pass_infra import PassContext
from dsopt.passes.convert_float16 import ConvertFloat16
from dsopt.passes.quantize_weights import QuantizeWeights
from dsopt.pattern import read_constant, topological_order

__all__ = [
    "CANDIDATES",
    "HALF",
    "INT4_BLOCKS",
    "TARGET_PRECISIONS",
    "Candidate",
    "ErrorMeter",
    "SensitivityCache",
    "Unit",
    "lower",
    "measure",
    "output_errors",
    "quantize_options",
    "upgrade_for_quantization",
    "weight_units",
]

logger = logging.getLogger(__name__)

#: Candidate precisions, widest first. `fp16`/`bf16` convert the unit's compute (2 bytes per
#: weight); `fp16-weights` only stores its weight in fp16 behind a Cast (2 bytes, compute
#: float32: runs anywhere). `int4` has blocks of `--block-size` (default 32);
#: `int4-b128` blocks of 128: a quarter of the scale bytes (4.25 instead of 5 bits per
#: weight) for a little more error, so that insensitive weights can pay for sensitive ones
#: even at the size of uniform int4 (where every weight is already at int4 or int8).
CANDIDATES = ("fp32", "fp16", "bf16", "fp16-weights", "int8", "int4", "int4-b128")
#: Block size of each int4 candidate (None: `--block-size`, default 32).
INT4_BLOCKS = {"int4": None, "int4-b128": 128}
#: `Target.precisions` keys -> candidates.
TARGET_PRECISIONS = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float16-weight": "fp16-weights",
    "int8": "int8",
    "int4-weight": "int4",
}
#: The 16-bit candidates: convert-float16 options (weight bytes are 2 per element).
HALF = {
    "fp16": {},
    "bf16": {"dtype": "bfloat16"},
    "fp16-weights": {"weights_only": True},
}
#: Weight input index per weight-bearing op.
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}
_INT4_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"})


@dataclasses.dataclass
class Candidate:
    """One precision of one unit: its weight bytes and the outputs' error with it alone.

    `sqnr_db`: the signal-to-quantization-noise ratio of the unit's first node's own output,
    `10 log10(sum y^2 / sum (y - y_lowered)^2)` over the samples (None where not measured).
    """

    precision: str
    bytes: int
    rel_l2: float
    cosine: float
    sqnr_db: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Unit:
    """A weight and the nodes reading it; named by its first reader."""

    name: str
    op: str
    nodes: tuple[str, ...]
    elements: int
    main_graph: bool
    candidates: dict[str, Candidate] = dataclasses.field(default_factory=dict)
    #: The first node's float output in the main graph (its SQNR is measured), else None.
    output: str | None = None

    @property
    def fp32_bytes(self) -> int:
        """Bytes of the float32 weight."""
        return 4 * self.elements


def weight_units(module: Module) -> list[Unit]:
    """The units of `module`, in graph order; names unnamed nodes (`mixed_<op>_<i>`) in place.

    Weights read by anything but weight-bearing nodes stay float (quantize-weights would keep
    them float too) and are no unit.
    """
    names = {n.name for g in module.graphs() for n in g.nodes if n.name}
    counter = 0
    for graph in module.graphs():
        for node in graph.nodes:
            if not node.name:
                while f"mixed_{node.op}_{counter}" in names:
                    counter += 1
                node.name = f"mixed_{node.op}_{counter}"
                names.add(node.name)
    found: dict[int, Unit] = {}
    tensors: dict[int, Any] = {}
    for graph_index, graph in enumerate(module.graphs()):
        for node in graph.nodes:
            index = _WEIGHT_INPUT.get(node.op)
            if index is None or (node.domain or "") not in ("", "ai.onnx"):
                continue
            if len(node.inputs) <= index:
                continue
            tensor = node.inputs[index]
            value = read_constant(tensor)
            if value is None or value.dtype != np.float32 or value.ndim < 2:
                continue
            unit = found.get(id(tensor))
            if unit is None:
                unit = Unit(node.name, node.op, (), int(value.size), graph_index == 0)
                out = node.outputs[0] if node.outputs else None
                if graph_index == 0 and out is not None and out.name:
                    unit.output = out.name
                found[id(tensor)] = unit
                tensors[id(tensor)] = tensor
            unit.nodes = (*unit.nodes, node.name)
            unit.main_graph = unit.main_graph and graph_index == 0
    kept = []
    for key, unit in found.items():
        tensor = tensors[key]
        readers = sum(1 for r in tensor.outputs for t in r.inputs if t is tensor)
        if readers == len(unit.nodes) and len({r.op for r in tensor.outputs}) == 1:
            kept.append(unit)
    return kept


def allowed(unit: Unit, precision: str) -> bool:
    """Whether `precision` is a candidate for `unit` (before trying it)."""
    if precision in INT4_BLOCKS:
        return unit.op in _INT4_OPS
    if precision in HALF:
        return unit.main_graph
    return True


@dataclasses.dataclass(frozen=True)
class _OnlyFloat16(ConvertFloat16):
    """convert-float16 limited to the nodes named in `only` (every other node blocked)."""

    only: str = ""

    def blocked_nodes(self, module: Module, ctx: PassContext) -> frozenset[str]:
        """Every named node outside `only`."""
        keep = set(self.only.split(","))
        return frozenset(n.name for n in module.graph.nodes if n.name and n.name not in keep)


def lower(
    source: Module | onnx.ModelProto,
    units: Sequence[Unit],
    assignment: Mapping[str, str],
    ctx: PassContext,
    *,
    block_size: int | None = None,
) -> tuple[Module, dict[str, int]]:
    """A clone of `module` with each unit in its assigned precision (default fp32).

    Returns the clone and the weight bytes per unit as the passes stored them. Pass the
    ModelProto when lowering one model many times: the clone is parsed from it (a graph
    copy would share export dtypes that convert-float16 changes).
    """
    proto = source.to_proto() if isinstance(source, Module) else source
    clone = Module.from_proto(proto)
    all_nodes = [n for u in units for n in u.nodes]
    by_precision: dict[str, list[Unit]] = {}
    for unit in units:
        by_precision.setdefault(assignment.get(unit.name, "fp32"), []).append(unit)
    sizes = {u.name: u.fp32_bytes for u in units}
    for precision, options in HALF.items():
        half = by_precision.get(precision, [])
        if not half:
            continue
        only = ",".join(n for u in half for n in u.nodes)
        _run(clone, _OnlyFloat16(only=only, **options), ctx)
        nodes = {n.name: n for n in clone.graph.nodes}
        for unit in half:
            node = nodes.get(unit.name)
            weight = node.inputs[_WEIGHT_INPUT[node.op]] if node is not None else None
            if weight is not None and _stored_in_16_bits(weight):  # else the pass kept it
                sizes[unit.name] = 2 * unit.elements
    for precision in (*INT4_BLOCKS, "int8"):
        chosen = by_precision.get(precision, [])
        if not chosen:
            continue
        options = quantize_options(precision, block_size)
        # One unit at a time, every other weight-bearing node excluded: the pass's byte
        # count is then that unit's.
        for unit in chosen:
            exclude = ",".join(n for n in all_nodes if n not in unit.nodes)
            stats = _run(clone, QuantizeWeights(**options, exclude=exclude), ctx)
            if int(stats.get("weights", 0)):
                sizes[unit.name] = int(stats["bytes-after"])
    return clone, sizes


def _stored_in_16_bits(weight: Any) -> bool:
    """Whether a weight input is a 16-bit constant, or a Cast to float of one."""
    if len(weight.inputs) == 1 and weight.inputs[0].op == "Cast" and weight.inputs[0].inputs:
        weight = weight.inputs[0].inputs[0]
    return isinstance(weight, gs.Constant) and _bits(weight.dtype) == 16


def _bits(dtype: Any) -> int:
    try:
        return 8 * np.dtype(dtype).itemsize
    except TypeError:  # graphsurgeon keeps bfloat16 as its ONNX enum value
        return 16 if int(dtype) == onnx.TensorProto.BFLOAT16 else 0


def quantize_options(precision: str, block_size: int | None) -> dict[str, Any]:
    """quantize-weights options of an int8/int4 candidate."""
    if precision == "int8":
        return {"bits": 8}
    block = INT4_BLOCKS[precision] or block_size
    return {"bits": 4, **({"block_size": block} if block is not None else {})}


def upgrade_for_quantization(
    module: Module, precisions: Sequence[str], ctx: PassContext
) -> list[str]:
    """Raises `module`'s opset in place so that quantize-weights can lower its weights.

    Per-channel int8 needs opset 13 and int4 blocks opset 21; below 13 the pass leaves every
    weight float, so int8/int4 would never be candidates (PP-OCR models are opset 11-12).
    Upgrading once here, not in each lowered clone, also spares a converter run per
    candidate. Goes as high as the target allows; returns notes for the report.
    """
    int4 = bool(set(INT4_BLOCKS) & set(precisions))
    wanted = [21, 13] if int4 else [13]
    if not (int4 or "int8" in precisions) or module.opset >= wanted[0]:
        return []
    from dsopt.passes.upgrade_opset import UpgradeOpset

    before = module.opset
    for opset in wanted:
        if module.opset >= opset or (ctx.max_opset is not None and ctx.max_opset < opset):
            continue
        try:
            _run(module, UpgradeOpset(to=opset), ctx)
        except Exception as e:  # noqa: BLE001 - a model the converter cannot take stays
            logger.info("opset %d -> %d failed: %s", module.opset, opset, e)
        if module.opset >= opset:
            break
    if module.opset == before:
        return [] if before >= 13 else [f"opset {before} kept: no int8/int4 candidates"]
    return [f"opset {before} -> {module.opset} for quantized weights"]


def _run(module: Module, pass_: Any, ctx: PassContext) -> Mapping[str, Any]:
    """Runs one pass in place, as the pass manager would; returns its statistics."""
    local = dataclasses.replace(ctx, analyses=AnalysisManager(module))
    result = pass_.run(module, local)
    for graph in module.graphs():
        graph.nodes = topological_order(graph)
    return dict(result.stats or {})


class ErrorMeter:
    """Output error of candidate models against a reference, on fixed feeds.

    The reference runs once; `runs` counts the candidate models run since.
    """

    def __init__(self, reference: onnx.ModelProto, feeds: Iterable[Mapping[str, Any]]) -> None:
        names = [i.name for i in reference.graph.input]
        self.feeds = [{k: np.asarray(v) for k, v in f.items() if k in names} for f in feeds]
        if not self.feeds:
            raise UsageError("--precision mixed: the calibration data holds no samples")
        self.model = reference
        self.reference = self._outputs(reference)
        self._probe: tuple[str, list[np.ndarray] | None] | None = None
        self.runs = 0

    def _probed(self, name: str) -> list[np.ndarray] | None:
        """The reference's values of the intermediate tensor `name`, None if not computed.

        Only the last one is kept: `measure` walks the units one by one, and activations can
        be large.
        """
        if self._probe is None or self._probe[0] != name:
            values = None
            if _computes(self.model, name):
                try:
                    probed = self._outputs(_with_outputs(self.model, [name]))
                    values = [sample[len(self.reference[0])] for sample in probed]
                except Exception:  # noqa: BLE001 - onnxruntime rejects the probe: no SQNR
                    values = None
            self._probe = (name, values)
        return self._probe[1]

    def _outputs(self, model: onnx.ModelProto) -> list[list[np.ndarray]]:
        import onnxruntime as ort

        from dsopt import bfloat16

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if bfloat16.needs_emulation(model):  # no bf16 kernels on the CPU provider
            model = bfloat16.emulate(model)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return [[np.asarray(o) for o in session.run(None, feed)] for feed in self.feeds]

    def measure(self, model: onnx.ModelProto) -> tuple[float, float]:
        """(worst relative L2 error, worst cosine) over the float outputs, feeds pooled."""
        self.runs += 1
        return output_errors(self.reference, self._outputs(model))

    def measure_node(
        self, model: onnx.ModelProto, probe: str | None
    ) -> tuple[float, float, float | None]:
        """`measure` plus the SQNR (dB) of the intermediate tensor `probe` against the reference.

        The SQNR is None when the reference or the candidate does not compute `probe` as a
        float tensor of that name (the run is then without it).
        """
        reference = self._probed(probe) if probe is not None else None
        if probe is None or reference is None or not _computes(model, probe):
            return (*self.measure(model), None)
        self.runs += 1
        outputs = len(self.reference[0])
        try:
            got = self._outputs(_with_outputs(model, [probe]))
        except Exception:  # noqa: BLE001 - onnxruntime rejects the probe: measure without it
            self.runs -= 1
            return (*self.measure(model), None)
        rel, cos = output_errors(self.reference, [sample[:outputs] for sample in got])
        return rel, cos, _sqnr(reference, [sample[outputs] for sample in got])


def _computes(model: onnx.ModelProto, name: str) -> bool:
    """Whether a main-graph node of `model` outputs `name`."""
    return any(name in node.output for node in model.graph.node)


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the float tensors `names`.

    Each as float32 unless the model's value_info says otherwise (a unit lowered to fp16
    computes its output in fp16).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for name in names:
        elem = known.get(name) or onnx.TensorProto.FLOAT
        copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return copy


def _sqnr(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float | None:
    """10 log10(signal / noise energy) over the samples; inf when exact, None if not float."""
    r = np.concatenate([np.asarray(x, np.float64).ravel() for x in reference])
    c = np.concatenate([np.asarray(x, np.float64).ravel() for x in candidate])
    if r.shape != c.shape:
        return None
    noise = float(np.sum((r - c) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0:
        return float("inf")
    return 10 * math.log10(signal / noise) if signal > 0 else float("-inf")


def output_errors(
    reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]
) -> tuple[float, float]:
    """(worst relative L2, worst cosine) over the float outputs; per output, feeds pooled."""
    worst_rel, worst_cos = 0.0, 1.0
    for index in range(len(reference[0])):
        if reference[0][index].dtype.kind != "f":
            continue
        r = np.concatenate([s[index].ravel() for s in reference]).astype(np.float64)
        c = np.concatenate([s[index].ravel() for s in candidate]).astype(np.float64)
        norm = float(np.linalg.norm(r))
        diff = float(np.linalg.norm(c - r))
        rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
        denom = norm * float(np.linalg.norm(c))
        cos = float(np.dot(r, c) / denom) if denom > 0 else (1.0 if diff == 0 else 0.0)
        if not np.isfinite(rel):
            rel, cos = float("inf"), -1.0
        worst_rel, worst_cos = max(worst_rel, rel), min(worst_cos, cos)
    return worst_rel, worst_cos


class SensitivityCache:
    """Measured candidates keyed by (model sha256, node, precision), in memory and on disk.

    With `path`, entries load from that JSON file (if it exists) and `save` writes it back.
    The sample count is part of the key: fewer samples measure something else.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.entries = dict(json.loads(self.path.read_text()))
            except (OSError, ValueError) as e:
                raise UsageError(f"sensitivity cache {self.path} is unreadable: {e}") from e

    @staticmethod
    def key(model_sha: str, node: str, precision: str, samples: int) -> str:
        """The key of one measurement."""
        return f"{model_sha}|{node}|{precision}|{samples}"

    def get(self, key: str) -> Candidate | None:
        """The cached candidate, or None."""
        entry = self.entries.get(key)
        return Candidate(**entry) if entry is not None else None

    def put(self, key: str, candidate: Candidate) -> None:
        """Stores one measurement."""
        self.entries[key] = candidate.to_dict()

    def save(self) -> None:
        """Writes the file (no-op without a path)."""
        if self.path is not None:
            self.path.write_text(json.dumps(self.entries, indent=1, sort_keys=True) + "\n")


def measure(
    module: Module,
    units: Sequence[Unit],
    precisions: Sequence[str],
    meter: ErrorMeter,
    ctx: PassContext,
    *,
    block_size: int | None = None,
    cache: SensitivityCache | None = None,
) -> None:
    """Fills `unit.candidates` for each unit: fp32 (exact) and each allowed precision.

    A precision the pass leaves float for a unit (too small, unsupported layout) is no
    candidate. Results come from `cache` where it has them.
    """
    cache = cache if cache is not None else SensitivityCache()
    proto = module.to_proto()
    sha = hashlib.sha256(proto.SerializeToString()).hexdigest()
    if block_size is not None:
        sha += f"/b{block_size}"
    samples = len(meter.feeds)
    for unit in units:
        unit.candidates = {"fp32": Candidate("fp32", unit.fp32_bytes, 0.0, 1.0)}
        for precision in precisions:
            if precision == "fp32" or not allowed(unit, precision):
                continue
            if INT4_BLOCKS.get(precision) and (block_size or 32) >= INT4_BLOCKS[precision]:
                continue  # no smaller than `int4` itself
            key = SensitivityCache.key(sha, unit.name, precision, samples)
            candidate = cache.get(key)
            if candidate is None:
                candidate = _try(proto, units, unit, precision, meter, ctx, block_size)
                if candidate is None:
                    candidate = Candidate(precision, unit.fp32_bytes, float("nan"), float("nan"))
                cache.put(key, candidate)
            if candidate.bytes < unit.fp32_bytes and np.isfinite(candidate.rel_l2):
                unit.candidates[precision] = candidate
    cache.save()


def _try(
    module: onnx.ModelProto,
    units: Sequence[Unit],
    unit: Unit,
    precision: str,
    meter: ErrorMeter,
    ctx: PassContext,
    block_size: int | None,
) -> Candidate | None:
    lowered, sizes = lower(module, units, {unit.name: precision}, ctx, block_size=block_size)
    if sizes[unit.name] >= unit.fp32_bytes:
        return None  # the pass kept it float
    rel, cos, sqnr = meter.measure_node(lowered.to_proto(), unit.output)
    return Candidate(precision, sizes[unit.name], rel, cos, sqnr)
