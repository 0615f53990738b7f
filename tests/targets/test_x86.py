"""TVM targets: x86 libraries built, run and checked against onnxruntime; cross targets built."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

import dsopt
from dsopt import numerics
from dsopt.cli import main
from dsopt.errors import CheckFailed, UsageError
from dsopt.plugin import PluginHost
from dsopt.testing import strategies

pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm

#: Each example costs a TVM compile (~1 s on 2 cores), so far fewer than PROPERTY_EXAMPLES.
TVM_EXAMPLES = 30
TVM_TARGETS = ("x86", "x86-avx2", "x86-avx512", "x86-vnni", "arm-neon", "rpi4", "jetson", "cuda")


def _const(rng, name, *shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def conv_net() -> onnx.ModelProto:
    """Conv-BN-Relu, a residual block, max pool, global pool and a Gemm head; dynamic batch."""
    rng = np.random.default_rng(0)
    weights = [
        _const(rng, "w0", 8, 3, 3, 3),
        _const(rng, "b0", 8),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_s"),
        _const(rng, "bn_b", 8),
        _const(rng, "bn_m", 8),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_v"),
        _const(rng, "w1", 8, 8, 3, 3),
        _const(rng, "w2", 8, 1, 3, 3),
        _const(rng, "fc_w", 8, 4),
        _const(rng, "fc_b", 4),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node(
            "BatchNormalization", ["c0", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"
        ),
        helper.make_node("Relu", ["bn"], ["r0"], name="relu0"),
        helper.make_node("MaxPool", ["r0"], ["p0"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dw"),
        helper.make_node("Add", ["c2", "p0"], ["res"], name="residual"),
        helper.make_node("Clip", ["res", "", ""], ["r1"], name="clip"),
        helper.make_node("GlobalAveragePool", ["r1"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def transformer_block(seq: int = 8, dim: int = 16, heads: int = 2) -> onnx.ModelProto:
    """Pre-LN attention + Gelu MLP with residuals; static shapes, shape arithmetic inside."""
    rng = np.random.default_rng(1)
    hd = dim // heads
    weights = [
        numpy_helper.from_array(np.ones(dim, np.float32), "ln_s"),
        numpy_helper.from_array(np.zeros(dim, np.float32), "ln_b"),
        *(_const(rng, f"w{n}", dim, dim) for n in ("q", "k", "v", "o")),
        _const(rng, "w_up", dim, 2 * dim),
        _const(rng, "w_down", 2 * dim, dim),
        numpy_helper.from_array(np.array([1, seq, heads, hd], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([1, seq, dim], np.int64), "merge_shape"),
        numpy_helper.from_array(np.array(1 / np.sqrt(hd), np.float32), "scale"),
        numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["h"], axis=-1)]
    for n in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["h", f"w{n}"], [f"{n}0"]),
            helper.make_node("Reshape", [f"{n}0", "heads_shape"], [f"{n}1"]),
            helper.make_node(
                "Transpose", [f"{n}1"], [f"{n}2"], perm=[0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]
            ),
        ]
    nodes += [
        helper.make_node("MatMul", ["q2", "k2"], ["s0"], name="scores"),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Softmax", ["s1"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v2"], ["a0"]),
        helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["a1", "merge_shape"], ["a2"]),
        helper.make_node("MatMul", ["a2", "wo"], ["a3"]),
        helper.make_node("Add", ["x", "a3"], ["x1"]),
        helper.make_node("LayerNormalization", ["x1", "ln_s", "ln_b"], ["h1"], axis=-1),
        helper.make_node("MatMul", ["h1", "w_up"], ["u"]),
        helper.make_node("Div", ["u", "sqrt2"], ["g0"]),
        helper.make_node("Erf", ["g0"], ["g1"]),
        helper.make_node("Add", ["g1", "one"], ["g2"]),
        helper.make_node("Mul", ["u", "g2"], ["g3"]),
        helper.make_node("Mul", ["g3", "half"], ["g4"]),
        helper.make_node("MatMul", ["g4", "w_down"], ["d"]),
        helper.make_node("Add", ["x1", "d"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "transformer_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    onnx.save(model, path)
    return path


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("dsopt: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def conv_out(tmp_path_factory):
    """The conv net compiled once for x86 (batch 2), shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("conv")
    result = dsopt.compile(
        _save(conv_net(), folder), target="x86", outdir=folder / "out", shapes={"x": [2, 3, 16, 16]}
    )
    return result


# -- x86: compiled libraries match onnxruntime -------------------------------------------------
def test_conv_net_compiles_for_x86_and_matches_onnxruntime(conv_out):
    check = conv_out.report["library_check"]
    assert check["ok"] is True, check
    assert conv_out.manifest["library_verified"] is True
    feeds = {"x": np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    target = PluginHost().get_target("x86")
    got = target.run(conv_out.outdir, conv_out.manifest, feeds)
    want = numerics.run_model(conv_net(), feeds)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-4, atol=1e-5)


def test_transformer_block_compiles_for_x86_and_matches_onnxruntime(tmp_path):
    result = dsopt.compile(
        _save(transformer_block(), tmp_path), target="x86", outdir=tmp_path / "o"
    )
    assert result.report["library_check"]["ok"] is True
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 8, 16)).astype(np.float32)}
    got = PluginHost().get_target("x86").run(result.outdir, result.manifest, feeds)
    want = numerics.run_model(transformer_block(), feeds)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-4, atol=1e-5)


@settings(
    max_examples=TVM_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(model=strategies.models(dynamic=False, max_ops=8))
def test_random_graphs_compiled_for_x86_match_onnxruntime(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("random")
    # compile raises CheckFailed when the library's outputs leave onnxruntime's tolerance.
    result = dsopt.compile(_save(model, folder), target="x86", outdir=folder / "out")
    assert result.report["library_check"]["ok"] is True


def test_library_mismatch_fails_the_check_and_writes_nothing(tmp_path, monkeypatch):
    from dsopt import _tvm

    real = _tvm.load_and_run
    monkeypatch.setattr(_tvm, "load_and_run", lambda *a, **k: [out + 1.0 for out in real(*a, **k)])
    with pytest.raises(CheckFailed, match="x86 library's output 'y' differs"):
        dsopt.compile(_save(transformer_block(), tmp_path), target="x86", outdir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- CLI: compile, run, manifest ---------------------------------------------------------------
def test_cli_compile_then_run_matches_onnxruntime(tmp_path, capsys):
    model = _save(conv_net(), tmp_path)
    out = tmp_path / "out"
    code = main(
        ["compile", str(model), "--target", "x86", "-o", str(out), "--shape", "x=1,3,16,16"]
    )
    assert code == 0, capsys.readouterr().err
    assert "library: ok vs onnxruntime" in capsys.readouterr().out
    x = np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    code = main(
        ["run", str(out), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "y.npz")]
    )
    assert code == 0, capsys.readouterr().err
    got = np.load(tmp_path / "y.npz")
    assert list(got) == ["y"]
    want = numerics.run_model(conv_net(), {"x": x})["y"]
    np.testing.assert_allclose(got["y"], want, rtol=1e-4, atol=1e-5)


def test_manifest_validates(conv_out):
    outdir, manifest = conv_out.outdir, json.loads((conv_out.outdir / "manifest.json").read_text())
    required = {
        "dsopt_manifest_version", "dsopt_version", "target", "source", "inputs", "outputs",
        "opset_imports", "pipeline", "artifacts", "verified", "equivalent", "tvm",
        "library_verified",
    }  # fmt: skip
    assert required <= set(manifest)
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 3, 16, 16]}]
    assert manifest["outputs"] == [{"name": "y", "dtype": "float32", "shape": [2, 4]}]
    tvm = manifest["tvm"]
    assert {"tvm", "tvm_ffi", "target"} <= set(tvm) and tvm["target"]["kind"] == "llvm"
    assert tvm["target"]["mcpu"]  # the host CPU, filled in at lowering
    roles = {a["role"]: a for a in manifest["artifacts"]}
    assert roles["library"]["path"] == "model.so" and roles["model"]["path"] == "model.onnx"
    for artifact in manifest["artifacts"]:
        path = outdir / artifact["path"]
        assert path.stat().st_size == artifact["bytes"]
        assert _sha256(path) == artifact["sha256"]
    dsopt.driver.verify_manifest(outdir, manifest)
    # The model written is the static one the library computes, and it is valid.
    static = onnx.load(outdir / "model.onnx")
    onnx.checker.check_model(static, full_check=True)


def test_run_refuses_a_changed_library(conv_out, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(conv_out.outdir, copy)
    with (copy / "model.so").open("ab") as f:
        f.write(b"\0")
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 3, 16, 16), np.float32))
    code = main(["run", str(copy), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o")])
    assert code == 2
    assert "does not match manifest.json" in _one_error_line(capsys.readouterr().err)


def test_unsupported_op_is_one_line_naming_op_node_and_target(tmp_path, capsys):
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Det", ["r"], ["y"], name="determinant"),
        ],
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path)
    code = main(["compile", str(model), "--target", "x86", "-o", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert "target 'x86'" in line and "op 'Det'" in line and "node 'determinant'" in line
    assert "--target onnxruntime" in err
    assert not (tmp_path / "o").exists()


def test_dynamic_model_without_shape_is_a_usage_error(tmp_path, capsys):
    model = _save(conv_net(), tmp_path)
    code = main(["compile", str(model), "--target", "x86", "-o", str(tmp_path / "o")])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "input 'x'" in line and "--shape x=1,3,16,16" in line
    assert not (tmp_path / "o").exists()


def test_shape_override_of_wrong_rank_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="rank 2"):
        dsopt.compile(
            _save(conv_net(), tmp_path), target="x86", outdir=tmp_path / "o", shapes={"x": [1, 3]}
        )


# -- cross targets: built here, run on the device ----------------------------------------------
@pytest.mark.parametrize(
    ("target", "library"),
    [("arm-neon", None), ("rpi4", None), ("jetson", None), ("cuda", "model.so")],
)
def test_cross_targets_build_a_library_that_runs_on_the_device(target, library, conv_out, tmp_path):
    model = _save(conv_net(), tmp_path)
    result = dsopt.compile(
        model, target=target, outdir=tmp_path / "o", shapes={"x": [1, 3, 16, 16]}
    )
    entry = next(a for a in result.manifest["artifacts"] if a["role"] == "library")
    # aarch64 links into a .so only where the cross compiler is installed, else objects (.tar).
    assert entry["path"] in ((library,) if library else ("model.so", "model.tar"))
    assert result.report["library_check"]["ok"] is None
    assert "run" in result.report["library_check"]["skipped"]
    if result.manifest["tvm"]["target"]["kind"] == "cuda":
        assert entry["cuda"]["code"] == ("cubin" if shutil.which("nvcc") else "source-jit")


def test_run_of_a_device_library_says_where_it_runs(tmp_path, capsys):
    model = _save(transformer_block(), tmp_path)
    assert main(["compile", str(model), "--target", "rpi4", "-o", str(tmp_path / "o")]) == 0
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 8, 16), np.float32))
    code = main(["run", str(tmp_path / "o"), "--inputs", str(tmp_path / "in.npz"), "-o", "y.npz"])
    assert code == 2
    assert "builds aarch64 code" in _one_error_line(capsys.readouterr().err)


# -- target data -------------------------------------------------------------------------------
def test_every_tvm_target_config_constructs_a_tvm_target():
    from dsopt import _tvm

    host = PluginHost()
    for name in TVM_TARGETS:
        target = host.get_target(name)
        config = target.tvm_config()
        tvm_target = _tvm.make_target(config)
        assert tvm_target.kind.name == config["kind"], name
        assert target.lower is dsopt.backend.lower_tvm
        assert set(target.precisions) >= {"float32", "int8"}
        assert target.precisions["float32"] > 0


def test_target_data_names_the_right_hardware():
    host = PluginHost()
    jetson = host.get_target("jetson").tvm_config()
    assert jetson["arch"] == "sm_87" and jetson["host"]["mcpu"] == "cortex-a78ae"
    assert host.get_target("rpi4").tvm_config()["mcpu"] == "cortex-a72"
    assert "+dotprod" not in host.get_target("rpi4").tvm_config()["mattr"]
    assert "+dotprod" in host.get_target("arm-neon").tvm_config()["mattr"]
    arches = {host.get_target(n).tvm_config()["arch"] for n in ("cuda", "cuda-sm86", "cuda-sm89")}
    assert arches == {"sm_80", "sm_86", "sm_89"}
    assert host.get_target("cuda-h100").tvm_config()["arch"] == "sm_90"
    assert host.get_target("x86-vnni").tvm_config()["mcpu"] == "cascadelake"
    assert "avx512vnni" in host.get_target("x86-vnni").cpu_features
    from dsopt import _tvm

    assert host.get_target("x86").tvm_config()["mcpu"] == _tvm.host_cpu_features()["cpu"]
