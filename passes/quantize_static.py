"""Static int8 quantization: calibrated Q/DQ where the runtime fuses them into int8 kernels."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.analysis import AnalysisManager, Shapes
from dsopt.errors import UsageError
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.pattern import (
    fresh_name,
    is_graph_output,
    node_subgraphs,
    read_constant,
    topological_order,
)
from dsopt.quant import calibration
from dsopt.quant.bias_correction import BiasCorrection
from dsopt.quant.grid import INT7, INT8, UINT8, affine_params, per_channel_symmetric
from dsopt.quant.kernels import COMPUTE_OPS, INT8_OPS, SHARED_SCALE_OPS

__all__ = ["COMPUTE_OPS", "INT8_OPS", "SHARED_SCALE_OPS", "QuantizeStatic"]

#: Activations folded into the int8 op before them: the Q after them clamps the same way.
_ABSORBED = frozenset({"Relu", "Clip"})
_DEFAULT_EXCLUDED = ("Softmax",)


@dataclasses.dataclass(frozen=True)
class QuantizeStatic(Pass):
    """float Conv/MatMul/Gemm islands  ==>  QDQ int8 islands from calibrated activation ranges.

    1. Compute ops (Conv, MatMul, Gemm) with a constant float weight: weights int8 symmetric
       per output channel, bias int32 at scale x_scale * w_scale, activations uint8
       asymmetric per tensor from the calibration `method` (minmax, percentile, entropy, mse).
       A Relu/Clip right after is absorbed: the Q goes after it (onnxruntime drops it).
    2. Ops onnxruntime runs on int8 (`INT8_OPS`: Add, Mul, Sigmoid, pools, Concat, ...) join
       an island when one input comes from it and every other input is quantizable; data
       movement (`SHARED_SCALE_OPS`) joins with its input's scale. Joined ops whose output
       feeds no int8 op leave again, so no island ends in a needless requantization.
    3. Left in float: the first and last compute layers (`keep_first`/`keep_last`), Softmax
       and the ops/names in `exclude`; tensors whose range reaches mask fill values
       (|x| >= 1e8, e.g. float-min attention masks); a Concat whose inputs' ranges differ by
       more than `concat_ratio` (boxes in pixels next to 0-1 scores must not share a scale).
    4. Every graph is planned: the top graph and each If/Loop/Scan body (nested too), with one
       calibration run for all (body tensors are probed through the bodies; a Loop's over
       all iterations). Q/DQ go into the graph that computes the tensor; an outer-scope
       weight is dequantized in the innermost graph enclosing its int8 readers (once when
       shared). Int8 ops join islands within their own graph; `keep_first`/`keep_last`
       apply to the top graph only; a body tensor of unknown dtype stays float.
       `subgraph-nodes` counts the quantized nodes inside bodies.
    5. `bias_correction` (off by default; top graph only): the mean shift dW . E[x] that
       int8 weight rounding adds to each output channel is subtracted from the float bias
       before it is quantized (`dsopt.quant.bias_correction`; one more calibration pass).
       `bias-corrected` counts the nodes.
    With `reduce_range` (the default) weights take 7 bits, as in `quantize-dynamic`: the u8s8
    kernels onnxruntime fuses QDQ islands into sum uint8 x int8 pairs in int16 on x86 CPUs
    without VNNI and saturate with full-range int8 weights (a random QLinearConv was off by 10
    steps on an AVX2 EPYC).
    Needs calibration data (`--calib`). Bound (relative, checked on calibration samples):
    every output keeps cosine >= 0.98 and relative L2 error <= 0.2.
    """

    name: ClassVar[str] = "quantize-static"
    summary: ClassVar[str] = "int8 Q/DQ around Conv/MatMul/Gemm islands from calibrated ranges"
    stage: ClassVar[str] = "quantize"
    exactness: ClassVar[str] = "lossy"
    tolerance: ClassVar[float | None] = 0.02
    bound: ClassVar[str] = "relative"
    opsets: ClassVar[tuple[int | None, int | None]] = (13, None)

    method: str = dataclasses.field(
        default="minmax", metadata={"help": "activation ranges: minmax, percentile, entropy or mse"}
    )
    percentile: float = dataclasses.field(
        default=99.999, metadata={"help": "two-sided percentile of the percentile method"}
    )
    samples: int = dataclasses.field(
        default=128, metadata={"help": "use at most this many calibration samples (0: all)"}
    )
    keep_first: bool = dataclasses.field(
        default=True, metadata={"help": "keep compute ops reading a graph input in float"}
    )
    keep_last: bool = dataclasses.field(
        default=True, metadata={"help": "keep the compute ops that produce the outputs in float"}
    )
    exclude: str = dataclasses.field(
        default="", metadata={"help": "comma-separated node names or op types to keep in float"}
    )
    include: str = dataclasses.field(
        default="", metadata={"help": "node names quantized even if first/last/excluded op"}
    )
    concat_ratio: float = dataclasses.field(
        default=8.0, metadata={"help": "largest ratio of input ranges a quantized Concat joins"}
    )
    activation: str = dataclasses.field(
        default="uint8", metadata={"help": "activation storage: uint8 (asymmetric) or int8"}
    )
    bias_correction: bool = dataclasses.field(
        default=False,
        metadata={"help": "subtract the mean shift int8 weight rounding adds per channel"},
    )
    reduce_range: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "7-bit weights, so onnxruntime's u8s8 kernels on x86 without VNNI (int16 "
            "pair sums) cannot saturate; false: full int8, for CPUs with VNNI or ARM only"
        },
    )

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Calibrates the candidate tensors, chooses the islands and writes Q/DQ."""
        if self.method not in calibration.METHODS:
            raise UsageError(
                f"quantize-static: method '{self.method}' is unknown",
                hint=f"use one of {', '.join(calibration.METHODS)}",
            )
        if self.activation not in ("uint8", "int8"):
            raise UsageError("quantize-static: activation must be uint8 or int8")
        if ctx.calibration is None:
            raise UsageError(
                "quantize-static needs calibration data",
                hint="pass --calib DIR|FILE.npz (--calib synthetic for random data), or use "
                "--precision int8-dynamic",
            )
        data = ctx.calibration
        if not isinstance(data, calibration.CalibrationData):
            data = calibration.CalibrationData.from_feeds(list(data))
        graph = module.graph
        shapes = (ctx.analyses or AnalysisManager(module)).get(Shapes)
        # One planner per graph: the top graph, then every If/Loop/Scan body (nested too).
        planners = [_Planner(self, g, shapes, top=g is graph) for g in module.graphs()]
        planner = planners[0]  # the top graph's
        candidates = list(dict.fromkeys(n for p in planners for n in p.candidate_tensors()))
        if not candidates:
            return PassResult(False, {"quantized-nodes": 0, "subgraph-nodes": 0})
        stats, facts = calibration.collect_ranges(
            module.to_proto(),
            candidates,
            data.limited(self.samples),
            method=self.method,  # type: ignore[arg-type]
            percentile=self.percentile,
        )
        plans = [(p, chosen) for p in planners if (chosen := p.choose(stats))]
        joined = next((chosen for p, chosen in plans if p is planner), [])
        if not plans:
            return PassResult(
                False,
                {
                    "quantized-nodes": 0,
                    "subgraph-nodes": 0,
                    "calibration-samples": facts["samples"],
                },
            )
        corrector = None
        if self.bias_correction:  # float biases change before the writer quantizes them
            weighted = [n for n in joined if planner.weight(n) is not None]
            grid = INT7 if self.reduce_range else INT8
            corrector = BiasCorrection(graph, weighted, _channel_axis, grid)
            corrector.measure(module.to_proto(), data.limited(self.samples))
            corrector.correct()
        writer = _Writer(
            module,
            stats,
            UINT8 if self.activation == "uint8" else INT8,
            weights=INT7 if self.reduce_range else INT8,
        )
        counts = writer.apply(plans)
        if corrector is not None:
            counts["bias-corrected"] = corrector.finish()
        for touched in writer.touched:
            touched.nodes = topological_order(touched)
        return PassResult(
            True,
            {
                "quantized-nodes": sum(len(chosen) for _, chosen in plans),
                "subgraph-nodes": sum(len(chosen) for p, chosen in plans if not p.top),
                **counts,
                "kept-float": sum(p.kept_float for p in planners),
                "calibration-samples": facts["samples"],
                "calibration-peak-rss-mb": facts["peak_rss_mb"],
            },
        )


def _names(text: str) -> frozenset[str]:
    return frozenset(part.strip() for part in text.split(",") if part.strip())


class _Planner:
    """Chooses the int8 islands: which nodes join and which tensors carry Q/DQ."""

    def __init__(
        self, options: QuantizeStatic, graph: gs.Graph, shapes: Any, *, top: bool = True
    ) -> None:
        self.options = options
        self.graph = graph
        self.shapes = shapes
        self.top = top  # keep_first/keep_last read the top graph's inputs and outputs only
        excluded = _names(options.exclude) | set(_DEFAULT_EXCLUDED)
        self.included = _names(options.include)
        self.excluded = excluded - self.included
        self.kept_float = 0
        self.order = topological_order(graph)
        self.outputs = {id(t) for t in graph.outputs}

    # -- tensors -------------------------------------------------------------------------
    def is_float(self, tensor: gs.Tensor) -> bool:
        if isinstance(tensor, gs.Constant) or not tensor.name:
            return False
        dtype = tensor.dtype
        if dtype is None and tensor.name in self.shapes:
            # Shape inference may not reach into bodies: no known dtype keeps a tensor float.
            dtype = self.shapes[tensor.name].dtype
        try:
            return np.dtype(dtype) == np.float32
        except TypeError:
            return False

    def activations(self, node: gs.Node) -> list[gs.Tensor]:
        """The float non-constant inputs the node computes on (weights excluded)."""
        if node.op in COMPUTE_OPS:
            inputs = node.inputs[:1] if self.weight(node) is not None else node.inputs[:2]
        elif node.op in SHARED_SCALE_OPS:
            inputs = node.inputs[:1]
        else:
            inputs = node.inputs
        return [
            t
            for t in inputs
            if read_constant(t) is None and self.is_float(t) and not _dequantized(t)
        ]

    def weight(self, node: gs.Node) -> np.ndarray | None:
        if node.op not in COMPUTE_OPS or len(node.inputs) < 2:
            return None
        value = read_constant(node.inputs[1])
        if value is None or value.dtype != np.float32:
            return None
        return value

    def absorbed_output(self, node: gs.Node) -> tuple[gs.Tensor, gs.Node | None]:
        """The tensor a compute op's Q goes on: after a lone Relu/Clip, else its output."""
        out = node.outputs[0]
        readers = list(out.outputs)
        if len(readers) == 1 and readers[0].op in _ABSORBED and id(out) not in self.outputs:
            reader = readers[0]
            if reader.op == "Relu" or self._clip_from_zero(reader):
                return reader.outputs[0], reader
        return out, None

    def outputs_of(self, node: gs.Node) -> list[gs.Tensor]:
        """The tensors a joined node's Q goes on (after an absorbed Relu/Clip)."""
        if node.op in SHARED_SCALE_OPS or len(node.outputs) != 1:
            return list(node.outputs)
        return [self.absorbed_output(node)[0]]

    def _from_island(self, tensor: gs.Tensor, joined: dict[int, gs.Node]) -> bool:
        if not tensor.inputs:
            return False
        producer = tensor.inputs[0]
        if id(producer) in joined:
            return True
        if producer.op in _ABSORBED and producer.inputs and producer.inputs[0].inputs:
            owner = producer.inputs[0].inputs[0]
            return id(owner) in joined and self.absorbed_output(owner)[1] is producer
        return False

    @staticmethod
    def _clip_from_zero(node: gs.Node) -> bool:
        low = (
            read_constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
        )
        high = (
            read_constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        )
        return (
            low is not None
            and float(np.asarray(low).reshape(())) == 0.0
            and (high is None or np.asarray(high).size == 1)
        )

    def candidate_tensors(self) -> list[str]:
        """Every float tensor an int8 island could quantize (the ones to calibrate)."""
        names: list[str] = []
        for node in self.order:
            if node.op in COMPUTE_OPS or node.op in INT8_OPS or node.op in SHARED_SCALE_OPS:
                names += [t.name for t in self.activations(node)]
                names += [t.name for t in self.outputs_of(node) if self.is_float(t)]
        return list(dict.fromkeys(names))

    # -- choosing --------------------------------------------------------------------------
    def eligible_compute(self, node: gs.Node) -> bool:
        if node.op not in COMPUTE_OPS or not self.allowed(node):
            return False
        if node.op == "Gemm" and (
            int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0
        ):
            return False
        weight = self.weight(node)
        if weight is None:
            return node.op == "MatMul" and len(self.activations(node)) == 2
        if node.op == "MatMul" and weight.ndim != 2:
            return False
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = read_constant(node.inputs[2])
            if bias is None or bias.ndim != 1:
                return False
        return len(self.activations(node)) == 1

    def allowed(self, node: gs.Node) -> bool:
        if node.name in self.included:
            return True
        return node.name not in self.excluded and node.op not in self.excluded

    def edge_layers(self) -> set[int]:
        """Compute nodes reading a graph input, and those feeding an output (no compute between)."""
        edges: set[int] = set()
        if not self.top:
            return edges  # a body's inputs and outputs are not the model's
        if self.options.keep_first:
            inputs = {id(t) for t in self.graph.inputs}
            for node in self.order:
                if node.op in COMPUTE_OPS and any(id(t) in inputs for t in node.inputs):
                    edges.add(id(node))
        if self.options.keep_last:
            stack = [t for t in self.graph.outputs]
            seen: set[int] = set()
            while stack:
                tensor = stack.pop()
                if id(tensor) in seen or not tensor.inputs:
                    continue
                seen.add(id(tensor))
                producer = tensor.inputs[0]
                if producer.op in COMPUTE_OPS:
                    edges.add(id(producer))
                else:
                    stack += [t for t in producer.inputs if not isinstance(t, gs.Constant)]
        return {e for e in edges if self._node(e).name not in self.included}

    def _node(self, key: int) -> gs.Node:
        return next(n for n in self.order if id(n) == key)

    def choose(self, stats: dict[str, calibration.RangeStats]) -> list[gs.Node]:
        """The nodes that run in int8, in topological order."""
        mixed = self._mixed_ranges(stats)

        def good(tensor: gs.Tensor) -> bool:
            info = stats.get(tensor.name)
            return info is not None and not info.mask_like and id(tensor) not in mixed

        edges = self.edge_layers()
        joined: dict[int, gs.Node] = {}
        for node in self.order:
            if node.op in COMPUTE_OPS:
                ok = self.eligible_compute(node) and id(node) not in edges
                ok = ok and all(good(t) for t in self.activations(node))
                ok = ok and good(self.absorbed_output(node)[0])
                if ok:
                    joined[id(node)] = node
                elif self.weight(node) is not None:
                    self.kept_float += 1
            elif node.op in INT8_OPS or node.op in SHARED_SCALE_OPS:
                if not self.allowed(node) or not self._joins(node, joined, stats, good):
                    continue
                joined[id(node)] = node
        # Leave again: non-compute joined nodes whose output no joined node reads.
        changed = True
        while changed:
            changed = False
            for key, node in list(joined.items()):
                if node.op in COMPUTE_OPS:
                    continue
                readers = [r for t in self.outputs_of(node) for r in t.outputs]
                if not any(id(r) in joined for r in readers):
                    del joined[key]
                    changed = True
        return [n for n in self.order if id(n) in joined]

    def _joins(self, node: gs.Node, joined: dict[int, gs.Node], stats: Any, good: Any) -> bool:
        inputs = self.activations(node)
        if not inputs or not all(good(t) for t in inputs):
            return False
        if not all(self.is_float(t) and good(t) for t in self.outputs_of(node)):
            return False
        if node.op in SHARED_SCALE_OPS or node.op in INT8_OPS:
            constants = [t for t in node.inputs if read_constant(t) is not None]
            if node.op in ("Add", "Mul") and constants:
                return False  # a constant operand would be rounded to the activation grid
        if node.op == "Resize" and _text(node.attrs.get("mode", "nearest")) != "nearest":
            return False  # linear Resize runs in float: a Q/DQ around it is pure cost
        return any(self._from_island(t, joined) for t in inputs)

    def _mixed_ranges(self, stats: dict[str, calibration.RangeStats]) -> set[int]:
        """Concat outputs whose inputs' ranges differ by more than `concat_ratio`."""
        mixed: set[int] = set()
        for node in self.order:
            if node.op != "Concat":
                continue
            spans = [
                max(stats[t.name].high - stats[t.name].low, 1e-12)
                for t in node.inputs
                if t.name in stats
            ]
            if len(spans) > 1 and max(spans) / min(spans) > self.options.concat_ratio:
                mixed.update(id(t) for t in node.outputs)
        return mixed

    def quantized_tensors(
        self, joined: Iterable[gs.Node]
    ) -> list[tuple[gs.Tensor, gs.Tensor | None]]:
        """(tensor, parameter source) pairs to quantize: None = its own calibrated range."""
        chosen: dict[int, tuple[gs.Tensor, gs.Tensor | None]] = {}
        for node in joined:
            for tensor in self.activations(node):
                chosen.setdefault(id(tensor), (tensor, None))
            if node.op in SHARED_SCALE_OPS:
                source = self.activations(node)[0]
                for out in node.outputs:
                    chosen[id(out)] = (out, source)
            else:
                for out in self.outputs_of(node):
                    chosen.setdefault(id(out), (out, None))
        return list(chosen.values())


class _Writer:
    """Writes Q/DQ pairs, int8 weights and int32 biases into every graph of the module.

    An activation's Q/DQ goes into the graph that computes it (a body reading an outer
    tensor reads its dequantized value from the outer scope). A weight's DequantizeLinear goes
    into the innermost graph enclosing all the int8 nodes that read it, once per channel axis
    (a weight shared by both If branches is dequantized once, before the If); a bias's into
    the graph of its node.
    """

    def __init__(
        self,
        module: Module,
        stats: dict[str, calibration.RangeStats],
        grid: Any,
        weights: Any = INT8,
    ) -> None:
        self.graph = module.graph
        self.stats = stats
        self.weight_grid = weights
        self.grid = grid
        self.used: set[str] = set()
        self.owner: dict[int, gs.Graph] = {}
        self.parents: dict[int, gs.Graph] = {}
        for graph in module.graphs():
            self.used.update(graph.tensors())
            self.used.update(n.name for n in graph.nodes if n.name)
            self.owner.update((id(t), graph) for t in graph.inputs)
            for node in graph.nodes:
                self.owner.update((id(t), graph) for t in node.outputs)
                self.parents.update((id(sub), graph) for sub in node_subgraphs(node))
        self.touched: list[gs.Graph] = []
        self.params: dict[int, tuple[gs.Constant, gs.Constant]] = {}
        self.restored_params: dict[int, tuple[gs.Constant, gs.Constant]] = {}
        self.weight_scale: dict[int, np.ndarray] = {}

    def apply(self, plans: list[tuple[_Planner, list[gs.Node]]]) -> dict[str, int]:
        chosen: dict[int, tuple[gs.Tensor, gs.Tensor | None]] = {}
        for planner, joined in plans:
            for tensor, source in planner.quantized_tensors(joined):
                # A tensor two graphs quantize: a shared scale (source) wins over its own.
                if id(tensor) not in chosen or source is not None:
                    chosen[id(tensor)] = (tensor, source)
        for tensor, source in chosen.values():
            self._qdq(tensor, source)
        sites: dict[tuple[int, int | None], list[tuple[gs.Graph, gs.Node]]] = {}
        weighted: list[tuple[tuple[int, int | None], gs.Graph, gs.Node]] = []
        for planner, joined in plans:
            for node in joined:
                value = planner.weight(node) if node.op in COMPUTE_OPS else None
                if value is not None:
                    key = (id(node.inputs[1]), _channel_axis(node, value))
                    sites.setdefault(key, []).append((planner.graph, node))
                    weighted.append((key, planner.graph, node))
        written: set[tuple[int, int | None]] = set()
        biases = 0
        for key, graph, node in weighted:  # in node order: weight, then bias, node by node
            if key not in written:
                written.add(key)
                self._weight(sites[key])
            biases += self._bias(graph, node)
        return {"qdq-tensors": len(chosen), "int8-weights": len(sites), "int32-biases": biases}

    def _touch(self, graph: gs.Graph) -> gs.Graph:
        if not any(g is graph for g in self.touched):
            self.touched.append(graph)
        return graph

    def _enclosing(self, graphs: list[gs.Graph]) -> gs.Graph:
        """The innermost graph that is, or encloses, each of `graphs`."""
        chains = []
        for graph in graphs:
            chain = [graph]
            while id(chain[-1]) in self.parents:
                chain.append(self.parents[id(chain[-1])])
            chains.append(chain[::-1])
        common = chains[0][0]
        for depth in range(min(len(c) for c in chains)):
            if all(c[depth] is chains[0][depth] for c in chains):
                common = chains[0][depth]
            else:
                break
        return common

    def _name(self, base: str) -> str:
        return fresh_name(self.used, base)

    def _parameters(
        self, tensor: gs.Tensor, source: gs.Tensor | None
    ) -> tuple[gs.Constant, gs.Constant]:
        if source is not None and id(source) in self.params:
            self.params[id(tensor)] = self.params[id(source)]
            return self.params[id(tensor)]
        info = self.stats[(source or tensor).name]
        scale, zero = affine_params(
            np.float32(info.low), np.float32(info.high), self.grid, symmetric=False
        )
        pair = (
            gs.Constant(
                self._name(f"{tensor.name}_scale"), np.asarray(scale, np.float32).reshape(())
            ),
            gs.Constant(
                self._name(f"{tensor.name}_zero_point"),
                np.asarray(zero).reshape(()).astype(self.grid.numpy_dtype),
            ),
        )
        self.params[id(tensor)] = pair
        return pair

    def _qdq(self, tensor: gs.Tensor, source: gs.Tensor | None) -> None:
        graph = self._touch(self.owner.get(id(tensor), self.graph))
        scale, zero = self._parameters(tensor, source)
        quantized = gs.Variable(
            self._name(f"{tensor.name}_quantized"), dtype=self.grid.numpy_dtype, shape=tensor.shape
        )
        restored = gs.Variable(
            self._name(f"{tensor.name}_dequantized"), dtype=np.float32, shape=tensor.shape
        )
        readers = list(tensor.outputs)
        q = gs.Node(
            "QuantizeLinear",
            self._name(f"{tensor.name}_Quantize"),
            inputs=[tensor, scale, zero],
            outputs=[quantized],
        )
        dq = gs.Node(
            "DequantizeLinear",
            self._name(f"{tensor.name}_Dequantize"),
            inputs=[quantized, scale, zero],
            outputs=[restored],
        )
        graph.nodes += [q, dq]
        for reader in readers:
            for index, read in enumerate(reader.inputs):
                if read is tensor:
                    reader.inputs[index] = restored
        if is_graph_output(graph, tensor):
            # The output keeps its name and now carries the dequantized value.
            raw_name = self._name(f"{tensor.name}_float")
            restored.name, tensor.name = tensor.name, raw_name
            graph.outputs = [restored if t is tensor else t for t in graph.outputs]
        self.restored_params[id(restored)] = (scale, zero)

    def _weight(self, sites: list[tuple[gs.Graph, gs.Node]]) -> None:
        """One DequantizeLinear of the int8 weight that every node of `sites` reads."""
        node = sites[0][1]
        tensor = node.inputs[1]
        value = read_constant(tensor)
        assert value is not None
        axis = _channel_axis(node, value)
        if axis is None:
            q, scale = per_channel_symmetric(value.reshape(1, -1), 0, self.weight_grid)
            q, axis_attr = q.reshape(value.shape), {}
            scale = scale.reshape(())
        else:
            q, scale = per_channel_symmetric(value, axis, self.weight_grid)
            axis_attr = {"axis": axis}
        base = tensor.name or f"{node.name}_weight"
        restored = gs.Variable(
            self._name(f"{base}_dequantized"), dtype=np.float32, shape=list(value.shape)
        )
        dq = gs.Node(
            "DequantizeLinear",
            self._name(f"{base}_Dequantize"),
            attrs=axis_attr,
            inputs=[
                gs.Constant(self._name(f"{base}_int8"), q.astype(np.int8)),
                gs.Constant(self._name(f"{base}_scale"), np.asarray(scale, np.float32)),
                gs.Constant(self._name(f"{base}_zero_point"), np.zeros(np.shape(scale), np.int8)),
            ],
            outputs=[restored],
        )
        # topological_order puts it before the If/Loop/Scan whose body reads it.
        self._touch(self._enclosing([graph for graph, _ in sites])).nodes.append(dq)
        for _, reader in sites:
            self.weight_scale[id(reader)] = np.asarray(scale, np.float32)
            reader.inputs[1] = restored

    def _bias(self, graph: gs.Graph, node: gs.Node) -> int:
        if len(node.inputs) < 3 or not node.inputs[2].name:
            return 0
        bias = read_constant(node.inputs[2])
        x_params = self.restored_params.get(id(node.inputs[0]))
        w_scale = self.weight_scale.get(id(node))
        if bias is None or x_params is None or w_scale is None:
            return 0
        x_scale = float(x_params[0].values)
        scale = (x_scale * w_scale.astype(np.float64)).astype(np.float32)
        scale = np.broadcast_to(scale.reshape(-1), bias.shape).astype(np.float32)
        q = np.round(bias.astype(np.float64) / scale.astype(np.float64))
        if np.abs(q).max(initial=0) >= 2**31 - 1:
            return 0
        base = node.inputs[2].name
        restored = gs.Variable(
            self._name(f"{base}_dequantized"), dtype=np.float32, shape=list(bias.shape)
        )
        dq = gs.Node(
            "DequantizeLinear",
            self._name(f"{base}_Dequantize"),
            attrs={"axis": 0},
            inputs=[
                gs.Constant(self._name(f"{base}_int32"), q.astype(np.int32)),
                gs.Constant(self._name(f"{base}_scale"), scale),
                gs.Constant(self._name(f"{base}_zero_point"), np.zeros(bias.shape, np.int32)),
            ],
            outputs=[restored],
        )
        self._touch(graph).nodes.append(dq)
        node.inputs[2] = restored
        return 1


def _dequantized(tensor: gs.Tensor) -> bool:
    """Made by a DequantizeLinear: already quantized (by an earlier run or a QAT export)."""
    return bool(tensor.inputs) and tensor.inputs[0].op == "DequantizeLinear"


def _channel_axis(node: gs.Node, weight: np.ndarray) -> int | None:
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul" and weight.ndim == 2:
        return 1
    return None


def _text(value: Any) -> str:
    """An ONNX string attribute as str (graphsurgeon may keep bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
