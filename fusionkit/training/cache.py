"""Frozen-backbone feature cache: encode a data set once, train the fusion on stored tokens.

A frozen encoder's token features for a given input never change, so the trainer stores its
:meth:`~fusionkit.models.CMACLIP.forward_features` outputs (tokens and masks per input name)
in a safetensors file and later epochs reuse them. When every encoder is frozen, only
``forward_head`` runs; when some are trainable (say, a fine-tuned text encoder beside a frozen
image backbone), the inputs of frozen encoders come from the cache and the others run live on
every batch (their raw values travel with the cached tokens in a :class:`FeatureBatch`).

The file is named by a hash of everything that determines the features: the cached inputs'
columns and encoder configs, the manifest path with its size and modification time, the sample
ids kept, the image transform key and the storage dtype. Texts of different lengths are stored
padded to the data set's longest text with their masks; :func:`collate_features` trims a batch
to its own longest text.

Training images are not augmented when the image features are cached: a cached feature is that
of the evaluation transform.
"""

from __future__ import annotations

import hashlib
import json
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
from fusionkit.errors import CheckpointError
from fusionkit.io import load_weights, save_weights

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
_VERSION = "fusionkit-features-v3"


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
        hits: Data sets loaded from disk.
        misses: Data sets encoded (then stored).
        encoded_batches: Encoder forward passes run to fill the cache.

    Examples:
        >>> CacheStats().hits
        0
    """

    hits: int = 0
    misses: int = 0
    encoded_batches: int = 0


def _kinds(model: Any, names: Sequence[str]) -> dict[str, str]:
    """Input name → ``"image"`` / ``"text"`` for some of a model's inputs."""
    return {name: model.config.inputs[name].kind for name in names}


def feature_cache_key(
    model: Any,
    dataset: ManifestDataset,
    transform_key: str,
    dtype: torch.dtype,
    modalities: Sequence[str] | None = None,
) -> str:
    """Hash of everything that determines a data set's cached features.

    Args:
        model: The model (the cached inputs' columns and encoder configs are hashed).
        dataset: The manifest data set (path, size, mtime and kept sample ids are hashed).
        transform_key: Key of the image transforms of the cached image inputs.
        dtype: Storage dtype.
        modalities: The cached input names (default: every input of the model).

    Returns:
        A 24-character hex digest.

    Examples:
        >>> key = feature_cache_key(model, dataset, "eval/...", torch.float16)  # doctest: +SKIP
    """
    stat = dataset.path.stat()
    cached = list(model.modalities if modalities is None else modalities)
    inputs = model.config.inputs
    parts = {
        "version": _VERSION,
        "inputs": {
            name: {
                "kind": inputs[name].kind,
                "column": inputs[name].column,
                "encoder": inputs[inputs[name].share or name].encoder.to_dict(),
            }
            for name in cached
        },
        "manifest": str(dataset.path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ids": hashlib.sha256("\n".join(r.id for r in dataset.records).encode()).hexdigest(),
        "transform": transform_key,
        "dtype": str(dtype),
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


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
        tokens: Cached input → ``(N, L, C)``.
        masks: Cached input → ``(N, L)`` bool.
        live: Inputs not in the cache, whose raw values each sample carries (an image
            through the data set's transform, a text as it is).

    Examples:
        >>> features = encode_dataset(model, dataset, cache_dir)  # doctest: +SKIP
        >>> features[0]["tokens"]["image"].shape  # doctest: +SKIP
        torch.Size([9, 1280])
    """

    def __init__(
        self,
        dataset: ManifestDataset,
        tokens: dict[str, Tensor],
        masks: dict[str, Tensor],
        live: Sequence[str] = (),
    ) -> None:
        self.dataset = dataset
        self.tokens = tokens
        self.masks = masks
        self.live = tuple(live)

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.dataset.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: ``id``, cached ``tokens`` and ``masks`` per input, ``targets``, and
        the value of each live input by name."""
        record = self.dataset.records[index]
        return {
            **self.dataset.load(index, self.live),
            "tokens": {m: t[index] for m, t in self.tokens.items()},
            "masks": {m: k[index] for m, k in self.masks.items()},
            "targets": dict(record.targets),
        }


class FeatureCollator:
    """Collate cached samples, trimming padded tokens to the batch's longest real sequence.

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
    """Stack cached samples; padding beyond the batch's longest sequence is dropped.

    Args:
        samples: Items of :class:`CachedFeatures`.
        target_collate: A :func:`~fusionkit.data.make_collate` collator for the targets and
            the raw values of the live inputs.
        live: Inputs whose raw values the samples carry.

    Returns:
        The batch, tokens as float32.

    Examples:
        >>> collate = make_collate(tasks)  # doctest: +SKIP
        >>> batch = collate_features([features[0], features[1]], collate)  # doctest: +SKIP
    """
    tokens, masks = {}, {}
    for modality in samples[0]["tokens"]:
        mask = torch.stack([s["masks"][modality] for s in samples])
        real = mask.any(dim=0).nonzero()
        length = int(real.max()) + 1 if len(real) else 1
        masks[modality] = mask[:, :length]
        tokens[modality] = torch.stack([s["tokens"][modality][:length] for s in samples]).float()
    batch = target_collate(
        [{k: v for k, v in s.items() if k not in ("tokens", "masks")} for s in samples]
    )
    live = tuple(live)
    return FeatureBatch(
        batch.ids, tokens, masks, batch.targets, live=live, inputs=batch if live else None
    )


def _pad_cat(chunks: list[Tensor], length: int) -> Tensor:
    padded = []
    for chunk in chunks:
        pad = length - chunk.shape[1]
        if pad:
            shape = (chunk.shape[0], pad, *chunk.shape[2:])
            chunk = torch.cat([chunk, chunk.new_zeros(shape)], dim=1)
        padded.append(chunk)
    return torch.cat(padded)


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
) -> CachedFeatures:
    """Load a data set's features from the cache, or encode and store them.

    Args:
        model: A model with ``forward_features`` whose encoders of ``modalities`` are frozen.
        dataset: The data set, with the evaluation image transforms when images are cached.
        cache_dir: The cache folder.
        transform_key: Key of the cached image inputs' transforms.
        batch_size: Encoding batch size.
        image_shape: ``(3, H, W)`` of the transformed images, or input name → shape (a batch
            without any image of an input then still has an image tensor).
        device: Device to encode on.
        dtype: Storage dtype (``float16`` halves the disk and memory footprint).
        stats: Counters to update.
        modalities: The input names to cache (default: every input of the model); the
            others are left live: each sample carries their raw values.

    Returns:
        The features (float tensors in ``dtype``, on the CPU).

    Raises:
        ValueError: ``modalities`` is empty or names a modality the model lacks.

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
    path = Path(cache_dir).expanduser() / f"{key}.safetensors"
    if path.is_file():
        try:
            stored = load_weights(path)
        except CheckpointError as error:
            _LOG.warning("feature cache %s is unreadable (%s); encoding again", path, error)
        else:
            stats.hits += 1
            tokens = {k.split(".")[0]: v for k, v in stored.items() if k.endswith(".tokens")}
            masks = {k.split(".")[0]: v for k, v in stored.items() if k.endswith(".mask")}
            return CachedFeatures(dataset, tokens, masks, live)
    stats.misses += 1
    was_training = model.training
    model.eval()
    # Only the cached inputs are loaded (no image decoding for a text cache).
    # An own generator keeps the loader from drawing a seed from the global RNG: a run that
    # fills the cache and one that reads it then train with the same dropout stream.
    loader = DataLoader(
        _Only(dataset, cached),
        batch_size=batch_size,
        collate_fn=make_collate({}, image_shape, inputs=_kinds(model, cached)),
        generator=torch.Generator(),
    )
    chunks: dict[str, list[Tensor]] = {}
    mask_chunks: dict[str, list[Tensor]] = {}
    try:
        for batch in loader:
            inputs = feature_inputs(model, batch.to(device), cached)
            tokens, masks = model.forward_features(**inputs)
            stats.encoded_batches += 1
            for modality in tokens:
                chunks.setdefault(modality, []).append(tokens[modality].to("cpu", dtype))
                mask_chunks.setdefault(modality, []).append(masks[modality].cpu())
    finally:
        model.train(was_training)
    tokens_out, masks_out = {}, {}
    for modality in chunks:
        length = max(chunk.shape[1] for chunk in chunks[modality])
        tokens_out[modality] = _pad_cat(chunks[modality], length)
        masks_out[modality] = _pad_cat(mask_chunks[modality], length)
    tensors = {f"{m}.tokens": t for m, t in tokens_out.items()}
    tensors.update({f"{m}.mask": k for m, k in masks_out.items()})
    save_weights(path, tensors, metadata={"manifest": str(dataset.path), "key": key})
    _LOG.info("cached features of %s in %s", dataset.path, path)
    return CachedFeatures(dataset, tokens_out, masks_out, live)


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
