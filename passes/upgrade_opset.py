"""Raise the model's opset (onnx version converter) when a standard fused op needs a newer one."""

from __future__ import annotations

import dataclasses
import importlib
import weakref
from typing import ClassVar

import onnx
from onnx import version_converter

from dsopt.analysis import AnalysisManager
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult, verify_model

__all__ = ["PROBES", "UpgradeOpset"]

#: Rule passes whose opset-gated rules justify an upgrade (`module:Class`, imported lazily).
PROBES = (
    "dsopt.passes.fuse_activations:FuseActivations",
    "dsopt.passes.fuse_layer_norm:FuseLayerNorm",
)

#: Modules already probed without result, per (opset, ceiling): pipeline rounds skip them.
_PROBED: weakref.WeakKeyDictionary[Module, set[tuple[int, int]]] = weakref.WeakKeyDictionary()

#: Models above this size are not converted (the converter copies the whole model in memory).
MAX_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class UpgradeOpset(Pass):
    """Raises the default-domain opset when that lets a standard fused op replace a spelling.

    Rules:
      1. With `to=0` (default) the pass acts only for a target that declares a newer opset
         (`ctx.max_opset`): it converts a copy to that opset, runs the `PROBES` fusion passes
         on it, and upgrades the model to the lowest opset that every rule which fired there,
         and could not fire at the model's opset, needs (e.g. Gelu 20, LayerNormalization 17,
         HardSwish 14). Nothing fires: nothing changes.
      2. With `to=N` it upgrades to N whenever the model's opset is lower.
      3. The onnx version converter does the conversion; a model it cannot convert, or whose
         conversion fails the checker, is left as it is (`skipped-converter`).
    Models with no opset gap, or over 1 GiB, are left alone; a probe that found nothing is
    not repeated in later rounds of the same pipeline run.
    """

    name: ClassVar[str] = "upgrade-opset"
    summary: ClassVar[str] = "raise the opset when a standard fused op (Gelu, LayerNorm) needs it"
    stage: ClassVar[str] = "canonicalize"
    exactness: ClassVar[str] = "exact"

    to: int = dataclasses.field(
        default=0, metadata={"help": "opset to upgrade to (0: the lowest one a fusion needs)"}
    )

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Converts the module in place when an upgrade pays off."""
        stats: dict[str, int | float | str] = {"from": module.opset, "to": module.opset}
        ceiling = self.to or ctx.max_opset or 0
        if ceiling <= module.opset:
            return PassResult(False, stats)
        proto = module.to_proto()
        if proto.ByteSize() > MAX_BYTES:
            stats["skipped-size"] = 1
            return PassResult(False, stats)
        key = (module.opset, ceiling)
        if not self.to and key in _PROBED.get(module, ()):
            return PassResult(False, stats)
        target = self.to or _needed_opset(proto, module.opset, ceiling, ctx)
        if target <= module.opset:
            _PROBED.setdefault(module, set()).add(key)
            return PassResult(False, stats)
        converted = _convert(proto, target)
        if converted is None:
            stats["skipped-converter"] = 1
            return PassResult(False, stats)
        upgraded = Module.from_proto(converted, base_dir=module.base_dir)
        module.graph, module.facts = upgraded.graph, upgraded.facts
        stats["to"] = target
        return PassResult(True, stats)


def _convert(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto | None:
    """`proto` converted to `opset`, or None when the converter fails or breaks the model."""
    try:
        converted = version_converter.convert_version(proto, opset)
    except Exception:  # noqa: BLE001 - the converter raises assorted C++ errors
        return None
    return converted if verify_model(converted, strict=False) is None else None


def _needed_opset(proto: onnx.ModelProto, current: int, ceiling: int, ctx: PassContext) -> int:
    """The lowest opset in (current, ceiling] that the probe rules which fired need, or current."""
    converted = _convert(proto, ceiling)
    if converted is None:
        return current
    twin = Module.from_proto(converted)
    needed = current
    for probe in _probes():
        probe_ctx = dataclasses.replace(ctx, analyses=AnalysisManager(twin))
        result = probe.run(twin, probe_ctx)
        for rule in probe.rules:
            if rule.min_opset > current and result.stats.get(rule.name, 0):
                needed = max(needed, rule.min_opset)
    return needed


def _probes() -> list[Pass]:
    found = []
    for spec in PROBES:
        module_name, _, class_name = spec.partition(":")
        try:
            found.append(getattr(importlib.import_module(module_name), class_name)())
        except (ImportError, AttributeError):
            continue
    return found
