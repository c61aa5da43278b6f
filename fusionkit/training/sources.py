"""What a training reads: the manifests as data sets, or their features from the cache."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fusionkit.config import DataConfig, TrainConfig
from fusionkit.data import (
    ManifestDataset,
    build_image_transform,
    input_image_configs,
    make_collate,
    transform_key,
)
from fusionkit.data.loading import loader_options
from fusionkit.data.shards import is_shard_pattern, shard_block_size
from fusionkit.errors import ConfigError, DataError
from fusionkit.tasks import TaskSpec
from fusionkit.training.cache import (
    CacheStats,
    FeatureCollator,
    default_cache_dir,
    encode_dataset,
)
from fusionkit.training.distributed import DistContext, local_main_first, mask_targets, shard
from fusionkit.training.state import seed_worker

__all__ = ["Sources", "balanced_class_weights", "build_sources", "epoch_batches"]

_LOG = logging.getLogger("fusionkit.training")


@dataclass
class Sources:
    """The training and validation sources of a run and how to batch them.

    Attributes:
        train: Indexable training samples (a data set, or its cached features).
        val: The same for validation; ``None`` without ``data.val``.
        collate: Turns a list of samples into a batch.
        train_set: The training manifest as read (its records give the class counts).
        cache_stats: Feature cache counters; ``None`` when nothing is cached.
    """

    train: Any
    val: Any
    collate: Callable[[list[Any]], Any]
    train_set: ManifestDataset
    cache_stats: CacheStats | None = None


def build_sources(
    model: Any,
    data: DataConfig,
    cfg: TrainConfig,
    ctx: DistContext,
    device: torch.device,
) -> Sources:
    """Read the manifests of ``data`` for ``model``; frozen encoders' features come cached.

    With ``train.cache_features`` ``auto`` (or true) every input of a frozen encoder is
    encoded once into the feature cache (local rank 0 encodes, the node's other ranks load)
    and the others are encoded live at each step. Each image input gets its encoder's
    transform; training images are augmented unless their features are cached.

    Args:
        model: The model being trained.
        data: The ``data`` section.
        cfg: The ``train`` section.
        ctx: The distributed context.
        device: Where the cache is encoded.

    Returns:
        The `Sources`.

    Raises:
        ConfigError: ``cache_features: true`` with no frozen encoder.
        DataError: A manifest has no usable sample.
    """
    frozen = model.frozen_modalities()
    if cfg.cache_features is True and not frozen:
        raise ConfigError(
            "train.cache_features: true needs at least one used encoder frozen (freeze: true)"
        )
    cached = frozen if cfg.cache_features is not False else []
    live = [m for m in model.modalities if m not in cached]
    image_configs = input_image_configs(model)
    image_shape = {name: tuple(config["input_size"]) for name, config in image_configs.items()}
    eval_transform = {n: build_image_transform(c, train=False) for n, c in image_configs.items()}
    train_transform = {
        n: build_image_transform(c, train=cfg.augment and n not in cached)
        for n, c in image_configs.items()
    }
    if cfg.augment and any(name in cached for name in image_configs):
        _LOG.info("image features cached: training images are not augmented")
    tasks = model.tasks
    read = {"on_error": data.on_error, "inputs": model.config.inputs}
    train_set = ManifestDataset(data.train, tasks, train_transform, **read)
    splits = {"train": train_set}
    if data.val is not None:
        splits["val"] = ManifestDataset(data.val, tasks, eval_transform, **read)
    else:
        _LOG.info("no validation set: no epoch is validated and last/ holds the final weights")
    for name, dataset in splits.items():
        if len(dataset) == 0:
            raise DataError(f"data.{name}: {dataset.path} has no usable sample")
    val_set = splits.get("val")
    if not cached:
        collate = make_collate(tasks, image_shape, inputs=model.config.inputs)
        return Sources(train_set, val_set, collate, train_set)
    if live:
        _LOG.info("feature cache: %s cached, %s encoded live", ", ".join(cached),
                  ", ".join(live))
    stats = CacheStats()
    key = ";".join(
        f"{name}={transform_key(config)}"
        for name, config in image_configs.items() if name in cached
    ) or "no-images"
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    dtype = getattr(torch, cfg.cache_dtype)
    # Local rank 0 encodes and stores; the node's other ranks then load the stored file.
    with local_main_first(ctx):
        features = [
            encode_dataset(
                model,
                dataset,
                cache_dir,
                key,
                batch_size=data.eval_batch_size,
                image_shape=image_shape,
                device=device,
                dtype=dtype,
                stats=stats,
                modalities=cached,
                num_workers=data.num_workers,
            )
            for dataset in splits.values()
        ]
    val = features[1] if val_set is not None else None
    collate = FeatureCollator(
        tasks, {name: model.config.inputs[name].kind for name in live}, image_shape
    )
    return Sources(features[0], val, collate, train_set, stats)


def balanced_class_weights(
    records: Any, tasks: dict[str, TaskSpec]
) -> dict[str, torch.Tensor]:
    """Per-task class weights inversely proportional to the class counts of ``records``.

    Single-label: ``labelled / (classes · count)`` (scikit-learn's "balanced"); multi-label:
    the positive weight ``negatives / positives`` of each class.

    Args:
        records: Manifest records (``.targets``: task → class index, or a list of indices).
        tasks: The tasks.

    Returns:
        Task → float weights ``(classes,)``.

    Examples:
        >>> balanced_class_weights(dataset.records, model.tasks)["color"]  # doctest: +SKIP
        tensor([0.8333, 1.2500])
    """
    weights = {}
    for task, spec in tasks.items():
        counts = torch.zeros(spec.num_classes, dtype=torch.float64)
        labelled = 0
        for record in records:
            target = record.targets.get(task)
            if target is None:
                continue
            labelled += 1
            for index in target if isinstance(target, list) else [target]:
                counts[index] += 1
        if spec.multi_label:
            weight = (labelled - counts) / counts.clamp(min=1)
        else:
            weight = labelled / (spec.num_classes * counts.clamp(min=1))
        weights[task] = weight.float()
    return weights


def _epoch_order(source: Any, generator: torch.Generator) -> torch.Tensor:
    """The epoch's sample order: a permutation; for tar shards, of shard-sized blocks of
    consecutive samples, each then permuted, so that loading reads one shard after another."""
    dataset = getattr(source, "dataset", source)
    path = getattr(dataset, "path", None)
    if path is None or not is_shard_pattern(path):
        return torch.randperm(len(source), generator=generator)
    block = shard_block_size(path)
    starts = torch.randperm(math.ceil(len(source) / block), generator=generator) * block
    return torch.cat([
        start + torch.randperm(min(block, len(source) - start), generator=generator)
        for start in starts.tolist()
    ])


class _RankBatches:
    """This rank's index lists of an epoch's global batches, sliced from the permutation as
    the loader asks for them (no list of every batch is built)."""

    def __init__(self, order: torch.Tensor, batch_size: int, start_batch: int,
                 ctx: DistContext) -> None:
        self.order, self.batch_size, self.start, self.ctx = order, batch_size, start_batch, ctx

    def __len__(self) -> int:
        return max(0, math.ceil(len(self.order) / self.batch_size) - self.start)

    def _global(self, number: int) -> list[int]:
        first = (self.start + number) * self.batch_size
        return self.order[first : first + self.batch_size].tolist()

    def placeholder(self, number: int) -> bool:
        """Whether this rank has no sample of batch ``number`` (counted from the start)."""
        return not shard(self._global(number), self.ctx)

    def __iter__(self) -> Iterator[list[int]]:
        for number in range(len(self)):
            indices = self._global(number)
            yield shard(indices, self.ctx) or indices[:1]


def epoch_batches(
    source: Any,
    collate: Callable[[list[Any]], Any],
    ctx: DistContext,
    *,
    seed: int,
    batch_size: int,
    start_batch: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Any]:
    """This rank's share of each global batch of one epoch, from ``start_batch`` on.

    The epoch's order is a permutation drawn from a generator seeded with ``seed``, so a
    resumed run replays exactly the batches an uninterrupted one would; every rank draws the
    same permutation and takes its shard of each global batch.

    Args:
        source: Indexable samples.
        collate: Turns a list of samples into a batch.
        ctx: The distributed context.
        seed: The epoch's seed.
        batch_size: The global batch size.
        start_batch: The first batch to yield (a resume mid-epoch).
        num_workers: DataLoader workers.
        pin_memory: Pin batches (for CUDA).

    Yields:
        Batches; a rank left without samples in the last batch gets one sample with its
        labels masked out, so that it still joins the gradient all-reduce.
    """
    generator = torch.Generator().manual_seed(seed)
    order = _epoch_order(source, generator)
    batches = _RankBatches(order, batch_size, start_batch, ctx)
    loader = DataLoader(
        source,
        batch_sampler=batches,
        collate_fn=collate,
        worker_init_fn=seed_worker,
        # Passing a generator keeps the loader from drawing its worker seed from the global
        # RNG, which dropout uses.
        generator=generator,
        **loader_options(num_workers, pin_memory),
    )
    for number, batch in enumerate(loader):
        if batches.placeholder(number):
            batch.targets = mask_targets(batch.targets)
        yield batch
