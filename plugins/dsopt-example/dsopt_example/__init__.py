"""dsopt-example: a third-party plugin registered through the `dsopt` entry-point group."""

from __future__ import annotations

from dsopt import Pipeline, hookimpl
from dsopt.plugin import PassRegistry
from dsopt_example.eliminate_double_negation import EliminateDoubleNegation

__all__ = ["EliminateDoubleNegation"]


@hookimpl
def dsopt_register_passes(registry: PassRegistry) -> None:
    """Registers the example pass."""
    registry.add(EliminateDoubleNegation)


@hookimpl
def dsopt_extend_pipeline(pipeline: Pipeline, target: str | None) -> None:
    """Runs the pass right after the built-in no-op elimination in default pipelines."""
    if "eliminate-noops" in pipeline.names():
        pipeline.insert_after("eliminate-noops", EliminateDoubleNegation.name)
