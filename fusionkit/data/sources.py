"""Named data sources: manifests such as ``synthetic:train`` that fusionkit builds on first use.

Wherever a manifest path is accepted (``data.train``, ``--train``, ``fusionkit evaluate --data``),
``<source>:<split>`` names a split of a data set that fusionkit can build offline:

- ``synthetic``: the embedded synthetic product catalogue (:data:`CATALOGUE`, the data of
  ``make demo``);
- ``emoji``: the emoji set built from Debian packages
  (:func:`~fusionkit.data.emoji.build_emoji_dataset` with its default arguments);
- ``icons``: the icons set built from Debian icon themes
  (:func:`~fusionkit.data.icons.build_icons_dataset` with its default arguments).

The first use builds the set into ``$FUSIONKIT_DATA_DIR/<source>-<hash>/`` (by default
``~/.cache/fusionkit/data``), the hash covering the source's generation parameters; later uses
read the same folder. A build writes into a temporary folder that is renamed into place once
complete (under a file lock where the platform has one), so processes started together (for
example by ``torchrun``) build it once and never see a half-written folder. A file that exists
under the given name always wins over the source interpretation.

Examples:
    >>> resolve_manifest("data/train.csv")
    PosixPath('data/train.csv')
    >>> resolve_manifest("synthetic:train").name  # doctest: +SKIP
    'train.csv'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionkit.errors import DataError

__all__ = [
    "CATALOGUE",
    "SOURCES",
    "STAMP",
    "DataSource",
    "data_dir",
    "materialize_source",
    "resolve_manifest",
    "source_dir",
]

_LOG = logging.getLogger("fusionkit.data")

#: Parameters of the synthetic catalogue that ``synthetic:`` names: 1200 / 300 / 300 samples at
#: 96 px, 20% spoiled titles and 20% spoiled images (so neither modality alone is always right).
CATALOGUE: dict[str, Any] = {
    "train": 1200,
    "val": 300,
    "test": 300,
    "seed": 0,
    "text_noise": 0.2,
    "image_noise": 0.2,
    "image_size": 96,
}

#: The file written last into a built source folder: its parameters and split manifests.
STAMP = "source.json"
# A source name is a word of two or more characters, so that a drive letter never reads as one.
_SOURCE_PATTERN = re.compile(r"([a-z][a-z0-9_]+):([a-z][a-z0-9_]*)")


@dataclass(frozen=True)
class DataSource:
    """A data set fusionkit can build offline, named in manifest paths as ``<name>:<split>``.

    Args:
        builder: ``"module:function"`` (imported on first use) or a callable, called as
            ``builder(out_dir, progress=..., **params)`` and returning split → manifest path.
        params: Keyword arguments of the builder; they are hashed into the folder name.
        description: One line for listings and messages.

    Examples:
        >>> DataSource("fusionkit.data.emoji:build_emoji_dataset", {}, "emoji").params
        {}
    """

    builder: str | Callable[..., Mapping[str, Path]]
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def build_function(self) -> Callable[..., Mapping[str, Path]]:
        """The builder as a callable (imports its module).

        Returns:
            The function.

        Raises:
            DataError: Its module cannot be imported.
        """
        if callable(self.builder):
            return self.builder
        module, _, name = self.builder.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise DataError(f"cannot load the builder {self.builder} ({error})") from None


#: Source name → :class:`DataSource`. A new source is one line here.
SOURCES: dict[str, DataSource] = {
    "synthetic": DataSource(
        "fusionkit.data.synthetic:generate_catalogue", CATALOGUE, "the synthetic catalogue"
    ),
    "emoji": DataSource(
        "fusionkit.data.emoji:build_emoji_dataset", {}, "the emoji set (Debian packages)"
    ),
    "icons": DataSource(
        "fusionkit.data.icons:build_icons_dataset", {}, "the icons set (Debian icon themes)"
    ),
}


def data_dir() -> Path:
    """Where named sources are built: ``$FUSIONKIT_DATA_DIR`` or ``~/.cache/fusionkit/data``.

    Returns:
        The folder (not created).

    Examples:
        >>> data_dir().name  # doctest: +SKIP
        'data'
    """
    root = os.environ.get("FUSIONKIT_DATA_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fusionkit" / "data"


def _source(name: str) -> DataSource:
    if name not in SOURCES:
        raise DataError(
            f"unknown data source {name!r}; known sources: {', '.join(sorted(SOURCES))} "
            f"(write <source>:<split>, e.g. synthetic:train, or give a manifest file)"
        )
    return SOURCES[name]


def source_dir(name: str) -> Path:
    """The folder a named source is (or will be) built in.

    Args:
        name: A key of :data:`SOURCES`.

    Returns:
        ``data_dir() / "<name>-<hash of the builder and its parameters>"``.

    Raises:
        DataError: Unknown source name.

    Examples:
        >>> source_dir("synthetic").name  # doctest: +SKIP
        'synthetic-3f2a9c1b7d'
    """
    source = _source(name)
    builder = source.builder if isinstance(source.builder, str) else source.builder.__qualname__
    blob = json.dumps({"builder": builder, "params": dict(source.params)}, sort_keys=True)
    return data_dir() / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` where ``fcntl`` exists; elsewhere the rename alone keeps
    the folder whole (concurrent processes may then build twice)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(name: str, source: DataSource, folder: Path, progress: bool) -> None:
    _LOG.info("building data source %r (%s) into %s", name, source.description, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp's folder is private; the built set is not
    try:
        try:
            paths = source.build_function()(tmp, progress=progress, **source.params)
        except DataError as error:
            raise DataError(f"data source {name!r}: {error}") from None
        stamp = {
            "source": name,
            "params": dict(source.params),
            "splits": {split: Path(path).name for split, path in paths.items()},
        }
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        if folder.exists() and _read_stamp(folder) is None:
            # Left by hand without its stamp: set it aside rather than mix old and new files.
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".stale",
                                          dir=folder.parent))
            os.replace(folder, stale / folder.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if _read_stamp(folder) is None:
                raise
            # Another process (without a working lock) finished first; its copy is the same.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def materialize_source(name: str, *, progress: bool = False) -> dict[str, Path]:
    """Build a named source unless already built; return its split manifests.

    Args:
        name: A key of :data:`SOURCES`.
        progress: Show the builder's progress bar.

    Returns:
        Split name → manifest path.

    Raises:
        DataError: Unknown source, or the build failed (e.g. missing Debian packages for
            ``emoji``; the message names them).

    Examples:
        >>> sorted(materialize_source("synthetic"))  # doctest: +SKIP
        ['test', 'train', 'val']
    """
    source = _source(name)
    folder = source_dir(name)
    stamp = _read_stamp(folder)
    if stamp is None:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            with _lock(folder.parent / f".{folder.name}.lock"):
                stamp = _read_stamp(folder)
                if stamp is None:
                    _build(name, source, folder, progress)
                    stamp = _read_stamp(folder)
        except OSError as error:
            raise DataError(
                f"data source {name!r}: cannot build it in {folder} ({error})"
            ) from None
        if stamp is None:
            raise DataError(f"data source {name!r}: {folder} holds no {STAMP} after building")
    return {split: folder / file for split, file in stamp["splits"].items()}


def resolve_manifest(path: str | os.PathLike[str]) -> Path:
    """A manifest path, with a named source (``synthetic:train``) built if needed.

    Args:
        path: A manifest file, or ``<source>:<split>`` with a source of :data:`SOURCES`. An
            existing file wins over the source interpretation of its name.

    Returns:
        The manifest file (a plain path unchanged).

    Raises:
        DataError: An unknown source or split, or a build that failed.

    Examples:
        >>> resolve_manifest("runs/data/train.csv")
        PosixPath('runs/data/train.csv')
    """
    plain = Path(path)
    match = _SOURCE_PATTERN.fullmatch(os.fspath(path)) if isinstance(path, str) else None
    if match is None or plain.exists():
        return plain
    name, split = match.groups()
    splits = materialize_source(name)
    if split not in splits:
        raise DataError(
            f"{path}: data source {name!r} has no split {split!r}; splits: {sorted(splits)}"
        )
    return splits[split]
