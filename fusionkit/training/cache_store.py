"""The feature cache on disk: fixed-size safetensors shards, written one by one, read mapped.

A cache entry is a folder named by its key. It holds ``shard-000000.safetensors``,
``shard-000001.safetensors``, ... of :data:`SHARD_SIZE` samples each (the last one shorter),
and an ``index.json`` written once every shard is complete. Each shard is written atomically
(a temporary file renamed into place) as soon as its samples are encoded, so an interrupted
encoding leaves only complete shards behind, and the next run encodes the missing ones.

Per cached input ``name`` a shard stores its samples ragged, without padding:

- ``name.tokens``: ``(T, C)``, every sample's tokens up to its last real one, concatenated;
- ``name.mask``: ``(T,)`` bool, the mask of those tokens;
- ``name.offsets``: ``(n + 1,)`` int64, sample ``i`` owning rows ``offsets[i]:offsets[i + 1]``.

Shards are read with :func:`safetensors.safe_open`, which maps the file: reading one sample
copies that sample's rows, and only the pages it touches become resident, as file pages the
kernel may drop, not as the process's anonymous memory. A rank or a DataLoader worker therefore
touches only the samples it reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fusionkit.data import ManifestDataset
from fusionkit.io import atomic_write, write_json

__all__ = [
    "FORMAT_VERSION",
    "INDEX_FILE",
    "SHARD_SIZE",
    "FeatureStore",
    "ShardBuffer",
    "feature_cache_key",
    "read_index",
    "shard_is_complete",
    "shard_path",
    "shard_ranges",
    "write_index",
]

_LOG = logging.getLogger("fusionkit.training")

#: The cache format; part of every key, so a new format never reads an old entry.
FORMAT_VERSION = "fusionkit-features-v4"
#: Samples per shard: bounds the memory an encoding holds at once (a shard's features).
SHARD_SIZE = 1024
#: Written last: the entry is complete.
INDEX_FILE = "index.json"
# Shards a reader keeps mapped at once (each is one file descriptor and one mapping).
_OPEN_SHARDS = 64


def _identity(value: Any) -> Any:
    """What of an input's value determines its features: a text itself, an image file's
    path, size and modification time (for an image in a tar shard, the tar's; None for a
    file gone since the manifest was read)."""
    if not isinstance(value, Path):
        return value
    for path in (value, value.parent):  # an image in a tar shard: the tar's identity
        try:
            if path is value or path.is_file():
                stat = path.stat()
                return [str(value), stat.st_size, stat.st_mtime_ns]
        except OSError:
            continue
    return [str(value), None]


def feature_cache_key(
    model: Any,
    dataset: ManifestDataset,
    transform_key: str,
    dtype: torch.dtype,
    modalities: Sequence[str] | None = None,
) -> str:
    """Hash of everything that determines a data set's cached features.

    The rows are hashed by content, one at a time: the value of each cached input of every
    sample, in order (a text itself; an image file's path, size and modification time). The
    manifest file itself (its path, time, ids and label columns) is not part of the key.

    Args:
        model: The model (the cached inputs' columns and encoder configs are hashed).
        dataset: The manifest data set (its rows' cached values are hashed).
        transform_key: Key of the image transforms of the cached image inputs.
        dtype: Storage dtype.
        modalities: The cached input names (default: every input of the model).

    Returns:
        A 24-character hex digest.

    Examples:
        >>> key = feature_cache_key(model, dataset, "eval/...", torch.float16)  # doctest: +SKIP
    """
    cached = list(model.modalities if modalities is None else modalities)
    inputs = model.config.inputs
    parts = {
        "version": FORMAT_VERSION,
        "inputs": {
            name: {
                "kind": inputs[name].kind,
                "column": inputs[name].column,
                "encoder": inputs[inputs[name].share or name].encoder.to_dict(),
            }
            for name in cached
        },
        "transform": transform_key,
        "dtype": str(dtype),
        "samples": len(dataset.records),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for record in dataset.records:
        row = [_identity(record.values.get(name)) for name in cached]
        digest.update(json.dumps(row).encode() + b"\n")
    return digest.hexdigest()[:24]


def shard_path(folder: Path, shard: int) -> Path:
    """The file of shard number ``shard`` in an entry's folder.

    Examples:
        >>> shard_path(Path("cache/abc"), 3).name
        'shard-000003.safetensors'
    """
    return folder / f"shard-{shard:06d}.safetensors"


def shard_ranges(num_samples: int, shard_size: int = SHARD_SIZE) -> list[range]:
    """The sample indices of each shard.

    Args:
        num_samples: Samples in the data set.
        shard_size: Samples per shard.

    Returns:
        One range per shard, in order.

    Examples:
        >>> shard_ranges(5, 2)
        [range(0, 2), range(2, 4), range(4, 5)]
    """
    return [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def _metadata(path: Path) -> tuple[dict[str, str], set[str]] | None:
    """A shard's header metadata and tensor names, or None when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {}), set(handle.keys())
    except Exception:
        # safetensors raises its own error types on a truncated or corrupt header.
        return None


def shard_is_complete(
    path: Path, key: str, samples: range, names: Sequence[str]
) -> bool:
    """Whether ``path`` is a readable shard of entry ``key`` holding exactly ``samples``.

    Args:
        path: The shard file.
        key: The cache key it must belong to.
        samples: The sample indices it must hold.
        names: The cached inputs it must hold.

    Returns:
        True for a complete shard; False when it is missing, unreadable (truncated,
        corrupt) or of another entry or layout.
    """
    if not path.is_file():
        return False
    found = _metadata(path)
    if found is None:
        _LOG.warning("feature cache shard %s is unreadable; encoding it again", path)
        return False
    metadata, tensors = found
    wanted = {f"{name}.{part}" for name in names for part in ("tokens", "mask", "offsets")}
    return (
        metadata.get("key") == key
        and metadata.get("start") == str(samples.start)
        and metadata.get("samples") == str(len(samples))
        and tensors == wanted
    )


class ShardBuffer:
    """The features of one shard while it is encoded; :meth:`write` stores them.

    Batches are kept ragged as they arrive (each sample's tokens up to its last real one), so
    the buffer holds at most one shard's features.

    Args:
        samples: The sample indices of the shard.

    Examples:
        >>> buffer = ShardBuffer(range(0, 2))
        >>> buffer.add({"text": torch.ones(2, 3, 4)},
        ...            {"text": torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()}, torch.float16)
        >>> buffer.full
        True
    """

    def __init__(self, samples: range) -> None:
        self.samples = samples
        self.count = 0
        self._tokens: dict[str, list[Tensor]] = {}
        self._masks: dict[str, list[Tensor]] = {}
        self._lengths: dict[str, list[Tensor]] = {}

    @property
    def full(self) -> bool:
        """Every sample of the shard has been added."""
        return self.count >= len(self.samples)

    def add(self, tokens: Mapping[str, Tensor], masks: Mapping[str, Tensor],
            dtype: torch.dtype, names: Sequence[str] | None = None) -> None:
        """Add a batch: tokens ``(B, L, C)`` and masks ``(B, L)`` per input.

        Args:
            tokens: Input name → tokens.
            masks: Input name → masks (True = real token).
            dtype: Storage dtype of the tokens.
            names: Every input the shard stores; one the batch lacks gets no token for any
                of its samples (default: those of ``tokens``).
        """
        size = len(next(iter(masks.values())))
        for name in tokens if names is None else names:
            if name not in tokens:
                self._lengths.setdefault(name, []).append(torch.zeros(size, dtype=torch.int64))
                continue
            mask = masks[name].cpu()
            positions = torch.arange(mask.shape[1])
            # Up to and including the last real token: the padding after it is dropped.
            lengths = torch.where(mask, positions + 1, 0).amax(dim=1)
            keep = positions < lengths[:, None]
            self._tokens.setdefault(name, []).append(tokens[name].detach().to("cpu", dtype)[keep])
            self._masks.setdefault(name, []).append(mask[keep])
            self._lengths.setdefault(name, []).append(lengths)
        self.count += size

    def write(self, path: Path, key: str) -> None:
        """Store the shard atomically at ``path`` (the entry's ``key`` in its header).

        Raises:
            StorageError: The file cannot be written.
        """
        tensors: dict[str, Tensor] = {}
        width = next((parts[0].shape[-1] for parts in self._tokens.values()), 0)
        for name, lengths_parts in self._lengths.items():
            lengths = torch.cat(lengths_parts)
            offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
            torch.cumsum(lengths, dim=0, out=offsets[1:])
            parts = self._tokens.get(name)
            tensors[f"{name}.tokens"] = (torch.cat(parts).contiguous() if parts
                                         else torch.zeros(0, width))
            tensors[f"{name}.mask"] = (torch.cat(self._masks[name]).contiguous() if parts
                                       else torch.zeros(0, dtype=torch.bool))
            tensors[f"{name}.offsets"] = offsets
        metadata = {"key": key, "start": str(self.samples.start),
                    "samples": str(len(self.samples))}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata))


def write_index(folder: Path, index: Mapping[str, Any]) -> None:
    """Write an entry's ``index.json`` (its last file: the entry is complete)."""
    write_json(folder / INDEX_FILE, dict(index))


class _Shard:
    """One mapped shard and the offsets of its inputs."""

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self.handle = safe_open(str(path), framework="pt")
        self.offsets = {name: self.handle.get_tensor(f"{name}.offsets").tolist()
                        for name in names}


class FeatureStore:
    """A complete cache entry, read sample by sample from its mapped shards.

    Shards open on first use and at most 64 stay open (least recently used first out). A
    process that forks (a DataLoader worker) opens its own.

    Args:
        folder: The entry's folder.
        num_samples: Samples in the entry.
        names: The cached inputs.
        shard_size: Samples per shard.

    Examples:
        >>> store = FeatureStore(Path("cache/abc"), 40, ["image", "text"])  # doctest: +SKIP
        >>> tokens, masks = store.sample(3)  # doctest: +SKIP
    """

    def __init__(
        self, folder: Path, num_samples: int, names: Sequence[str], shard_size: int = SHARD_SIZE
    ) -> None:
        self.folder = Path(folder)
        self.num_samples = num_samples
        self.names = tuple(names)
        self.shard_size = shard_size
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        """Samples in the entry."""
        return self.num_samples

    def __getstate__(self) -> dict[str, Any]:
        # Mapped files do not travel to another process; the receiver opens its own.
        return {**self.__dict__, "_open": OrderedDict()}

    def _shard(self, number: int) -> _Shard:
        if self._pid != os.getpid():
            self._open, self._pid = OrderedDict(), os.getpid()
        shard = self._open.get(number)
        if shard is None:
            shard = _Shard(shard_path(self.folder, number), self.names)
            self._open[number] = shard
            if len(self._open) > _OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(number)
        return shard

    def sample(self, index: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One sample's tokens ``(L, C)`` and mask ``(L,)`` per input (``L``: up to its last
        real token; 0 for a missing input).

        Args:
            index: The sample, ``0 <= index < len(self)``.

        Returns:
            ``(tokens, masks)``, each input name → tensor.

        Raises:
            IndexError: ``index`` is out of range.
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        number, local = divmod(index, self.shard_size)
        shard = self._shard(number)
        tokens, masks = {}, {}
        for name in self.names:
            start, stop = shard.offsets[name][local], shard.offsets[name][local + 1]
            tokens[name] = shard.handle.get_slice(f"{name}.tokens")[start:stop]
            masks[name] = shard.handle.get_slice(f"{name}.mask")[start:stop]
        return tokens, masks


def read_index(folder: Path) -> dict[str, Any] | None:
    """An entry's ``index.json``, or None when absent or unreadable."""
    try:
        return json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None
