"""The pictures of the synthetic catalogue: garment silhouettes filled with a colour and its
patterns, drawn with Pillow, and the corruptions and pixel noise laid over them."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fusionkit.data.synthetic_vocabulary import COLOR_RGB, RGB, Product

__all__ = ["add_pixel_noise", "corrupt_image", "render_image"]

Point = tuple[float, float]
# Maps unit-box coordinates (u, v) to pixels.
_Mapper = Callable[[float, float], Point]
_ShapeDrawer = Callable[[ImageDraw.ImageDraw, _Mapper, float], None]


def _polygon(*points: Point) -> _ShapeDrawer:
    def draw(canvas: ImageDraw.ImageDraw, at: _Mapper, _: float) -> None:
        canvas.polygon([at(u, v) for u, v in points], fill=255)

    return draw


def _draw_bag(canvas: ImageDraw.ImageDraw, at: _Mapper, width: float) -> None:
    radius = max(1, round(width * 0.08))
    canvas.rounded_rectangle([at(0.0, 0.35), at(1.0, 1.0)], radius=radius, fill=255)
    canvas.ellipse([at(0.22, 0.0), at(0.78, 0.65)], outline=255, width=max(1, round(width * 0.07)))


def _draw_hat(canvas: ImageDraw.ImageDraw, at: _Mapper, _: float) -> None:
    crown = [(0.22, 0.75), (0.26, 0.15), (0.4, 0.02), (0.6, 0.02), (0.74, 0.15), (0.78, 0.75)]
    canvas.polygon([at(u, v) for u, v in crown], fill=255)
    canvas.ellipse([at(0.0, 0.62), at(1.0, 0.98)], fill=255)


# Silhouettes in a unit box, with the box's width/height ratio. They only need to be told apart
# by a small CNN at 32-96 pixels, so each has a distinctive outline.
_SHAPES: dict[str, tuple[float, _ShapeDrawer]] = {
    "tshirt": (1.0, _polygon(
        (0.32, 0.0), (0.42, 0.0), (0.5, 0.1), (0.58, 0.0), (0.68, 0.0), (1.0, 0.2), (0.88, 0.42),
        (0.78, 0.36), (0.78, 1.0), (0.22, 1.0), (0.22, 0.36), (0.12, 0.42), (0.0, 0.2))),
    "dress": (0.75, _polygon(
        (0.36, 0.0), (0.44, 0.0), (0.5, 0.08), (0.56, 0.0), (0.64, 0.0), (0.66, 0.3), (0.6, 0.42),
        (0.98, 1.0), (0.02, 1.0), (0.4, 0.42), (0.34, 0.3))),
    "trousers": (0.65, _polygon(
        (0.12, 0.0), (0.88, 0.0), (0.98, 1.0), (0.6, 1.0), (0.5, 0.32), (0.4, 1.0), (0.02, 1.0))),
    "bag": (1.1, _draw_bag),
    "shoe": (1.7, _polygon(
        (0.0, 0.25), (0.3, 0.25), (0.38, 0.45), (0.75, 0.6), (0.95, 0.68), (1.0, 0.85), (1.0, 1.0),
        (0.0, 1.0))),
    "hat": (1.3, _draw_hat),
    "scarf": (1.0, _polygon((0.0, 0.24), (0.24, 0.0), (1.0, 0.76), (0.76, 1.0))),
}


def _blend(color: RGB, target: RGB, amount: float) -> RGB:
    r, g, b = (round(c + (t - c) * amount) for c, t in zip(color, target, strict=True))
    return r, g, b


def _jitter(color: RGB, rng: random.Random, spread: int) -> RGB:
    r, g, b = (min(255, max(0, c + rng.randint(-spread, spread))) for c in color)
    return r, g, b


def _pattern_tints(base: RGB) -> tuple[RGB, RGB]:
    """Two tints of the base colour for pattern marks.

    Marks are lighter or darker shades of the same hue, never another colour, so the colour
    label stays unambiguous however dense the pattern is.
    """
    luminance = 0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2]
    white, black = (250, 250, 250), (10, 10, 10)
    if luminance < 110:
        return _blend(base, white, 0.7), _blend(base, white, 0.4)
    return _blend(base, black, 0.55), _blend(base, white, 0.6)


def _draw_pattern(
    canvas: ImageDraw.ImageDraw, pattern: str, size: int, period: int, tint: RGB,
    accent: RGB, rng: random.Random,
) -> None:
    phase = rng.randrange(period)
    if pattern == "striped":
        band = max(1, round(period * 0.35))
        orientation = rng.choice(("horizontal", "vertical", "diagonal"))
        for offset in range(phase - size, 2 * size, period):
            if orientation == "horizontal":
                canvas.rectangle([0, offset, size, offset + band - 1], fill=tint)
            elif orientation == "vertical":
                canvas.rectangle([offset, 0, offset + band - 1, size], fill=tint)
            else:
                canvas.line([(offset, 0), (offset + size, size)], fill=tint, width=band)
    elif pattern == "checked":
        line = max(1, round(period * 0.22))
        for offset in range(phase, size, period):
            canvas.rectangle([0, offset, size, offset + line - 1], fill=tint)
            canvas.rectangle([offset, 0, offset + line - 1, size], fill=tint)
    elif pattern == "dotted":
        radius = max(1.0, period * 0.22)
        for row, y in enumerate(range(phase, size + period, period)):
            shift = period // 2 if row % 2 else 0
            for x in range(phase + shift, size + period, period):
                canvas.ellipse([x - radius, y - radius, x + radius, y + radius], fill=tint)
    elif pattern == "floral":
        spacing = max(4, round(period * 1.6))
        petal = max(1.0, period * 0.2)
        reach = period * 0.28
        for y in range(phase, size + spacing, spacing):
            for x in range(phase, size + spacing, spacing):
                cx = x + rng.uniform(-0.2, 0.2) * spacing
                cy = y + rng.uniform(-0.2, 0.2) * spacing
                turn = rng.uniform(0, 2 * math.pi)
                for k in range(5):
                    angle = turn + k * 2 * math.pi / 5
                    px, py = cx + reach * math.cos(angle), cy + reach * math.sin(angle)
                    canvas.ellipse([px - petal, py - petal, px + petal, py + petal], fill=tint)
                centre = petal * 0.7
                canvas.ellipse([cx - centre, cy - centre, cx + centre, cy + centre], fill=accent)


Box = tuple[float, float, float, float]


def render_image(product: Product, size: int, rng: random.Random) -> tuple[Image.Image, Box]:
    """Draw the clean product picture (pixel noise and corruptions come later).

    Returns:
        The picture and the product's box ``(x0, y0, width, height)`` in pixels.
    """
    grey = rng.randint(205, 250)
    background = Image.new("RGB", (size, size), _jitter((grey, grey, grey), rng, 8))

    aspect, draw_shape = _SHAPES[product.category]
    height = size * rng.uniform(0.55, 0.85)
    width = height * aspect
    if width > size * 0.92:
        height, width = height * size * 0.92 / width, size * 0.92
    margin = 2.0
    x0 = rng.uniform(margin, max(margin, size - width - margin))
    y0 = rng.uniform(margin, max(margin, size - height - margin))

    def at(u: float, v: float) -> Point:
        return x0 + u * width, y0 + v * height

    mask = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(mask), at, width)

    base = _jitter(COLOR_RGB[product.color], rng, 18)
    fill = Image.new("RGB", (size, size), base)
    tint, accent = _pattern_tints(base)
    period = max(4, round(height * rng.uniform(0.14, 0.2)))
    fill_canvas = ImageDraw.Draw(fill)
    for k, pattern in enumerate(product.patterns):
        # A second pattern uses the other tint so both stay visible.
        first, second = (tint, accent) if k == 0 else (accent, tint)
        _draw_pattern(fill_canvas, pattern, size, period, first, second, rng)

    background.paste(fill, (0, 0), mask)
    outline = mask.filter(ImageFilter.FIND_EDGES)
    background.paste(_blend(base, (0, 0, 0), 0.5), (0, 0), outline)
    return background, (x0, y0, width, height)


def corrupt_image(image: Image.Image, box: Box, rng: random.Random) -> Image.Image:
    """Heavily blur the image or hide a large part of the product behind a grey patch."""
    if rng.random() < 0.5:
        return image.filter(ImageFilter.GaussianBlur(radius=image.width * rng.uniform(0.07, 0.11)))
    x0, y0, width, height = box
    # 35-65% of the product's box: enough to hide the pattern and the outline, not the colour.
    patch_w, patch_h = width * rng.uniform(0.6, 0.8), height * rng.uniform(0.6, 0.8)
    left = x0 + rng.uniform(0, width - patch_w)
    top = y0 + rng.uniform(0, height - patch_h)
    grey = rng.randint(90, 200)
    occluded = image.copy()
    ImageDraw.Draw(occluded).rectangle(
        [left, top, left + patch_w, top + patch_h], fill=(grey, grey, grey)
    )
    return occluded


def add_pixel_noise(image: Image.Image, rng: random.Random) -> Image.Image:
    """Add Gaussian pixel noise of a strength drawn from ``rng``."""
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + noise_rng.normal(0.0, rng.uniform(3.0, 8.0), size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")

