"""Targets: declared data (TVM config, default pipeline, capabilities) plus a lowering step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dsopt.ir import Module

__all__ = ["Artifact", "Target"]


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A file a target wrote into the output directory, with its role (`model`, `library`)."""

    role: str
    path: Path


#: Lowers an optimized module into files under `outdir`; returns what it wrote.
Lowering = Callable[[Module, Path, Mapping[str, Any]], list[Artifact]]


def write_onnx(module: Module, outdir: Path, options: Mapping[str, Any]) -> list[Artifact]:
    """The default lowering: the optimized model as `model.onnx`."""
    path = module.save(outdir / "model.onnx")
    return [Artifact("model", path)]


@dataclasses.dataclass(frozen=True)
class Target:
    """A hardware/runtime target, declared as data.

    Args:
        name: Kebab-case name used with `--target`.
        summary: One line for `dsopt targets`.
        aliases: Other accepted names.
        tvm: TVM target config in dict form (None for non-TVM targets).
        pipeline: Default pass pipeline text for this target.
        precisions: Precisions the target runs, with relative cost (lower is faster).
        fused_ops: Non-standard ops (`domain::Op`, e.g. `com.microsoft::FusedConv`) its runtime
            executes; fusions into such ops fire only for targets that declare them.
        opset: The newest default-domain opset its runtime executes; `upgrade-opset` may raise a
            model's opset up to it when a standard fused op needs that (None: never upgrade).
        allow_lossy: Whether lossy passes may join its default pipeline.
        lower: Writes the deployable files; defaults to writing `model.onnx`.
    """

    name: str
    summary: str
    aliases: tuple[str, ...] = ()
    tvm: Mapping[str, Any] | None = None
    pipeline: str = "default"
    precisions: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"float32": 1.0})
    fused_ops: frozenset[str] = frozenset()
    opset: int | None = None
    allow_lossy: bool = False
    lower: Lowering = write_onnx
