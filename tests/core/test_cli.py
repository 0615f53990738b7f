from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

from dsopt.cli import main
from tests.core.models import tiny

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cnn.onnx"


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny(), path)
    return path


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("dsopt: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_optimize_writes_output_and_report(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    before = model_path.read_bytes()
    code = main(
        [
            "optimize",
            str(model_path),
            "-o",
            str(out),
            "--check",
            "--verify",
            "each",
            "--report",
            str(report),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert model_path.read_bytes() == before
    optimized = onnx.load(out)
    onnx.checker.check_model(optimized, full_check=True)
    assert "Sigmoid" not in [n.op_type for n in optimized.graph.node]
    data = json.loads(report.read_text())
    assert data["equivalence"]["ok"] is True
    assert [p["name"] for p in data["passes"]][:2] == ["inline-constants", "eliminate-noops"]
    assert {"seconds", "nodes", "initializers", "bytes", "stats"} <= set(data["passes"][0])


def test_output_is_byte_identical_across_runs(model_path, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.onnx"
        assert main(["optimize", str(model_path), "-o", str(out)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_unknown_pass_is_one_line_exit_2(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(model_path), "-o", str(out), "--passes", "fold-constans"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "unknown pass 'fold-constans'" in line
    assert not out.exists()


def test_bad_option_value(model_path, tmp_path, capsys):
    code = main(
        [
            "optimize",
            str(model_path),
            "-o",
            str(tmp_path / "o.onnx"),
            "--passes",
            "fold-constants{max_size_mb=lots}",
        ]
    )
    assert code == 2
    assert "max_size_mb" in _one_error_line(capsys.readouterr().err)


def test_missing_and_corrupt_models(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.onnx")]) == 2
    assert "nope.onnx: no such file" in _one_error_line(capsys.readouterr().err)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01\x02not a model")
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(bad), "-o", str(out)]) == 2
    assert "bad.onnx" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_refuses_to_overwrite_input(model_path, capsys):
    before = model_path.read_bytes()
    assert main(["optimize", str(model_path), "-o", str(model_path)]) == 2
    assert "never overwrites its input" in _one_error_line(capsys.readouterr().err)
    assert model_path.read_bytes() == before


def test_usage_error_without_traceback(capsys):
    assert main(["optimize"]) == 2
    _one_error_line(capsys.readouterr().err)


def test_compile_onnxruntime_target(tmp_path, capsys):
    outdir = tmp_path / "tiny_cnn.ort"
    code = main(["compile", str(EXAMPLE), "--target", "onnxruntime", "-o", str(outdir)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((outdir / "manifest.json").read_text())
    report = json.loads((outdir / "report.json").read_text())
    assert manifest["target"] == "onnxruntime"
    assert manifest["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["N", 3, 32, 32]}]
    assert manifest["equivalent"] is True
    (artifact,) = manifest["artifacts"]
    assert artifact["path"] == "model.onnx"
    assert (outdir / "model.onnx").stat().st_size == artifact["bytes"]
    assert report["equivalence"]["ok"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_compile_unknown_target(tmp_path, capsys):
    assert main(["compile", str(EXAMPLE), "--target", "jetsn", "-o", str(tmp_path / "o")]) == 2
    assert "unknown target 'jetsn'" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_verify_command(model_path, tmp_path, capsys):
    other = tiny()
    for tensor in other.graph.initializer:
        tensor.CopyFrom(
            onnx.numpy_helper.from_array(
                onnx.numpy_helper.to_array(tensor) + np.float32(0.5), tensor.name
            )
        )
    changed = tmp_path / "changed.onnx"
    onnx.save_model(other, changed)
    assert main(["verify", str(model_path), str(model_path)]) == 0
    capsys.readouterr()
    assert main(["verify", str(model_path), str(changed), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False


def test_inspect_passes_targets(model_path, capsys):
    assert main(["inspect", str(model_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["nodes"] == 4
    assert main(["passes", "--json"]) == 0
    passes = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert passes["fold-constants"]["plugin"] == "dsopt.passes"
    assert main(["targets"]) == 0
    assert "onnxruntime" in capsys.readouterr().out


def test_python_dash_m_and_debug_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dsopt", "inspect", str(tmp_path / "x.onnx")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("dsopt: error:")
    debug = subprocess.run(
        [sys.executable, "-m", "dsopt", "inspect", str(tmp_path / "x.onnx"), "--debug"],
        capture_output=True,
        text=True,
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_inspect_with_fixed_shape_counts_flops(capsys):
    assert main(["inspect", str(EXAMPLE), "--json", "--shape", "input=1,3,32,32"]) == 0
    data = json.loads(capsys.readouterr().out)
    # conv1: 8*3*3*3 MACs per output pixel over 32*32; conv2: 16*8*3*3 over 16*16; fc: 16*10
    assert data["macs"] >= 8 * 27 * 32 * 32 + 16 * 72 * 16 * 16 + 160
    assert main(["inspect", str(EXAMPLE), "--shape", "nope=1"]) == 2
    assert "no input 'nope'" in _one_error_line(capsys.readouterr().err)


def test_explain_says_why_rules_did_not_fire(tmp_path, capsys):
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x, float[4, 3] w) => (float[2, 3] y, float[2, 3] t)
          <float[3] b = {1.0, 2.0, 3.0}> {
          t = MatMul (x, w)
          y = Add (t, b)
        }"""
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    assert main(["explain", str(path), "fuse-matmul-add", "--json"]) == 0
    reasons = json.loads(capsys.readouterr().out)["matmul-add"]
    assert any("graph output" in r or "not constant" in r for r in reasons), reasons
    assert main(["explain", str(path), "eliminate-dead"]) == 2
    assert "not made of rewrite rules" in _one_error_line(capsys.readouterr().err)


def test_explain_names_the_fused_op_a_target_lacks(tmp_path, capsys):
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) <float[4, 3, 1, 1] w = {
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0, 2.0, 3.0}> {
          c = Conv (x, w)
          y = Relu (c)
        }"""
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    assert main(["explain", str(path), "fuse-contrib-ops", "--json"]) == 0
    reasons = json.loads(capsys.readouterr().out)["fused-conv"]
    assert reasons == [
        "emits com.microsoft::FusedConv: runs only for targets that declare it "
        "(e.g. --target onnxruntime)"
    ]
    assert (
        main(["explain", str(path), "fuse-contrib-ops", "--target", "onnxruntime", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["fused-conv"] == []


def _qdq_tanh_model(path):
    from tests.core.test_quant_lint import _case

    onnx.save_model(_case(lambda b, y, x: b.op("Tanh", [y])), path)
    return path


def test_lint_prints_findings_and_exits_0(tmp_path, capsys):
    path = _qdq_tanh_model(tmp_path / "q.onnx")
    assert main(["lint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "float-island" in out and "the_Tanh" in out
    assert "1 float ops between requantizations" in out


def test_lint_json_and_strict_exit_code(tmp_path, capsys):
    path = _qdq_tanh_model(tmp_path / "q.onnx")
    assert main(["lint", str(path), "--json", "--target", "onnxruntime"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == "onnxruntime"
    assert [(f["kind"], f["node"]) for f in data["findings"]] == [("float-island", "the_Tanh")]
    assert main(["lint", str(path), "--strict"]) == 1
    capsys.readouterr()
    assert main(["lint", str(EXAMPLE), "--strict"]) == 0
    assert "nothing to lint" in capsys.readouterr().out


def test_lint_bad_target_and_missing_model_are_one_line_exit_2(tmp_path, capsys):
    path = _qdq_tanh_model(tmp_path / "q.onnx")
    assert main(["lint", str(path), "--target", "jetsn"]) == 2
    assert "unknown target 'jetsn'" in _one_error_line(capsys.readouterr().err)
    assert main(["lint", str(tmp_path / "missing.onnx")]) == 2
    _one_error_line(capsys.readouterr().err)
