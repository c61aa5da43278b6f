"""Frozen-backbone feature cache: encode a data set once, train the fusion on stored tokens.

When every encoder a model uses is frozen, its token features for a given image never change,
so the trainer stores :meth:`~fusionkit.models.CMACLIP.forward_features` outputs (tokens and
masks per modality) in a safetensors file and later epochs run only ``forward_head``. The file
is named by a hash of everything that determines the features: the encoders' config, the
manifest path with its size and modification time, the sample ids kept, the image transform key
and the storage dtype. Texts of different lengths are stored padded to the data set's longest
text with their masks; :func:`collate_features` trims a batch to its own longest text.

Training images are not augmented in this mode: a cached feature is that of the evaluation
transform.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fusionkit.data import ManifestDataset, make_collate
from fusionkit.errors import CheckpointError
from fusionkit.io import load_weights, save_weights

__all__ = [
    "CacheStats",
    "CachedFeatures",
    "FeatureBatch",
    "FeatureCollator",
    "collate_features",
    "default_cache_dir",
    "encode_dataset",
    "feature_cache_key",
    "feature_inputs",
]

_LOG = logging.getLogger("fusionkit.training")
_VERSION = "fusionkit-features-v1"


def default_cache_dir() -> Path:
    """``$FUSIONKIT_CACHE/features`` or ``~/.cache/fusionkit/features``.

    Returns:
        The folder (not created).

    Example:
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

    Example:
        >>> CacheStats().hits
        0
    """

    hits: int = 0
    misses: int = 0
    encoded_batches: int = 0


def feature_cache_key(
    model: Any, dataset: ManifestDataset, transform_key: str, dtype: torch.dtype
) -> str:
    """Hash of everything that determines a data set's cached features.

    Args:
        model: The model (its ``config.vision`` / ``config.text`` sections are hashed).
        dataset: The manifest data set (path, size, mtime and kept sample ids are hashed).
        transform_key: :func:`~fusionkit.data.transform_key` of the image transform.
        dtype: Storage dtype.

    Returns:
        A 24-character hex digest.

    Example:
        >>> key = feature_cache_key(model, dataset, "eval/...", torch.float16)  # doctest: +SKIP
    """
    stat = dataset.path.stat()
    parts = {
        "version": _VERSION,
        "vision": None if model.config.vision is None else model.config.vision.to_dict(),
        "text": None if model.config.text is None else model.config.text.to_dict(),
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
    """A batch of cached features and targets.

    Attributes:
        ids: Sample ids.
        tokens: Modality → ``(B, N, C)`` float32.
        masks: Modality → ``(B, N)`` bool.
        targets: Task → targets as in :class:`~fusionkit.data.Batch`.
    """

    ids: list[str]
    tokens: dict[str, Tensor]
    masks: dict[str, Tensor]
    targets: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        """The batch size."""
        return len(self.ids)


class CachedFeatures(Dataset):
    """Cached encoder features of a :class:`~fusionkit.data.ManifestDataset`, sample by sample.

    Args:
        dataset: The data set the features belong to (targets are read from its records).
        tokens: Modality → ``(N, L, C)``.
        masks: Modality → ``(N, L)`` bool.

    Example:
        >>> features = encode_dataset(model, dataset, cache_dir)  # doctest: +SKIP
        >>> features[0]["tokens"]["image"].shape  # doctest: +SKIP
        torch.Size([9, 1280])
    """

    def __init__(
        self, dataset: ManifestDataset, tokens: dict[str, Tensor], masks: dict[str, Tensor]
    ) -> None:
        self.dataset = dataset
        self.tokens = tokens
        self.masks = masks

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.dataset.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: ``id``, ``tokens`` and ``masks`` per modality, ``targets``."""
        record = self.dataset.records[index]
        return {
            "id": record.id,
            "tokens": {m: t[index] for m, t in self.tokens.items()},
            "masks": {m: k[index] for m, k in self.masks.items()},
            "targets": dict(record.targets),
        }


class FeatureCollator:
    """Collate cached samples, trimming padded tokens to the batch's longest real sequence.

    Args:
        tasks: The tasks to collate targets for.
    """

    def __init__(self, tasks: dict[str, Any]) -> None:
        self.targets = make_collate(tasks)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> FeatureBatch:
        """Stack ``samples`` into a :class:`FeatureBatch`."""
        return collate_features(samples, self.targets)


def collate_features(samples: Sequence[dict[str, Any]], target_collate: Any) -> FeatureBatch:
    """Stack cached samples; padding beyond the batch's longest sequence is dropped.

    Args:
        samples: Items of :class:`CachedFeatures`.
        target_collate: A :func:`~fusionkit.data.make_collate` collator for the targets.

    Returns:
        The batch, tokens as float32.

    Example:
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
        [{"id": s["id"], "image": None, "text": None, "targets": s["targets"]} for s in samples]
    )
    return FeatureBatch(batch.ids, tokens, masks, batch.targets)


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
    image_shape: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    stats: CacheStats | None = None,
) -> CachedFeatures:
    """Load a data set's features from the cache, or encode and store them.

    Args:
        model: A model with ``forward_features`` whose encoders are frozen.
        dataset: The data set, with the evaluation image transform.
        cache_dir: The cache folder.
        transform_key: Key of the data set's image transform.
        batch_size: Encoding batch size.
        image_shape: ``(3, H, W)`` of the transformed images (a batch without any image
            then still has an image tensor).
        device: Device to encode on.
        dtype: Storage dtype (``float16`` halves the disk and memory footprint).
        stats: Counters to update.

    Returns:
        The features (float tensors in ``dtype``, on the CPU).

    Example:
        >>> features = encode_dataset(model, dataset, "~/.cache/x", key)  # doctest: +SKIP
    """
    stats = stats if stats is not None else CacheStats()
    key = feature_cache_key(model, dataset, transform_key, dtype)
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
            return CachedFeatures(dataset, tokens, masks)
    stats.misses += 1
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=make_collate(dataset.tasks, image_shape)
    )
    chunks: dict[str, list[Tensor]] = {}
    mask_chunks: dict[str, list[Tensor]] = {}
    try:
        for batch in loader:
            tokens, masks = model.forward_features(**feature_inputs(model, batch.to(device)))
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
    return CachedFeatures(dataset, tokens_out, masks_out)


def feature_inputs(model: Any, batch: Any) -> dict[str, Any]:
    """``forward_features`` arguments for a data batch, for the modalities the model uses.

    Args:
        model: A :class:`~fusionkit.models.CMACLIP`.
        batch: A :class:`~fusionkit.data.Batch`.

    Returns:
        ``images``/``present`` and/or ``texts`` keyword arguments.

    Example:
        >>> tokens, masks = model.forward_features(**feature_inputs(model, batch))  # doctest: +SKIP
    """
    inputs: dict[str, Any] = {}
    if "image" in model.modalities:
        inputs["images"] = batch.images
        inputs["present"] = {"image": batch.image_present}
    if "text" in model.modalities:
        inputs["texts"] = batch.texts
    return inputs
