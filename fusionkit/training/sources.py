"""What a training reads: the manifests as data sets, or their features from the cache."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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

__all__ = ["EpochLoader", "Sources", "balanced_class_weights", "build_sources", "epoch_batches"]

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


class _SeededSamples(Dataset):
    """``source`` read by ``(seed, index)`` keys: each sample's random draws (augmentation)
    come from its own seed, whichever worker loads it and whatever it loaded before."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        seed, index = key
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return self.source[index]


class _CurrentBatches:
    """The batch sampler of a loader that outlives its epochs: it yields the batches of the
    epoch set last, as ``(sample seed, index)`` keys of :class:`_SeededSamples`."""

    def __init__(self) -> None:
        self.batches: _RankBatches | None = None
        self.seed = 0

    def __len__(self) -> int:
        return len(self.batches) if self.batches is not None else 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        assert self.batches is not None
        for indices in self.batches:
            seeds = np.random.SeedSequence([self.seed, *indices]).generate_state(len(indices))
            yield [(int(s), i) for s, i in zip(seeds, indices, strict=True)]


class EpochLoader:
    """The training loader of a run: this rank's share of each epoch's seeded batches.

    The epoch's order is a permutation drawn from a generator seeded with the epoch's seed,
    so a resumed run replays exactly the batches an uninterrupted one would; every rank draws
    the same permutation and takes its shard of each global batch.

    With ``persistent`` workers (the default on CUDA with workers), one ``DataLoader`` and its
    worker processes serve every epoch, and each sample's random draws (image augmentation)
    come from a seed of its own, derived from the epoch's seed and the batch: a resume draws
    the same augmentations, with any number of workers. Otherwise the loader is built afresh
    each epoch, its workers seeded from the epoch's generator.

    Args:
        source: Indexable samples.
        collate: Turns a list of samples into a batch.
        ctx: The distributed context.
        batch_size: The global batch size.
        num_workers: DataLoader workers.
        pin_memory: Pin batches (for CUDA).
        persistent: Keep the workers across epochs; ``None``: when there are workers and
            batches are pinned (CUDA).

    Examples:
        >>> loader = EpochLoader(source, collate, ctx, batch_size=32)  # doctest: +SKIP
        >>> for batch in loader.epoch(seed=7):  # doctest: +SKIP
        ...     ...
    """

    def __init__(
        self,
        source: Any,
        collate: Callable[[list[Any]], Any],
        ctx: DistContext,
        *,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent: bool | None = None,
    ) -> None:
        self.source, self.collate, self.ctx = source, collate, ctx
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.persistent = num_workers > 0 and (pin_memory if persistent is None else persistent)
        self._current = _CurrentBatches()
        self._loader: DataLoader | None = None

    def _persistent_loader(self) -> DataLoader:
        if self._loader is None:
            self._loader = DataLoader(
                _SeededSamples(self.source),
                batch_sampler=self._current,
                collate_fn=self.collate,
                persistent_workers=True,
                **loader_options(self.num_workers, self.pin_memory),
            )
        return self._loader

    def epoch(self, seed: int, start_batch: int = 0) -> Iterator[Any]:
        """The batches of one epoch, from ``start_batch`` on.

        Args:
            seed: The epoch's seed.
            start_batch: The first batch to yield (a resume mid-epoch).

        Yields:
            Batches; a rank left without samples in the last batch gets one sample with its
            labels masked out, so that it still joins the gradient all-reduce.
        """
        generator = torch.Generator().manual_seed(seed)
        order = _epoch_order(self.source, generator)
        batches = _RankBatches(order, self.batch_size, start_batch, self.ctx)
        if self.persistent:
            self._current.batches, self._current.seed = batches, seed
            loader = self._persistent_loader()
        else:
            loader = DataLoader(
                self.source,
                batch_sampler=batches,
                collate_fn=self.collate,
                worker_init_fn=seed_worker,
                # Passing a generator keeps the loader from drawing its worker seed from the
                # global RNG, which dropout uses.
                generator=generator,
                **loader_options(self.num_workers, self.pin_memory),
            )
        for number, batch in enumerate(loader):
            if batches.placeholder(number):
                batch.targets = mask_targets(batch.targets)
            yield batch


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
    loader: EpochLoader | None = None,
) -> Iterator[Any]:
    """This rank's share of each global batch of one epoch, from ``start_batch`` on.

    Args:
        source: Indexable samples.
        collate: Turns a list of samples into a batch.
        ctx: The distributed context.
        seed: The epoch's seed.
        batch_size: The global batch size.
        start_batch: The first batch to yield (a resume mid-epoch).
        num_workers: DataLoader workers.
        pin_memory: Pin batches (for CUDA).
        loader: The run's :class:`EpochLoader` (its workers may persist); ``None`` builds
            one for this epoch from the arguments above.

    Yields:
        The batches (see :meth:`EpochLoader.epoch`).
    """
    loader = loader or EpochLoader(source, collate, ctx, batch_size=batch_size,
                                   num_workers=num_workers, pin_memory=pin_memory)
    yield from loader.epoch(seed, start_batch)
