"""The tab's two pictures, drawn with PIL and handed to the browser as ``data:`` URLs inside HTML.

Why not gradio's Image/Gallery/LinePlot: gradio 3.41 (A1111) writes Gallery images, and gradio 4 (Forge) writes
every Image, to files in its temp folder, served over HTTP. The face preview shows private photos, so it is
kept in memory: a PNG encoded here, embedded in an ``<img>`` of a gr.HTML, works the same in both versions and
never touches the disk. The chart uses the same path (no altair/pandas version differences either).
"""
from __future__ import annotations

import base64
import io
import math

COLORS = ((79, 195, 247), (255, 183, 77), (186, 104, 200), (129, 199, 132), (229, 115, 115), (255, 241, 118),
          (144, 164, 174))
MAX_POINTS = 400           # a long run's chart stays cheap to draw


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_html(image, alt: str) -> str:
    return (f'<img src="{png_data_url(image)}" alt="{alt}" '
            'style="max-width:100%;image-rendering:auto;border-radius:4px">')


# --------------------------------------------------------------------------------------------------- faces
def faces_sheet(refs, tile: int = 128, columns: int = 6):
    """A contact sheet of the face crops, the reference set (Xc) first, each tile labelled Xc / X0 (no names)."""
    import numpy as np
    from PIL import Image, ImageDraw

    order = [(i, "Xc") for i in refs.split.reference] + [(i, "X0") for i in refs.split.protect]
    columns = max(1, min(columns, len(order)))
    rows = math.ceil(len(order) / columns)
    sheet = Image.new("RGB", (columns * tile, rows * tile), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for n, (i, label) in enumerate(order):
        rgb = (refs.images[i].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
        face = Image.fromarray(rgb.astype(np.uint8)).resize((tile, tile), Image.BICUBIC)
        x, y = (n % columns) * tile, (n // columns) * tile
        sheet.paste(face, (x, y))
        draw.rectangle((x, y, x + 22, y + 12), fill=(0, 0, 0))
        draw.text((x + 3, y + 1), label, fill=(255, 255, 255))
    return sheet


def faces_html(refs) -> str:
    return img_html(faces_sheet(refs), "face crops: reference (Xc) first, then protected (X0)")


# --------------------------------------------------------------------------------------------------- chart
class History:
    """The numbers of a run's progress events, for the chart: fine-tune loss and each recogniser's similarity of
    the protected photos during PGD, by overall step."""

    def __init__(self):
        self.loss: list[tuple[int, float]] = []
        self.sims: dict[str, list[tuple[int, float]]] = {}

    def add(self, event) -> None:
        if event.phase == "finetune" and _finite(event.loss):
            self.loss.append((event.done, float(event.loss)))
        if event.phase == "pgd":
            for name, value in (event.similarity or {}).items():
                if _finite(value):
                    self.sims.setdefault(str(name), []).append((event.done, float(value)))

    def empty(self) -> bool:
        return not self.loss and not self.sims


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def _thin(points):
    if len(points) <= MAX_POINTS:
        return points
    step = len(points) / MAX_POINTS
    return [points[int(i * step)] for i in range(MAX_POINTS)] + [points[-1]]


def _panel(draw, box, series: dict, title: str, fixed=None):
    """Lines of ``series`` ({label: [(x, y)]}) in ``box``; y range ``fixed`` or the data's."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(90, 90, 90))
    draw.text((x0 + 4, y0 + 3), title, fill=(220, 220, 220))
    points = [p for pts in series.values() for p in pts]
    if not points:
        draw.text((x0 + 4, y0 + 20), "waiting for the first step", fill=(140, 140, 140))
        return
    xs = [p[0] for p in points]
    lo, hi = fixed if fixed else (min(p[1] for p in points), max(p[1] for p in points))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    xmin, xmax = min(xs), max(xs)
    if xmax == xmin:
        xmax = xmin + 1
    top, bottom, left, right = y0 + 18, y1 - 14, x0 + 6, x1 - 6
    draw.text((x0 + 4, y1 - 13), f"{lo:.3g} .. {hi:.3g}   step {xmin}..{xmax}", fill=(140, 140, 140))

    def xy(p):
        return (left + (p[0] - xmin) / (xmax - xmin) * (right - left),
                bottom - (min(max(p[1], lo), hi) - lo) / (hi - lo) * (bottom - top))

    legend_x = x0 + 4 + 7 * len(title) + 10
    for n, (label, pts) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        pts = _thin(pts)
        if len(pts) == 1:
            cx, cy = xy(pts[0])
            draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=color)
        else:
            draw.line([xy(p) for p in pts], fill=color, width=2)
        text = f"{label} {pts[-1][1]:.3f}"
        draw.text((legend_x, y0 + 3), text, fill=color)
        legend_x += 7 * len(text) + 12


def chart_image(history: History, width: int = 640, height: int = 200):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (17, 17, 17))
    draw = ImageDraw.Draw(image)
    half = width // 2
    _panel(draw, (0, 0, half - 3, height - 1), {"loss": history.loss}, "fine-tune loss")
    _panel(draw, (half + 2, 0, width - 1, height - 1), history.sims, "similarity (PGD)")
    return image


def chart_html(history: History) -> str:
    return img_html(chart_image(history), "fine-tune loss and recogniser similarity")
