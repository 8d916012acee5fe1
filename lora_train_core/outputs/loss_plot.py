"""A picture of the loss curve (raw and smoothed), drawn with Pillow alone.

Robust to what real runs produce: a single step, a constant loss, NaN or inf
values (skipped and counted in the caption), and any length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 48
RAW, SMOOTH, AXIS, TEXT = (150, 180, 230), (200, 60, 40), (90, 90, 90), (30, 30, 30)


def smoothed(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def render_loss_plot(losses: Sequence[float], title: str = "training loss") -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    points = [(i + 1, v) for i, v in enumerate(losses) if math.isfinite(v)]
    skipped = len(losses) - len(points)
    caption = f"{title}: {len(losses)} steps" + (f", {skipped} non-finite skipped" if skipped else "")
    draw.text((MARGIN, 12), caption, fill=TEXT)
    left, top, right, bottom = MARGIN, MARGIN, WIDTH - 16, HEIGHT - MARGIN
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS)
    if not points:
        draw.text((left + 10, (top + bottom) // 2), "no finite loss values yet", fill=TEXT)
        return image
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    if hi - lo < 1e-12:  # a flat curve: centre it rather than divide by zero
        lo, hi = lo - 0.5, hi + 0.5
    last_step = max(len(losses), 2)

    def xy(step: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (step - 1) / (last_step - 1)
        return x, bottom - (bottom - top) * (value - lo) / (hi - lo)

    steps = [s for s, _ in points]
    for series, colour in (([v for _, v in points], RAW), (smoothed([v for _, v in points]), SMOOTH)):
        coords = [xy(s, v) for s, v in zip(steps, series, strict=True)]
        if len(coords) == 1:
            x, y = coords[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        else:
            draw.line(coords, fill=colour, width=2 if colour == SMOOTH else 1)
    draw.text((4, top - 6), f"{hi:.4g}", fill=TEXT)
    draw.text((4, bottom - 6), f"{lo:.4g}", fill=TEXT)
    draw.text((right - 60, bottom + 8), f"step {len(losses)}", fill=TEXT)
    return image
