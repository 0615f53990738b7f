"""`dsopt bench`: table, JSON, plot, and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from dsopt import bench
from dsopt.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cnn.onnx"


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """The example model, its optimized form, and a fp16 copy with external data."""
    folder = tmp_path_factory.mktemp("bench")
    assert main(["optimize", str(EXAMPLE), "-o", str(folder / "opt.onnx")]) == 0
    external = folder / "external.onnx"
    onnx.save_model(
        onnx.load(EXAMPLE),
        external,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="external.data",
        size_threshold=0,
    )
    return EXAMPLE, folder / "opt.onnx", external


def test_bench_json_has_every_measure(variants, capsys):
    base, opt, external = variants
    argv = ["bench", str(base), str(opt), str(external), "--runs", "5", "--warmup", "1"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    models = data["models"]
    assert [Path(m["path"]).name for m in models] == ["tiny_cnn.onnx", "opt.onnx", "external.onnx"]
    assert models[0]["ratio"] == 1.0 and models[0]["fidelity"] is None
    for m in models:
        lat = m["latency_ms"]
        assert 0 < lat["min"] <= lat["q1"] <= lat["median"] <= lat["q3"] <= lat["max"]
        assert m["flops"] >= m["macs"] > 0
        assert m["peak_mb"] > data["baseline_peak_mb"] > 0
    # Size counts external data: the file alone is tiny, the total is the weights' bytes.
    assert external.stat().st_size < 2000 < models[2]["bytes"]
    assert (
        models[2]["bytes"]
        == external.stat().st_size + (external.parent / "external.data").stat().st_size
    )
    # Same weights, same graph: identical outputs; the optimized model within float rounding.
    assert models[2]["worst"]["max_abs_error"] == 0.0
    assert models[1]["worst"]["cosine"] > 0.99999
    assert models[1]["flops"] <= models[0]["flops"]


def test_bench_table_and_plot(variants, tmp_path, capsys):
    pytest.importorskip("PIL", reason="--plot needs the bench extra (pillow)")
    base, opt, _ = variants
    png = tmp_path / "plot.png"
    argv = ["bench", str(base), str(opt), "--runs", "3", "--no-memory", "--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "median ms" in out and "opt.onnx" in out and "1.00x" in out
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 100


def test_bench_with_inputs_file(variants, tmp_path):
    base, opt, _ = variants
    feeds = tmp_path / "in.npz"
    np.savez(feeds, input=np.zeros((1, 3, 32, 32), np.float32))
    report = bench.bench([base, opt], inputs=str(feeds), runs=2, warmup=0, memory=False)
    assert report.inputs == str(feeds)
    assert len(report.models) == 2 and report.models[1].fidelity


def test_plot_without_pillow_is_a_usage_error(variants, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "PIL", None)
    base, _, _ = variants
    code = main(
        ["bench", str(base), "--runs", "1", "--no-memory", "--plot", str(tmp_path / "p.png")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "pip install dsopt[bench]" in err and "Traceback" not in err


def test_bench_errors_are_one_line_exit_2(variants, tmp_path, capsys):
    base, _, _ = variants
    assert main(["bench", str(base), str(tmp_path / "missing.onnx"), "--no-memory"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(base), "--runs", "0", "--no-memory"]) == 2
    assert "--runs" in capsys.readouterr().err
    other = tmp_path / "other.onnx"
    from tests.core.models import tiny

    onnx.save_model(tiny(), other)
    assert main(["bench", str(base), str(other), "--no-memory"]) == 2
    assert "same inputs" in capsys.readouterr().err
