from __future__ import annotations

import csv
import json
import logging
import struct
import zlib

import numpy as np
import onnx
import pytest

from dsopt.cli import main
from dsopt.driver import compile as compile_model
from dsopt.mixed.plot import COLORS, SIZE, encode_png, render, write_beside, write_pareto
from tests.core.test_mixed_precision import _feeds, _mlp


def _decode(data: bytes) -> np.ndarray:
    """A strict decoder of the PNGs dsopt writes (8-bit RGB, filter 0): pillow is optional."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, color, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:].reshape(height, width, 3)


def _has(pixels: np.ndarray, color: tuple[int, int, int]) -> int:
    return int(np.all(pixels == np.array(color, np.uint8), axis=-1).sum())


def _entry(**budget):
    points = [
        {"label": "greedy", "bytes": 30, "rel_l2": 0.05, "cosine": 0.999, "chosen": True},
        {"label": "verified", "bytes": 35, "rel_l2": 0.08, "cosine": 0.998},  # dominated
        {"label": "uniform-fp16", "bytes": 50, "rel_l2": 0.001, "cosine": 1.0},
        {"label": "uniform-int8", "bytes": 26, "rel_l2": 0.1, "cosine": 0.995},
        {"label": "uniform-int4", "bytes": 16, "rel_l2": 0.3, "cosine": 0.95},
        {"label": "fp32", "bytes": 100, "rel_l2": 0.0, "cosine": 1.0},
    ]
    for p in points:
        p["pareto"] = p["label"] != "verified"
    full = {"size": None, "max_error": None, "min_cosine": None, **budget}
    return {"fp32_bytes": 100, "budget": full, "pareto": points}


def test_png_encoder_round_trips():
    pixels = np.random.default_rng(0).integers(0, 256, (7, 13, 3), dtype=np.uint8)
    assert np.array_equal(_decode(encode_png(pixels)), pixels)


def test_pillow_reads_the_png(tmp_path):
    """Cross-check with an independent decoder where the [bench] extra is installed."""
    image_module = pytest.importorskip("PIL.Image")
    pixels = np.random.default_rng(1).integers(0, 256, (5, 9, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(pixels))
    with image_module.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (9, 5)
        assert np.array_equal(np.asarray(image), pixels)


def test_render_draws_points_front_choice_and_budget_lines():
    pixels = render(_entry(size=40, max_error=0.2))
    assert pixels.shape == (SIZE[1], SIZE[0], 3)
    for key in ("point", "front", "chosen", "budget"):
        assert _has(pixels, COLORS[key]) > 20, key
    # Without a budget, no budget line: the colour only appears for budgets.
    assert _has(render(_entry()), COLORS["budget"]) == 0
    # The front is connected: red pixels between the int4 and int8 dots (x 0.16 .. 0.26).
    front = np.all(render(_entry()) == np.array(COLORS["front"], np.uint8), axis=-1)
    columns = np.nonzero(front.any(axis=0))[0]
    assert columns.max() - columns.min() > SIZE[0] // 2  # from int4 (0.16) to fp32 (1.0)
    # One polyline, not separate dots (the chosen ring, drawn on top, hides a few pixels).
    assert np.diff(columns).max() <= 4


def test_cosine_budget_plots_one_minus_cosine():
    by_rel = render(_entry(max_error=0.2))
    by_cos = render(_entry(min_cosine=0.99))
    assert not np.array_equal(by_rel, by_cos)
    assert _has(by_cos, COLORS["budget"]) > 20


def test_cli_writes_the_plot_beside_the_report(tmp_path):
    src, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save_model(_mlp(outlier_layer=1), src)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(2)]))
    argv = ["optimize", str(src), "-o", str(out), "--precision", "mixed", "--calib", str(calib)]
    assert main([*argv, "--size-budget", "0.4", "--report", str(report)]) == 0
    entry = json.loads(report.read_text())["mixed"]
    assert entry["plot"] == "r.pareto.png"
    assert sum(1 for p in entry["pareto"] if p.get("chosen")) == 1
    pixels = _decode((tmp_path / entry["plot"]).read_bytes())
    assert pixels.shape == (SIZE[1], SIZE[0], 3)
    assert _has(pixels, COLORS["front"]) > 20
    assert _has(pixels, COLORS["chosen"]) > 20
    assert _has(pixels, COLORS["budget"]) > 20
    # and the sensitivity table (dsopt/mixed/table.py), most sensitive first
    assert entry["table"] == "r.sensitivity.csv"
    rows = list(csv.DictReader((tmp_path / entry["table"]).open()))
    assert len(rows) == len(entry["nodes"]) == 4
    # the layer with +-100 outliers stretches every scale: the most sensitive at int4, and
    # its own output's SQNR at int8 is near 0 dB, where well-scaled layers keep > 30 dB
    assert rows[0]["node"] == "mm1"
    assert float(rows[0]["int8 sqnr_db"]) < 10
    for row in rows[1:]:
        if row["int8 sqnr_db"]:
            assert float(row["int8 sqnr_db"]) > 30
            assert float(row["fp16 sqnr_db"]) > float(row["int8 sqnr_db"])


def test_compile_writes_pareto_png_in_outdir(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save_model(_mlp(), src)
    result = compile_model(
        src,
        target="onnxruntime",  # float32 only: nothing lowers, the plot is still drawn
        outdir=tmp_path / "out",
        precision="mixed",
        calibration=_feeds(2),
        size_budget="1.0",
    )
    assert result.report["mixed"]["plot"] == "pareto.png"
    report = json.loads((result.outdir / "report.json").read_text())
    assert report["mixed"]["plot"] == "pareto.png"
    pixels = _decode((result.outdir / "pareto.png").read_bytes())
    assert pixels.shape == (SIZE[1], SIZE[0], 3)
    assert _has(pixels, COLORS["chosen"]) > 20
    assert result.report["mixed"]["table"] == "sensitivity.csv"
    rows = list(csv.DictReader((result.outdir / "sensitivity.csv").open()))
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]


def test_write_beside_never_fails_the_run(tmp_path, caplog):
    assert write_beside({"passes": []}, tmp_path / "r.json") is None  # no mixed entry
    report = {"mixed": _entry()}
    with caplog.at_level(logging.WARNING):
        assert write_beside(report, tmp_path / "missing" / "r.json") is None
    assert "no Pareto plot" in caplog.text
    assert "plot" not in report["mixed"]
    assert write_pareto(_entry(), tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize(
    "points", [[], [{"label": "fp32", "bytes": 0, "rel_l2": 0.0, "cosine": 1.0}]]
)
def test_degenerate_entries_still_render(points):
    pixels = render({"fp32_bytes": 0, "budget": {}, "pareto": points})
    assert pixels.shape == (SIZE[1], SIZE[0], 3)
