"""PLACEHOLDER being written by a helper: simplify-shapes."""

from __future__ import annotations

import dataclasses

from dsopt import Module, Pass, PassContext, PassResult


@dataclasses.dataclass(frozen=True)
class SimplifyShapes(Pass):
    """Placeholder."""

    name = "simplify-shapes"
    summary = "placeholder"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Does nothing yet."""
        return PassResult(False)
