"""PLACEHOLDER being written by a helper: eliminate-noops."""

from __future__ import annotations

import dataclasses

from dsopt import Module, Pass, PassContext, PassResult


@dataclasses.dataclass(frozen=True)
class EliminateNoops(Pass):
    """Placeholder."""

    name = "eliminate-noops"
    summary = "placeholder"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Does nothing yet."""
        return PassResult(False)
