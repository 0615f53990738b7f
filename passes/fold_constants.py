"""Evaluate nodes whose inputs are all constant and replace their results by constants."""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx

from dsopt import Module, Pass, PassContext, PassResult
from dsopt.analysis import AnalysisManager, Shapes, TensorType
from dsopt.pattern import dropout_in_training, node_subgraphs, read_constant, redirect_readers

__all__ = [
    "FoldConstants",
    "constant_node_supports",
    "is_constant",
    "replace_with_constants",
]

logger = logging.getLogger(__name__)

_MIB = 2**20

#: Ops whose results change from run to run: folding would freeze one draw. The last three
#: are com.microsoft training dropouts.
_NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "BiasDropout",
        "BitmaskDropout",
        "BitmaskBiasDropout",
    }
)

#: Ops whose results are sequences or optionals, which a gs.Constant cannot hold.
_NON_TENSOR_RESULTS = frozenset(
    {
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceInsert",
        "SequenceErase",
        "SplitToSequence",
        "Optional",
    }
)

#: Kept on purpose: DequantizeLinear(int8 weight) is the pattern the qdq stage and int8
#: runtimes consume; folding it would turn quantized weights back into float ones.
_KEPT = frozenset({"DequantizeLinear"})

#: Domains whose ops onnxruntime (or the reference evaluator) can run.
_EVALUABLE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

#: Above this many input bytes the one-node model no longer fits a protobuf for onnxruntime.
_ORT_PROTO_LIMIT = 2**31 - 2**26


@dataclasses.dataclass(frozen=True)
class FoldConstants(Pass):
    """op(c1, c2, ...) -> t   ==>   initializer t = op(c1, c2, ...).

    Rules:
      1. A node whose inputs are all constants (initializers, Constant-node outputs, absent
         optional inputs) is evaluated by onnxruntime on a one-node model, or by
         `onnx.reference.ReferenceEvaluator` when onnxruntime cannot; its results become
         initializers with the same names and exactly the dtype the op produces. Nodes are
         visited as a worklist, so whole chains fold in one run, in subgraphs too (outer-scope
         constants count as constants).
      2. A result that is a graph output is produced by a `Constant` node instead, so the
         output keeps a producer in every runtime (skipped when the opset's Constant cannot
         hold the dtype, e.g. int64 before opset 9).
      3. `If` with a constant condition is replaced by the chosen branch's nodes (plus an
         Identity per output) when no name in the branch clashes with another scope.
      4. Size cap: a fold whose results are larger than its constant inputs is skipped
         (`skipped-too-large`) when a result would exceed `max_size_mb`, or the constant
         bytes would grow by more than `max_growth_bytes` (ConstantOfShape/Expand/Tile/Range
         generating weights stay nodes: the model does not grow).
      5. Never folded: Constant nodes, nondeterministic ops (RandomNormal, Bernoulli, ...),
         Dropout in training mode, ops with subgraphs (other than rule 3), DequantizeLinear
         (kept for the qdq stage), ops of other domains than ai.onnx, ai.onnx.ml and
         com.microsoft, calls to model-local functions, and sequence/optional results.
         A node neither evaluator can run is skipped (`skipped-unsupported`).

    Exact: onnxruntime's own kernels compute the values it would compute at run time.
    """

    name = "fold-constants"
    summary = "evaluate nodes with all-constant inputs and replace their results by constants"
    stage = "canonicalize"
    exactness = "exact"

    max_size_mb: float = dataclasses.field(
        default=1.0,
        metadata={"help": "largest result (MiB) to materialize when it is bigger than its inputs"},
    )
    max_growth_bytes: int = dataclasses.field(
        default=128,
        metadata={
            "help": "most bytes one fold may add to the constants (room for shape-sized "
            "tensors; raise it to materialize generated weights)"
        },
    )

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Folds every graph, outermost first, so inner graphs see folded outer constants."""
        analyses = ctx.analyses if ctx.analyses is not None else AnalysisManager(module)
        folder = _Folder(self, module, analyses)
        folder.fold_tree(module.graph)
        stats = {
            "folded": folder.stats["folded"],
            "if-inlined": folder.stats["if-inlined"],
            "skipped-too-large": folder.stats["skipped-too-large"],
            "skipped-unsupported": folder.stats["skipped-unsupported"],
        }
        changed = bool(stats["folded"] or stats["if-inlined"])
        return PassResult(changed, stats)

    def too_large(self, result_bytes: int, input_bytes: int) -> bool:
        """Whether materializing `result_bytes` from `input_bytes` of constants is refused."""
        if result_bytes <= input_bytes:
            return False
        return (
            result_bytes > self.max_size_mb * _MIB
            or result_bytes - input_bytes > self.max_growth_bytes
        )


# -- helpers shared with other passes ----------------------------------------------------------
def is_constant(tensor: gs.Tensor) -> bool:
    """Whether `tensor` has a known value.

    That is an initializer, an absent optional input, or the output of a (dense, non-string)
    Constant node. Lazily loaded initializer data stays unloaded.
    """
    if isinstance(tensor, gs.Constant):
        return True
    if not tensor.name:
        return True  # an absent optional input
    producers = tensor.inputs
    if len(producers) == 1 and producers[0].op == "Constant" and not producers[0].domain:
        value = read_constant(tensor)
        return value is not None and value.dtype.kind not in "OSU"
    return False


def replace_with_constants(
    node: gs.Node, values: Sequence[np.ndarray | None], graph_outputs: set[int]
) -> list[gs.Node]:
    """Detaches `node` and hands each output's consumers a gs.Constant holding its value.

    An output whose id is in `graph_outputs` (outputs of any graph of the module: a subgraph
    may name an outer tensor as its output) keeps its tensor, produced by a new `Constant`
    node; those nodes are returned (the caller puts them where `node` was). `values[i]` is
    None for an absent (empty-named) output.
    """
    pairs = [(out, value) for out, value in zip(node.outputs, values, strict=True) if out.name]
    node.inputs.clear()
    node.outputs.clear()
    constant_nodes: list[gs.Node] = []
    for out, value in pairs:
        assert value is not None
        if id(out) in graph_outputs:
            suffix = f"_{len(constant_nodes)}" if constant_nodes and node.name else ""
            constant_nodes.append(
                gs.Node(
                    "Constant",
                    name=f"{node.name}{suffix}" if node.name else None,
                    attrs={"value": gs.Constant(out.name, value)},
                    outputs=[out],
                )
            )
            continue
        redirect_readers(out, gs.Constant(out.name, value))
    return constant_nodes


@functools.cache
def _constant_types(opset: int) -> frozenset[str]:
    try:
        schema = onnx.defs.get_schema("Constant", opset)
    except onnx.defs.SchemaError:
        return frozenset()
    return frozenset(t for c in schema.type_constraints for t in c.allowed_type_strs)


def constant_node_supports(opset: int, dtype: Any) -> bool:
    """Whether a `Constant` node of the default-domain `opset` may hold `dtype`.

    Constant-1 holds only float types, bfloat16 needs opset 13, float8 opset 19, and so on.
    """
    try:
        elem = dtype_to_onnx(np.dtype(dtype))
        name = onnx.TensorProto.DataType.Name(elem).lower()
    except (KeyError, TypeError, ValueError):
        return False
    return f"tensor({name})" in _constant_types(opset)


def _byte_size(shape: Sequence[Any] | None, dtype: Any) -> int | None:
    if shape is None or not all(isinstance(d, (int, np.integer)) for d in shape):
        return None
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        return None
    return int(np.prod(shape, dtype=np.int64)) * int(itemsize)


def _input_bytes(node: gs.Node) -> int:
    """Bytes of the node's distinct constant inputs plus its tensor attributes."""
    seen: set[int] = set()
    total = 0
    for tensor in node.inputs:
        if id(tensor) in seen or not tensor.name:
            continue
        seen.add(id(tensor))
        if isinstance(tensor, gs.Constant):
            total += _byte_size(tensor.shape, tensor.dtype) or 0
        else:
            value = read_constant(tensor)
            total += 0 if value is None else int(value.nbytes)
    for value in node.attrs.values():
        if isinstance(value, gs.Constant):
            total += _byte_size(value.shape, value.dtype) or 0
    return total


# -- the folding engine ------------------------------------------------------------------------
class _Folder:
    """One run of FoldConstants over a module: worklist folding per graph, plus statistics."""

    def __init__(self, pass_: FoldConstants, module: Module, analyses: AnalysisManager) -> None:
        self.pass_ = pass_
        self.module = module
        self.analyses = analyses
        self.stats: collections.Counter[str] = collections.Counter()
        self._types: dict[str, TensorType] | None = None
        self._names: dict[str, set[int]] | None = None
        self._functions = {(f.domain or "", f.name) for f in module.graph.functions}
        imports = dict(module.facts.opset_imports)
        for graph in module.graphs():
            for node in graph.nodes:
                imports.setdefault(node.domain or "", 1)
        self._opset_imports = [onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items())]
        self._ir_version = max(4, module.facts.ir_version)
        self.graph_outputs = {id(t) for g in module.graphs() for t in g.outputs}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 4
        # Prepacked kernels (used when an operand is an initializer, as every input is here)
        # round differently from the ones a computed operand gets in the full graph.
        options.add_session_config_entry("session.disable_prepacking", "1")
        self._ort_options = options

    @property
    def types(self) -> dict[str, TensorType]:
        """Inferred types of the module as it was when the pass started (names do not change)."""
        if self._types is None:
            self._types = self.analyses.get(Shapes)
        return self._types

    # -- traversal ---------------------------------------------------------------------------
    def fold_tree(self, graph: gs.Graph) -> None:
        """Folds `graph`, then the subgraphs of the nodes that remain, depth first."""
        self.fold_graph(graph)
        for node in graph.nodes:
            for subgraph in node_subgraphs(node):
                self.fold_tree(subgraph)

    def fold_graph(self, graph: gs.Graph) -> None:
        """Worklist folding of one graph; replaced nodes are swapped in place at the end."""
        members = {id(n) for n in graph.nodes}
        replacements: dict[int, list[gs.Node]] = {}
        queue = collections.deque(n for n in graph.nodes if self._ready(n))
        queued = {id(n) for n in queue}
        while queue:
            node = queue.popleft()
            consumers = [c for t in node.outputs for c in t.outputs]
            new_nodes = self._fold(graph, node)
            if new_nodes is None:
                continue
            replacements[id(node)] = new_nodes
            members.update(id(n) for n in new_nodes)
            for candidate in [*new_nodes, *consumers]:
                if (
                    id(candidate) in members
                    and id(candidate) not in queued
                    and self._ready(candidate)
                ):
                    queued.add(id(candidate))
                    queue.append(candidate)
        if replacements:
            graph.nodes = list(_expand(graph.nodes, replacements))

    def _ready(self, node: gs.Node) -> bool:
        return (
            bool(node.outputs)
            and node.op != "Constant"
            and all(is_constant(t) for t in node.inputs)
        )

    # -- one node ----------------------------------------------------------------------------
    def _fold(self, graph: gs.Graph, node: gs.Node) -> list[gs.Node] | None:
        """Folds `node`; returns the nodes that replace it ([] when none), or None if kept."""
        if node.op == "If" and node.domain in ("", "ai.onnx"):
            return self._inline_if(graph, node)
        if self._kept(node):
            return None
        input_bytes = _input_bytes(node)
        estimate = self._estimated_bytes(node)
        if estimate is not None and self.pass_.too_large(estimate, input_bytes):
            self.stats["skipped-too-large"] += 1
            return None
        values = self._evaluate(node)
        if values is None:
            self.stats["skipped-unsupported"] += 1
            return None
        produced = sum(int(v.nbytes) for v in values if v is not None)
        if self.pass_.too_large(produced, input_bytes):
            self.stats["skipped-too-large"] += 1
            return None
        if not all(
            constant_node_supports(self.module.opset, value.dtype)
            for out, value in zip(node.outputs, values, strict=True)
            if value is not None and id(out) in self.graph_outputs
        ):
            self.stats["skipped-unsupported"] += 1  # a graph output needs a Constant node
            return None
        self.stats["folded"] += 1
        return replace_with_constants(node, values, self.graph_outputs)

    def _kept(self, node: gs.Node) -> bool:
        """Policy: nodes that must not be folded even though their inputs are constant."""
        domain = node.domain or ""
        if node.op in _NONDETERMINISTIC or node.op in _NON_TENSOR_RESULTS or node.op in _KEPT:
            return True
        if domain not in _EVALUABLE_DOMAINS or (domain, node.op) in self._functions:
            return True
        if any(True for _ in node_subgraphs(node)):
            return True
        return node.op == "Dropout" and dropout_in_training(node, self.module.opset)

    def _estimated_bytes(self, node: gs.Node) -> int | None:
        """Result bytes from shape inference, or None when a result's size is unknown."""
        total = 0
        for out in node.outputs:
            if not out.name:
                continue
            found = self.types.get(out.name)
            size = None if found is None else _byte_size(found.shape, found.dtype)
            if size is None:
                return None
            total += size
        return total

    def _evaluate(self, node: gs.Node) -> list[np.ndarray | None] | None:
        """Runs `node` alone; the results in output order (None for absent outputs)."""
        try:
            model = self._one_node_model(node)
        except Exception as e:  # noqa: BLE001 - exporting odd attributes may fail
            logger.debug("cannot export %s (%s) for folding: %s", node.name, node.op, e)
            return None
        names = [out.name for out in node.outputs if out.name]
        results = self._run_ort(model, node)
        if results is None:
            results = self._run_reference(model, node)
        if results is None or len(results) != len(names):
            return None
        expected = self._expected_dtypes(model, names)
        by_name: dict[str, np.ndarray] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, np.generic):
                result = np.asarray(result)
            if not isinstance(result, np.ndarray) or result.dtype.kind in "OSU":
                return None
            want = expected.get(name)
            if want is not None and result.dtype != want:
                logger.debug(
                    "%s (%s): got %s, the op produces %s", node.name, node.op, result.dtype, want
                )
                return None
            try:
                dtype_to_onnx(result.dtype)
            except (KeyError, TypeError, ValueError):
                return None
            by_name[name] = np.asarray(result, order="C")  # keeps 0-d (ascontiguousarray does not)
        return [by_name[out.name] if out.name else None for out in node.outputs]

    def _one_node_model(self, node: gs.Node) -> onnx.ModelProto:
        initializers: dict[str, onnx.TensorProto] = {}
        for tensor in node.inputs:
            if not tensor.name or tensor.name in initializers:
                continue
            if isinstance(tensor, gs.Constant):
                initializers[tensor.name] = OnnxExporter.export_tensor_proto(tensor)
            else:
                value = read_constant(tensor)
                assert value is not None
                initializers[tensor.name] = OnnxExporter.export_tensor_proto(
                    gs.Constant(tensor.name, value)
                )
        outputs = [
            onnx.helper.make_value_info(out.name, onnx.TypeProto())
            for out in node.outputs
            if out.name
        ]
        graph = onnx.helper.make_graph(
            [OnnxExporter.export_node(node)], "fold", [], outputs, list(initializers.values())
        )
        return onnx.helper.make_model(
            graph, opset_imports=self._opset_imports, ir_version=self._ir_version
        )

    def _run_ort(self, model: onnx.ModelProto, node: gs.Node) -> list[Any] | None:
        if model.ByteSize() > _ORT_PROTO_LIMIT:
            return None
        try:
            session = ort.InferenceSession(
                model.SerializeToString(), self._ort_options, providers=["CPUExecutionProvider"]
            )
            return list(session.run(None, {}))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own assorted errors
            logger.debug("onnxruntime cannot fold %s (%s): %s", node.name, node.op, e)
            return None

    def _run_reference(self, model: onnx.ModelProto, node: gs.Node) -> list[Any] | None:
        from onnx.reference import ReferenceEvaluator

        try:
            return list(ReferenceEvaluator(model).run(None, {}))
        except Exception as e:  # noqa: BLE001 - the evaluator raises anything on unknown ops
            logger.debug("the reference evaluator cannot fold %s (%s): %s", node.name, node.op, e)
            return None

    def _expected_dtypes(self, model: onnx.ModelProto, names: list[str]) -> dict[str, Any]:
        """Element types the op produces: from the module's inference, else the node's own."""
        found = {n: self.types[n].dtype for n in names if n in self.types and self.types[n].dtype}
        if len(found) == len(names):
            return found
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - inference is advisory here
            return found
        for vi in inferred.graph.output:
            elem = vi.type.tensor_type.elem_type
            if vi.name not in found and elem:
                found[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(elem)
        return found

    # -- If with a constant condition ---------------------------------------------------------
    def _inline_if(self, graph: gs.Graph, node: gs.Node) -> list[gs.Node] | None:
        """Replaces `If(const)` by the chosen branch's nodes and one Identity per output."""
        cond = read_constant(node.inputs[0]) if node.inputs and node.inputs[0].name else None
        if cond is None or cond.size != 1:
            return None
        branch = node.attrs.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
        if not isinstance(branch, gs.Graph) or len(branch.outputs) != len(node.outputs):
            return None
        if any(not out.name for out in node.outputs) or not self._names_are_safe(branch):
            return None
        moved = list(branch.nodes)
        pairs = list(zip(branch.outputs, node.outputs, strict=True))
        node.inputs.clear()
        node.outputs.clear()
        branch.nodes = []
        branch.outputs = []
        self.graph_outputs = {id(t) for g in self.module.graphs() for t in g.outputs}
        identities = [
            gs.Node(
                "Identity",
                name=f"{node.name}_out{i}" if node.name else None,
                inputs=[inner],
                outputs=[outer],
            )
            for i, (inner, outer) in enumerate(pairs)
        ]
        self.stats["if-inlined"] += 1
        self._names = None  # tensors changed scope
        return moved + identities

    def _names_are_safe(self, branch: gs.Graph) -> bool:
        """True when every tensor of `branch` is the only tensor of that name in the module."""
        if self._names is None:
            names: dict[str, set[int]] = collections.defaultdict(set)
            for g in self.module.graphs():
                for tensor in g.tensors().values():
                    names[tensor.name].add(id(tensor))
            self._names = names
        for tensor in branch.tensors().values():
            if tensor.name and self._names.get(tensor.name, set()) - {id(tensor)}:
                return False
        return True


def _expand(nodes: Sequence[gs.Node], replacements: dict[int, list[gs.Node]]) -> Iterator[gs.Node]:
    """`nodes` with each replaced node swapped for its replacements (recursively)."""
    for node in nodes:
        replaced = replacements.get(id(node))
        if replaced is None:
            yield node
        else:
            yield from _expand(replaced, replacements)
