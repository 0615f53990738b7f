"""Build-system integration: determinism, the artifact cache, report schema, Make and CMake."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsopt.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_cnn.onnx"
SCHEMA = ROOT / "docs" / "report.schema.json"
TIMING = {"seconds", "lowering_seconds"}


def _untimed(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k not in TIMING}
    out["passes"] = [{k: v for k, v in p.items() if k != "seconds"} for p in report["passes"]]
    return out


def _chain(n: int = 120) -> onnx.ModelProto:
    """x -> (MatMul w_i -> Add b_i -> Relu) * n: enough passes' work to time a cache hit."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        inits += [
            numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Identity", [f"a{i}"], [f"i{i}"]),
            helper.make_node("Relu", [f"i{i}"], [f"r{i}"]),
        ]
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# -- determinism -------------------------------------------------------------------------------
def test_compile_twice_gives_identical_model_and_manifest(tmp_path):
    runs = []
    for i in range(2):
        outdir = tmp_path / f"out{i}"
        assert main(["compile", str(EXAMPLE), "--target", "onnxruntime", "-o", str(outdir)]) == 0
        runs.append(outdir)
    a, b = runs
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    report_a, report_b = (json.loads((d / "report.json").read_text()) for d in runs)
    assert _untimed(report_a) == _untimed(report_b)


def test_seeded_int8_calibration_is_deterministic(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"q{i}.onnx"
        argv = ["optimize", str(EXAMPLE), "-o", str(out), "--precision", "int8"]
        assert main([*argv, "--calib", "synthetic"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(outs[0]).graph.node)


# -- cache -------------------------------------------------------------------------------------
def test_cache_hit_is_a_fast_no_op_with_identical_bytes(tmp_path, monkeypatch):
    model = tmp_path / "chain.onnx"
    onnx.save_model(_chain(), model)
    cache = tmp_path / "cache"
    argv = ["optimize", str(model), "--cache-dir", str(cache), "--check"]

    started = time.perf_counter()
    assert main([*argv, "-o", str(tmp_path / "a.onnx"), "--report", str(tmp_path / "a.json")]) == 0
    miss = time.perf_counter() - started
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["cache"]["hit"] is False and first["passes"]

    import dsopt.driver

    def no_pass(*args, **kwargs):
        raise AssertionError("a cache hit ran the pipeline")

    monkeypatch.setattr(dsopt.driver, "optimize", no_pass)
    started = time.perf_counter()
    assert main([*argv, "-o", str(tmp_path / "b.onnx"), "--report", str(tmp_path / "b.json")]) == 0
    hit = time.perf_counter() - started
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["cache"] == {**first["cache"], "hit": True}
    assert _untimed({**second, "cache": None}) == _untimed({**first, "cache": None})
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert hit < miss / 3, (hit, miss)


def test_cache_key_changes_with_model_options_and_bypasses(tmp_path, monkeypatch):
    from dsopt import cache
    from dsopt.plugin import PluginHost

    host = PluginHost()
    model = tmp_path / "m.onnx"
    shutil.copyfile(EXAMPLE, model)
    base = cache.cache_key(model, {"passes": None}, host)
    assert cache.cache_key(model, {"passes": None}, host) == base
    assert cache.cache_key(model, {"passes": "eliminate-dead"}, host) != base
    calib = tmp_path / "c.npz"
    np.savez(calib, input=np.zeros((1, 3, 32, 32), np.float32))
    with_calib = cache.cache_key(model, {"calib_file": str(calib)}, host)
    np.savez(calib, input=np.ones((1, 3, 32, 32), np.float32))
    assert cache.cache_key(model, {"calib_file": str(calib)}, host) != with_calib
    m = onnx.load(model)
    m.doc_string = "changed"
    onnx.save_model(m, model)
    assert cache.cache_key(model, {"passes": None}, host) != base
    # Instruments would not run on a hit: --dump-dir bypasses the cache.
    store = tmp_path / "cache"
    out = tmp_path / "o.onnx"
    argv = ["optimize", str(model), "-o", str(out), "--cache-dir", str(store)]
    assert main([*argv, "--dump-dir", str(tmp_path / "dump")]) == 0
    assert not store.exists()
    monkeypatch.setenv("DSOPT_CACHE_DIR", str(store))
    assert main(["optimize", str(model), "-o", str(out), "--no-cache"]) == 0
    assert not store.exists()
    assert main(["optimize", str(model), "-o", str(out)]) == 0
    assert len(list(store.glob("*/*/model.onnx"))) == 1


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    from dsopt.cache import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "dsopt" / "artifacts"


# -- report schema -----------------------------------------------------------------------------
def _validate(instance, schema, root, where="report"):
    """A structural subset of JSON Schema (type, required, properties, items, $ref, const,
    minimum, pattern), for environments without the jsonschema package."""
    import re

    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _validate(instance, root["$defs"][name], root, where)
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        py = {
            "object": dict,
            "array": list,
            "string": str,
            "boolean": bool,
            "null": type(None),
            "integer": int,
            "number": (int, float),
        }
        ok = any(
            isinstance(instance, py[k])
            and not (k in ("integer", "number") and instance is True)
            and not (k in ("integer", "number") and instance is False)
            for k in kinds
        )
        assert ok, f"{where}: {instance!r} is not {kinds}"
    if "const" in schema:
        assert instance == schema["const"], where
    if "minimum" in schema and isinstance(instance, int | float):
        assert instance >= schema["minimum"], where
    if "pattern" in schema and isinstance(instance, str):
        assert re.search(schema["pattern"], instance), where
    if isinstance(instance, dict):
        for key in schema.get("required", ()):
            assert key in instance, f"{where}: missing '{key}'"
        for key, sub in schema.get("properties", {}).items():
            if key in instance:
                _validate(instance[key], sub, root, f"{where}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            _validate(item, schema["items"], root, f"{where}[{i}]")


def test_reports_validate_against_the_documented_schema(tmp_path):
    schema = json.loads(SCHEMA.read_text())
    report = tmp_path / "r.json"
    argv = ["optimize", str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), "--check"]
    assert main([*argv, "--report", str(report), "--cache-dir", str(tmp_path / "c")]) == 0
    outdir = tmp_path / "ort"
    assert main(["compile", str(EXAMPLE), "--target", "onnxruntime", "-o", str(outdir)]) == 0
    reports = [json.loads(report.read_text()), json.loads((outdir / "report.json").read_text())]
    for data in reports:
        _validate(data, schema, schema)
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        jsonschema.Draft202012Validator.check_schema(schema)
        for data in reports:
            jsonschema.validate(data, schema)
    # The validator catches a broken report.
    broken = dict(reports[0])
    broken["passes"] = [{**broken["passes"][0], "changed": "yes"}]
    with pytest.raises(AssertionError, match="changed"):
        _validate(broken, schema, schema)


# -- Make and CMake ----------------------------------------------------------------------------
def _example_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "examples"
    folder.mkdir()
    for name in ("Makefile", "CMakeLists.txt", "tiny_cnn.onnx"):
        shutil.copyfile(ROOT / "examples" / name, folder / name)
    return folder


def _check_outputs(folder: Path) -> None:
    assert onnx.load(folder / "tiny_cnn.opt.onnx").graph.node
    manifest = json.loads((folder / "tiny_cnn.ort" / "manifest.json").read_text())
    assert manifest["target"] == "onnxruntime" and manifest["equivalent"] is True
    report = json.loads((folder / "tiny_cnn.opt.report.json").read_text())
    assert report["verification"].startswith("ok")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_example_builds_and_is_then_up_to_date(tmp_path):
    folder = _example_copy(tmp_path)
    dsopt = f"{sys.executable} -m dsopt"
    done = subprocess.run(
        ["make", "-C", str(folder), f"DSOPT={dsopt}"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    _check_outputs(folder / "build")
    again = subprocess.run(["make", "-q", "-C", str(folder), f"DSOPT={dsopt}"], cwd=ROOT)
    assert again.returncode == 0  # nothing left to rebuild


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_example_builds(tmp_path):
    folder = _example_copy(tmp_path)
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(folder), "-B", str(build), f"-DDSOPT_PYTHON={sys.executable}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    done = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    _check_outputs(build)


# -- config --show -----------------------------------------------------------------------------
def test_config_show_prints_file_and_flag_overrides(tmp_path, monkeypatch, capsys):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.dsopt]\ntarget = "onnxruntime"\nverify = "each"\nprecision = "fp16"\n'
        "[tool.dsopt.options.fold-constants]\nmax_size_mb = 4\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["config", "--show", "--json", "--verify", "off"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["source"] == str(tmp_path / "pyproject.toml")
    assert shown["target"] == "onnxruntime" and shown["verify"] == "off"
    assert shown["precision"] == "fp16"
    assert "fold-constants{max_size_mb=4}" in shown["pipeline"]
    assert shown["options"] == {"fold-constants": {"max_size_mb": 4}}
    assert main(["config", "--show", "--passes", "eliminate-dead"]) == 0
    text = capsys.readouterr().out
    assert 'pipeline = "eliminate-dead"' in text and 'verify = "each"' in text
    assert "[options.fold-constants]" in text and "max_size_mb = 4" in text
    assert main(["config"]) == 2
    assert "dsopt config --show" in capsys.readouterr().err
