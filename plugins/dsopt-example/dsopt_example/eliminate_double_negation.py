"""Remove pairs of negations: Neg(Neg(x)) and Not(Not(x))."""

from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from dsopt import Module, Pass, PassContext, PassResult
from dsopt.pattern import redirect_readers

_INVOLUTIONS = ("Neg", "Not")


@dataclasses.dataclass(frozen=True)
class EliminateDoubleNegation(Pass):
    """Neg(Neg(x)) ==> x, and Not(Not(x)) ==> x.

    The outer node's consumers read `x` instead. Skipped when the outer result is a graph
    output (its name is the model's interface). Exact: negation is its own inverse in IEEE
    arithmetic and in boolean logic.
    """

    name = "eliminate-double-negation"
    summary = "remove Neg(Neg(x)) and Not(Not(x)) pairs (example third-party pass)"
    stage = "canonicalize"
    exactness = "exact"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Rewires consumers of each outer negation to the inner node's input."""
        removed = 0
        for graph in module.graphs():
            outputs = {id(t) for t in graph.outputs}
            for outer in list(graph.nodes):
                inner_out = outer.inputs[0] if outer.op in _INVOLUTIONS and outer.inputs else None
                if inner_out is None or len(inner_out.inputs) != 1:
                    continue
                inner = inner_out.inputs[0]
                if inner.op != outer.op or inner.domain or outer.domain:
                    continue
                result = outer.outputs[0]
                if id(result) in outputs:
                    continue
                source: gs.Tensor = inner.inputs[0]
                redirect_readers(result, source)
                outer.outputs.clear()
                removed += 1
        if removed:
            module.graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(removed > 0, {"removed-pairs": removed})
