"""Frozen-backbone feature cache: encode a data set once, train the fusion on stored tokens.

A frozen encoder's token features for a given input never change, so the trainer stores its
:meth:`~fusionkit.models.CMACLIP.forward_features` outputs (tokens and masks per input name)
and later epochs reuse them. When every encoder is frozen, only ``forward_head`` runs; when
some are trainable (say, a fine-tuned text encoder beside a frozen image backbone), the inputs
of frozen encoders come from the cache and the others run live on every batch (their raw
values travel with the cached tokens in a :class:`FeatureBatch`).

The features are stored shard by shard (see :mod:`fusionkit.training.cache_store`): each
shard of 1,024 samples is written as soon as it is encoded, so an encoding holds one shard in
memory whatever the data set's size, and an interrupted encoding resumes after its last
complete shard. Training reads the shards memory-mapped, sample by sample: each rank and each
DataLoader worker touches only the samples it reads. Texts are stored ragged (each sample up to
its last real token); :func:`collate_features` pads a batch to its own longest text.

The entry is named by a hash of what determines the features, not of the manifest file: the
cached inputs' encoder configs and columns, and for every sample, in order, the value of each
cached input (a text itself; an image file's path, size and modification time), with the image
transform key and the storage dtype. A manifest rewritten byte for byte, moved, or relabelled
reuses its features; an image file replaced with one of the same size and modification time
is not noticed (the check ``make`` and ``rsync`` make too).

Training images are not augmented when the image features are cached: a cached feature is that
of the evaluation transform.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fusionkit.data import Batch, ManifestDataset, make_collate
from fusionkit.data.loading import loader_options
from fusionkit.training.cache_store import (
    FORMAT_VERSION,
    SHARD_SIZE,
    FeatureStore,
    ShardBuffer,
    feature_cache_key,
    shard_is_complete,
    shard_path,
    shard_ranges,
    write_index,
)

__all__ = [
    "CacheStats",
    "CachedFeatures",
    "FeatureBatch",
    "FeatureCollator",
    "batch_tokens",
    "collate_features",
    "default_cache_dir",
    "encode_dataset",
    "feature_cache_key",
    "feature_inputs",
]

_LOG = logging.getLogger("fusionkit.training")


def default_cache_dir() -> Path:
    """``$FUSIONKIT_CACHE/features`` or ``~/.cache/fusionkit/features``.

    Returns:
        The folder (not created).

    Examples:
        >>> default_cache_dir().name
        'features'
    """
    root = os.environ.get("FUSIONKIT_CACHE") or Path.home() / ".cache" / "fusionkit"
    return Path(root) / "features"


@dataclass
class CacheStats:
    """Counters of the feature cache, per trainer.

    Attributes:
        hits: Data sets whose every shard was found on disk.
        misses: Data sets with shards to encode (all of them, or those an interrupted
            encoding left undone).
        encoded_batches: Encoder forward passes run to fill the cache.
        encoded_shards: Shards encoded and written.
        reused_shards: Shards found complete on disk and reused.

    Examples:
        >>> CacheStats().hits
        0
    """

    hits: int = 0
    misses: int = 0
    encoded_batches: int = 0
    encoded_shards: int = 0
    reused_shards: int = 0


def _kinds(model: Any, names: Sequence[str]) -> dict[str, str]:
    """Input name → ``"image"`` / ``"text"`` for some of a model's inputs."""
    return {name: model.config.inputs[name].kind for name in names}


@dataclass
class FeatureBatch:
    """A batch of cached features and targets, with the raw inputs of live encoders.

    Attributes:
        ids: Sample ids.
        tokens: Cached input → ``(B, N, C)`` float32.
        masks: Cached input → ``(B, N)`` bool.
        targets: Task → targets as in :class:`~fusionkit.data.Batch`.
        live: The inputs whose (trainable) encoders run on every batch.
        inputs: A :class:`~fusionkit.data.Batch` holding the raw values of the ``live``
            inputs (None when every input is cached).
    """

    ids: list[str]
    tokens: dict[str, Tensor]
    masks: dict[str, Tensor]
    targets: dict[str, Tensor] = field(default_factory=dict)
    live: tuple[str, ...] = ()
    inputs: Batch | None = None

    def __len__(self) -> int:
        """The batch size."""
        return len(self.ids)


class CachedFeatures(Dataset):
    """Cached encoder features of a :class:`~fusionkit.data.ManifestDataset`, sample by sample.

    Args:
        dataset: The data set the features belong to (targets are read from its records;
            the raw values of ``live`` inputs are loaded from it).
        store: The cache entry, read sample by sample (memory-mapped).
        live: Inputs not in the cache, whose raw values each sample carries (an image
            through the data set's transform, a text as it is).

    Examples:
        >>> features = encode_dataset(model, dataset, cache_dir, key)  # doctest: +SKIP
        >>> features[0]["tokens"]["image"].shape  # doctest: +SKIP
        torch.Size([9, 1280])
    """

    def __init__(
        self, dataset: ManifestDataset, store: FeatureStore, live: Sequence[str] = ()
    ) -> None:
        self.dataset = dataset
        self.store = store
        self.live = tuple(live)

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.dataset.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: ``id``, cached ``tokens`` ``(L, C)`` and ``masks`` ``(L,)`` per input
        (``L`` up to the sample's last real token), ``targets``, and the value of each live
        input by name."""
        record = self.dataset.records[index]
        tokens, masks = self.store.sample(index)
        return {
            **self.dataset.load(index, self.live),
            "tokens": tokens,
            "masks": masks,
            "targets": dict(record.targets),
        }


class FeatureCollator:
    """Collate cached samples, each input padded to the batch's longest sequence.

    Args:
        tasks: The tasks to collate targets for.
        live: Input name → kind (``"image"`` / ``"text"``) of the inputs whose raw values the
            samples carry; a sequence of names means the shorthand's (``image``, ``text``).
        image_shape: ``(3, H, W)`` of live images, or input name → shape (for a batch
            without any image of an input).
    """

    def __init__(
        self,
        tasks: dict[str, Any],
        live: Sequence[str] | Mapping[str, str] = (),
        image_shape: Any = None,
    ) -> None:
        kinds = dict(live) if isinstance(live, Mapping) else {name: name for name in live}
        self.targets = make_collate(tasks, image_shape, inputs=kinds)
        self.live = tuple(kinds)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> FeatureBatch:
        """Stack ``samples`` into a :class:`FeatureBatch`."""
        return collate_features(samples, self.targets, self.live)


def collate_features(
    samples: Sequence[dict[str, Any]], target_collate: Any, live: Sequence[str] = ()
) -> FeatureBatch:
    """Pad cached samples to the batch's longest sequence per input and stack them.

    Args:
        samples: Items of :class:`CachedFeatures`.
        target_collate: A :func:`~fusionkit.data.make_collate` collator for the targets and
            the raw values of the live inputs.
        live: Inputs whose raw values the samples carry.

    Returns:
        The batch, tokens as float32 (zeros where padded, masked out).

    Examples:
        >>> collate = make_collate(tasks)  # doctest: +SKIP
        >>> batch = collate_features([features[0], features[1]], collate)  # doctest: +SKIP
    """
    tokens, masks = {}, {}
    for name in samples[0]["tokens"]:
        parts = [s["tokens"][name] for s in samples]
        # Samples keep their tokens up to their last real one, so the batch's longest real
        # sequence sets its length (1 when no sample has any).
        length = max(1, *(len(part) for part in parts))
        stacked = torch.zeros(len(parts), length, parts[0].shape[-1])
        mask = torch.zeros(len(parts), length, dtype=torch.bool)
        for row, (part, sample) in enumerate(zip(parts, samples, strict=True)):
            stacked[row, : len(part)] = part
            mask[row, : len(part)] = sample["masks"][name]
        tokens[name], masks[name] = stacked, mask
    batch = target_collate(
        [{k: v for k, v in s.items() if k not in ("tokens", "masks")} for s in samples]
    )
    live = tuple(live)
    return FeatureBatch(
        batch.ids, tokens, masks, batch.targets, live=live, inputs=batch if live else None
    )


@torch.no_grad()
def encode_dataset(
    model: Any,
    dataset: ManifestDataset,
    cache_dir: str | os.PathLike[str],
    transform_key: str,
    *,
    batch_size: int = 64,
    image_shape: Any = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    stats: CacheStats | None = None,
    modalities: Sequence[str] | None = None,
    num_workers: int = 0,
    shard_size: int = SHARD_SIZE,
) -> CachedFeatures:
    """Read a data set's features from the cache, encoding the shards it lacks first.

    Shards found complete on disk are reused (all of them: a cache hit; some: an interrupted
    encoding resumed); the others are encoded and each is written as soon as its samples are,
    so memory holds one shard's features at a time.

    Args:
        model: A model with ``forward_features`` whose encoders of ``modalities`` are frozen.
        dataset: The data set, with the evaluation image transforms when images are cached.
        cache_dir: The cache folder (the entry is its sub-folder named by the key).
        transform_key: Key of the cached image inputs' transforms.
        batch_size: Encoding batch size.
        image_shape: ``(3, H, W)`` of the transformed images, or input name → shape (a batch
            without any image of an input then still has an image tensor).
        device: Device to encode on.
        dtype: Storage dtype (``float16`` halves the disk and memory footprint).
        stats: Counters to update.
        modalities: The input names to cache (default: every input of the model); the
            others are left live: each sample carries their raw values.
        num_workers: DataLoader workers that read and transform the samples to encode.
        shard_size: Samples per shard.

    Returns:
        The features, read from the cache's mapped shards (float tensors in ``dtype``).

    Raises:
        ValueError: ``modalities`` is empty or names a modality the model lacks.
        StorageError: A shard cannot be written.

    Examples:
        >>> features = encode_dataset(model, dataset, "~/.cache/x", key)  # doctest: +SKIP
    """
    stats = stats if stats is not None else CacheStats()
    cached = tuple(model.modalities if modalities is None else modalities)
    unknown = sorted(set(cached) - set(model.modalities))
    if not cached or unknown:
        raise ValueError(
            f"modalities: expected a non-empty subset of {list(model.modalities)}, got "
            f"{list(cached)}"
        )
    live = tuple(m for m in model.modalities if m not in cached)
    key = feature_cache_key(model, dataset, transform_key, dtype, cached)
    folder = Path(cache_dir).expanduser() / key
    ranges = shard_ranges(len(dataset), shard_size)
    todo = [
        number for number, samples in enumerate(ranges)
        if not shard_is_complete(shard_path(folder, number), key, samples, cached)
    ]
    stats.reused_shards += len(ranges) - len(todo)
    features = CachedFeatures(dataset, FeatureStore(folder, len(dataset), cached, shard_size),
                              live)
    if not todo:
        stats.hits += 1
        return features
    stats.misses += 1
    if len(todo) < len(ranges):
        _LOG.info("feature cache %s: %d of %d shards on disk; encoding the other %d",
                  folder, len(ranges) - len(todo), len(ranges), len(todo))
    _encode_shards(model, dataset, folder, key, [(n, ranges[n]) for n in todo],
                   batch_size=batch_size, image_shape=image_shape, device=device, dtype=dtype,
                   stats=stats, cached=cached, num_workers=num_workers)
    write_index(folder, {
        "version": FORMAT_VERSION, "key": key, "manifest": str(dataset.path),
        "samples": len(dataset), "shard_size": shard_size, "shards": len(ranges),
        "inputs": list(cached), "dtype": str(dtype),
    })
    _LOG.info("cached features of %s in %s (%d shards encoded)", dataset.path, folder,
              len(todo))
    return features


def _encode_shards(
    model: Any,
    dataset: ManifestDataset,
    folder: Path,
    key: str,
    shards: list[tuple[int, range]],
    *,
    batch_size: int,
    image_shape: Any,
    device: torch.device | str,
    dtype: torch.dtype,
    stats: CacheStats,
    cached: tuple[str, ...],
    num_workers: int,
) -> None:
    """Encode ``shards`` (number, sample indices) in order, writing each once it is full."""
    # Batches never straddle two shards, so each shard is complete after its last batch.
    batches = [list(samples[i : i + batch_size]) for _, samples in shards
               for i in range(0, len(samples), batch_size)]
    # Only the cached inputs are loaded (no image decoding for a text cache).
    # An own generator keeps the loader from drawing a seed from the global RNG: a run that
    # fills the cache and one that reads it then train with the same dropout stream.
    loader = DataLoader(
        _Only(dataset, cached),
        batch_sampler=batches,
        collate_fn=make_collate({}, image_shape, inputs=_kinds(model, cached)),
        generator=torch.Generator(),
        **loader_options(num_workers, torch.device(device).type == "cuda"),
    )
    pending = iter(shards)
    number, buffer = -1, None
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if buffer is None:
                number, samples = next(pending)
                buffer = ShardBuffer(samples)
            inputs = feature_inputs(model, batch.to(device), cached)
            tokens, masks = model.forward_features(**inputs)
            stats.encoded_batches += 1
            buffer.add(tokens, masks, dtype, names=cached)
            if buffer.full:
                buffer.write(shard_path(folder, number), key)
                stats.encoded_shards += 1
                buffer = None
    finally:
        model.train(was_training)


class _Only(Dataset):
    """A manifest data set's samples with the values of some inputs only (no targets)."""

    def __init__(self, dataset: ManifestDataset, names: Sequence[str]) -> None:
        self.dataset = dataset
        self.names = tuple(names)

    def __len__(self) -> int:
        return len(self.dataset.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset.load(index, self.names)


def feature_inputs(
    model: Any, batch: Any, modalities: Sequence[str] | None = None
) -> dict[str, Any]:
    """``forward_features`` arguments for a data batch: its inputs by name, with the
    ``present`` flags of the image inputs (a missing image is a zero placeholder).

    Args:
        model: A :class:`~fusionkit.models.CMACLIP`.
        batch: A :class:`~fusionkit.data.Batch`.
        modalities: Restrict the arguments to these input names (default: the model's).

    Returns:
        ``{"inputs": {name: value}, "present": {name: flags}}``; an image input whose every
        image is missing from the batch (and that has no placeholder) is left out.

    Examples:
        >>> tokens, masks = model.forward_features(**feature_inputs(model, batch))  # doctest: +SKIP
    """
    wanted = model.modalities if modalities is None else modalities
    values: dict[str, Any] = {}
    present: dict[str, Tensor] = {}
    for name in model.modalities:
        value = batch.inputs.get(name)
        if name not in wanted or value is None:
            continue
        values[name] = value
        if isinstance(value, Tensor):
            present[name] = batch.present[name]
    return {"inputs": values, "present": present}


def batch_tokens(
    model: Any, batch: Any, device: torch.device | str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Tokens and masks of every modality for a data batch or a cached-feature batch.

    Encoders run for a :class:`~fusionkit.data.Batch` and for the live modalities of a
    :class:`FeatureBatch`; cached modalities are moved to ``device``.

    Args:
        model: A :class:`~fusionkit.models.CMACLIP`.
        batch: A :class:`~fusionkit.data.Batch` or a :class:`FeatureBatch`.
        device: Where the model lives.

    Returns:
        ``(tokens, masks)`` as from :meth:`~fusionkit.models.CMACLIP.forward_features`.

    Examples:
        >>> output = model.forward_head(*batch_tokens(model, batch, "cpu"))  # doctest: +SKIP
    """
    if not isinstance(batch, FeatureBatch):
        return model.forward_features(**feature_inputs(model, batch.to(device)))
    tokens = {m: t.to(device, non_blocking=True) for m, t in batch.tokens.items()}
    masks = {m: k.to(device, non_blocking=True) for m, k in batch.masks.items()}
    if batch.live:
        assert batch.inputs is not None
        inputs = feature_inputs(model, batch.inputs.to(device), batch.live)
        live_tokens, live_masks = model.forward_features(**inputs)
        tokens.update(live_tokens)
        masks.update(live_masks)
    # The model's modality order, whatever came from where.
    order = [m for m in model.modalities if m in tokens]
    return {m: tokens[m] for m in order}, {m: masks[m] for m in order}
