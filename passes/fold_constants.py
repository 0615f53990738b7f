"""PLACEHOLDER being written by a helper: fold-constants."""

from __future__ import annotations

import dataclasses

from dsopt import Module, Pass, PassContext, PassResult


@dataclasses.dataclass(frozen=True)
class FoldConstants(Pass):
    """Placeholder."""

    name = "fold-constants"
    summary = "placeholder"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Does nothing yet."""
        return PassResult(False)
