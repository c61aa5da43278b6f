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

The pictures are drawn in :mod:`fusionkit.data.synthetic_images` and the titles written in
:mod:`fusionkit.data.synthetic_titles`, from the classes and words of
:mod:`fusionkit.data.synthetic_vocabulary`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from tqdm.auto import tqdm

from fusionkit.data.manifest import write_manifest
from fusionkit.data.synthetic_images import add_pixel_noise, corrupt_image, render_image
from fusionkit.data.synthetic_titles import contradicting, informative_title, uninformative_title
from fusionkit.data.synthetic_vocabulary import (
    CATEGORY_WORDS,
    COLOR_RGB,
    COLOR_WORDS,
    PATTERN_WORDS,
    Product,
)
from fusionkit.errors import ConfigError
from fusionkit.tasks import TaskSpec

__all__ = ["CATALOGUE_TASKS", "CATALOGUE_VOCABULARY", "SPLITS", "generate_catalogue"]

#: The splits :func:`generate_catalogue` writes, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: The catalogue's tasks, classes sorted by name (as :func:`~fusionkit.data.infer_tasks` infers).
CATALOGUE_TASKS: dict[str, TaskSpec] = {
    "color": TaskSpec.from_classes(sorted(COLOR_RGB)),
    "pattern": TaskSpec.from_classes(sorted(PATTERN_WORDS), multi_label=True),
    "category": TaskSpec.from_classes(sorted(CATEGORY_WORDS)),
}

#: Task → class → the words clean titles use for it (read-only), e.g. for keyword baselines.
CATALOGUE_VOCABULARY: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType({
    "color": MappingProxyType(COLOR_WORDS),
    "pattern": MappingProxyType(PATTERN_WORDS),
    "category": MappingProxyType(CATEGORY_WORDS),
})

# Share of patterned items that carry a second pattern (a multi-label cell such as striped|dotted).
_SECOND_PATTERN_RATE = 0.3


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
            others = [p for p in PATTERN_WORDS if p not in ("plain", patterns[0])]
            patterns = tuple(sorted((patterns[0], extra.choice(others))))
        product = Product(colors[index], patterns, categories[index])

        image_rng = random.Random(f"{sample}:image")
        image, box = render_image(product, image_size, image_rng)
        if index in noisy_images:
            image = corrupt_image(image, box, random.Random(f"{sample}:image-noise"))
        image = add_pixel_noise(image, image_rng)
        relative = f"images/{split}-{index:05d}.png"
        image.save(out / relative, format="PNG")

        text_rng = random.Random(f"{sample}:text")
        if index not in noisy_texts:
            title = informative_title(product, text_rng)
        else:
            noise_rng = random.Random(f"{sample}:text-noise")
            if noise_rng.random() < 0.5:
                title = uninformative_title(noise_rng)
            else:
                title = informative_title(contradicting(product, noise_rng), text_rng)

        label_rng = random.Random(f"{sample}:labels")
        cells = [product.color, "|".join(product.patterns), product.category]
        cells = [cell if label_rng.random() >= missing_label_rate else "" for cell in cells]
        rows.append([f"{split}-{index:05d}", relative, title, *cells])
        bar.update(1)

    return write_manifest(out / f"{split}.csv", ["id", "image", "text", *CATALOGUE_TASKS], rows)
