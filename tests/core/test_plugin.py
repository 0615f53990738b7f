from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
import types

import pytest

from dsopt import Pass, PassResult, PluginError, Target, UsageError, hookimpl
from dsopt.plugin import DEFAULT_PLUGINS, PluginHost


def _plugin(name, **hooks):
    module = types.ModuleType(name)
    for hook_name, impl in hooks.items():
        setattr(module, hook_name, hookimpl(impl))
    return module


@dataclasses.dataclass(frozen=True)
class Shadow(Pass):
    name = "eliminate-dead"
    summary = "collides with a built-in"

    def run(self, module, ctx):
        return PassResult(False)


def test_builtins_register_through_the_hooks():
    host = PluginHost(autoload=False)
    assert host.plugin_names()[: len(DEFAULT_PLUGINS)] == list(DEFAULT_PLUGINS)
    assert host.passes.providers["fold-constants"] == "dsopt.passes"
    assert host.targets.providers["onnxruntime"] == "dsopt.targets"
    assert host.get_target("ort").name == "onnxruntime"


def test_duplicate_pass_names_both_providers():
    plugin = _plugin("shadow", dsopt_register_passes=lambda registry: registry.add(Shadow))
    with pytest.raises(PluginError, match="'dsopt.passes' and by plugin 'shadow'"):
        PluginHost(extra=[plugin], autoload=False)


def test_non_pass_registration_is_refused():
    plugin = _plugin("bad", dsopt_register_passes=lambda registry: registry.add(object))
    with pytest.raises(PluginError, match="not a dsopt.Pass subclass"):
        PluginHost(extra=[plugin], autoload=False)


def test_lossy_pass_must_declare_tolerance():
    @dataclasses.dataclass(frozen=True)
    class Lossy(Pass):
        name = "lossy-thing"
        summary = "drops bits"
        exactness = "lossy"

    plugin = _plugin("lossy", dsopt_register_passes=lambda registry: registry.add(Lossy))
    with pytest.raises(PluginError, match="must declare `tolerance`"):
        PluginHost(extra=[plugin], autoload=False)


def test_unknown_hook_fails_loudly():
    module = types.ModuleType("typo")
    module.dsopt_register_pases = hookimpl(lambda registry: None)
    with pytest.raises(PluginError, match="typo"):
        PluginHost(extra=[module], autoload=False)


def test_unknown_target_lists_known():
    host = PluginHost(autoload=False)
    with pytest.raises(UsageError, match=r"unknown target 'jetsn' \(known: .*onnxruntime \[ort\]"):
        host.get_target("jetsn")


def test_plugin_target_registration():
    target = Target(name="toy", summary="a toy target", aliases=("t",))
    plugin = _plugin("toy", dsopt_register_targets=lambda registry: registry.add(target))
    host = PluginHost(extra=[plugin], autoload=False)
    assert host.get_target("t") is target
    assert host.targets.providers["toy"] == "toy"


def test_blocked_plugin_is_not_loaded(monkeypatch):
    monkeypatch.setenv("DSOPT_DISABLE_PLUGINS", "dsopt.instruments")
    host = PluginHost(autoload=False)
    assert "dsopt.instruments" not in host.plugin_names()


def test_broken_entry_point_is_reported_by_name_and_only_breaks_when_used(monkeypatch, caplog):
    class BrokenEntryPoint:
        name = "broken"
        dist = types.SimpleNamespace(name="dsopt-broken", version="9.9")

        def load(self):
            raise ImportError("No module named 'missing_dep'")

    real = importlib.metadata.entry_points

    def fake(**kwargs):
        if kwargs.get("group") == "dsopt":
            return [BrokenEntryPoint()]
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    host = PluginHost()
    assert "broken" in host.failed
    assert "plugin 'broken' from dsopt-broken 9.9 failed to import" in caplog.text
    assert caplog.text.count("failed to import") == 1
    host.get_pass("fold-constants")  # unrelated passes still work
    with pytest.raises(PluginError, match="plugin 'broken' from dsopt-broken 9.9"):
        host.get_pass("from-the-broken-plugin")


def test_extra_plugin_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_dsopt_plugin.py").write_text(
        "import dataclasses\n"
        "from dsopt import Pass, PassResult, hookimpl\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Nothing(Pass):\n"
        "    name = 'do-nothing'\n"
        "    summary = 'does nothing'\n"
        "    def run(self, module, ctx):\n"
        "        return PassResult(False)\n"
        "@hookimpl\n"
        "def dsopt_register_passes(registry):\n"
        "    registry.add(Nothing)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost(extra=["my_dsopt_plugin"], autoload=False)
    assert host.passes.providers["do-nothing"] == "my_dsopt_plugin"
    with pytest.raises(PluginError, match="'no_such_plugin_module' \\(-p\\) failed to import"):
        PluginHost(extra=["no_such_plugin_module"], autoload=False)
    sys.modules.pop("my_dsopt_plugin", None)


def test_builtins_are_declared_in_the_entry_point_group_too():
    declared = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="dsopt")}
    for name in DEFAULT_PLUGINS:
        assert declared.get(name) == name
    host = PluginHost()  # autoload on: each built-in is registered once, not twice
    names = host.plugin_names()
    assert all(names.count(name) == 1 for name in DEFAULT_PLUGINS)
