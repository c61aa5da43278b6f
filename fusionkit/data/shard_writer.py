"""Writing WebDataset tar shards from a manifest (see :mod:`fusionkit.data.shards`)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusionkit.data.reading import read_manifest
from fusionkit.data.shards import IMAGE_SUFFIXES, SHARD_INDEX
from fusionkit.errors import DataError
from fusionkit.io import atomic_write, write_json

__all__ = ["write_shards"]


def _image_columns(
    columns: Sequence[str], rows: Sequence[tuple[int, dict[str, str]]]
) -> list[str]:
    """Columns whose every non-empty cell names a file with an image suffix."""
    found = []
    for column in columns:
        cells = [cells[column].strip() for _, cells in rows if cells[column].strip()]
        if cells and all(Path(cell).suffix.lower() in IMAGE_SUFFIXES for cell in cells):
            found.append(column)
    return found


def write_shards(
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    shard_size: int = 1000,
    image_columns: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Pack a manifest and its images into WebDataset tar shards.

    Each shard is written to a temporary file and renamed into place; ``index.json`` is
    written last.

    Args:
        manifest: A manifest file or a named source (see
            :func:`~fusionkit.data.sources.resolve_manifest`).
        out: The output folder (created).
        shard_size: Samples per shard.
        image_columns: Columns whose cells are image files (default: every column whose
            non-empty cells all end in an image suffix).

    Returns:
        The index: ``pattern``, ``samples``, ``shards``, ``shard_size``, ``columns``,
        ``image_columns`` and each shard's ``counts``.

    Raises:
        DataError: The manifest cannot be read, a named image column does not exist, an image
            file is missing, or a column name holds a dot (WebDataset splits keys at dots).
        ValueError: ``shard_size`` is below 1.

    Examples:
        >>> write_shards("synthetic:train", "shards", shard_size=500)["shards"]  # doctest: +SKIP
        3
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    path, columns, rows = read_manifest(manifest)
    images = list(_image_columns(columns, rows) if image_columns is None else image_columns)
    unknown = [column for column in images if column not in columns]
    if unknown:
        raise DataError(f"{path}: no image column(s) {unknown}; columns: {columns}")
    dotted = [column for column in images if "." in column]
    if dotted:
        raise DataError(f"{path}: image column names must not hold a dot, got {dotted}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    counts = []
    for start in range(0, len(rows), shard_size):
        chunk = rows[start : start + shard_size]
        target = folder / f"shard-{len(counts):06d}.tar"
        atomic_write(target, lambda tmp, c=chunk, s=start: _write_tar(tmp, path, c, s, images))
        counts.append(len(chunk))
    last = max(len(counts) - 1, 0)
    index = {
        "pattern": str(folder / f"shard-{{000000..{last:06d}}}.tar"),
        "samples": len(rows),
        "shards": len(counts),
        "shard_size": shard_size,
        "columns": columns,
        "image_columns": images,
        "counts": counts,
        "source": str(path),
    }
    write_json(folder / SHARD_INDEX, index)
    return index


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_tar(
    tmp: Path, manifest: Path, rows: Sequence[tuple[int, dict[str, str]]], start: int,
    images: Sequence[str],
) -> None:
    # Fixed member metadata (no times, owners or modes of the sources): the same manifest
    # gives byte-identical shards.
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for number, (line, cells) in enumerate(rows, start=start):
            key = f"{number:09d}"
            row = dict(cells)
            for column in images:
                cell = cells[column].strip()
                if not cell:
                    continue
                source = manifest.parent / cell
                try:
                    data = source.read_bytes()
                except OSError as error:
                    raise DataError(
                        f"{manifest}, line {line}, column {column!r}: cannot read image "
                        f"{source} ({error})"
                    ) from None
                member = f"{key}.{column}{Path(cell).suffix.lower()}"
                _add(tar, member, data)
                row[column] = member
            _add(tar, f"{key}.json", json.dumps(row, ensure_ascii=False).encode())
