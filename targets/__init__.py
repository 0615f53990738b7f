"""Built-in targets, registered through the same hook as third-party targets."""

from __future__ import annotations

from dsopt import hookimpl
from dsopt.plugin import TargetRegistry
from dsopt.targets.onnxruntime import ONNXRUNTIME


@hookimpl
def dsopt_register_targets(registry: TargetRegistry) -> None:
    """Registers the built-in targets."""
    registry.add(ONNXRUNTIME)
