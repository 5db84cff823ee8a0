"""Pictures of an identity-leak evaluation: per-image similarity labels, a contact sheet and a bar chart.

Drawn with PIL only (its built-in bitmap font: nothing to download), from plain arrays and numbers, so the CLI
and the ComfyUI node render the same thing. Colour code: red = the recogniser still matches the user (similarity
at or above the match threshold), green = below it, grey = no face detected.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

RED, GREEN, GREY = (200, 40, 40), (30, 150, 60), (110, 110, 110)
MIN_TILE = 128          # tiles are enlarged (nearest) to at least this size so labels stay readable


def match_color(matched: Optional[bool]) -> tuple[int, int, int]:
    """Red: recognised as the user; green: not; grey: no face."""
    return GREY if matched is None else RED if matched else GREEN


def verdict_color(similarity: Optional[float], threshold: float) -> tuple[int, int, int]:
    """The colour of a cosine ``similarity`` against a cosine ``threshold``."""
    return match_color(None if similarity is None else similarity >= threshold)


def label_text(similarity: Optional[float], name: str = "") -> str:
    prefix = f"{name} " if name else ""
    return f"{prefix}no face" if similarity is None else f"{prefix}sim {similarity:.3f}"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)     # Pillow >= 10.1: scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def annotate(rgb: np.ndarray, text: str, color: tuple[int, int, int]) -> np.ndarray:
    """A copy of ``rgb`` (uint8 H x W x 3) with ``text`` on a coloured band along the bottom edge."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    band = max(12, im.height // 10)
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, im.height - band, im.width, im.height], fill=color)
    draw.text((3, im.height - band + 1), text, fill=(255, 255, 255), font=_font(max(9, band - 3)))
    return np.asarray(im)


def enlarge(rgb: np.ndarray, min_side: int = MIN_TILE) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor so the shorter side is at least ``min_side``."""
    factor = max(1, -(-min_side // min(rgb.shape[:2])))
    return rgb if factor == 1 else np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def contact_sheet(tiles: Sequence[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """Tiles (uint8, all the same size) in a grid of ``columns``, white gaps between them."""
    if not tiles:
        raise ValueError("contact_sheet: no tiles")
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * h + (rows + 1) * gap, columns * w + (columns + 1) * gap, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        sheet[y:y + h, x:x + w] = tile[:, :, :3]
    return sheet


def bar_chart(values: Sequence[Optional[float]], threshold: float, title: str = "",
              width: int = 512, height: int = 256, matched: Optional[Sequence[Optional[bool]]] = None) -> np.ndarray:
    """One bar per image (cosine similarity on a fixed [-0.2, 1] axis), a dashed threshold line, grey stubs
    for images without a face. ``matched``: each bar's verdict when a rule other than the cosine threshold decides
    (dlib's distance); by default a bar at or above the threshold is red. Returns uint8 H x W x 3."""
    from PIL import Image, ImageDraw

    lo, hi = -0.2, 1.0
    im = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    font = _font(11)
    left, right, top, bottom = 34, width - 8, 20, height - 18

    def y_of(v: float) -> float:
        v = min(max(v, lo), hi)
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    for tick in (0.0, 0.5, 1.0):
        y = y_of(tick)
        draw.line([left, y, right, y], fill=(225, 225, 225))
        draw.text((2, y - 6), f"{tick:.1f}", fill=(60, 60, 60), font=font)
    n = max(1, len(values))
    slot = (right - left) / n
    for i, v in enumerate(values):
        x0, x1 = left + i * slot + slot * 0.15, left + (i + 1) * slot - slot * 0.15
        if v is None:
            draw.rectangle([x0, y_of(0.0) - 2, x1, y_of(0.0) + 2], fill=GREY)
        else:
            draw.rectangle([x0, min(y_of(v), y_of(0.0)), x1, max(y_of(v), y_of(0.0))],
                           fill=verdict_color(v, threshold) if matched is None else match_color(matched[i]))
        if n <= 32:
            draw.text((x0, bottom + 3), str(i), fill=(60, 60, 60), font=font)
    yt = y_of(threshold)
    for x in range(left, right, 8):
        draw.line([x, yt, min(x + 4, right), yt], fill=(0, 0, 0))
    draw.text((left, 3), f"{title}  threshold {threshold:.2f}".strip(), fill=(0, 0, 0), font=font)
    return np.asarray(im)
