"""One test per hook (tests/test_meta.py checks that every hookspec has one)."""

from __future__ import annotations

import types

from dsopt import Target, hookimpl, optimize
from dsopt.plugin import PluginHost
from tests.core.models import tiny


def _host_with(**hooks):
    plugin = types.ModuleType("recorder")
    for name, impl in hooks.items():
        setattr(plugin, name, hookimpl(impl))
    return PluginHost(extra=[plugin], autoload=False)


def test_hook_dsopt_register_passes():
    host = PluginHost(autoload=False)
    assert {"fold-constants", "eliminate-dead"} <= {p.name for p in host.passes}


def test_hook_dsopt_register_targets():
    host = _host_with(
        dsopt_register_targets=lambda registry: registry.add(
            Target(name="edge-box", summary="test target", pipeline="eliminate-dead")
        )
    )
    assert host.get_target("edge-box").pipeline == "eliminate-dead"


def test_hook_dsopt_extend_pipeline():
    seen = []

    def extend(pipeline, target):
        seen.append(target)
        pipeline.remove("fold-constants")

    host = _host_with(dsopt_extend_pipeline=extend)
    result = optimize(tiny(), target="onnxruntime", host=host)
    assert seen == ["onnxruntime"]
    assert "fold-constants" not in result.pipeline


def test_hook_dsopt_before_pass_and_after_pass_order():
    events = []
    host = _host_with(
        dsopt_before_pass=lambda pass_: events.append(("before", pass_.name)),
        dsopt_after_pass=lambda pass_, record: events.append(("after", pass_.name, record.changed)),
    )
    optimize(tiny(), passes="eliminate-dead", host=host)
    assert events == [("before", "eliminate-dead"), ("after", "eliminate-dead", True)]


test_hook_dsopt_before_pass = test_hook_dsopt_before_pass_and_after_pass_order
test_hook_dsopt_after_pass = test_hook_dsopt_before_pass_and_after_pass_order


def test_hook_dsopt_add_options():
    seen = {}

    class Probe:
        @hookimpl
        def dsopt_add_options(self, options):
            options.setdefault("probe_level", 3)

        @hookimpl
        def dsopt_before_pass(self, ctx):
            seen["level"] = ctx.options["probe_level"]

    host = PluginHost(extra=[], autoload=False)
    host.pm.register(Probe(), "probe")
    optimize(tiny(), passes="eliminate-dead", host=host)
    assert seen == {"level": 3}


def test_print_after_and_dump_dir(tmp_path, capsys):
    optimize(
        tiny(),
        passes="eliminate-noops,eliminate-dead",
        options={"print_after": ("eliminate-dead",), "dump_dir": str(tmp_path)},
    )
    err = capsys.readouterr().err
    assert "IR after eliminate-dead" in err and "Relu" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_eliminate-noops.onnx",
        "000_eliminate-noops.txt",
        "001_eliminate-dead.onnx",
        "001_eliminate-dead.txt",
    ]
