"""Remove nodes whose results nobody uses, unused initializers and unused local functions."""

from __future__ import annotations

import dataclasses

from dsopt import Module, Pass, PassContext, PassResult
from dsopt.pass_infra import graph_counts


@dataclasses.dataclass(frozen=True)
class EliminateDead(Pass):
    """Dead node, initializer and function elimination (in every subgraph too).

    A node is dead when none of its outputs reaches a graph output. Graph inputs are kept:
    they are the model's interface. Exact: removes only work whose results are unused.
    """

    name = "eliminate-dead"
    summary = "remove nodes, initializers and local functions that no graph output depends on"
    stage = "canonicalize"
    exactness = "exact"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Runs graphsurgeon's cleanup on every graph, then drops unused functions."""
        before = graph_counts(module)
        module.graph.cleanup(
            remove_unused_node_outputs=False,
            recurse_subgraphs=True,
            remove_unused_graph_inputs=False,
            recurse_functions=True,
        )
        used = {(n.domain, n.op) for g in module.graphs() for n in g.nodes}
        functions = [f for f in module.graph.functions if (f.domain, f.name) in used]
        removed_functions = len(module.graph.functions) - len(functions)
        if removed_functions:
            module.graph.functions = functions
        after = graph_counts(module)
        nodes = before["nodes"] - after["nodes"]
        initializers = before["initializers"] - after["initializers"]
        changed = bool(nodes or initializers or removed_functions)
        return PassResult(
            changed,
            {"nodes": nodes, "initializers": initializers, "functions": removed_functions},
        )
