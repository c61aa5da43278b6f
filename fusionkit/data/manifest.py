"""Data sets read from a manifest file: the way users bring their own image+text data.

A manifest is a CSV file or a JSON Lines file with one row per sample:

- one column per input of the model: ``image`` and ``text`` for the ``vision:`` / ``text:``
  shorthand, or the ``column`` of each named input (``title``, ``description``, ``front``,
  ...). An image cell is the path of an image file, absolute or relative to the manifest's
  folder; a text cell is the text. An empty cell, or an absent column, is a missing input;
- ``id`` (optional): a unique name of the sample;
- one column per task: the class name, or several joined by ``|`` for a multi-label task; an
  empty cell is a missing label, ignored by the loss.

Rows are read and validated when the data set is built, so a bad file fails (or is reported)
before training starts; image files are decoded lazily, one sample at a time. Problems with one
row are skipped and logged or raised, as the caller chooses; problems with the file's structure
(a missing task column, a malformed line, duplicated ids) always raise :class:`DataError`.
"""

from __future__ import annotations

import csv
import io
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

from fusionkit.data.columns import MODALITY_COLUMNS, input_columns, require_columns
from fusionkit.data.reading import LABEL_SEPARATOR, read_manifest, split_labels
from fusionkit.data.shards import read_member
from fusionkit.errors import ConfigError, DataError
from fusionkit.tasks import TaskSpec

__all__ = [
    "ManifestDataset",
    "ManifestRecord",
    "Sample",
    "SkippedRow",
    "open_image",
    "write_manifest",
]

_LOG = logging.getLogger("fusionkit.data")

# How many offending rows a log message or an error quotes.
_EXAMPLES = 3

Target = int | list[int] | None
#: PIL image → ``(3, H, W)`` float tensor.
Transform = Callable[[Image.Image], torch.Tensor]
#: One item of :class:`ManifestDataset`: ``id``, ``targets`` and one value per input, by name.
Sample = dict[str, Any]


@dataclass(frozen=True)
class SkippedRow:
    """A row of a manifest that :class:`ManifestDataset` skipped.

    Args:
        id: The row's sample id.
        line: Its line in the manifest (1-based).
        reason: The reason key (``missing_image_file``, ``unknown_label``, ``no_input``).
        message: The reason in words.

    Examples:
        >>> SkippedRow("a", 3, "no_input", "no_input").line
        3
    """

    id: str
    line: int
    reason: str
    message: str


@dataclass(frozen=True)
class ManifestRecord:
    """One validated row of a manifest (images themselves are read later).

    Args:
        id: The sample's unique name.
        values: Input name → the resolved image path or the text; None where the cell is empty
            or the column absent.
        targets: Task name → class index (single-label), sorted class indices (multi-label), or
            None for a missing label.
        line: The line of the manifest where the row starts (1-based), for messages.

    Examples:
        >>> ManifestRecord("a", {"text": "red shirt"}, {"color": 2}, line=2).text
        'red shirt'
    """

    id: str
    values: dict[str, Path | str | None]
    targets: dict[str, Target]
    line: int

    @property
    def image_path(self) -> Path | None:
        """The value of the input named ``image`` (the shorthand's), or None."""
        value = self.values.get("image")
        return value if isinstance(value, Path) else None

    @property
    def text(self) -> str | None:
        """The value of the input named ``text`` (the shorthand's), or None."""
        value = self.values.get("text")
        return value if isinstance(value, str) else None


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
            with Image.open(_image_source(path)) as raw:
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


def _in_tar(path: Path) -> bool:
    """Whether ``path`` names a member of a tar shard (``DIR/shard.tar/member``)."""
    return path.parent.suffix == ".tar" and path.parent.is_file()


def _image_source(path: Any) -> Any:
    """What Pillow opens: the file, the bytes of a tar shard's member, or ``path`` itself when
    it is already a file object (an upload)."""
    if isinstance(path, str | os.PathLike) and _in_tar(Path(path)):
        return io.BytesIO(read_member(path))
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file() or _in_tar(path)
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
    """Samples with inputs keyed by name and multi-task labels, listed in a CSV or JSONL manifest.

    Every row is validated at construction. Rows that cannot be used are skipped and counted in
    :attr:`skipped` (reason → count) with one warning on the ``fusionkit.data`` logger, or raise,
    depending on ``on_error``:

    - ``missing_image_file``: an image cell names a file that does not exist;
    - ``unknown_label``: a label is not among its task's classes;
    - ``no_input``: every input's cell is empty (always skipped).

    :attr:`skipped_rows` lists each skipped row (id, line, reason), so a caller that must
    answer for every row (``predict --manifest``) can.

    Only the columns of the read inputs are loaded: a text-only model's manifest needs no
    ``image`` column, and its image cells (if any) are neither checked nor loaded. An empty
    cell makes that input missing (``None``) for the sample, and so does an absent column for
    every sample (with a warning); both are counted in :attr:`missing_inputs`. An image that
    exists but cannot be decoded (corrupt, truncated, or over Pillow's decompression-bomb
    limit) becomes a missing image when the sample is loaded: :attr:`load_failures` counts such
    images (per process: each DataLoader worker has its own copy) and each is logged once.

    Args:
        path: The ``.csv``, ``.jsonl`` or ``.ndjson`` manifest, or a named source such as
            ``synthetic:train`` (see :func:`~fusionkit.data.sources.resolve_manifest`).
        tasks: Task name → :class:`TaskSpec`, e.g. from :func:`~fusionkit.data.infer_tasks` on
            the training split; every task needs a column of that name.
        image_transform: Maps an RGB PIL image to a ``(3, H, W)`` float tensor, for every image
            input, or a mapping input name → transform; by default the pixels scaled to
            ``[0, 1]``.
        on_error: ``"skip"`` to skip and count bad rows, ``"raise"`` to raise on the first one.
        modalities: The shorthand inputs to read, a non-empty subset of ``("image", "text")``
            (each reads the column of its name); ignored when ``inputs`` is given.
        inputs: Input name → its :class:`~fusionkit.data.columns.InputColumn` (or anything
            with ``kind`` and ``column``, such as a model's ``config.inputs``).

    Raises:
        DataError: The manifest cannot be read, lacks a task column or every input column; a
            line is malformed; two rows share an id; or, with ``on_error="raise"``, a row names
            a missing image file or an unknown label.
        ConfigError: ``on_error``, ``tasks``, ``modalities`` or ``inputs`` is invalid.

    Examples:
        >>> data = ManifestDataset("train.csv", infer_tasks("train.csv"))  # doctest: +SKIP
        >>> sorted(data[0])  # doctest: +SKIP
        ['id', 'image', 'targets', 'text']
        >>> named = ManifestDataset("train.csv", tasks, inputs={  # doctest: +SKIP
        ...     "title": InputColumn("text", "title"), "front": InputColumn("image", "image")})
        >>> sorted(named[0])  # doctest: +SKIP
        ['front', 'id', 'targets', 'title']
    """

    def __init__(
        self,
        path: str | Path,
        tasks: Mapping[str, TaskSpec],
        image_transform: Transform | Mapping[str, Transform] | None = None,
        *,
        on_error: Literal["skip", "raise"] = "skip",
        modalities: Sequence[str] = MODALITY_COLUMNS,
        inputs: Mapping[str, Any] | None = None,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ConfigError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not isinstance(tasks, Mapping) or not all(
            isinstance(spec, TaskSpec) for spec in tasks.values()
        ):
            raise ConfigError("tasks must map task names to TaskSpec objects")
        self.inputs = input_columns(inputs, modalities)
        # The shorthand's samples keep both keys, None for an input not read.
        self._sample_keys = tuple(
            dict.fromkeys([*self.inputs, *(MODALITY_COLUMNS if inputs is None else ())])
        )
        self.path, columns, rows = read_manifest(path)
        absent = require_columns(self.path, columns, self.inputs, tasks)
        self._read = {n: spec for n, spec in self.inputs.items() if n not in absent}

        self.tasks: dict[str, TaskSpec] = dict(tasks)
        self.image_transform = image_transform
        self.on_error = on_error
        self.skipped: dict[str, int] = {}
        self.skipped_rows: list[SkippedRow] = []
        self.missing_inputs: dict[str, int] = dict.fromkeys(self._sample_keys, 0)
        self.load_failures = 0
        self._unreadable: set[tuple[int, str]] = set()
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

    @property
    def modalities(self) -> tuple[str, ...]:
        """The names of the inputs read, in order."""
        return tuple(self.inputs)

    @property
    def missing_modalities(self) -> dict[str, int]:
        """Alias of :attr:`missing_inputs`."""
        return self.missing_inputs

    def _skip(self, reason: str, example: str, error: str | None, row: tuple[int, str]) -> None:
        """Count a skipped row (``row``: its line and id), or raise ``error`` with
        ``on_error="raise"`` (if one is given)."""
        if self.on_error == "raise" and error is not None:
            raise DataError(error)
        line, sample_id = row
        self.skipped_rows.append(SkippedRow(sample_id, line, reason, error or reason))
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

        values: dict[str, Path | str | None] = dict.fromkeys(self.inputs)
        for name, spec in self._read.items():
            cell = cells[spec.column].strip()
            if not cell:
                continue
            if spec.kind == "text":
                values[name] = cell
                continue
            # Path("/abs") joined to the folder stays absolute, so both kinds work.
            image_path = self.path.parent / cell
            if not _is_file(image_path):
                self._skip(
                    "missing_image_file",
                    f"line {line}: {image_path}",
                    f"{where}, column {spec.column!r}: image file {str(image_path)!r} does "
                    "not exist",
                    (line, sample_id),
                )
                return None
            values[name] = image_path
        if all(value is None for value in values.values()):
            # Not an error: such a row has nothing to learn from, whatever on_error says.
            self._skip("no_input", f"line {line}", None, (line, sample_id))
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
                    (line, sample_id),
                )
                return None
            if not labels:
                targets[name] = None
            elif spec.multi_label:
                targets[name] = sorted({known[label] for label in labels})
            else:
                targets[name] = known[labels[0]]

        for name, value in values.items():
            self.missing_inputs[name] += int(value is None)
        return ManifestRecord(sample_id, values, targets, line)

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
        missing = {n: c for n, c in self.missing_inputs.items() if c and n in self._read}
        if missing and len(self.inputs) > 1:
            counts = "; ".join(
                f"{count} of {len(self.records)} samples have no {name}"
                for name, count in missing.items()
            )
            _LOG.warning("%s: %s; they are used with their other inputs", self.path, counts)
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
            ``{"id": str, "targets": {task: int | list[int] | None}}`` and, per input name,
            its value: a ``(3, H, W)`` tensor for an image, a string for a text, or None.

        Raises:
            IndexError: ``index`` is out of range.

        Examples:
            >>> data[0]["targets"]  # doctest: +SKIP
            {'color': 3, 'pattern': [1, 4], 'category': None}
        """
        sample = self.load(index, self._sample_keys)
        sample["targets"] = {
            name: list(target) if isinstance(target, list) else target
            for name, target in self.records[index].targets.items()
        }
        return sample

    def load(self, index: int, names: Sequence[str]) -> Sample:
        """The ``id`` of one sample and the values of some of its inputs (no targets).

        Only the images of ``names`` are decoded, so a caller that needs one input (say, a
        feature cache of the texts) reads no image.

        Args:
            index: Position of the sample.
            names: Input names; a name the data set does not read gives None.

        Returns:
            ``{"id": str, name: value, ...}``.

        Raises:
            IndexError: ``index`` is out of range.
        """
        record = self.records[index]
        index = index % len(self.records)
        sample: Sample = {"id": record.id}
        for name in names:
            value = record.values.get(name)
            if isinstance(value, Path):
                value = self._load_image(index, name, record)
            sample[name] = value
        return sample

    def _transform(self, name: str) -> Transform | None:
        if isinstance(self.image_transform, Mapping):
            return self.image_transform.get(name)
        return self.image_transform

    def _load_image(self, index: int, name: str, record: ManifestRecord) -> torch.Tensor | None:
        if (index, name) in self._unreadable:
            return None
        try:
            picture = open_image(record.values[name])  # type: ignore[arg-type]
        except DataError as error:
            self._unreadable.add((index, name))
            self.load_failures += 1
            _LOG.warning(
                "%s, line %d: %s; sample %r is used without its %s "
                "(%d load failure(s) so far)",
                self.path, record.line, error, record.id, name, self.load_failures,
            )
            return None
        transform = self._transform(name)
        if transform is not None:
            return transform(picture)
        return pil_to_tensor(picture).float() / 255
