"""Turn `Constant` nodes into initializers, so every later pass sees one kind of constant."""

from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from dsopt import Module, Pass, PassContext, PassResult
from dsopt.ir import constant_node_value
from dsopt.pattern import redirect_readers, remove_nodes


@dataclasses.dataclass(frozen=True)
class InlineConstants(Pass):
    """Constant(value=V) -> t   ==>   initializer t = V.

    Graph outputs produced by a Constant node are left alone (an initializer cannot be renamed
    into an output in every runtime). Sparse and string constants are kept as nodes. Exact.
    """

    name = "inline-constants"
    summary = "replace Constant nodes by initializers (tensor, scalar and list values)"
    stage = "canonicalize"
    exactness = "exact"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Replaces each Constant node's output Variable by a gs.Constant with its value."""
        inlined = 0
        for graph in module.graphs():
            outputs = {id(t) for t in graph.outputs}
            for node in list(graph.nodes):
                if node.op != "Constant" or node.domain or len(node.outputs) != 1:
                    continue
                out = node.outputs[0]
                value = constant_node_value(node)
                if value is None or value.dtype.kind in "OSU" or id(out) in outputs:
                    continue
                constant = gs.Constant(out.name, value)
                redirect_readers(out, constant)
                remove_nodes(graph, [node])
                inlined += 1
        return PassResult(inlined > 0, {"inlined": inlined})
