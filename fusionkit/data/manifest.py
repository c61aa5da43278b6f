"""Data sets read from a manifest file: the way users bring their own image+text data.

A manifest is a CSV file or a JSON Lines file with one row per sample:

- ``image``: path of the image file, absolute or relative to the manifest's folder; empty when
  the sample has no image;
- ``text``: the sample's text; empty when it has none;
- ``id`` (optional): a unique name of the sample;
- one column per task: the class name, or several joined by ``|`` for a multi-label task; an
  empty cell is a missing label, ignored by the loss.

Rows are read and validated when the data set is built, so a bad file fails (or is reported)
before training starts; image files are decoded lazily, one sample at a time. Problems with one
row are skipped and logged or raised, as the caller chooses; problems with the file's structure
(a missing column, a malformed line, duplicated ids) always raise :class:`DataError`.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from fusionkit.data.columns import MODALITY_COLUMNS, check_modalities, require_columns
from fusionkit.data.reading import LABEL_SEPARATOR, read_manifest, split_labels
from fusionkit.errors import ConfigError, DataError
from fusionkit.tasks import TaskSpec

__all__ = [
    "ManifestDataset",
    "ManifestRecord",
    "Sample",
    "open_image",
    "write_manifest",
]

_LOG = logging.getLogger("fusionkit.data")

# How many offending rows a log message or an error quotes.
_EXAMPLES = 3

Target = int | list[int] | None
#: One item of :class:`ManifestDataset`: ``id``, ``image``, ``text`` and ``targets``.
Sample = dict[str, Any]


@dataclass(frozen=True)
class ManifestRecord:
    """One validated row of a manifest (the image itself is read later).

    Args:
        id: The sample's unique name.
        image_path: The resolved image path, or None when the row names no image.
        text: The text, or None when the cell is empty.
        targets: Task name → class index (single-label), sorted class indices (multi-label), or
            None for a missing label.
        line: The line of the manifest where the row starts (1-based), for messages.

    Examples:
        >>> ManifestRecord("a", None, "red shirt", {"color": 2}, line=2).text
        'red shirt'
    """

    id: str
    image_path: Path | None
    text: str | None
    targets: dict[str, Target]
    line: int


# --------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as RGB, safely.

    Pillow's decompression-bomb limit is kept and its warning (an image over the pixel
    limit) is treated as an error, EXIF orientation is applied, and transparent images are
    composed on white.

    Args:
        path: The image file.

    Returns:
        The decoded RGB image.

    Raises:
        DataError: The file is missing, unreadable, corrupt or too large.

    Examples:
        >>> open_image("images/train-00000.png").mode
        'RGB'
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as raw:
                picture = ImageOps.exif_transpose(raw)
                if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
                    # Transparent product cut-outs belong on white, not on black.
                    white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
                    picture = Image.alpha_composite(white, picture.convert("RGBA"))
                return picture.convert("RGB")
    except Exception as error:
        # Pillow's decoders raise many types on bad files (OSError, SyntaxError,
        # struct.error, DecompressionBombError, ...); each means "no usable image".
        raise DataError(f"cannot read image {path} ({type(error).__name__}: {error})") from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        # A name the OS refuses (too long, NUL byte) names no readable file either.
        return False


def write_manifest(
    path: str | os.PathLike[str], columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> Path:
    """Write a CSV manifest: a header row, then one row per sample.

    Lines end in ``"\\n"`` on every platform, so a data set built twice is byte-identical.

    Args:
        path: The ``.csv`` file (its folder is created).
        columns: Header, e.g. ``["id", "image", "text", "color"]``.
        rows: Cells in the order of ``columns``.

    Returns:
        The path.

    Examples:
        >>> write_manifest("data/train.csv", ["id", "text", "color"], [["a", "red shirt", "red"]])
        ... # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    return path


class ManifestDataset(Dataset):
    """Image+text samples with multi-task labels, listed in a CSV or JSONL manifest.

    Every row is validated at construction. Rows that cannot be used are skipped and counted in
    :attr:`skipped` (reason → count) with one warning on the ``fusionkit.data`` logger, or raise,
    depending on ``on_error``:

    - ``missing_image_file``: the image cell names a file that does not exist;
    - ``unknown_label``: a label is not among its task's classes;
    - ``no_image_no_text``: every used modality's cell is empty (always skipped).

    Only the columns of the used ``modalities`` are required and read: a text-only model's
    manifest needs no ``image`` column, and its image cells (if any) are neither checked nor
    loaded, so every sample's ``image`` is None. An empty text cell makes the text missing
    (``None``), an empty image cell the image; both are counted in :attr:`missing_modalities`.
    An image that exists but cannot be decoded (corrupt, truncated, or over Pillow's
    decompression-bomb limit) becomes a missing image when the sample is loaded:
    :attr:`load_failures` counts such images (per process: each DataLoader worker has its own
    copy) and each is logged once.

    Args:
        path: The ``.csv``, ``.jsonl`` or ``.ndjson`` manifest, or a named source such as
            ``synthetic:train`` (see :func:`~fusionkit.data.sources.resolve_manifest`).
        tasks: Task name → :class:`TaskSpec`, e.g. from :func:`~fusionkit.data.infer_tasks` on
            the training split; every task needs a column of that name.
        image_transform: Maps an RGB PIL image to a ``(3, H, W)`` float tensor; by default the
            pixels scaled to ``[0, 1]``.
        on_error: ``"skip"`` to skip and count bad rows, ``"raise"`` to raise on the first one.
        modalities: The modality columns to read, a non-empty subset of ``("image", "text")``
            (``model.modalities``); the others are neither required nor loaded.

    Raises:
        DataError: The manifest cannot be read or lacks the column of a used modality or a
            task; a line is malformed; two rows share an id; or, with ``on_error="raise"``, a
            row names a missing image file or an unknown label.
        ConfigError: ``on_error``, ``tasks`` or ``modalities`` is invalid.

    Examples:
        >>> data = ManifestDataset("train.csv", infer_tasks("train.csv"))  # doctest: +SKIP
        >>> sorted(data[0])  # doctest: +SKIP
        ['id', 'image', 'targets', 'text']
        >>> texts = ManifestDataset("train.csv", tasks, modalities=("text",))  # doctest: +SKIP
        >>> texts[0]["image"] is None  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        path: str | Path,
        tasks: Mapping[str, TaskSpec],
        image_transform: Callable[[Image.Image], torch.Tensor] | None = None,
        *,
        on_error: Literal["skip", "raise"] = "skip",
        modalities: Sequence[str] = MODALITY_COLUMNS,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ConfigError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not isinstance(tasks, Mapping) or not all(
            isinstance(spec, TaskSpec) for spec in tasks.values()
        ):
            raise ConfigError("tasks must map task names to TaskSpec objects")
        self.modalities = check_modalities(modalities)
        self.path, columns, rows = read_manifest(path)
        require_columns(self.path, columns, self.modalities, tasks)

        self.tasks: dict[str, TaskSpec] = dict(tasks)
        self.image_transform = image_transform
        self.on_error = on_error
        self.skipped: dict[str, int] = {}
        self.missing_modalities: dict[str, int] = {"image": 0, "text": 0}
        self.load_failures = 0
        self._unreadable: set[int] = set()
        self._class_index = {
            name: {label: k for k, label in enumerate(spec.class_names())}
            for name, spec in self.tasks.items()
        }
        self._examples: dict[str, list[str]] = {}
        seen_ids: dict[str, int] = {}
        self.records: list[ManifestRecord] = []
        for row, (line, cells) in enumerate(rows, start=1):
            record = self._validate(row, line, cells, seen_ids)
            if record is not None:
                self.records.append(record)
        self._log_summary(len(rows))

    def _skip(self, reason: str, example: str, error: str | None) -> None:
        """Count a skipped row, or raise ``error`` with ``on_error="raise"`` (if one is given)."""
        if self.on_error == "raise" and error is not None:
            raise DataError(error)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self._examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES:
            examples.append(example)

    def _validate(
        self, row: int, line: int, cells: Mapping[str, str], seen_ids: dict[str, int]
    ) -> ManifestRecord | None:
        # Rows count data records from 1; lines differ once a CSV cell spans several lines.
        where = f"{self.path}, row {row} (line {line})"
        sample_id = cells.get("id", "").strip() or f"{self.path.stem}:{line}"
        if sample_id in seen_ids:
            raise DataError(
                f"{where}: id {sample_id!r} is already used on line {seen_ids[sample_id]}"
            )
        seen_ids[sample_id] = line

        image_cell = cells["image"].strip() if "image" in self.modalities else ""
        image_path: Path | None = None
        if image_cell:
            # Path("/abs") joined to the folder stays absolute, so both kinds work.
            image_path = self.path.parent / image_cell
            if not _is_file(image_path):
                self._skip(
                    "missing_image_file",
                    f"line {line}: {image_path}",
                    f"{where}: image file {str(image_path)!r} does not exist",
                )
                return None
        text = (cells["text"].strip() if "text" in self.modalities else "") or None
        if image_path is None and text is None:
            # Not an error: such a row has nothing to learn from, whatever on_error says.
            self._skip("no_image_no_text", f"line {line}", None)
            return None

        targets: dict[str, Target] = {}
        for name, spec in self.tasks.items():
            labels = split_labels(cells[name], spec.multi_label)
            known = self._class_index[name]
            unknown = [label for label in labels if label not in known]
            if unknown:
                hint = (
                    f" ({name!r} is single-label: '|' does not separate labels)"
                    if not spec.multi_label and LABEL_SEPARATOR in unknown[0]
                    else ""
                )
                self._skip(
                    "unknown_label",
                    f"line {line}: {name}={unknown[0]!r:.60}",
                    f"{where}, column {name!r}: label {unknown[0]!r} is not a known class{hint}; "
                    f"known classes: {list(spec.class_names())}",
                )
                return None
            if not labels:
                targets[name] = None
            elif spec.multi_label:
                targets[name] = sorted({known[label] for label in labels})
            else:
                targets[name] = known[labels[0]]

        for modality, value in (("image", image_path), ("text", text)):
            if modality in self.modalities:
                self.missing_modalities[modality] += int(value is None)
        return ManifestRecord(sample_id, image_path, text, targets, line)

    def _log_summary(self, total: int) -> None:
        if self.skipped:
            details = "; ".join(
                f"{reason}: {count} (e.g. {', '.join(self._examples[reason])})"
                for reason, count in self.skipped.items()
            )
            _LOG.warning(
                "%s: skipped %d of %d rows: %s",
                self.path, sum(self.skipped.values()), total, details,
            )
        if self.missing_modalities["text"] or self.missing_modalities["image"]:
            _LOG.warning(
                "%s: %d of %d samples have no text and %d no image; they are used with the "
                "other modality alone",
                self.path, self.missing_modalities["text"], len(self.records),
                self.missing_modalities["image"],
            )
        if not self.records:
            _LOG.warning("%s: no usable sample", self.path)

    def __len__(self) -> int:
        """The number of usable samples (rows minus skipped ones)."""
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        """Load one sample.

        Args:
            index: Position of the sample, ``0 <= index < len(self)``.

        Returns:
            ``{"id": str, "image": Tensor (3, H, W) | None, "text": str | None,
            "targets": {task: int | list[int] | None}}``.

        Raises:
            IndexError: ``index`` is out of range.

        Examples:
            >>> data[0]["targets"]  # doctest: +SKIP
            {'color': 3, 'pattern': [1, 4], 'category': None}
        """
        record = self.records[index]
        image = None
        if record.image_path is not None:
            image = self._load_image(index % len(self.records), record)
        targets = {
            name: list(target) if isinstance(target, list) else target
            for name, target in record.targets.items()
        }
        return {"id": record.id, "image": image, "text": record.text, "targets": targets}

    def _load_image(self, index: int, record: ManifestRecord) -> torch.Tensor | None:
        if index in self._unreadable:
            return None
        try:
            picture = open_image(record.image_path)
        except DataError as error:
            self._unreadable.add(index)
            self.load_failures += 1
            _LOG.warning(
                "%s, line %d: %s; sample %r is used without its image "
                "(%d load failure(s) so far)",
                self.path, record.line, error, record.id, self.load_failures,
            )
            return None
        if self.image_transform is not None:
            return self.image_transform(picture)
        return pil_to_tensor(picture).float() / 255
