"""Raise the model's opset (onnx version converter) when a standard fused op needs a newer one."""

from __future__ import annotations

import dataclasses
import importlib
import weakref
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter
from onnx_graphsurgeon.ir.tensor import LazyValues

from dsopt.analysis import AnalysisManager
from dsopt.ir import Module, is_stub
from dsopt.pass_infra import Pass, PassContext, PassResult, verify_module

__all__ = ["PROBES", "UpgradeOpset"]

#: Rule passes whose opset-gated rules justify an upgrade (`module:Class`, imported lazily).
PROBES = (
    "dsopt.passes.fuse_activations:FuseActivations",
    "dsopt.passes.fuse_layer_norm:FuseLayerNorm",
)

#: Modules already probed without result, per (opset, ceiling): pipeline rounds skip them.
_PROBED: weakref.WeakKeyDictionary[Module, set[tuple[int, int]]] = weakref.WeakKeyDictionary()


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
    The converter and the probes see the model without its big weights (`skeleton_proto`),
    so their cost does not grow with the weights; a probe that found nothing is not repeated
    in later rounds of the same pipeline run.
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
        key = (module.opset, ceiling)
        if not self.to and key in _PROBED.get(module, ()):
            return PassResult(False, stats)
        # The converter works on the structure; weights are re-attached after conversion.
        skeleton = module.skeleton_proto()
        target = self.to or _needed_opset(skeleton, module.opset, ceiling, ctx)
        if target <= module.opset:
            _PROBED.setdefault(module, set()).add(key)
            return PassResult(False, stats)
        converted = _convert(skeleton, target)
        upgraded = None if converted is None else _with_weights(converted, module)
        if upgraded is None:
            stats["skipped-converter"] = 1
            return PassResult(False, stats)
        module.graph, module.facts = upgraded.graph, upgraded.facts
        stats["to"] = target
        return PassResult(True, stats)


def _convert(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto | None:
    """`proto` converted to `opset`, or None when the converter fails."""
    try:
        return version_converter.convert_version(proto, opset)
    except Exception:  # noqa: BLE001 - the converter raises assorted C++ errors
        return None


def _with_weights(converted: onnx.ModelProto, module: Module) -> Module | None:
    """The converted skeleton with `module`'s weights back in place of its stubs.

    None when a stub has no same-named, same-shaped weight in `module` or the result fails
    the checker.
    """
    upgraded = Module.from_proto(converted, base_dir=module.base_dir)
    originals = {
        tensor.name: tensor
        for graph in module.graphs()
        for tensor in graph.tensors().values()
        if isinstance(tensor, gs.Constant)
    }
    for graph in upgraded.graphs():
        for tensor in graph.tensors().values():
            values = getattr(tensor, "_values", None)
            if not isinstance(values, LazyValues) or not is_stub(values.tensor):
                continue
            original = originals.get(tensor.name)
            if original is None or tuple(original.shape) != tuple(tensor.shape):
                return None
            tensor._values = original._values
    return upgraded if verify_module(upgraded, strict=False) is None else None


def _needed_opset(proto: onnx.ModelProto, current: int, ceiling: int, ctx: PassContext) -> int:
    """The lowest opset in (current, ceiling] that the probe rules which fired need, or current.

    The probes run on the converted skeleton (big weights are stubs without data).
    """
    converted = _convert(proto, ceiling)
    if converted is None:
        return current
    twin = Module.from_proto(converted)
    needed = current
    for probe in _probes():
        probe_ctx = dataclasses.replace(ctx, analyses=AnalysisManager(twin))
        try:
            result = probe.run(twin, probe_ctx)
        except Exception:  # noqa: BLE001 - a probe reading a stubbed weight just finds nothing
            continue
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
