"""Adapters for the public data sets of the CMA-CLIP paper: UPMC Food-101 and Fashion-Gen.

Nothing is downloaded: the user points at a local copy, and the adapter writes standard
fusionkit manifests (see :mod:`fusionkit.data.manifest`) that ``fusionkit train`` reads.

- **UPMC Food-101** (Wang et al., 2015): ``ROOT/images/{train,test}/<class>/<file>.jpg`` and
  ``ROOT/texts/{train,test}_titles.csv`` with rows ``filename,text,label`` (no header; the
  copies on Kaggle add the header ``image_path,text,food``, which is recognised and skipped).
  One task, ``label`` (101 classes). The manifests point at the original image files.
- **Fashion-Gen** (Rostamzadeh et al., 2018): HDF5 files with the datasets ``input_image``
  ``(N, 256, 256, 3)`` uint8, ``input_description``, ``input_category`` and
  ``input_subcategory`` (byte strings). Tasks ``category`` and ``subcategory``. Images are
  written as PNG files. Reading HDF5 needs ``h5py`` (``pip install fusionkit[fashiongen]``).

Both sets come with two splits (train and test/validation); a validation split is held out of
the training rows, stratified by class, and the published test (Food-101) or validation
(Fashion-Gen) file becomes the test split, as in the paper.

Examples:
    >>> paths = convert_food101("~/data/upmc_food101", "data/food101")  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['test', 'train', 'val']
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from fusionkit.data.manifest import write_manifest
from fusionkit.errors import ConfigError, DataError, MissingDependencyError

__all__ = ["FASHIONGEN_TASKS", "FOOD101_TASKS", "convert_fashiongen", "convert_food101"]

_LOG = logging.getLogger("fusionkit.data")

FOOD101_TASKS = ("label",)
FASHIONGEN_TASKS = ("category", "subcategory")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# The Kaggle copies of UPMC Food-101 start with this header row.
_FOOD101_HEADER = ("image_path", "text", "food")


def _check_fraction(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"val_fraction must be a number in [0, 1), got {value!r}")
    return float(value)


def _hold_out(labels: Sequence[str], fraction: float, seed: int, stream: str) -> set[int]:
    """Indices of a validation split: ``fraction`` of each class, at least one row kept in train.

    Stratified so that every class seen in validation is also a training class.
    """
    by_class: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    rng = random.Random(f"fusionkit-{stream}:{seed}")
    held: set[int] = set()
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        held.update(indices[: min(round(fraction * len(indices)), len(indices) - 1)])
    return held


def _write_splits(
    out: Path,
    columns: list[str],
    train_rows: list[list[str]],
    test_rows: list[list[str]],
    held: set[int],
) -> dict[str, Path]:
    """Write train (minus the held-out rows), val (the held-out rows) and test manifests."""
    return {
        "train": write_manifest(
            out / "train.csv", columns, [r for i, r in enumerate(train_rows) if i not in held]
        ),
        "val": write_manifest(
            out / "val.csv", columns, [r for i, r in enumerate(train_rows) if i in held]
        ),
        "test": write_manifest(out / "test.csv", columns, test_rows),
    }


# --------------------------------------------------------------------------------------------
# UPMC Food-101
# --------------------------------------------------------------------------------------------


def _food101_rows(root: Path, split: str) -> list[list[str]]:
    """``[id, image, text, label]`` rows of one split whose image file exists."""
    titles = root / "texts" / f"{split}_titles.csv"
    if not titles.is_file():
        raise DataError(
            f"{titles} not found; UPMC Food-101 is expected as ROOT/images/{{train,test}}/"
            "<class>/<file> and ROOT/texts/{train,test}_titles.csv"
        )
    rows: list[list[str]] = []
    missing = 0
    with titles.open(newline="", encoding="utf-8", errors="replace") as handle:
        for number, cells in enumerate(csv.reader(handle), start=1):
            if not cells:
                continue
            if number == 1 and tuple(cell.strip().lower() for cell in cells) == _FOOD101_HEADER:
                continue
            if len(cells) < 3:
                raise DataError(
                    f"{titles}, line {number}: expected filename,text,label, got {cells!r:.120}"
                )
            # Titles may hold unquoted commas in some copies: the label is always last.
            filename, label = cells[0].strip(), cells[-1].strip()
            text = ",".join(cells[1:-1]).strip()
            image = root / "images" / split / label / filename
            if not image.is_file():
                missing += 1
                continue
            rows.append([f"{split}/{Path(filename).stem}", str(image.absolute()), text, label])
    if missing:
        _LOG.warning("%s: %d row(s) skipped, their image file is missing", titles, missing)
    if not rows:
        raise DataError(f"{titles}: no row with an existing image under {root / 'images' / split}")
    return rows


def convert_food101(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Write manifests for a local copy of UPMC Food-101.

    Args:
        root: Folder holding ``images/`` and ``texts/``.
        out_dir: Folder for ``train.csv``, ``val.csv`` and ``test.csv`` (columns ``id, image,
            text, label``; image paths absolute, pointing into ``root``).
        val_fraction: Share of each class's training rows held out as the validation split.
        seed: Seed of the validation split.
        progress: Show a progress bar (one step per split).

    Returns:
        Split name → manifest path.

    Raises:
        DataError: A titles file is missing or malformed, or a split has no usable row.
        ConfigError: ``val_fraction`` is not in [0, 1).

    Examples:
        >>> convert_food101("data/upmc_food101", "data/food101")["test"]  # doctest: +SKIP
        PosixPath('data/food101/test.csv')
    """
    fraction = _check_fraction(val_fraction)
    source, out = Path(root).expanduser(), Path(out_dir)
    columns = ["id", "image", "text", *FOOD101_TASKS]
    with tqdm(total=2, desc="food101", unit="split", disable=not progress) as bar:
        train_rows = _food101_rows(source, "train")
        bar.update(1)
        test_rows = _food101_rows(source, "test")
        bar.update(1)
    held = _hold_out([row[3] for row in train_rows], fraction, seed, "food101")
    return _write_splits(out, columns, train_rows, test_rows, held)


# --------------------------------------------------------------------------------------------
# Fashion-Gen
# --------------------------------------------------------------------------------------------

_FASHIONGEN_DATASETS = ("input_image", "input_description", "input_category", "input_subcategory")


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError(
            "reading Fashion-Gen needs h5py: `pip install fusionkit[fashiongen]` "
            "(or `pip install h5py`)"
        ) from None
    return h5py


def _decode(value: Any) -> str:
    """A Fashion-Gen string cell (bytes, often in a length-1 array) as clean text."""
    while hasattr(value, "shape") and getattr(value, "shape", ()) != ():
        value = value[0]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bytes):
        # The files hold Latin-1 text in places; a lossless fallback beats a crash.
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            value = value.decode("latin-1")
    return " ".join(str(value).split())


def _read_fashiongen(path: Path, limit: int | None) -> tuple[Any, Any, int]:
    h5py = _import_h5py()
    if not path.is_file():
        raise DataError(f"{path}: Fashion-Gen HDF5 file not found")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path}: not a readable HDF5 file ({error})") from None
    absent = [name for name in _FASHIONGEN_DATASETS if name not in handle]
    if absent:
        handle.close()
        raise DataError(
            f"{path}: missing dataset(s) {absent}; a Fashion-Gen file holds "
            f"{list(_FASHIONGEN_DATASETS)}"
        )
    count = len(handle["input_image"])
    return h5py, handle, count if limit is None else min(limit, count)


def _fashiongen_rows(
    path: Path, out: Path, split: str, limit: int | None, progress: bool
) -> list[list[str]]:
    """Write one file's images as PNG; ``[id, image, text, category, subcategory]`` rows."""
    _, handle, count = _read_fashiongen(path, limit)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    with handle, tqdm(total=count, desc=f"fashiongen {split}", unit="img",
                      disable=not progress) as bar:
        images = handle["input_image"]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"{path}: input_image has shape {images.shape}, expected (N, H, W, 3)")
        for index in range(count):
            relative = f"images/{split}-{index:06d}.png"
            Image.fromarray(images[index].astype("uint8"), mode="RGB").save(out / relative)
            rows.append(
                [
                    f"{split}-{index:06d}",
                    relative,
                    _decode(handle["input_description"][index]),
                    _decode(handle["input_category"][index]),
                    _decode(handle["input_subcategory"][index]),
                ]
            )
            bar.update(1)
    return rows


def convert_fashiongen(
    train: str | os.PathLike[str],
    val: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Write PNG images and manifests for local Fashion-Gen HDF5 files.

    The published validation file is the test split (the paper reports on it); the validation
    split is held out of the training file, stratified by category.

    Args:
        train: The training ``.h5`` file.
        val: The validation ``.h5`` file.
        out_dir: Folder for ``images/`` and ``train.csv``, ``val.csv``, ``test.csv`` (columns
            ``id, image, text, category, subcategory``).
        val_fraction: Share of each category's training rows held out for validation.
        seed: Seed of the validation split.
        limit: Convert at most this many rows of each file (quick trials).
        progress: Show progress bars.

    Returns:
        Split name → manifest path.

    Raises:
        MissingDependencyError: ``h5py`` is not installed.
        DataError: A file is missing, not HDF5, or lacks a Fashion-Gen dataset.
        ConfigError: ``val_fraction`` or ``limit`` is out of range.

    Examples:
        >>> convert_fashiongen("fashiongen_256_256_train.h5",
        ...                    "fashiongen_256_256_validation.h5", "data/fashiongen")
        ... # doctest: +SKIP
    """
    fraction = _check_fraction(val_fraction)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive int or None, got {limit!r}")
    out = Path(out_dir)
    columns = ["id", "image", "text", *FASHIONGEN_TASKS]
    train_rows = _fashiongen_rows(Path(train), out, "train", limit, progress)
    test_rows = _fashiongen_rows(Path(val), out, "test", limit, progress)
    held = _hold_out([row[3] for row in train_rows], fraction, seed, "fashiongen")
    return _write_splits(out, columns, train_rows, test_rows, held)
