"""The trainer: AdamW with warm-up + cosine, checkpoints, exact resume and the feature cache.

Outputs in the run folder:

- ``config.yaml``: the resolved config (tasks inferred from the data are written out);
- ``metrics.jsonl``: one JSON line per finished epoch. The file is rewritten whole with
  :func:`~fusionkit.io.atomic_write` from the history kept in the trainer state, so after a kill
  it never holds half a line nor an epoch the ``last/`` checkpoint does not know about;
- ``best/`` (highest mean validation accuracy over tasks) and ``last/``: checkpoints loadable
  with :meth:`~fusionkit.models.CMACLIP.from_pretrained`; ``last/`` also holds the optimizer,
  scheduler and RNG states for ``resume``.

Determinism: the order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``, so a resumed run (also from a mid-epoch ``save_every_steps`` checkpoint) replays
exactly the batches an uninterrupted run would; dropout draws from the global torch RNG, whose
state is checkpointed. On CPU a resumed run ends bit-for-bit where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fusionkit.errors import ConfigError, DataError, FusionkitError
from fusionkit.io import atomic_write_text, read_yaml, write_yaml
from fusionkit.training.cache import (
    CacheStats,
    FeatureCollator,
    default_cache_dir,
    encode_dataset,
)
from fusionkit.training.checkpoint import (
    find_checkpoint,
    load_model_weights,
    read_trainer_state,
    save_checkpoint,
)
from fusionkit.training.config import DataConfig, TrainConfig, parse_section
from fusionkit.training.evaluate import collect_outputs, compute_report, forward_batch

__all__ = [
    "TrainResult",
    "Trainer",
    "TrainingError",
    "build_run_config",
    "image_data_config",
    "resolve_device",
    "resolve_run_dir",
    "train",
]

_LOG = logging.getLogger("fusionkit.training")
METRICS_FILE = "metrics.jsonl"


class TrainingError(FusionkitError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU.

    Args:
        name: ``auto``, ``cpu`` or ``cuda`` (``cuda:N`` accepted).

    Returns:
        The device.

    Raises:
        ConfigError: CUDA asked for but not available, or an unknown name.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available here; use cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device: expected auto, cpu or cuda, got {name!r}")


def resolve_run_dir(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from a checkpoint or run folder (a run folder gives its ``best/``).

    Args:
        path: ``run/best``, ``run/last`` or ``run``.

    Returns:
        The folder holding ``config.yaml`` and ``model.safetensors``.

    Example:
        >>> resolve_run_dir("runs/quickstart")  # doctest: +SKIP
        PosixPath('runs/quickstart/best')
    """
    folder = Path(path)
    if not (folder / "model.safetensors").is_file() and (folder / "best").is_dir():
        return folder / "best"
    return folder


def image_data_config(model: Any, image_size: int | None) -> dict[str, Any]:
    """The vision backbone's timm data config, with ``input_size`` set to ``image_size``.

    Args:
        model: A model with a ``vision`` encoder.
        image_size: Square side in pixels, or ``None`` for the backbone's default.

    Returns:
        A data config for :func:`~fusionkit.data.build_image_transform`.

    Example:
        >>> image_data_config(model, 96)["input_size"]  # doctest: +SKIP
        (3, 96, 96)
    """
    config = dict(model.vision.data_config)
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    return config


def build_run_config(
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    train: str | None = None,
    val: str | None = None,
    tasks: Sequence[str] | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> Any:
    """Read a run config and apply command-line overrides; infer tasks from the data if needed.

    Without a config this is the default model (offline EfficientNet-Lite0 + MiniLM CMA-CLIP)
    with every label column of ``train`` (or the ``tasks`` named) as a task.

    Args:
        config: YAML path or mapping (``None`` = defaults).
        train: Training manifest (overrides ``data.train``).
        val: Validation manifest (overrides ``data.val``).
        tasks: Task columns (overrides ``data.tasks``).
        epochs: Overrides ``train.epochs``.
        seed: Overrides ``train.seed``.
        device: Overrides ``train.device``.

    Returns:
        The validated :class:`~fusionkit.models.ModelConfig`.

    Raises:
        ConfigError: An invalid config, or no tasks and no training data to infer them from.
        DataError: The training manifest cannot be read.

    Example:
        >>> config = build_run_config(train="train.csv", val="val.csv")  # doctest: +SKIP
    """
    from fusionkit.data import infer_tasks
    from fusionkit.models import ModelConfig

    if config is None:
        raw: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raw = read_yaml(config)
    data = dict(raw.get("data") or {})
    for key, value in (("train", train), ("val", val), ("tasks", list(tasks) if tasks else None)):
        if value is not None:
            data[key] = value
    section = dict(raw.get("train") or {})
    for key, value in (("epochs", epochs), ("seed", seed), ("device", device)):
        if value is not None:
            section[key] = value
    raw["data"], raw["train"] = data, section
    data_cfg = parse_section(DataConfig, data, "data")
    parse_section(TrainConfig, section, "train")
    if "tasks" not in raw:
        if data_cfg.train is None:
            raise ConfigError("tasks: missing, and no data.train (--train) to infer them from")
        inferred = infer_tasks(data_cfg.train, data_cfg.tasks, data_cfg.multi_label or None)
        raw["tasks"] = {name: spec.to_dict() for name, spec in inferred.items()}
    return ModelConfig.from_dict(raw)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        output_dir: The run folder.
        history: One metrics record per epoch.
        best_score: Best mean validation accuracy.
        cache_stats: Feature cache counters (``None`` without the cache).
    """

    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = float("-inf")
    cache_stats: CacheStats | None = None

    @property
    def best_dir(self) -> Path:
        """The best checkpoint."""
        return self.output_dir / "best"

    @property
    def last_dir(self) -> Path:
        """The last checkpoint."""
        return self.output_dir / "last"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """Seed ``random`` and numpy in a DataLoader worker from its torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _warmup_cosine(total: int, warmup_ratio: float, min_ratio: float) -> Any:
    warmup = round(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """Trains a model from a run config (model + ``data`` + ``train`` sections).

    Args:
        config: The run config (see :func:`build_run_config`).
        output_dir: The run folder.
        resume: Continue from ``output_dir/last`` when it exists.
        progress: Show tqdm progress bars.

    Raises:
        ConfigError: Invalid ``data``/``train`` sections or a missing ``data.train``/``data.val``.

    Example:
        >>> result = Trainer(build_run_config("configs/quickstart.yaml"), "runs/q").fit()
        ... # doctest: +SKIP
    """

    def __init__(
        self,
        config: Any,
        output_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.progress = progress
        self.data = parse_section(DataConfig, config.sections.get("data"), "data")
        self.train_config = parse_section(TrainConfig, config.sections.get("train"), "train")
        for split in ("train", "val"):
            if getattr(self.data, split) is None:
                raise ConfigError(f"data.{split}: missing; give a manifest (--{split})")
        self.device = resolve_device(self.train_config.device)
        self.cache_stats: CacheStats | None = None
        self.model: Any = None

    # ----------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------

    def _build_model(self) -> Any:
        from fusionkit.models import build_model

        _seed_everything(self.train_config.seed)
        return build_model(self.config).to(self.device)

    def _all_frozen(self, model: Any) -> bool:
        encoders = [model.vision if m == "image" else model.text for m in model.modalities]
        return all(getattr(encoder, "frozen", False) for encoder in encoders)

    def _sources(self, model: Any) -> tuple[Any, Any, Any]:
        """Training and validation sources and their collate function."""
        from fusionkit.data import (
            ManifestDataset,
            build_image_transform,
            make_collate,
            transform_key,
        )

        cfg = self.train_config
        frozen = self._all_frozen(model)
        if cfg.cache_features is True and not frozen:
            raise ConfigError(
                "train.cache_features: true needs every used encoder frozen (freeze: true)"
            )
        use_cache = frozen and cfg.cache_features is not False
        image_config = image_shape = None
        eval_transform = train_transform = None
        if model.vision is not None:
            image_config = image_data_config(model, self.data.image_size)
            image_shape = tuple(image_config["input_size"])
            eval_transform = build_image_transform(image_config, train=False)
            augment = cfg.augment and not use_cache
            train_transform = build_image_transform(image_config, train=augment)
            if use_cache and cfg.augment:
                _LOG.info("feature cache on: training images are not augmented")
        tasks = model.tasks
        train_set = ManifestDataset(
            self.data.train, tasks, train_transform, on_error=self.data.on_error
        )
        val_set = ManifestDataset(self.data.val, tasks, eval_transform, on_error=self.data.on_error)
        for name, dataset in (("train", train_set), ("val", val_set)):
            if len(dataset) == 0:
                raise DataError(f"data.{name}: {dataset.path} has no usable sample")
        self._train_set = train_set
        if not use_cache:
            return train_set, val_set, make_collate(tasks, image_shape)
        self.cache_stats = CacheStats()
        key = transform_key(image_config, train=False) if image_config is not None else "text-only"
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        dtype = getattr(torch, cfg.cache_dtype)
        cached = [
            encode_dataset(
                model,
                dataset,
                cache_dir,
                key,
                batch_size=self.data.eval_batch_size,
                image_shape=image_shape,
                device=self.device,
                dtype=dtype,
                stats=self.cache_stats,
            )
            for dataset in (train_set, val_set)
        ]
        return cached[0], cached[1], FeatureCollator(tasks)

    def _class_weights(self, model: Any) -> None:
        if self.train_config.class_weight != "balanced":
            return
        for task, spec in model.tasks.items():
            counts = torch.zeros(spec.num_classes, dtype=torch.float64)
            labelled = 0
            for record in self._train_set.records:
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
            model.head.set_class_weight(task, weight.float().to(self.device))

    def _optimizer(self, model: Any) -> torch.optim.Optimizer:
        cfg = self.train_config
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            backbone = name.startswith(("vision.", "text."))
            # Biases and norm scales are not decayed (the usual transformer recipe).
            decay = parameter.ndim >= 2
            groups.setdefault((backbone, decay), []).append(parameter)
        param_groups = [
            {
                "params": params,
                "lr": cfg.lr_backbone if backbone else cfg.lr,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
            for (backbone, decay), params in sorted(groups.items())
        ]
        return torch.optim.AdamW(param_groups, lr=cfg.lr)

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------

    def _loader(self, source: Any, collate: Any, epoch: int, start_batch: int) -> DataLoader:
        seed = self.train_config.seed * 1_000_003 + epoch
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(source), generator=generator).tolist()
        return DataLoader(
            source,
            batch_size=self.data.batch_size,
            sampler=order[start_batch * self.data.batch_size :],
            collate_fn=collate,
            num_workers=self.data.num_workers,
            worker_init_fn=_seed_worker,
            # Passing a generator keeps the loader from drawing its worker seed from the
            # global RNG, which dropout uses.
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def _save_last(self, model: Any, state: dict[str, Any], optimizer: Any, scheduler: Any) -> None:
        save_checkpoint(
            self.output_dir / "last",
            model,
            include_frozen=not self._all_frozen(model),
            state=state,
            tensor_state={
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
            },
        )

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(record) + "\n" for record in history)
        atomic_write_text(self.output_dir / METRICS_FILE, text)

    def _validate(self, model: Any, source: Any, collate: Any) -> dict[str, Any]:
        loader = DataLoader(
            source,
            batch_size=self.data.eval_batch_size,
            collate_fn=collate,
            num_workers=self.data.num_workers,
        )
        outputs = collect_outputs(model, loader, self.device, amp=self.train_config.amp)
        return compute_report(outputs, model.tasks, model.modalities)

    def fit(self) -> TrainResult:
        """Train for ``train.epochs`` epochs (from the last checkpoint with ``resume``).

        Returns:
            The :class:`TrainResult`.

        Raises:
            TrainingError: The loss became NaN or infinite (the message names the step and
                the batch); ``last/`` keeps the last good checkpoint.
            DataError: A manifest cannot be read or has no usable sample.
            CheckpointError: ``resume`` found a checkpoint that cannot be loaded.

        Example:
            >>> Trainer(config, "runs/x").fit().best_score  # doctest: +SKIP
        """
        from tqdm.auto import tqdm

        cfg = self.train_config
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        model = self._build_model()
        self.model = model
        source, val_source, collate = self._sources(model)
        self._class_weights(model)
        optimizer = self._optimizer(model)
        steps_per_epoch = math.ceil(len(source) / self.data.batch_size)
        total_steps = steps_per_epoch * cfg.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _warmup_cosine(total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
        )
        state: dict[str, Any] = {
            "epoch": 0,
            "batch_in_epoch": 0,
            "step": 0,
            "epoch_loss_sum": 0.0,
            "epoch_seconds": 0.0,
            "best_score": None,
            "history": [],
        }
        checkpoint = find_checkpoint(self.output_dir / "last") if self.resume else None
        if checkpoint is not None:
            state, tensors = read_trainer_state(checkpoint)
            load_model_weights(model, checkpoint)
            optimizer.load_state_dict(tensors["optimizer"])
            scheduler.load_state_dict(tensors["scheduler"])
            _set_rng_state(tensors["rng"])
            _LOG.info("resuming from %s at epoch %d, step %d", checkpoint, state["epoch"] + 1,
                      state["step"])
        elif self.resume:
            _LOG.warning("--resume: no checkpoint in %s; starting from scratch", self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(self.output_dir / "config.yaml", self.config.to_dict())
        amp = cfg.amp and self.device.type == "cuda"

        for epoch in range(state["epoch"], cfg.epochs):
            model.train()
            start_batch = state["batch_in_epoch"]
            started = time.perf_counter()
            loader = self._loader(source, collate, epoch, start_batch)
            bar = tqdm(
                total=steps_per_epoch,
                initial=start_batch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not self.progress,
                leave=False,
            )
            for batch_index, batch in enumerate(loader, start=start_batch):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    output = forward_batch(model, batch, self.device)
                    loss = model.loss(output, batch.targets)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss is {loss.item()} at step {state['step'] + 1} (epoch {epoch + 1}, "
                        f"batch {batch_index + 1}/{steps_per_epoch}, first ids "
                        f"{batch.ids[:3]}); stopped, the last good checkpoint in "
                        f"{self.output_dir / 'last'} is kept"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                state["epoch_loss_sum"] += loss.item()
                state["batch_in_epoch"] = batch_index + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                mid_epoch = batch_index + 1 < steps_per_epoch
                if cfg.save_every_steps and state["step"] % cfg.save_every_steps == 0 and mid_epoch:
                    state["epoch_seconds"] += time.perf_counter() - started
                    started = time.perf_counter()
                    self._save_last(model, state, optimizer, scheduler)
            bar.close()
            seconds = state["epoch_seconds"] + time.perf_counter() - started
            report = self._validate(model, val_source, collate)
            score = report["mean"]["accuracy"] or 0.0
            record = {
                "epoch": epoch + 1,
                "step": state["step"],
                "train_loss": state["epoch_loss_sum"] / steps_per_epoch,
                "val_loss": report["loss"],
                "val_accuracy": {t: r["accuracy"] for t, r in report["tasks"].items()},
                "val_mean_accuracy": score,
                "lr": scheduler.get_last_lr()[-1],
                "epoch_seconds": round(seconds, 3),
            }
            _LOG.info("epoch %d: %s", epoch + 1, record)
            state.update(epoch=epoch + 1, batch_in_epoch=0, epoch_loss_sum=0.0, epoch_seconds=0.0)
            state["history"].append(record)
            if state["best_score"] is None or score > state["best_score"]:
                state["best_score"] = score
                save_checkpoint(
                    self.output_dir / "best", model, include_frozen=not self._all_frozen(model)
                )
            self._save_last(model, state, optimizer, scheduler)
            self._write_metrics(state["history"])
        self._write_metrics(state["history"])
        return TrainResult(
            self.output_dir,
            state["history"],
            state["best_score"] if state["best_score"] is not None else float("-inf"),
            self.cache_stats,
        )


def train(
    config: Any,
    output_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a run config into ``output_dir``; see :class:`Trainer`.

    Args:
        config: A run config, mapping or YAML path (see :func:`build_run_config`).
        output_dir: The run folder.
        resume: Continue from ``output_dir/last``.
        progress: Show progress bars.

    Returns:
        The :class:`TrainResult`.

    Raises:
        TrainingError: Non-finite loss.
        ConfigError: Invalid config.
        DataError: Unreadable data.

    Example:
        >>> result = train("configs/quickstart.yaml", "runs/quickstart")  # doctest: +SKIP
    """
    from fusionkit.models import ModelConfig

    if not isinstance(config, ModelConfig):
        config = build_run_config(config)
    return Trainer(config, output_dir, resume=resume, progress=progress).fit()
