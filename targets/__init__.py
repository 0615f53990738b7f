"""Built-in targets, registered through the same hook as third-party targets."""

from __future__ import annotations

from dsopt import hookimpl
from dsopt.plugin import TargetRegistry
from dsopt.targets import cuda, x86
from dsopt.targets.arm_neon import ARM_NEON
from dsopt.targets.jetson import JETSON_ORIN
from dsopt.targets.onnxruntime import ONNXRUNTIME
from dsopt.targets.rpi4 import RPI4


@hookimpl
def dsopt_register_targets(registry: TargetRegistry) -> None:
    """Registers the built-in targets."""
    for target in (ONNXRUNTIME, *x86.TARGETS, ARM_NEON, RPI4, JETSON_ORIN, *cuda.TARGETS):
        registry.add(target)
