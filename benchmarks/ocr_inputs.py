"""Rendered text images for the PP-OCR models, and the task metrics that judge their outputs.

Random noise says nothing about an OCR model: quantization that keeps noise outputs close can
still misread every word. These inputs are real rendering (Pillow's built-in scalable font,
so no font files are needed): text lines for the recognizer and the direction classifier,
pages of lines for the detector; preprocessing follows rapidocr (x / 255 - 0.5) / 0.5.
"""

from __future__ import annotations

import string

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

_ALPHABET = string.ascii_letters + string.digits
_WORDS = (
    "invoice total amount date order number street city price quantity model serial "
    "account balance due paid tax rate ship to from name phone code item unit page of"
).split()


def _text(rng: np.random.Generator) -> str:
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.6:
            word = str(rng.choice(_WORDS))
            parts.append(word.capitalize() if rng.random() < 0.3 else word)
        else:
            parts.append("".join(rng.choice(list(_ALPHABET), int(rng.integers(2, 7)))))
    return " ".join(parts)


def _draw_line(text: str, rng: np.random.Generator, height: int) -> Image.Image:
    font = ImageFont.load_default(size=int(rng.integers(height * 5 // 10, height * 8 // 10)))
    left, top, right, bottom = font.getbbox(text)
    paper = int(rng.integers(180, 256))
    ink = int(rng.integers(0, 80))
    image = Image.new("RGB", (right - left + 16, height), (paper,) * 3)
    ImageDraw.Draw(image).text(
        (8 - left, (height - (bottom - top)) // 2 - top), text, fill=(ink,) * 3, font=font
    )
    return image


def _normalize(pixels: np.ndarray) -> np.ndarray:
    """HWC uint8 -> 1x3xHxW float32 in rapidocr's normalization."""
    chw = pixels.astype(np.float32).transpose(2, 0, 1) / 255.0
    return ((chw - 0.5) / 0.5)[None]


def _line_tensor(
    image: Image.Image, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    scale = height / image.height
    resized = image.resize((min(width, max(1, int(image.width * scale))), height))
    canvas = np.zeros((height, width, 3), np.uint8)  # rapidocr pads with zeros (-1 normalized)
    canvas[:, : resized.width] = np.asarray(resized)
    noise = rng.normal(0, 4, canvas.shape)
    canvas[:, : resized.width] = np.clip(
        canvas[:, : resized.width] + noise[:, : resized.width], 0, 255
    )
    return _normalize(canvas)


def rec_samples(count: int, seed: int) -> list[tuple[dict[str, np.ndarray], str]]:
    """Recognizer feeds (1x3x48x320) with the text each one shows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        text = _text(rng)
        out.append(({"x": _line_tensor(_draw_line(text, rng, 48), 48, 320, rng)}, text))
    return out


def cls_samples(count: int, seed: int) -> list[tuple[dict[str, np.ndarray], int]]:
    """Direction-classifier feeds (1x3x48x192): label 1 when the line is upside down."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = _draw_line(_text(rng), rng, 48)
        label = i % 2
        if label:
            image = image.rotate(180)
        out.append(({"x": _line_tensor(image, 48, 192, rng)}, label))
    return out


def det_samples(count: int, seed: int, size: tuple[int, int] = (480, 640)) -> list[dict]:
    """Detector feeds: pages of 6-12 text lines at random places (1x3xHxW, H, W % 32 == 0)."""
    rng = np.random.default_rng(seed)
    out = []
    height, width = size
    for _ in range(count):
        page = Image.new("RGB", (width, height), (int(rng.integers(200, 256)),) * 3)
        for _ in range(int(rng.integers(6, 13))):
            line = _draw_line(_text(rng), rng, int(rng.integers(20, 44)))
            x = int(rng.integers(0, max(1, width - line.width)))
            y = int(rng.integers(0, height - line.height))
            page.paste(line.crop((0, 0, min(line.width, width - x), line.height)), (x, y))
        pixels = np.asarray(page).astype(np.float64) + rng.normal(0, 4, (height, width, 3))
        out.append({"x": _normalize(np.clip(pixels, 0, 255).astype(np.uint8))})
    return out


def ctc_alphabet(model: onnx.ModelProto) -> list[str]:
    """The recognizer's characters (its `character` metadata), with CTC blank and space."""
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_decode(probabilities: np.ndarray, alphabet: list[str]) -> str:
    """Greedy CTC: argmax per step, repeats merged, blanks dropped."""
    best = probabilities[0].argmax(-1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    return "".join(alphabet[i] for i in best[keep] if i != 0)


def char_accuracy(got: str, want: str) -> float:
    """1 - edit distance / len(want)."""
    row = list(range(len(want) + 1))
    for i, g in enumerate(got, 1):
        prev, row[0] = row[0], i
        for j, w in enumerate(want, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (g != w))
    return max(0.0, 1.0 - row[-1] / max(len(want), 1))


def mask_iou(a: np.ndarray, b: np.ndarray, threshold: float = 0.3) -> float:
    """IoU of two detector probability maps binarized at rapidocr's threshold."""
    ma, mb = a > threshold, b > threshold
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 1.0
