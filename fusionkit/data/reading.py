"""Reading manifests: CSV and JSONL cells as text, checked headers, and the tasks they hold.

`read_manifest` gives a manifest's columns and rows as text cells; `check_manifest` is the
quick check run before any model loads; `infer_tasks` turns label columns into tasks.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fusionkit.data.columns import input_columns, require_columns
from fusionkit.data.shards import is_shard_pattern, read_shard_rows
from fusionkit.data.sources import resolve_manifest
from fusionkit.errors import ConfigError, DataError
from fusionkit.tasks import TaskSpec

__all__ = [
    "LABEL_SEPARATOR",
    "RESERVED_COLUMNS",
    "check_manifest",
    "infer_tasks",
    "read_manifest",
    "split_labels",
]

_LOG = logging.getLogger("fusionkit.data")

#: Columns that are never tasks.
RESERVED_COLUMNS = ("image", "text", "id")
#: Separates the labels of a multi-label cell.
LABEL_SEPARATOR = "|"
_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# How many offending rows a log message or an error quotes.
_EXAMPLES = 3


# --------------------------------------------------------------------------------------------
# Reading CSV and JSONL
# --------------------------------------------------------------------------------------------


def _cell_text(value: Any, path: Path, line: int, column: str) -> str:
    """A JSON value as cell text; lists become ``|``-joined labels."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list) and all(
        isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in value
    ):
        return LABEL_SEPARATOR.join(str(item) for item in value)
    raise DataError(
        f"{path}, line {line}, column {column!r}: expected a string, a number or a list of "
        f"labels, got {type(value).__name__} {value!r:.80}"
    )


def _check_header(columns: list[str], path: Path) -> list[str]:
    duplicated = sorted(name for name, count in Counter(columns).items() if count > 1)
    if duplicated:
        raise DataError(f"{path}: duplicated column name(s) {duplicated}")
    return columns


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    rows: list[tuple[int, dict[str, str]]] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        line = 1
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the manifest is empty (no header line)")
            columns = _check_header([name.strip() for name in header], path)
            line = reader.line_num + 1
            for record in reader:
                if record:
                    if len(record) != len(columns):
                        raise DataError(
                            f"{path}, line {line}: {len(record)} field(s), but the header has "
                            f"{len(columns)}: {columns}"
                        )
                    rows.append((line, dict(zip(columns, record, strict=True))))
                line = reader.line_num + 1
        except csv.Error as error:
            raise DataError(f"{path}, line {line}: malformed CSV ({error})") from None
    return columns, rows


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    columns: list[str] = []
    raw_rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as error:
                raise DataError(f"{path}, line {number}: malformed JSON ({error})") from None
            if not isinstance(value, dict):
                raise DataError(
                    f"{path}, line {number}: expected a JSON object, got {type(value).__name__}"
                )
            stripped = {str(key).strip(): cell for key, cell in value.items()}
            if len(stripped) != len(value):
                raise DataError(f"{path}, line {number}: duplicated key(s) after stripping spaces")
            columns.extend(key for key in stripped if key not in columns)
            raw_rows.append((number, stripped))
    if not raw_rows:
        raise DataError(f"{path}: the manifest is empty (no JSON object)")
    rows = [
        (line, {column: _cell_text(cells.get(column), path, line, column) for column in columns})
        for line, cells in raw_rows
    ]
    return columns, rows


def read_manifest(path: str | Path) -> tuple[Path, list[str], list[tuple[int, dict[str, str]]]]:
    """Read a manifest's columns and rows as text cells, with the line each row starts on.

    A shard pattern (see :mod:`fusionkit.data.shards`) reads as a manifest: its rows come
    from the shards' JSON members, numbered in shard order, image cells naming tar members.
    """
    if is_shard_pattern(path):
        columns, rows = read_shard_rows(Path(path).absolute())
        return Path(path).absolute(), columns, rows
    # Absolute, so image paths relative to it survive a later change of working directory.
    manifest = resolve_manifest(path).absolute()
    kind = _SUFFIXES.get(manifest.suffix.lower())
    if kind is None:
        raise DataError(
            f"{manifest}: unknown manifest format {manifest.suffix!r}; "
            f"expected one of {sorted(_SUFFIXES)}"
        )
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest file not found")
    try:
        columns, rows = _read_csv(manifest) if kind == "csv" else _read_jsonl(manifest)
    except UnicodeDecodeError as error:
        raise DataError(f"{manifest}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise DataError(f"{manifest}: cannot read the manifest ({error})") from None
    return manifest, columns, rows


def check_manifest(
    path: str | os.PathLike[str],
    *,
    modalities: Sequence[str] = ("image", "text"),
    tasks: Sequence[str] = (),
    inputs: Mapping[str, Any] | None = None,
) -> Path:
    """Resolve a manifest and check it is readable and has the needed columns.

    A quick check to run before loading models: the rows' contents (image files, labels) are
    checked later by :class:`~fusionkit.data.ManifestDataset`.

    Args:
        path: A manifest file or a named source (see
            :func:`~fusionkit.data.sources.resolve_manifest`).
        modalities: The shorthand inputs the model reads (``image`` and/or ``text``).
        tasks: The task columns.
        inputs: Input name → anything with ``kind`` and ``column`` (a model's
            ``config.inputs``), instead of ``modalities``.

    Returns:
        The resolved manifest path.

    Raises:
        DataError: The file is missing, unreadable or malformed, or lacks a task column or
            every input column (one absent input column is a missing input, see
            :func:`~fusionkit.data.columns.require_columns`).

    Examples:
        >>> check_manifest("synthetic:train", tasks=["color"]).name  # doctest: +SKIP
        'train.csv'
    """
    manifest, columns, _ = read_manifest(path)
    require_columns(manifest, columns, input_columns(inputs, modalities), tasks, warn=False)
    return manifest


def split_labels(cell: str, multi_label: bool) -> list[str]:
    if multi_label:
        return [label.strip() for label in cell.split(LABEL_SEPARATOR) if label.strip()]
    label = cell.strip()
    return [label] if label else []


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def _names(value: Iterable[str] | None, argument: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ConfigError(f"{argument} must be a sequence of column names, not a string: {value!r}")
    return list(value)


def infer_tasks(
    manifest_path: str | Path,
    task_names: Sequence[str] | None = None,
    multi_label: Iterable[str] | None = None,
    input_columns: Iterable[str] = (),
) -> dict[str, TaskSpec]:
    """Infer the tasks and their classes from a manifest (normally the training split).

    Args:
        manifest_path: A ``.csv``, ``.jsonl`` or ``.ndjson`` manifest, or a named source such
            as ``synthetic:train``.
        task_names: The task columns; by default every column but ``image``, ``text``, ``id``
            and ``input_columns``.
        multi_label: Tasks to treat as multi-label even if no cell holds ``|``.
        input_columns: More columns that are inputs, not tasks (those of a model's named
            inputs).

    Returns:
        Task name → :class:`TaskSpec` with the class names found, sorted, in column order.
        A task is multi-label if it is named in ``multi_label`` or any of its cells holds ``|``.

    Raises:
        DataError: The manifest cannot be read, a named task column does not exist, there is no
            task column, or a task has too few classes (single-label tasks need two).
        ConfigError: ``task_names`` or ``multi_label`` is a string or names an unknown task.

    Examples:
        >>> tasks = infer_tasks("train.csv")  # doctest: +SKIP
        >>> tasks["pattern"].multi_label  # doctest: +SKIP
        True
    """
    path, columns, rows = read_manifest(manifest_path)
    named = _names(task_names, "task_names")
    forced = set(_names(multi_label, "multi_label") or ())
    if named is None:
        # An unnamed column (a trailing comma in the header) cannot be a task.
        inputs = {*RESERVED_COLUMNS, *input_columns}
        named = [column for column in columns if column and column not in inputs]
    else:
        absent = [name for name in named if name not in columns]
        if absent:
            raise DataError(f"{path}: no task column(s) {absent}; columns found: {columns}")
    if not named:
        raise DataError(
            f"{path}: no task column; columns found: {columns} "
            f"(every column but {sorted({*RESERVED_COLUMNS, *input_columns})} is a task)"
        )
    unknown = sorted(forced - set(named))
    if unknown:
        raise ConfigError(f"multi_label names {unknown}, which are not tasks of {path}: {named}")

    tasks: dict[str, TaskSpec] = {}
    for name in named:
        cells = [cells[name] for _, cells in rows]
        is_multi = name in forced or any(LABEL_SEPARATOR in cell for cell in cells)
        classes = sorted({label for cell in cells for label in split_labels(cell, is_multi)})
        if len(classes) < (1 if is_multi else 2):
            kind = "multi-label" if is_multi else "single-label"
            raise DataError(
                f"{path}: column {name!r} has {len(classes)} distinct label(s) {classes}; "
                f"a {kind} task needs at least {1 if is_multi else 2}"
            )
        tasks[name] = TaskSpec.from_classes(classes, multi_label=is_multi)
    return tasks
