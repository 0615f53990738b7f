"""`dsopt compile --cache-dir`: a content-addressed copy of the whole OUTDIR."""

from __future__ import annotations

import dataclasses
import json
import shutil
import types
from pathlib import Path

import pytest

import dsopt.driver
from dsopt import Target, cache, hookimpl
from dsopt.backend import write_onnx
from dsopt.cli import main
from dsopt.plugin import PluginHost
from tests.core.test_build import SCHEMA, _validate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_cnn.onnx"

LOWERED: list[str] = []


def counting_lower(module, outdir, options):
    """A target's lowering that records each call (the compiler a hit must not run)."""
    LOWERED.append(str(outdir))
    return write_onnx(module, outdir, options)


COUNTING = Target(name="counting", summary="writes model.onnx, counts", lower=counting_lower)


def _host() -> PluginHost:
    module = types.ModuleType("counting-target")
    module.dsopt_register_targets = hookimpl(lambda registry: registry.add(COUNTING))
    return PluginHost(extra=[module], autoload=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _no_pipeline(*args, **kwargs):
    raise AssertionError("a cache hit optimized the model again")


def test_cli_second_compile_is_a_no_op_with_identical_bytes(tmp_path, monkeypatch):
    store = tmp_path / "cache"
    argv = ["compile", str(EXAMPLE), "--target", "onnxruntime", "--cache-dir", str(store)]
    assert main([*argv, "-o", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "report.json").read_text())
    assert first["cache"]["hit"] is False and first["passes"]
    (entry,) = store.glob("*/*/outdir")
    assert sorted(_files(entry)) == ["manifest.json", "model.onnx", "report.json"]

    monkeypatch.setattr(dsopt.driver, "optimize", _no_pipeline)
    assert main([*argv, "-o", str(tmp_path / "b")]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for name in ("model.onnx", "manifest.json"):
        assert a[name] == b[name], name
    second = json.loads(b["report.json"])
    assert second["cache"] == {**first["cache"], "hit": True}
    assert {**second, "cache": None} == {**first, "cache": None}
    _validate(second, json.loads(SCHEMA.read_text()), json.loads(SCHEMA.read_text()))
    assert not list(tmp_path.glob(".b.*")), "a staging folder was left behind"


def test_api_hit_skips_the_lowering_and_replaces_an_older_outdir(tmp_path, monkeypatch):
    LOWERED.clear()
    host, store, out = _host(), tmp_path / "cache", tmp_path / "out"
    first = dsopt.driver.compile(EXAMPLE, target="counting", outdir=out, host=host, cache_dir=store)
    assert len(LOWERED) == 1 and first.report["cache"]["hit"] is False
    saved = _files(out)
    (out / "stale.txt").write_text("from an older build")  # OUTDIR is replaced as a whole
    monkeypatch.setattr(dsopt.driver, "optimize", _no_pipeline)
    again = dsopt.driver.compile(EXAMPLE, target="counting", outdir=out, host=host, cache_dir=store)
    assert len(LOWERED) == 1, "the lowering ran on a cache hit"
    assert again.report["cache"]["hit"] is True and again.manifest == first.manifest
    now = _files(out)
    assert "stale.txt" not in now
    assert {k: v for k, v in now.items() if k != "report.json"} == {
        k: v for k, v in saved.items() if k != "report.json"
    }


def test_changed_settings_miss(tmp_path):
    LOWERED.clear()
    host, store = _host(), tmp_path / "cache"

    def build(name, **kwargs):
        result = dsopt.driver.compile(
            EXAMPLE, target="counting", outdir=tmp_path / name, host=host, cache_dir=store, **kwargs
        )
        return result.report["cache"]

    base = build("a")
    assert build("b", shapes={"input": [1, 3, 32, 32]})["hit"] is False
    assert build("c", passes="eliminate-dead")["hit"] is False
    assert build("d", rtol=1e-3)["hit"] is False
    assert build("e", shapes={"input": [1, 3, 32, 32]})["hit"] is True
    assert len(LOWERED) == 4
    assert len({base["key"], build("f", check=False)["key"]}) == 2


def test_key_covers_target_declaration_tuning_and_tvm_version(tmp_path, monkeypatch):
    host = _host()
    model = tmp_path / "m.onnx"
    shutil.copyfile(EXAMPLE, model)
    x86 = host.get_target("x86")

    def key(target=x86, **settings):
        return cache.compile_key(model, {"tune": None, **settings}, host, target)

    base = key()
    assert key() == base
    assert key(target=host.get_target("arm-neon")) != base
    assert key(target=dataclasses.replace(x86, tvm={**x86.tvm, "mattr": ["+avx2"]})) != base
    assert key(target=dataclasses.replace(x86, lower=counting_lower)) != base
    assert key(tune={"minutes": 1.0, "trials": 8}) != base
    assert key(tune={"minutes": 1.0, "trials": 8}) != key(tune={"minutes": 1.0, "trials": 16})
    real = cache._version
    monkeypatch.setattr(
        cache, "_version", lambda name: "0.99.0" if name == "apache-tvm" else real(name)
    )
    assert key() != base
    spec = cache.target_fingerprint(x86)
    assert spec["name"] == "x86" and spec["lower"].startswith("dsopt.")
    assert "0x" not in json.dumps(spec)  # no function reprs with addresses


def test_feeds_and_files_enter_the_key(tmp_path):
    import numpy as np

    settings = {"inputs": [{"input": np.zeros((1, 3, 32, 32), np.float32)}]}
    a = cache.compile_settings(settings, {})
    b = cache.compile_settings({"inputs": [{"input": np.ones((1, 3, 32, 32), np.float32)}]}, {})
    assert a["inputs"] != b["inputs"]
    calib = tmp_path / "calib.npz"
    resolved = cache.compile_settings({"calibration": str(calib)}, {"progress": print})
    assert resolved == {"options": {}, "calibration_file": str(calib)}
    assert cache.compile_settings({}, {"dump_dir": str(tmp_path)}) is None


def test_damaged_entry_is_a_miss_and_is_repaired(tmp_path):
    LOWERED.clear()
    host, store = _host(), tmp_path / "cache"
    dsopt.driver.compile(
        EXAMPLE, target="counting", outdir=tmp_path / "a", host=host, cache_dir=store
    )
    (entry,) = store.glob("*/*/outdir")
    (entry / "model.onnx").write_bytes(b"not the model")
    result = dsopt.driver.compile(
        EXAMPLE, target="counting", outdir=tmp_path / "b", host=host, cache_dir=store
    )
    assert result.report["cache"]["hit"] is False and len(LOWERED) == 2
    assert (entry / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    hit = dsopt.driver.compile(
        EXAMPLE, target="counting", outdir=tmp_path / "c", host=host, cache_dir=store
    )
    assert hit.report["cache"]["hit"] is True and len(LOWERED) == 2


def test_a_failed_restore_leaves_no_partial_outdir(tmp_path, monkeypatch):
    host, store, out = _host(), tmp_path / "cache", tmp_path / "out"
    dsopt.driver.compile(
        EXAMPLE, target="counting", outdir=tmp_path / "a", host=host, cache_dir=store
    )
    (tmp_path / "out").mkdir()
    shutil.copytree(tmp_path / "a", out, dirs_exist_ok=True)
    before = _files(out)
    copied: list[str] = []

    def failing_copy(src, dst, **kwargs):
        if copied:
            raise OSError("disk full")
        copied.append(src)
        return shutil.copy(src, dst)

    monkeypatch.setattr(cache.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        dsopt.driver.compile(EXAMPLE, target="counting", outdir=out, host=host, cache_dir=store)
    assert copied, "the restore did not start"
    assert _files(out) == before  # the previous OUTDIR, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "cache", "out"]


def test_instruments_plugins_and_no_cache_bypass(tmp_path, monkeypatch):
    store = tmp_path / "cache"
    argv = ["compile", str(EXAMPLE), "--target", "onnxruntime", "--no-check"]
    dump = ["--dump-dir", str(tmp_path / "dump")]
    assert main([*argv, "-o", str(tmp_path / "a"), "--cache-dir", str(store), *dump]) == 0
    assert not store.exists()
    assert "cache" not in json.loads((tmp_path / "a" / "report.json").read_text())
    monkeypatch.setenv("DSOPT_CACHE_DIR", str(store))
    assert main([*argv, "-o", str(tmp_path / "b"), "--no-cache"]) == 0
    assert not store.exists()
    assert main([*argv, "-o", str(tmp_path / "c")]) == 0
    assert len(list(store.glob("*/*/outdir/manifest.json"))) == 1


@pytest.mark.tvm
def test_x86_hit_does_not_call_the_tvm_compiler(tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    from dsopt import _tvm

    store = tmp_path / "cache"
    argv = ["compile", str(EXAMPLE), "--target", "x86", "--shape", "input=1,3,32,32"]
    argv += ["--cache-dir", str(store)]
    assert main([*argv, "-o", str(tmp_path / "a")]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["tvm"]["tvm"] and any(a["role"] == "library" for a in manifest["artifacts"])

    def no_compiler(*args, **kwargs):
        raise AssertionError("TVM compiled on a cache hit")

    monkeypatch.setattr(_tvm, "build", no_compiler)
    monkeypatch.setattr(_tvm, "import_onnx", no_compiler)
    assert main([*argv, "-o", str(tmp_path / "b")]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert {k: v for k, v in a.items() if k != "report.json"} == {
        k: v for k, v in b.items() if k != "report.json"
    }
    assert json.loads(b["report.json"])["cache"]["hit"] is True
