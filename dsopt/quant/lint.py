"""Static lint of a QDQ model: which Q/DQ a target will not fuse, and what runs in float.

`lint(model, target)` predicts, from the runtime's declared fusion table
(`dsopt.quant.kernels`), which `DequantizeLinear -> op -> QuantizeLinear` islands become
integer kernels and which ops run in float between two requantizations (the usual reason an
INT8 model is slower than FP32), without running anything. `dsopt lint` prints it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dsopt.ir import Module
from dsopt.pattern import read_constant
from dsopt.quant.kernels import (
    COMPUTE_OPS,
    INT8_OPS,
    SHARED_SCALE_OPS,
    QdqKernels,
    kernels_for,
)

__all__ = ["FINDING_KINDS", "Finding", "LintReport", "lint"]

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_DEFAULT_DOMAINS = ("", "ai.onnx")
#: Ops a quantizer expects the runtime to fuse: float there is a missed fusion, not a float op.
_FUSABLE = frozenset(COMPUTE_OPS) | INT8_OPS | SHARED_SCALE_OPS
#: QOperator-format ops (any domain) that compute on integers (QLinear* are matched by prefix).
_INTEGER_OPS = frozenset({"ConvInteger", "MatMulInteger", "QGemm", "MatMulIntegerToFloat"})
#: Relative tolerance of "bias scale equals x_scale * w_scale" (onnxruntime compares floats).
_SCALE_RTOL = 1e-5

#: Every finding kind, with what it means.
FINDING_KINDS: dict[str, str] = {
    "unfused-qdq": "an op the runtime can fuse keeps its Q/DQ: a condition of the fusion fails",
    "float-island": "an op with no integer kernel runs in float between DequantizeLinear and "
    "QuantizeLinear",
    "per-axis-activation": "an activation quantized per axis: integer kernels take one scale",
    "dynamic-scale": "a Q/DQ scale or zero point that is computed, not constant",
    "requantize-chain": "DequantizeLinear straight into QuantizeLinear that the runtime keeps",
    "q-without-dq": "a QuantizeLinear whose integer result no DequantizeLinear or integer op reads",
    "dq-without-q": "an activation DequantizeLinear whose integer input no QuantizeLinear made",
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing the target will not fuse, with why and what to do.

    Args:
        kind: A key of `FINDING_KINDS`.
        node: The node's name ("" when it has none).
        op: Its op type (`domain::Op` outside the default domain).
        tensor: The tensor concerned (the node's first output, or the Q/DQ's input).
        message: One line: what happens, why, and what to do.
        graph: The If/Loop/Scan body holding the node ("" for the main graph).
    """

    kind: str
    node: str
    op: str
    tensor: str
    message: str
    graph: str = ""

    def to_dict(self) -> dict[str, str]:
        """The finding as JSON-ready data."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LintReport:
    """What `lint` predicts for a model on one target.

    Args:
        target: The target name ("" when none was given).
        runtime: The runtime whose fusion table was used.
        findings: Everything the runtime will not fuse, in graph order.
        qdq_nodes: QuantizeLinear and DequantizeLinear nodes in the model (all graphs).
        fused: Nodes predicted to run as integer kernels (or on the integer tensor).
        unfused: Fusable ops predicted to keep their Q/DQ (`unfused-qdq`, per-axis).
        float_ops: Ops predicted to run in float between a DequantizeLinear and a
            QuantizeLinear.
        extra_qdq: Q/DQ nodes executed around those float ops (each one a pass over a tensor).
        integer_nodes: QOperator-format nodes (QLinear*, ConvInteger, ...) found.
    """

    target: str
    runtime: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    qdq_nodes: int = 0
    fused: int = 0
    unfused: int = 0
    float_ops: int = 0
    extra_qdq: int = 0
    integer_nodes: int = 0

    @property
    def quantized(self) -> bool:
        """Whether the model holds any Q/DQ or QOperator node (else there is nothing to lint)."""
        return bool(self.qdq_nodes or self.integer_nodes)

    def counts(self) -> dict[str, int]:
        """Findings per kind."""
        counts: dict[str, int] = {}
        for finding in self.findings:
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
        return counts

    def summary(self) -> str:
        """One line: fused, unfused, float ops and extra Q/DQ."""
        if not self.quantized:
            return (
                "no QuantizeLinear/DequantizeLinear nodes: nothing to lint "
                "(quantize with --precision int8 first)"
            )
        return (
            f"{self.runtime}: {self.fused} nodes fused, {self.unfused} unfused, "
            f"{self.float_ops} float ops between requantizations, "
            f"~{self.extra_qdq} extra Q/DQ executed; {len(self.findings)} findings"
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "target": self.target,
            "runtime": self.runtime,
            "summary": {
                "qdq_nodes": self.qdq_nodes,
                "integer_nodes": self.integer_nodes,
                "fused": self.fused,
                "unfused": self.unfused,
                "float_ops": self.float_ops,
                "extra_qdq": self.extra_qdq,
                "findings": self.counts(),
            },
            "findings": [f.to_dict() for f in self.findings],
        }


def lint(
    model: Module | onnx.ModelProto | str | os.PathLike[str], target: Any = None
) -> LintReport:
    """Predicts what `target`'s runtime fuses of the model's Q/DQ, without running it.

    Args:
        model: A Module, a ModelProto or a path to an .onnx file.
        target: A `dsopt.backend.Target` (None: onnxruntime CPU); its fusion table comes
            from `dsopt.quant.kernels.kernels_for`.

    Returns:
        The findings and counts, every graph (If/Loop/Scan bodies too) included.

    Raises:
        ModelError: The path is not a readable model.
    """
    if isinstance(model, onnx.ModelProto):
        module = Module.from_proto(model)
    elif isinstance(model, Module):
        module = model
    else:
        module = Module.load(model)
    kernels = kernels_for(target)
    report = LintReport(target=getattr(target, "name", "") or "", runtime=kernels.runtime)
    for index, graph in enumerate(module.graphs()):
        _GraphLinter(graph, kernels, report, "" if index == 0 else graph.name).run()
    return report


@dataclasses.dataclass(frozen=True)
class _Params:
    """The constant parameters of one Q or DQ node."""

    scale: np.ndarray
    zero: np.ndarray
    dtype: np.dtype[Any]

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    def same(self, other: _Params) -> bool:
        return (
            self.dtype == other.dtype
            and self.scale.size == other.scale.size
            and np.array_equal(self.scale.reshape(-1), other.scale.reshape(-1))
            and np.array_equal(self.zero.reshape(-1), other.zero.reshape(-1))
        )

    def representable(self) -> tuple[float, float]:
        """The float range the integer type covers (per-tensor parameters)."""
        info = np.iinfo(self.dtype)
        scale, zero = float(self.scale.reshape(-1)[0]), float(self.zero.reshape(-1)[0])
        return (info.min - zero) * scale, (info.max - zero) * scale


@dataclasses.dataclass(frozen=True)
class _Verdict:
    """What the runtime does with one node: `integer`, `removed` or `float` (and why)."""

    status: str
    why: str = ""
    kind: str = ""
    #: Merged into the op before it (Conv + Relu -> FusedConv): reported with that op.
    merged: bool = False


_INTEGER = _Verdict("integer")
_REMOVED = _Verdict("removed")


class _GraphLinter:
    """Classifies every node of one graph and appends its findings to the report."""

    def __init__(
        self, graph: gs.Graph, kernels: QdqKernels, report: LintReport, label: str
    ) -> None:
        self.graph = graph
        self.label = label
        self.kernels = kernels
        self.report = report
        self.outputs = {id(t) for t in graph.outputs}
        self.verdicts: dict[int, _Verdict] = {}

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _is(node: gs.Node, op: str) -> bool:
        return node.op == op and (node.domain or "") in _DEFAULT_DOMAINS

    @staticmethod
    def _producer(tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    def _dq_of(self, tensor: gs.Tensor) -> gs.Node | None:
        producer = self._producer(tensor)
        return producer if producer is not None and self._is(producer, _DQ) else None

    def _params(self, node: gs.Node) -> _Params | None:
        """The Q/DQ's constant parameters; None when a scale or zero point is computed."""
        scale = read_constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if scale is None:
            return None
        zero: np.ndarray | None
        if len(node.inputs) > 2 and node.inputs[2].name:
            zero = read_constant(node.inputs[2])
            if zero is None:
                return None
        else:
            zero = None
        if zero is not None:
            dtype = np.dtype(zero.dtype)
        elif self._is(node, _Q):
            to = int(node.attrs.get("output_dtype", 0) or onnx.TensorProto.UINT8)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
        else:
            source = node.inputs[0]
            dtype = np.dtype(source.dtype) if source.dtype is not None else np.dtype(np.uint8)
        if zero is None:
            zero = np.zeros(np.shape(scale), dtype)
        if dtype.kind not in "iu":
            dtype = np.dtype(np.uint8)
        return _Params(np.asarray(scale), np.asarray(zero), dtype)

    def _readers(self, tensor: gs.Tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    def _sole_q(self, tensor: gs.Tensor) -> gs.Node | None:
        readers = self._readers(tensor)
        if id(tensor) in self.outputs or len(readers) != 1 or not self._is(readers[0], _Q):
            return None
        return readers[0]

    @staticmethod
    def _label(node: gs.Node) -> str:
        return node.op if (node.domain or "") in _DEFAULT_DOMAINS else f"{node.domain}::{node.op}"

    def _add(self, kind: str, node: gs.Node, tensor: str, message: str) -> None:
        self.report.findings.append(
            Finding(kind, node.name or "", self._label(node), tensor, message, self.label)
        )

    # -- classification ----------------------------------------------------------------------
    def run(self) -> None:
        """Classifies the nodes, finds the float islands, writes findings and counts."""
        nodes = list(self.graph.nodes)
        qdq = [n for n in nodes if self._is(n, _Q) or self._is(n, _DQ)]
        self.report.qdq_nodes += len(qdq)
        for node in qdq:
            self._check_qdq(node)
        for node in nodes:
            if id(node) in self.verdicts or self._is(node, _Q) or self._is(node, _DQ):
                continue
            if not self._in_region(node):
                continue
            self.verdicts[id(node)] = self._classify(node)
        between = self._between_requantizations(nodes)
        for node in nodes:
            verdict = self.verdicts.get(id(node))
            if verdict is None:
                continue
            if verdict.status == "integer":
                self.report.fused += 1
            if id(node) not in between or verdict.status != "float" or verdict.merged:
                continue
            kind = verdict.kind or ("unfused-qdq" if node.op in _FUSABLE else "float-island")
            if kind != "float-island":
                self.report.unfused += 1
            self._add(
                kind, node, node.outputs[0].name if node.outputs else "", self._say(node, verdict)
            )
        self.report.float_ops += len(between)
        self.report.extra_qdq += self._adjacent_qdq(n for n in nodes if id(n) in between)

    def _say(self, node: gs.Node, verdict: _Verdict) -> str:
        head = f"{self._label(node)} runs in float between DequantizeLinear and QuantizeLinear"
        advice = self.kernels.float_advice.format(op=node.op)
        plain = node.op in _FUSABLE or node.op in self.kernels.absorbed
        if plain or verdict.kind == "per-axis-activation" or advice in ("", verdict.why):
            return f"{head}: {verdict.why}"
        return f"{head}: {verdict.why}; {advice}"

    def _in_region(self, node: gs.Node) -> bool:
        """Reads a DequantizeLinear, feeds a QuantizeLinear, or is a QOperator node."""
        if self._integer_op(node) or self._qoperator_key(node) in self.kernels.qoperator:
            return True
        if any(self._dq_of(t) is not None for t in node.inputs):
            return True
        return any(self._is(r, _Q) for t in node.outputs for r in t.outputs)

    @staticmethod
    def _qoperator_key(node: gs.Node) -> str:
        return f"{node.domain}::{node.op}" if node.domain else node.op

    def _integer_op(self, node: gs.Node) -> bool:
        return node.op.startswith("QLinear") or node.op in _INTEGER_OPS

    def _classify(self, node: gs.Node) -> _Verdict:
        kernels = self.kernels
        key = self._qoperator_key(node)
        if key in kernels.qoperator:
            return _Verdict("float", kernels.qoperator[key], "float-island")
        if self._integer_op(node):
            self.report.integer_nodes += 1
            return _INTEGER
        if (node.domain or "") not in _DEFAULT_DOMAINS:
            return _Verdict("float", f"{kernels.runtime} has no integer form of it")
        if node.op in kernels.removed:
            return _REMOVED
        if not kernels.fuses_anything():
            return _Verdict("float", kernels.float_advice.format(op=node.op))
        if node.op in kernels.compute:
            return self._compute(node)
        if node.op in kernels.int8:
            return self._int8(node)
        if node.op in kernels.shared_scale:
            return self._shared_scale(node)
        if node.op in kernels.absorbed:
            return self._activation(node)
        why = kernels.float_reasons.get(node.op, f"{kernels.runtime} has no int8 kernel for it")
        return _Verdict("float", why)

    def _operand(self, node: gs.Node, index: int, role: str) -> tuple[_Params | None, str]:
        """The parameters of the DQ feeding input `index`, or why there is none usable."""
        tensor = node.inputs[index]
        dq = self._dq_of(tensor)
        if dq is None:
            if read_constant(tensor) is not None:
                return None, (
                    f"its {role} '{tensor.name}' is a float constant, not dequantized; "
                    "store it as an integer constant behind a DequantizeLinear"
                )
            return None, (
                f"its {role} '{tensor.name}' is not dequantized; put QuantizeLinear -> "
                "DequantizeLinear on it"
            )
        params = self._params(dq)
        if params is None:
            return None, f"the DequantizeLinear of its {role} has computed parameters"
        return params, ""

    def _compute(self, node: gs.Node) -> _Verdict:
        weight_index = self.kernels.compute[node.op]
        if len(node.inputs) <= weight_index:
            return _Verdict("float", "it has no weight input")
        x_params, why = self._operand(node, 0, "input")
        if x_params is None:
            return _Verdict("float", why)
        if not x_params.per_tensor:
            return _Verdict(
                "float",
                f"its input '{node.inputs[0].name}' is quantized per axis; QLinear kernels take "
                "one input scale (onnxruntime 1.32 fuses a Conv anyway and fails at run time): "
                "quantize activations per tensor",
                "per-axis-activation",
            )
        w_params, why = self._operand(node, weight_index, "weight")
        if w_params is None:
            return _Verdict("float", why)
        weight_dq = self._dq_of(node.inputs[weight_index])
        assert weight_dq is not None
        constant_weight = read_constant(weight_dq.inputs[0]) is not None
        if node.op == "Conv":
            if not constant_weight:
                return _Verdict(
                    "float",
                    "its weight DequantizeLinear reads a computed tensor (QAT Q -> DQ on a float "
                    "weight?); fold it to an integer constant first (fold-qdq)",
                )
            axis = int(weight_dq.attrs.get("axis", 1))
            if not w_params.per_tensor and axis != 0:
                return _Verdict("float", f"its weight is quantized along axis {axis}, not 0")
        elif not w_params.per_tensor and node.op == "MatMul" and not constant_weight:
            return _Verdict("float", "its second input is quantized per axis and not constant")
        if len(node.inputs) > 2 and node.inputs[2].name:
            why = self._bias_problem(node, x_params, w_params)
            if why:
                return _Verdict("float", why)
        out = node.outputs[0]
        readers = self._readers(out)
        activation = None
        if (
            len(readers) == 1
            and readers[0].op in self.kernels.absorbed
            and id(out) not in self.outputs
        ):
            activation = readers[0]
            out = activation.outputs[0]
        q = self._sole_q(out)
        if q is None:
            if any(self._is(r, _Q) for r in self._readers(out)):
                return _Verdict(
                    "float",
                    f"its result '{out.name}' is read by other nodes besides its "
                    "QuantizeLinear; give the other readers their own DequantizeLinear",
                )
            if activation is None and node.op in self.kernels.float_output and constant_weight:
                return _INTEGER
            return _Verdict(
                "float",
                f"its result '{out.name}' is not quantized; {node.op} fuses only with a "
                "QuantizeLinear after it",
            )
        q_params = self._params(q)
        if q_params is None:
            return _Verdict("float", "the QuantizeLinear after it has computed parameters")
        if not q_params.per_tensor:
            return _Verdict(
                "float",
                f"its result '{out.name}' is quantized per axis: quantize it per tensor",
                "per-axis-activation",
            )
        if activation is not None:
            if self._absorbable(activation, q_params):
                self.verdicts[id(activation)] = _REMOVED
            else:
                self.verdicts[id(activation)] = _Verdict("float", "", merged=True)
                return _Verdict(
                    "float",
                    f"the {activation.op} after it is not absorbed: "
                    f"{self._absorb_problem(activation, q_params)}",
                )
        return _INTEGER

    def _bias_problem(self, node: gs.Node, x: _Params, w: _Params) -> str:
        bias = node.inputs[2]
        value = read_constant(bias)
        if value is not None:
            return "" if value.dtype == np.float32 else f"its bias has type {value.dtype}"
        dq = self._dq_of(bias)
        if dq is None or read_constant(dq.inputs[0]) is None:
            return f"its bias '{bias.name}' is neither a constant nor a DequantizeLinear of one"
        params = self._params(dq)
        if params is None or params.dtype != np.int32:
            return "its bias DequantizeLinear is not int32 with constant parameters"
        expected = x.scale.astype(np.float32).reshape(-1) * w.scale.astype(np.float32).reshape(-1)
        try:
            close = np.allclose(
                params.scale.reshape(-1), np.broadcast_to(expected, params.scale.reshape(-1).shape),
                rtol=_SCALE_RTOL, atol=0.0,
            )  # fmt: skip
        except ValueError:
            close = False
        if not close:
            return (
                "its int32 bias scale is not input_scale * weight_scale; requantize the bias "
                "with that scale"
            )
        return ""

    def _absorbable(self, activation: gs.Node, q: _Params) -> bool:
        return not self._absorb_problem(activation, q)

    def _absorb_problem(self, activation: gs.Node, q: _Params) -> str:
        """Why the runtime cannot drop this Relu/Clip into the Q's clamp ("" when it can)."""
        if not q.per_tensor:
            return "the QuantizeLinear after it is per axis"
        low, high = q.representable()
        if activation.op == "Relu":
            if low == 0.0 or float(q.zero.reshape(-1)[0]) == np.iinfo(q.dtype).min:
                return ""
            return (
                f"the QuantizeLinear after it has zero point {int(q.zero.reshape(-1)[0])}, not "
                f"the {q.dtype} minimum {np.iinfo(q.dtype).min}; calibrate the Relu's output "
                "(min 0) so that its zero point is the minimum"
            )
        clip_low = self._clip_bound(activation, 1, "min", -np.inf)
        clip_high = self._clip_bound(activation, 2, "max", np.inf)
        if clip_low is None or clip_high is None:
            return "its bounds are computed"
        # float32 scales make the Q's range end a few ulps off a written bound (12.75 vs
        # 255 * float32(0.05)); onnxruntime compares with a tolerance too.
        slack = 1e-5 * max(abs(low), abs(high), float(q.scale.reshape(-1)[0]))
        if clip_low <= low + slack and clip_high >= high - slack:
            return ""
        return (
            f"its range [{clip_low:g}, {clip_high:g}] is narrower than the QuantizeLinear's "
            f"[{low:g}, {high:g}]; quantize the Clip's output over exactly its range"
        )

    @staticmethod
    def _clip_bound(node: gs.Node, index: int, attr: str, default: float) -> float | None:
        if len(node.inputs) > index and node.inputs[index].name:
            value = read_constant(node.inputs[index])
            return None if value is None else float(np.asarray(value).reshape(-1)[0])
        return float(node.attrs.get(attr, default))

    def _activation(self, node: gs.Node) -> _Verdict:
        """A Relu/Clip not right after a fused op: dropped when the next Q clamps the same."""
        q = self._sole_q(node.outputs[0])
        q_params = self._params(q) if q is not None else None
        if q_params is None:
            return _Verdict("float", self.kernels.float_reasons.get(node.op, "no int8 kernel"))
        problem = self._absorb_problem(node, q_params)
        return _REMOVED if not problem else _Verdict("float", problem)

    def _int8(self, node: gs.Node) -> _Verdict:
        data = [i for i, t in enumerate(node.inputs) if t.name]
        if node.op not in ("Add", "Mul", "Concat"):
            data = data[:1]
        for index in data:
            params, why = self._operand(node, index, f"input {index}")
            if params is None:
                return _Verdict("float", why)
            if not params.per_tensor:
                return _Verdict(
                    "float",
                    f"its input '{node.inputs[index].name}' is quantized per axis; QLinear "
                    f"{node.op} takes one scale: quantize it per tensor",
                    "per-axis-activation",
                )
        q = self._sole_q(node.outputs[0])
        if q is None:
            return _Verdict(
                "float",
                f"its result '{node.outputs[0].name}' is not quantized (or read by other nodes "
                "too); QLinear ops need one QuantizeLinear after them",
            )
        q_params = self._params(q)
        if q_params is None or not q_params.per_tensor:
            return _Verdict("float", "the QuantizeLinear after it is per axis or computed")
        return _INTEGER

    def _shared_scale(self, node: gs.Node) -> _Verdict:
        if node.op in self.kernels.nearest_only:
            mode = node.attrs.get("mode", "nearest")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            if mode != "nearest":
                return _Verdict("float", self.kernels.float_reasons.get(node.op, "not nearest"))
        dq = self._dq_of(node.inputs[0]) if node.inputs else None
        params = self._params(dq) if dq is not None else None
        if params is None:
            return _Verdict("float", "its input is not dequantized with constant parameters")
        for out in node.outputs:
            q = self._sole_q(out)
            q_params = self._params(q) if q is not None else None
            if q_params is None:
                return _Verdict(
                    "float", f"its result '{out.name}' is not quantized by one QuantizeLinear"
                )
            if not q_params.same(params):
                return _Verdict(
                    "float",
                    "its input and output are quantized with different parameters; "
                    f"{self.kernels.runtime} drops the Q/DQ only when they are equal",
                )
        return _INTEGER

    # -- islands -----------------------------------------------------------------------------
    def _between_requantizations(self, nodes: list[gs.Node]) -> set[int]:
        """Float nodes on a path of float nodes from an activation DQ to a QuantizeLinear."""
        float_ids = {id(n) for n in nodes if self.verdicts.get(id(n), _INTEGER).status == "float"}
        forward: set[int] = set()
        # Weight-only DQs do not start an island: the op's input was never quantized.
        stack = [
            n for n in nodes if id(n) in float_ids and any(self._activation_dq(t) for t in n.inputs)
        ]
        while stack:
            node = stack.pop()
            if id(node) in forward:
                continue
            forward.add(id(node))
            stack += [r for t in node.outputs for r in t.outputs if id(r) in float_ids]
        backward: set[int] = set()
        stack = [
            n
            for n in nodes
            if id(n) in forward and any(self._is(r, _Q) for t in n.outputs for r in t.outputs)
        ]
        while stack:
            node = stack.pop()
            if id(node) in backward:
                continue
            backward.add(id(node))
            for tensor in node.inputs:
                producer = self._producer(tensor)
                if producer is not None and id(producer) in forward:
                    stack.append(producer)
        return backward

    def _activation_dq(self, tensor: gs.Tensor) -> bool:
        dq = self._dq_of(tensor)
        return dq is not None and read_constant(dq.inputs[0]) is None

    def _adjacent_qdq(self, nodes: Iterable[gs.Node]) -> int:
        """Activation Q/DQ nodes reading or feeding the given nodes (each runs once)."""
        seen: set[int] = set()
        for node in nodes:
            seen.update(id(t.inputs[0]) for t in node.inputs if self._activation_dq(t))
            for tensor in node.outputs:
                seen.update(id(r) for r in tensor.outputs if self._is(r, _Q))
        return len(seen)

    # -- the Q/DQ nodes themselves -----------------------------------------------------------
    def _check_qdq(self, node: gs.Node) -> None:
        source = node.inputs[0]
        is_q = self._is(node, _Q)
        constant_input = read_constant(source) is not None
        params = self._params(node)
        if params is None:
            self._add(
                "dynamic-scale",
                node,
                source.name,
                f"{node.op} of '{source.name}' has a computed scale or zero point: no runtime "
                "fuses it; make the parameters constants (calibrate)",
            )
            return
        if constant_input:
            return
        producer = self._producer(source)
        if not params.per_tensor and (is_q or producer is None or not self._is(producer, _Q)):
            self._add(
                "per-axis-activation",
                node,
                source.name,
                f"activation '{source.name}' is quantized per axis ({params.scale.size} "
                "scales): integer kernels take one activation scale, so the ops around it "
                "stay float; quantize activations per tensor",
            )
        if is_q:
            self._check_q(node, params)
        elif producer is not None and not (
            self._is(producer, _Q) or self._integer_op(producer) or producer.op in _FUSABLE
        ):
            self._add(
                "dq-without-q",
                node,
                source.name,
                f"DequantizeLinear reads '{source.name}', made by {self._label(producer)}, "
                "not by a QuantizeLinear or an integer op",
            )

    def _check_q(self, node: gs.Node, params: _Params) -> None:
        out = node.outputs[0]
        readers = self._readers(out)
        if (
            id(out) not in self.outputs
            and readers
            and not any(self._is(r, _DQ) or self._integer_op(r) for r in readers)
        ):
            names = ", ".join(sorted({self._label(r) for r in readers}))
            self._add(
                "q-without-dq",
                node,
                out.name,
                f"the integer tensor '{out.name}' is read only by {names}, not by a "
                "DequantizeLinear or an integer op",
            )
        source = node.inputs[0]
        dq = self._dq_of(source)
        if dq is None:
            return
        dq_params = self._params(dq)
        if dq_params is None or dq_params.same(params):
            return
        # onnxruntime removes Q1 -> DQ1 -> Q2 -> DQ2 when each has one reader (a requantization
        # that folds into the op before); anything else runs both ops.
        upstream = self._producer(dq.inputs[0])
        removable = (
            self.kernels.fuses_anything()
            and len(self._readers(source)) == 1
            and upstream is not None
            and self._is(upstream, _Q)
            and len(self._readers(dq.inputs[0])) == 1
            and dq_params.dtype == params.dtype
        )
        if not removable:
            self._add(
                "requantize-chain",
                node,
                source.name,
                f"'{source.name}' is dequantized and quantized again with other parameters: "
                "two passes over the tensor; quantize it once with the parameters its reader "
                "needs",
            )
