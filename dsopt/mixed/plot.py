"""The Pareto plot of `--precision mixed`: output error vs weight size, as a PNG.

Drawn from report.json's `mixed` entry alone (so a cached report can be drawn again): every
measured assignment as a grey dot, the Pareto front in red and connected, the chosen
assignment ringed in blue, the uniform fp32/fp16/int8/int4 points labelled and the budget as
green dashed lines. The y axis is the worst output's relative L2 error, or 1 - cosine when
the budget is `--min-cosine` alone (so the budget line is exact).

No dependency: a numpy canvas, a 3x5 pixel font and a PNG encoder on zlib (about 100 lines).
Pillow is only an optional extra (`dsopt[bench]`), and a report feature of every
`--precision mixed` run should not depend on it, nor silently vanish without it.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["COLORS", "SIZE", "encode_png", "render", "write_beside", "write_pareto"]

logger = logging.getLogger(__name__)

#: (width, height) of the PNG.
SIZE = (720, 450)
COLORS = {
    "point": (160, 160, 160),
    "front": (219, 68, 55),
    "chosen": (66, 133, 244),
    "budget": (15, 157, 88),
    "axis": (0, 0, 0),
    "grid": (232, 232, 232),
}
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 24, 40, 56

# 3x5 glyphs, rows top to bottom ("#" = ink); text is drawn upper-cased.
_FONT = {
    "0": "###/#.#/#.#/#.#/###", "1": ".#./##./.#./.#./###", "2": "###/..#/###/#../###",
    "3": "###/..#/.##/..#/###", "4": "#.#/#.#/###/..#/..#", "5": "###/#../###/..#/###",
    "6": "###/#../###/#.#/###", "7": "###/..#/.#./.#./.#.", "8": "###/#.#/###/#.#/###",
    "9": "###/#.#/###/..#/###", "A": ".#./#.#/###/#.#/#.#", "B": "##./#.#/##./#.#/##.",
    "C": ".##/#../#../#../.##", "D": "##./#.#/#.#/#.#/##.", "E": "###/#../##./#../###",
    "F": "###/#../##./#../#..", "G": ".##/#../#.#/#.#/.##", "H": "#.#/#.#/###/#.#/#.#",
    "I": "###/.#./.#./.#./###", "J": "..#/..#/..#/#.#/.#.", "K": "#.#/#.#/##./#.#/#.#",
    "L": "#../#../#../#../###", "M": "#.#/###/###/#.#/#.#", "N": "##./#.#/#.#/#.#/#.#",
    "O": ".#./#.#/#.#/#.#/.#.", "P": "##./#.#/##./#../#..", "Q": ".#./#.#/#.#/.#./..#",
    "R": "##./#.#/##./#.#/#.#", "S": ".##/#../.#./..#/##.", "T": "###/.#./.#./.#./.#.",
    "U": "#.#/#.#/#.#/#.#/###", "V": "#.#/#.#/#.#/#.#/.#.", "W": "#.#/#.#/###/###/#.#",
    "X": "#.#/#.#/.#./#.#/#.#", "Y": "#.#/#.#/.#./.#./.#.", "Z": "###/..#/.#./#../###",
    ".": ".../.../.../.../.#.", "-": ".../.../###/.../...", "+": ".../.#./###/.#./...",
    ":": ".../.#./.../.#./...", "=": ".../###/.../###/...", ">": "#../.#./..#/.#./#..",
    "<": "..#/.#./#../.#./..#", "/": "..#/..#/.#./#../#..", "(": ".#./#../#../#../.#.",
    ")": ".#./..#/..#/..#/.#.", "%": "#.#/..#/.#./#../#.#", "_": ".../.../.../.../###",
    ",": ".../.../.../.#./#..", " ": ".../.../.../.../...",
}  # fmt: skip
_GLYPHS = {
    ch: np.array([[c == "#" for c in row] for row in rows.split("/")], dtype=bool)
    for ch, rows in _FONT.items()
}


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (height, width, 3) uint8 array."""
    height, width, _ = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.pixels = np.full((height, width, 3), 255, np.uint8)

    def dot(self, x: float, y: float, color: tuple[int, int, int], radius: float) -> None:
        h, w, _ = self.pixels.shape
        ys, xs = np.ogrid[:h, :w]
        self.pixels[(xs - x) ** 2 + (ys - y) ** 2 <= radius**2] = color

    def ring(self, x: float, y: float, color: tuple[int, int, int], radius: float) -> None:
        h, w, _ = self.pixels.shape
        ys, xs = np.ogrid[:h, :w]
        d2 = (xs - x) ** 2 + (ys - y) ** 2
        self.pixels[(d2 <= radius**2) & (d2 >= (radius - 2.5) ** 2)] = color

    def line(
        self,
        p: tuple[float, float],
        q: tuple[float, float],
        color: tuple[int, int, int],
        width: int = 1,
        dash: int = 0,
    ) -> None:
        steps = int(max(abs(q[0] - p[0]), abs(q[1] - p[1]))) + 1
        xs = np.rint(np.linspace(p[0], q[0], steps)).astype(int)
        ys = np.rint(np.linspace(p[1], q[1], steps)).astype(int)
        if dash:
            keep = (np.arange(steps) // dash) % 2 == 0
            xs, ys = xs[keep], ys[keep]
        h, w, _ = self.pixels.shape
        for dx in range(-(width // 2), width - width // 2):
            for dy in range(-(width // 2), width - width // 2):
                ok = (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)
                self.pixels[ys[ok] + dy, xs[ok] + dx] = color

    def text(
        self, x: int, y: int, text: str, color: tuple[int, int, int] = (0, 0, 0), scale: int = 2
    ) -> int:
        """Draws `text` with its top left at (x, y); returns the width drawn."""
        h, w, _ = self.pixels.shape
        start = x
        for ch in text.upper():
            glyph = _GLYPHS.get(ch, _GLYPHS[" "])
            big = np.kron(glyph, np.ones((scale, scale), dtype=bool))
            gh, gw = big.shape
            if 0 <= x and x + gw <= w and 0 <= y and y + gh <= h:
                self.pixels[y : y + gh, x : x + gw][big] = color
            x += gw + scale
        return x - start


def _text_width(text: str, scale: int = 2) -> int:
    return len(text) * 4 * scale


def _ticks(high: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to about `high`."""
    raw = high / count
    step = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    return [i * step for i in range(int(high / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}" if value else "0"


def render(entry: Mapping[str, Any], size: tuple[int, int] = SIZE) -> np.ndarray:
    """The plot of a `mixed` report entry as an (height, width, 3) uint8 array."""
    width, height = size
    canvas = _Canvas(width, height)
    points = list(entry.get("pareto", []))
    budget = entry.get("budget") or {}
    fp32 = float(entry.get("fp32_bytes") or max((p["bytes"] for p in points), default=1) or 1)
    cosine_axis = budget.get("min_cosine") is not None and budget.get("max_error") is None

    def err(point: Mapping[str, Any]) -> float:
        value = 1 - point["cosine"] if cosine_axis else point["rel_l2"]
        return float(value) if math.isfinite(value) else 0.0

    limit = None
    if cosine_axis:
        limit = 1 - budget["min_cosine"]
    elif budget.get("max_error") is not None:
        limit = float(budget["max_error"])
    size_limit = budget.get("size") / fp32 if budget.get("size") is not None else None
    x_high = max([p["bytes"] / fp32 for p in points] + [size_limit or 0, 1.0]) * 1.05
    y_high = max([err(p) for p in points] + [limit or 0]) * 1.12 or 1.0
    left, right, top, bottom = _LEFT, width - _RIGHT, _TOP, height - _BOTTOM

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (right - left) * x / x_high,
            bottom - (bottom - top) * y / y_high,
        )

    for tick in _ticks(x_high):
        px, _ = at(tick, 0)
        canvas.line((px, top), (px, bottom), COLORS["grid"])
        label = _label(tick)
        canvas.text(int(px) - _text_width(label) // 2, bottom + 6, label)
    for tick in _ticks(y_high):
        _, py = at(0, tick)
        canvas.line((left, py), (right, py), COLORS["grid"])
        label = _label(tick)
        canvas.text(left - 6 - _text_width(label), int(py) - 5, label)
    canvas.line((left, bottom), (right, bottom), COLORS["axis"], 2)
    canvas.line((left, top), (left, bottom), COLORS["axis"], 2)
    x_title = f"weight bytes / fp32 (fp32 = {fp32 / 1e6:.3g} mb)"
    canvas.text((left + right - _text_width(x_title)) // 2, height - 24, x_title)
    y_title = "1 - cosine" if cosine_axis else "rel l2 error"
    canvas.text(8, 10, f"{y_title} vs size: mixed precision candidates")
    if size_limit is not None:
        px, _ = at(size_limit, 0)
        canvas.line((px, top), (px, bottom), COLORS["budget"], 2, dash=6)
        canvas.text(int(px) + 4, top + 4, "size budget", COLORS["budget"])
    if limit is not None:
        _, py = at(0, limit)
        canvas.line((left, py), (right, py), COLORS["budget"], 2, dash=6)
        name = "error budget"
        canvas.text(right - _text_width(name), int(py) - 14, name, COLORS["budget"])
    front = sorted((p for p in points if p.get("pareto")), key=lambda p: p["bytes"])
    for p, q in zip(front, front[1:], strict=False):
        canvas.line(
            at(p["bytes"] / fp32, err(p)), at(q["bytes"] / fp32, err(q)), COLORS["front"], 2
        )
    for p in points:
        x, y = at(p["bytes"] / fp32, err(p))
        canvas.dot(x, y, COLORS["front"] if p.get("pareto") else COLORS["point"], 5)
        label = str(p.get("label", ""))
        if label == "fp32" or label.startswith("uniform-"):
            name = label.removeprefix("uniform-")
            lx = int(x) + 8 if x + 8 + _text_width(name) < width else int(x) - 8 - _text_width(name)
            canvas.text(lx, int(y) - 14, name)
        if p.get("chosen"):
            canvas.ring(x, y, COLORS["chosen"], 10)
    legend = [("point", "measured"), ("front", "pareto front"), ("chosen", "chosen")]
    x = width - _RIGHT - sum(20 + _text_width(name) for _, name in legend)
    for key, name in legend:
        canvas.dot(x + 4, 15, COLORS[key], 5)
        x += 20 + canvas.text(x + 14, 10, name, COLORS["axis"])
    return canvas.pixels


def write_pareto(entry: Mapping[str, Any], path: str | Path, size: tuple[int, int] = SIZE) -> Path:
    """Writes the plot of a `mixed` report entry to `path` (a PNG)."""
    path = Path(path)
    path.write_bytes(encode_png(render(entry, size)))
    return path


def write_beside(report: MutableMapping[str, Any], report_path: str | Path) -> Path | None:
    """Writes the plot and sensitivity table of `report`'s `mixed` entry beside `report_path`.

    The files are `pareto.png` and `sensitivity.csv` beside a `report.json` (compile's
    OUTDIR), else `<report stem>.pareto.png` / `<report stem>.sensitivity.csv`; `mixed.plot`
    and `mixed.table` name them (relative to the report). Returns the plot's path, None
    without a `mixed` entry. Never fails the run: an unwritable file is a warning.
    """
    from dsopt.mixed.table import write_table

    entry = report.get("mixed")
    if not isinstance(entry, MutableMapping):
        return None
    report_path = Path(report_path)
    stem = "" if report_path.name == "report.json" else f"{report_path.stem}."
    table = f"{stem}sensitivity.csv"
    try:
        write_table(entry, report_path.parent / table)
        entry["table"] = table
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("--precision mixed: no sensitivity table: %s", e)
    name = f"{stem}pareto.png"
    try:
        out = write_pareto(entry, report_path.parent / name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("--precision mixed: no Pareto plot: %s", e)
        return None
    entry["plot"] = name
    return out
