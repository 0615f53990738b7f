"""dsopt-myplugin: registers one pass through the `dsopt` entry-point group."""

from __future__ import annotations

from dsopt import hookimpl
from dsopt.plugin import PassRegistry
from dsopt_myplugin.remove_transpose_pairs import RemoveTransposePairs

__all__ = ["RemoveTransposePairs"]


@hookimpl
def dsopt_register_passes(registry: PassRegistry) -> None:
    """Registers the pass; default pipelines run it at the end of the canonicalize stage."""
    registry.add(RemoveTransposePairs, after="canonicalize")
