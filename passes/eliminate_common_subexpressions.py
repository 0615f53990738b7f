"""PLACEHOLDER being written by a helper: eliminate-common-subexpressions."""

from __future__ import annotations

import dataclasses

from dsopt import Module, Pass, PassContext, PassResult


@dataclasses.dataclass(frozen=True)
class EliminateCommonSubexpressions(Pass):
    """Placeholder."""

    name = "eliminate-common-subexpressions"
    summary = "placeholder"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Does nothing yet."""
        return PassResult(False)
