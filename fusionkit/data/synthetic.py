"""The embedded default data set: a synthetic multi-task "product attributes" catalogue.

CMA-CLIP was built for retail listings where one product has an image, a title and several
attribute labels (colour, pattern, style, ...), and where either modality may be uninformative.
This module draws such a catalogue with Pillow, deterministically and without any download, so
that every example, test and benchmark of fusionkit has data to run on.

Each sample is a garment-like silhouette (t-shirt, dress, trousers, bag, shoe, hat, scarf)
filled with one of eight colours and one or two patterns, on a pale background with pixel noise,
and a product title built from synonyms of its attributes plus brand and distractor words. Three
tasks are labelled: ``color`` (single-label), ``pattern`` (multi-label) and ``category``
(single-label). When clean, every task can be read from the image *and* from the title; the
``text_noise`` and ``image_noise`` knobs spoil one modality for a fraction of the samples, so a
fused model has something to gain over either modality alone.

Randomness comes from :class:`random.Random` streams seeded with strings, one per split and one
per sample and purpose, so the same arguments give byte-identical files, a sample's clean content
does not depend on the noise rates, and a larger noise rate corrupts a superset of the samples a
smaller one corrupts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from fusionkit.data.manifest import write_manifest
from fusionkit.errors import ConfigError
from fusionkit.tasks import TaskSpec

__all__ = ["CATALOGUE_TASKS", "CATALOGUE_VOCABULARY", "SPLITS", "generate_catalogue"]

#: The splits :func:`generate_catalogue` writes, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")

RGB = tuple[int, int, int]

_COLOR_RGB: dict[str, RGB] = {
    "black": (25, 25, 28),
    "blue": (30, 70, 190),
    "green": (40, 150, 60),
    "orange": (240, 130, 20),
    "pink": (240, 130, 180),
    "purple": (120, 50, 160),
    "red": (200, 30, 35),
    "yellow": (240, 210, 30),
}

_COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black", "jet black", "ebony", "onyx", "charcoal black"),
    "blue": ("blue", "navy", "cobalt", "royal blue", "azure", "sky blue"),
    "green": ("green", "emerald", "olive", "forest green", "sage", "kelly green"),
    "orange": ("orange", "tangerine", "burnt orange", "pumpkin", "apricot"),
    "pink": ("pink", "blush", "fuchsia", "hot pink", "magenta", "rose pink"),
    "purple": ("purple", "violet", "plum", "lilac", "lavender", "aubergine"),
    "red": ("red", "crimson", "scarlet", "cherry red", "ruby", "brick red"),
    "yellow": ("yellow", "mustard", "lemon", "golden", "sunflower yellow"),
}

_PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "checked": ("checked", "check", "plaid", "gingham", "tartan", "windowpane check"),
    "dotted": ("dotted", "polka dot", "spotted", "dot print", "pin dot"),
    "floral": ("floral", "flower print", "botanical", "blossom print", "ditsy floral"),
    "plain": ("plain", "solid", "solid colour", "block colour", "plain-dyed"),
    "striped": ("striped", "stripe", "pinstripe", "breton stripe", "banded"),
}

_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "bag": ("bag", "handbag", "tote", "purse", "shoulder bag", "tote bag"),
    "dress": ("dress", "midi dress", "sundress", "maxi dress", "frock", "wrap dress"),
    "hat": ("hat", "cap", "beanie", "fedora", "bucket hat", "sun hat"),
    "scarf": ("scarf", "shawl", "stole", "muffler", "neck scarf", "pashmina"),
    "shoe": ("shoe", "sneakers", "trainers", "loafers", "ankle boots", "running shoe"),
    "trousers": ("trousers", "pants", "chinos", "slacks", "joggers", "wide-leg trousers"),
    "tshirt": ("t-shirt", "tee", "crew neck tee", "cotton tee", "short sleeve top"),
}

# Filler vocabulary. None of these phrases may contain a colour, pattern or category word:
# uninformative titles are built from them alone.
_BRANDS = (
    "Nordvik", "Alba & Co", "Urbanline", "Mira Studio", "Kestrel", "Tidewear", "Lumo",
    "Harbor Lane", "Solenne", "Basics Co", "Fjord", "Maison Verre", "Oakridge", "Kinfolk Supply",
)
_ADJECTIVES = (
    "premium", "new", "classic", "vintage", "casual", "essential", "lightweight", "everyday",
    "oversized", "slim", "relaxed", "organic", "soft", "retro", "modern", "elegant", "cozy",
    "breathable", "limited edition", "handmade", "recycled", "luxury",
)
_AUDIENCES = ("for women", "for men", "women's", "men's", "unisex", "kids", "for girls", "for boys")
_SIZES = ("size S", "size M", "size L", "size XL", "one size")
_SUFFIXES = (
    "summer sale", "free shipping", "2-pack", "new season", "gift idea", "cotton blend",
    "100% cotton", "machine washable", "new arrival", "bestseller", "limited stock", "in stock",
    "fast delivery", "20% off", "clearance", "eco friendly", "made in Portugal", "regular fit",
)
_GENERIC_NOUNS = (
    "item", "piece", "product", "must-have", "wardrobe staple", "gift", "look", "favourite",
    "essential piece", "style",
)

#: The catalogue's tasks, classes sorted by name (as :func:`~fusionkit.data.infer_tasks` infers).
CATALOGUE_TASKS: dict[str, TaskSpec] = {
    "color": TaskSpec.from_classes(sorted(_COLOR_RGB)),
    "pattern": TaskSpec.from_classes(sorted(_PATTERN_WORDS), multi_label=True),
    "category": TaskSpec.from_classes(sorted(_CATEGORY_WORDS)),
}

#: Task → class → the words clean titles use for it (read-only), e.g. for keyword baselines.
CATALOGUE_VOCABULARY: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType({
    "color": MappingProxyType(_COLOR_WORDS),
    "pattern": MappingProxyType(_PATTERN_WORDS),
    "category": MappingProxyType(_CATEGORY_WORDS),
})

_MAX_TITLE_WORDS = 20
# Layouts add up to two separator tokens ("-", "by") to the counted phrases.
_FILLER_BUDGET = _MAX_TITLE_WORDS - 2
# Share of patterned items that carry a second pattern (a multi-label cell such as striped|dotted).
_SECOND_PATTERN_RATE = 0.3


@dataclass(frozen=True)
class _Product:
    """The ground truth of one sample."""

    color: str
    patterns: tuple[str, ...]
    category: str


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

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


def _render_image(product: _Product, size: int, rng: random.Random) -> tuple[Image.Image, Box]:
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

    base = _jitter(_COLOR_RGB[product.color], rng, 18)
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


def _corrupt_image(image: Image.Image, box: Box, rng: random.Random) -> Image.Image:
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


def _add_pixel_noise(image: Image.Image, rng: random.Random) -> Image.Image:
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + noise_rng.normal(0.0, rng.uniform(3.0, 8.0), size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------------------------
# Titles
# --------------------------------------------------------------------------------------------


def _word_count(parts: Sequence[str]) -> int:
    return sum(len(part.split()) for part in parts)


def _fill_title(
    core: list[str], rng: random.Random, target: int, *, with_brand: bool
) -> tuple[str | None, list[str], list[str], str | None]:
    """Choose filler phrases around ``core`` until the title reaches ``target`` words.

    Returns:
        The brand (or None), the leading adjectives, the trailing suffixes and the audience.
    """
    brand = rng.choice(_BRANDS) if with_brand and rng.random() < 0.75 else None
    adjectives: list[str] = []
    suffixes: list[str] = []
    audience: str | None = None
    sized = False
    for _ in range(12):
        count = _word_count([*core, *adjectives, *suffixes] + [p for p in (brand, audience) if p])
        if count >= target:
            break
        slot = rng.random()
        if slot < 0.4:
            phrase, bucket = rng.choice(_ADJECTIVES), adjectives
        elif slot < 0.75:
            phrase, bucket = rng.choice(_SUFFIXES), suffixes
        elif slot < 0.88:
            if sized:
                continue
            phrase, bucket, sized = rng.choice(_SIZES), suffixes, True
        else:
            if audience is None and count + 2 <= _FILLER_BUDGET:
                audience = rng.choice(_AUDIENCES)
            continue
        if phrase not in bucket and count + len(phrase.split()) <= _FILLER_BUDGET:
            bucket.append(phrase)
    return brand, adjectives, suffixes, audience


def _style(title: str, rng: random.Random) -> str:
    draw = rng.random()
    if draw < 0.45:
        return " ".join(word[:1].upper() + word[1:] for word in title.split(" "))
    if draw < 0.55:
        return title.lower()
    return title


def _target_length(rng: random.Random, low: int, mode: int) -> int:
    return min(_FILLER_BUDGET, max(low, round(rng.triangular(low, _FILLER_BUDGET, mode))))


def _informative_title(product: _Product, rng: random.Random) -> str:
    """A title that names the product's colour, pattern(s) and category with synonyms."""
    color = rng.choice(_COLOR_WORDS[product.color])
    category = rng.choice(_CATEGORY_WORDS[product.category])
    words = [rng.choice(_PATTERN_WORDS[p]) for p in product.patterns]
    if len(words) == 2:
        pattern = rng.choice(("{} and {}", "{} & {}", "{} {}", "{}/{}")).format(*words)
    elif product.patterns == ("plain",) and rng.random() < 0.25:
        # Sellers often leave "plain" out; the absence of any pattern word still says it.
        pattern = ""
    else:
        pattern = words[0]
    core = [part for part in (color, pattern, category) if part]
    brand, adjectives, suffixes, audience = _fill_title(
        core, rng, _target_length(rng, 3, 8), with_brand=True
    )
    layout = rng.random()
    if layout < 0.5:
        parts = [brand, *adjectives, color, pattern, category, audience, *suffixes]
        title = " ".join(part for part in parts if part)
    elif layout < 0.8:
        head = " ".join(part for part in (brand, *adjectives, category, audience) if part)
        attributes = ", ".join(part for part in (color, pattern) if part)
        title = f"{head} - {attributes}"
        if suffixes:
            title += " - " + ", ".join(suffixes)
    else:
        head = " ".join(part for part in (*adjectives, pattern, color, category) if part)
        tail = " ".join(part for part in (audience, *suffixes) if part)
        title = " ".join(part for part in (head, f"by {brand}" if brand else "", tail) if part)
    return _style(title, rng)


def _uninformative_title(rng: random.Random) -> str:
    """A title with no colour, pattern or category word at all."""
    core = [rng.choice(_GENERIC_NOUNS)]
    brand, adjectives, suffixes, audience = _fill_title(
        core, rng, _target_length(rng, 3, 6), with_brand=True
    )
    parts = [brand, *adjectives, *core, audience, *suffixes]
    return _style(" ".join(part for part in parts if part), rng)


def _contradicting(product: _Product, rng: random.Random) -> _Product:
    """The product with a wrong colour, a wrong category, or both."""
    draw = rng.random()
    color, category = product.color, product.category
    if draw < 0.7:
        color = rng.choice([c for c in _COLOR_RGB if c != product.color])
    if draw >= 0.4:
        category = rng.choice([c for c in _CATEGORY_WORDS if c != product.category])
    return _Product(color, product.patterns, category)


# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------


def _balanced(classes: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """``count`` labels that cover every class as evenly as possible, shuffled.

    Even coverage makes tiny catalogues (tests) still contain every class.
    """
    labels = [classes[k % len(classes)] for k in range(count)]
    rng.shuffle(labels)
    return labels


def _chosen(count: int, rate: float, stream: str) -> set[int]:
    """The first ``round(rate * count)`` indices of a fixed permutation: nested across rates."""
    order = list(range(count))
    random.Random(stream).shuffle(order)
    return set(order[: round(rate * count)])


def _check_rate(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def generate_catalogue(
    out_dir: str | Path,
    *,
    train: int = 1600,
    val: int = 200,
    test: int = 200,
    seed: int = 0,
    text_noise: float = 0.0,
    image_noise: float = 0.0,
    missing_label_rate: float = 0.1,
    image_size: int = 96,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the synthetic product catalogue: PNG images and one manifest per split.

    The files are ``out_dir/images/<split>-<index>.png`` and ``out_dir/<split>.csv`` with
    columns ``id, image, text, color, pattern, category`` (image paths relative to ``out_dir``;
    an empty label cell is a missing label; ``|`` separates the labels of the multi-label
    ``pattern`` task). Files already there with the same names are overwritten.

    Args:
        out_dir: Folder to write into; created if needed.
        train: Number of training samples.
        val: Number of validation samples.
        test: Number of test samples.
        seed: Seed of every random choice; same arguments give byte-identical files.
        text_noise: Fraction of titles per split that are spoiled: half of them name no
            attribute at all, half name a wrong colour and/or category.
        image_noise: Fraction of images per split that are heavily blurred or have a large part
            hidden behind a grey patch.
        missing_label_rate: Probability that a label cell is left empty, per task and sample.
        image_size: Side of the square images in pixels (at least 16).
        progress: Show a tqdm progress bar.

    Returns:
        Split name (``train``, ``val``, ``test``) → path of its CSV manifest.

    Raises:
        ConfigError: A size, rate or the image size is out of range.

    Examples:
        >>> paths = generate_catalogue("/tmp/catalogue", train=40, val=8, test=8, progress=False)
        >>> sorted(paths)
        ['test', 'train', 'val']
    """
    sizes = {"train": train, "val": val, "test": test}
    for name, count in sizes.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"{name} must be a non-negative int, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ConfigError(f"image_size must be an int >= 16, got {image_size!r}")
    text_noise = _check_rate("text_noise", text_noise)
    image_noise = _check_rate("image_noise", image_noise)
    missing_label_rate = _check_rate("missing_label_rate", missing_label_rate)

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Path] = {}
    with tqdm(total=sum(sizes.values()), desc="catalogue", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            manifests[split] = _write_split(
                out, split, sizes[split], seed, text_noise, image_noise, missing_label_rate,
                image_size, bar,
            )
    return manifests


def _write_split(
    out: Path, split: str, count: int, seed: int, text_noise: float, image_noise: float,
    missing_label_rate: float, image_size: int, bar: tqdm,
) -> Path:
    stream = f"fusionkit-catalogue:{seed}:{split}"
    assign = random.Random(f"{stream}:assign")
    colors = _balanced(CATALOGUE_TASKS["color"].class_names(), count, assign)
    categories = _balanced(CATALOGUE_TASKS["category"].class_names(), count, assign)
    first_patterns = _balanced(CATALOGUE_TASKS["pattern"].class_names(), count, assign)
    noisy_texts = _chosen(count, text_noise, f"{stream}:text-noise")
    noisy_images = _chosen(count, image_noise, f"{stream}:image-noise")

    rows: list[list[str]] = []
    for index in range(count):
        sample = f"{stream}:{index}"
        patterns = (first_patterns[index],)
        extra = random.Random(f"{sample}:patterns")
        if patterns != ("plain",) and extra.random() < _SECOND_PATTERN_RATE:
            others = [p for p in _PATTERN_WORDS if p not in ("plain", patterns[0])]
            patterns = tuple(sorted((patterns[0], extra.choice(others))))
        product = _Product(colors[index], patterns, categories[index])

        image_rng = random.Random(f"{sample}:image")
        image, box = _render_image(product, image_size, image_rng)
        if index in noisy_images:
            image = _corrupt_image(image, box, random.Random(f"{sample}:image-noise"))
        image = _add_pixel_noise(image, image_rng)
        relative = f"images/{split}-{index:05d}.png"
        image.save(out / relative, format="PNG")

        text_rng = random.Random(f"{sample}:text")
        if index not in noisy_texts:
            title = _informative_title(product, text_rng)
        else:
            noise_rng = random.Random(f"{sample}:text-noise")
            if noise_rng.random() < 0.5:
                title = _uninformative_title(noise_rng)
            else:
                title = _informative_title(_contradicting(product, noise_rng), text_rng)

        label_rng = random.Random(f"{sample}:labels")
        cells = [product.color, "|".join(product.patterns), product.category]
        cells = [cell if label_rng.random() >= missing_label_rate else "" for cell in cells]
        rows.append([f"{split}-{index:05d}", relative, title, *cells])
        bar.update(1)

    return write_manifest(out / f"{split}.csv", ["id", "image", "text", *CATALOGUE_TASKS], rows)
