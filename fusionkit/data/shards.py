"""WebDataset tar shards: a manifest and its images packed into a few large files.

``fusionkit data shard --manifest M --out DIR --shard-size N``
(:func:`~fusionkit.data.shard_writer.write_shards`) writes ``DIR/shard-000000.tar``,
``DIR/shard-000001.tar``, ... of ``N`` samples each, and ``DIR/index.json``. Each sample is a
WebDataset sample: members sharing the key ``000000123`` (the sample's row number):

- ``000000123.json``: the row's cells (``{"id": ..., "text": ..., "color": ...}``), image cells
  replaced by the member that holds the image;
- ``000000123.<column>.<ext>``: the bytes of the image file of each image column.

Any WebDataset reader reads them. Wherever fusionkit takes a manifest (``data.train``,
``data.val``), it takes a shard pattern too: ``DIR/shard-{000000..000123}.tar`` (brace ranges
as in WebDataset), or one ``.tar`` file. The rows come from the shards' JSON members, read
once; images are read when a sample is loaded, straight from their byte range in the tar (each
tar's member offsets are indexed on first use, per process). So a rank or a DataLoader worker
reads the bytes of its own samples only, and training on shards samples, splits and resumes
exactly as training on the manifest does.

Examples:
    >>> is_shard_pattern("data/shards/shard-{000000..000023}.tar")
    True
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fusionkit.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "SHARD_INDEX",
    "expand_shards",
    "is_shard_pattern",
    "read_member",
    "read_shard_rows",
    "shard_block_size",
]

#: The file of a shard folder that lists its shards and their sample counts.
SHARD_INDEX = "index.json"
#: File suffixes a column's cells must all have to be packed as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# Tars whose member offsets a process keeps indexed at once.
_INDEXED = 64
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
_indexes: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()


def is_shard_pattern(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names tar shards (a ``.tar`` file or a brace pattern of them).

    Examples:
        >>> is_shard_pattern("d/shard-{000000..000009}.tar"), is_shard_pattern("d/train.csv")
        (True, False)
    """
    return str(path).endswith(".tar")


def expand_shards(pattern: str | os.PathLike[str]) -> list[Path]:
    """The files of a shard pattern, in order.

    Args:
        pattern: ``DIR/shard-{000000..000123}.tar`` (zero-padded ranges keep their width; several
            ranges expand as a product) or one ``.tar`` path.

    Returns:
        The tar files.

    Raises:
        DataError: The pattern matches no file, or names files that do not exist.

    Examples:
        >>> [p.name for p in expand_shards("d/s-{00..02}.tar")]  # doctest: +SKIP
        ['s-00.tar', 's-01.tar', 's-02.tar']
    """
    names = [str(pattern)]
    while any(_BRACES.search(name) for name in names):
        expanded = []
        for name in names:
            found = _BRACES.search(name)
            if found is None:
                expanded.append(name)
                continue
            first, last = found.group(1), found.group(2)
            width = len(first)
            expanded.extend(
                name[: found.start()] + str(number).zfill(width) + name[found.end():]
                for number in range(int(first), int(last) + 1)
            )
        names = expanded
    paths = [Path(name) for name in names]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        listed = ", ".join(str(path) for path in missing[:3])
        raise DataError(
            f"{pattern}: {len(missing)} of {len(paths)} shard file(s) do not exist "
            f"(e.g. {listed})"
        )
    return paths


def _members(tar_path: str) -> dict[str, tuple[int, int]]:
    """Member name → (data offset, size) of a tar, indexed once per process (LRU)."""
    index = _indexes.get(tar_path)
    if index is not None:
        _indexes.move_to_end(tar_path)
        return index
    try:
        with tarfile.open(tar_path) as tar:
            index = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
    except (OSError, tarfile.TarError) as error:
        raise DataError(f"{tar_path}: unreadable tar shard ({error})") from None
    _indexes[tar_path] = index
    if len(_indexes) > _INDEXED:
        _indexes.popitem(last=False)
    return index


def read_member(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a tar member named as a path inside its tar: ``DIR/shard.tar/member``.

    Args:
        path: The tar file's path, ``/``, then the member's name.

    Returns:
        The member's bytes.

    Raises:
        DataError: The tar is unreadable or lacks the member.

    Examples:
        >>> read_member("shards/shard-000000.tar/000000000.image.png")[:4]  # doctest: +SKIP
        b'\\x89PNG'
    """
    path = Path(path)
    tar_path, name = str(path.parent), path.name
    found = _members(tar_path).get(name)
    if found is None:
        raise DataError(f"{tar_path}: no member {name!r}")
    offset, size = found
    with open(tar_path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise DataError(f"{tar_path}: member {name!r} is truncated")
    return data


def read_shard_rows(
    pattern: str | os.PathLike[str],
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The rows of tar shards as a manifest's: columns, and (sample number, cells) per row.

    Image cells become ``<tar path>/<member>`` (absolute when the pattern is).

    Args:
        pattern: A shard pattern (see :func:`expand_shards`).

    Returns:
        ``(columns, rows)``, rows numbered from 1 in shard order.

    Raises:
        DataError: No shard matches, a shard is unreadable (truncated, corrupt), or a sample
            lacks its JSON member or holds a malformed one.
    """
    columns: list[str] = []
    rows: list[tuple[int, dict[str, str]]] = []
    for tar_path in expand_shards(pattern):
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, suffix = member.name.partition(".")
                    entry = samples.setdefault(key, {})
                    if suffix == "json":
                        handle = tar.extractfile(member)
                        entry["json"] = handle.read() if handle else b""
                    else:
                        entry[suffix] = member.name
        except (OSError, tarfile.TarError, EOFError) as error:
            raise DataError(f"{tar_path}: unreadable tar shard ({error})") from None
        for key, entry in samples.items():
            if "json" not in entry:
                raise DataError(f"{tar_path}: sample {key!r} has no .json member")
            try:
                cells = json.loads(entry["json"])
            except ValueError as error:
                raise DataError(f"{tar_path}: sample {key!r}: malformed JSON ({error})") from None
            if not isinstance(cells, dict):
                raise DataError(f"{tar_path}: sample {key!r}: expected a JSON object")
            for column, value in cells.items():
                if isinstance(value, str) and value in entry.values():
                    cells[column] = str(tar_path / value)
            columns.extend(column for column in cells if column not in columns)
            rows.append((len(rows) + 1, {str(k): "" if v is None else str(v)
                                         for k, v in cells.items()}))
    rows = [(line, {column: cells.get(column, "") for column in columns}) for line, cells in rows]
    return columns, rows


def shard_block_size(pattern: str | os.PathLike[str]) -> int:
    """Samples per shard of a shard folder (its ``index.json``), or 1000 without one.

    Args:
        pattern: A shard pattern.

    Returns:
        The shard size the epoch order keeps samples together by.
    """
    try:
        index = json.loads((Path(pattern).parent / SHARD_INDEX).read_text())
        return max(1, int(index["shard_size"]))
    except (OSError, ValueError, KeyError, TypeError):
        return 1000
