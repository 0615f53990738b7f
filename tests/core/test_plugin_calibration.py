"""The `dsopt_calibration_data` hook, and contract errors that name the plugin."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dsopt import Pass, PassError, PluginError, UsageError, hookimpl, optimize
from dsopt.cli import main
from dsopt.plugin import PluginHost
from tests.core.models import tiny
from tests.core.test_build import SCHEMA, _validate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_cnn.onnx"


def _feeds(scale: float, count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [
        {"input": (scale * rng.standard_normal((1, 3, 32, 32))).astype(np.float32)}
        for _ in range(count)
    ]


def _provider(name: str, answer, calls: list | None = None) -> PluginHost:
    """A host with an in-process plugin `name` whose hook records its calls and returns
    `answer` (a value, or a callable of the hook's arguments)."""
    module = types.ModuleType(name)

    def dsopt_calibration_data(model, shapes, precision, options):
        if calls is not None:
            calls.append({"inputs": [i.name for i in model.graph.input], "precision": precision})
        return answer(model, shapes, precision, options) if callable(answer) else answer

    module.dsopt_calibration_data = hookimpl(dsopt_calibration_data)
    return PluginHost(extra=[module], autoload=False)


def _activation_scales(model: onnx.ModelProto) -> np.ndarray:
    """The scales of the activation QuantizeLinear nodes, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    scales = [
        float(numpy_helper.to_array(inits[n.input[1]]))
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    ]
    assert scales, "no activation was quantized"
    return np.array(scales)


def test_hook_dsopt_calibration_data():
    calls: list = []
    host = _provider("calib-provider", _feeds(1.0), calls)
    result = optimize(EXAMPLE, precision="int8", host=host)
    assert calls == [{"inputs": ["input"], "precision": "int8"}]
    assert "quantize-static" in result.pipeline  # static int8: calibrated
    assert result.calibration == {"from": "plugin", "plugin": "calib-provider", "samples": 3}
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)


def test_plugin_feeds_decide_the_activation_scales():
    small = optimize(EXAMPLE, precision="int8", host=_provider("p", _feeds(1.0)))
    large = optimize(EXAMPLE, precision="int8", host=_provider("p", _feeds(10.0)))
    ratio = _activation_scales(large.model) / _activation_scales(small.model)
    assert np.all(ratio > 5.0), ratio  # ten times larger inputs, activations ~ten times wider


def test_user_calibration_wins_and_fp32_never_asks():
    calls: list = []
    host = _provider("p", _feeds(10.0), calls)
    user = optimize(EXAMPLE, precision="int8", host=host, calibration=_feeds(1.0))
    assert calls == []
    assert user.calibration == {"from": "user", "source": "feeds", "samples": 3}
    plugin_scales = _activation_scales(optimize(EXAMPLE, precision="int8", host=host).model)
    assert np.all(_activation_scales(user.model) < plugin_scales / 5.0)
    calls.clear()
    plain = optimize(EXAMPLE, host=host)
    optimize(EXAMPLE, precision="int8-dynamic", host=host)
    assert calls == [] and plain.calibration is None


def test_first_plugin_with_data_wins_and_none_passes():
    host = _provider("passes", None)
    module = types.ModuleType("answers")
    module.dsopt_calibration_data = hookimpl(tryfirst=True)(lambda model: _feeds(1.0, count=2))
    host.pm.register(module, "answers")
    assert host.calibration_data(onnx.load(EXAMPLE))[1] == "answers"
    host.pm.unregister(name="answers")
    assert host.calibration_data(onnx.load(EXAMPLE)) is None


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (42, r"plugin 'bad-calib': dsopt_calibration_data returned int; it must return"),
        ({"input": np.zeros((1, 3, 32, 32), np.float32)}, "returned one feed mapping"),
        ("data.npz", "returned str"),
        ([np.zeros(3)], r"sample 0 is ndarray, not a mapping"),
        ([], "returned no samples"),
        ([{"x": np.zeros((1, 3, 32, 32), np.float32)}], r"'bad-calib'.*'x' is not an input"),
        ([{"input": np.zeros((1, 3, 32, 32), np.int64)}], r"'bad-calib'"),
    ],
)
def test_wrong_answers_are_plugin_errors_naming_the_plugin(answer, match):
    with pytest.raises(PluginError, match=match):
        optimize(EXAMPLE, precision="int8", host=_provider("bad-calib", answer))


def test_a_raising_provider_is_named():
    def boom(model, shapes, precision, options):
        raise FileNotFoundError("no dataset at /data/calib")

    with pytest.raises(PluginError, match=r"plugin 'flaky' failed in dsopt_calibration_data: "):
        optimize(EXAMPLE, precision="int8", host=_provider("flaky", boom))


def test_provider_sees_shapes_and_plugin_options():
    seen = {}

    class Provider:
        @hookimpl
        def dsopt_add_options(self, options):
            options.setdefault("calib_scale", 2.0)

        @hookimpl
        def dsopt_calibration_data(self, shapes, options):
            seen.update(shapes=shapes, scale=options["calib_scale"])
            return _feeds(options["calib_scale"], count=1)

    host = PluginHost(autoload=False)
    host.pm.register(Provider(), "provider")
    result = optimize(
        EXAMPLE, precision="int8", host=host, shapes={"input": [1, 3, 32, 32]}, check=True
    )
    assert seen == {"shapes": {"input": [1, 3, 32, 32]}, "scale": 2.0}
    assert result.calibration["plugin"] == "provider"


def test_mixed_precision_measures_on_plugin_feeds():
    calls: list = []
    result = optimize(
        EXAMPLE, precision="mixed", size_budget=0.5, host=_provider("p", _feeds(1.0), calls)
    )
    assert [c["precision"] for c in calls] == ["mixed"]
    assert result.mixed is not None and result.calibration["plugin"] == "p"


def test_mixed_without_any_calibration_still_refuses():
    with pytest.raises(UsageError, match="needs calibration data"):
        optimize(EXAMPLE, precision="mixed", size_budget=0.5, host=_provider("p", None))


def test_cli_report_names_the_plugin(tmp_path, monkeypatch):
    (tmp_path / "calib_plugin_mod.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from dsopt import hookimpl

            @hookimpl
            def dsopt_calibration_data(model):
                rng = np.random.default_rng(0)
                return [{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "calib_plugin_mod", raising=False)
    report = tmp_path / "r.json"
    argv = ["optimize", str(EXAMPLE), "-o", str(tmp_path / "q.onnx"), "--precision", "int8"]
    assert main([*argv, "-p", "calib_plugin_mod", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["calibration"] == {"from": "plugin", "plugin": "calib_plugin_mod", "samples": 1}
    assert any(p["name"] == "quantize-static" and p["changed"] for p in data["passes"])
    schema = json.loads(SCHEMA.read_text())
    _validate(data, schema, schema)
    assert set(schema["properties"]["calibration"]["properties"]) >= set(data["calibration"])


# -- a pass that returns something other than PassResult ----------------------------------------
@dataclasses.dataclass(frozen=True)
class ReturnsDict(Pass):
    name = "returns-dict"
    summary = "returns a dict instead of a PassResult"

    def run(self, module, ctx):
        return {"changed": False}


def test_wrong_pass_result_type_names_the_plugin():
    module = types.ModuleType("sloppy-plugin")
    module.dsopt_register_passes = hookimpl(lambda registry: registry.add(ReturnsDict))
    host = PluginHost(extra=[module], autoload=False)
    with pytest.raises(PassError) as info:
        optimize(tiny(), passes="eliminate-dead,returns-dict", host=host)
    message = info.value.message
    assert message.startswith("plugin 'sloppy-plugin': pass 'returns-dict' (#1) failed")
    assert "ReturnsDict.run must return PassResult, not dict" in message
    assert "eliminate-dead" in message  # the passes before it
