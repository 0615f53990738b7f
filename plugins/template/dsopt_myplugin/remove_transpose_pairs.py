"""Remove Transpose(Transpose(x)) pairs whose permutations cancel."""

from __future__ import annotations

import dataclasses

from dsopt import Module, Pass, PassContext, PassResult
from dsopt.pattern import redirect_readers


@dataclasses.dataclass(frozen=True)
class RemoveTransposePairs(Pass):
    """Transpose(Transpose(x, p), q) ==> x when q[p[i]] == i for every axis.

    Only pairs with explicit `perm` attributes, whose outer result is no graph output. Exact:
    transposes move data without arithmetic.
    """

    name = "my-remove-transpose-pairs"
    summary = "remove Transpose pairs that cancel (plugin template)"
    stage = "canonicalize"
    exactness = "exact"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Rewires readers of each cancelling outer Transpose to the inner one's input."""
        removed = 0
        for graph in module.graphs():
            outputs = {id(t) for t in graph.outputs}
            for outer in list(graph.nodes):
                if outer.op != "Transpose" or outer.domain or not outer.inputs:
                    continue
                middle = outer.inputs[0]
                if len(middle.inputs) != 1 or id(outer.outputs[0]) in outputs:
                    continue
                inner = middle.inputs[0]
                p, q = inner.attrs.get("perm"), outer.attrs.get("perm")
                if inner.op != "Transpose" or inner.domain or p is None or q is None:
                    continue
                if len(p) != len(q) or any(q[p[i]] != i for i in range(len(p))):
                    continue
                redirect_readers(outer.outputs[0], inner.inputs[0])
                outer.outputs.clear()
                removed += 1
        if removed:
            module.graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(removed > 0, {"removed-pairs": removed})
