"""The trainer: AdamW with warm-up + cosine, checkpoints, exact resume and the feature cache.

Outputs in the run folder:

- ``config.yaml``: the resolved config (tasks inferred from the data are written out);
- ``metrics.jsonl``: one JSON line per finished epoch. The file is rewritten whole with
  :func:`~fusionkit.io.atomic_write` from the history kept in the trainer state, so after a kill
  it never holds half a line nor an epoch the ``last/`` checkpoint does not know about;
- ``best/`` (highest mean validation accuracy over tasks) and ``last/``: checkpoints loadable
  with :meth:`~fusionkit.models.CMACLIP.from_pretrained`; ``last/`` also holds the optimizer,
  scheduler and RNG states for ``resume``. Without a validation set (``data.val`` not given: a
  final fit on all labelled data for a schedule chosen before) no epoch is validated, no
  ``best/`` is written and ``last/`` holds the final weights.

Determinism: the order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``, so a resumed run (also from a mid-epoch ``save_every_steps`` checkpoint) replays
exactly the batches an uninterrupted run would; dropout draws from the global torch RNG, whose
state is checkpointed. On CPU a resumed run ends bit-for-bit where an uninterrupted one does.

Under ``torchrun`` (see :mod:`fusionkit.training.distributed`) ``data.batch_size`` is the global
batch: every rank draws the same permutation and trains on its share of each batch, gradients are
averaged by DDP with a loss scaling that makes them equal the single-process gradient, and only
rank 0 writes to the run folder; it also writes ``replicas.json``, a digest of every rank's
parameters at the end (a mismatch raises :class:`TrainingError`). ``last/`` keeps every rank's
RNG state, so a resumed run with the same number of processes replays the same random draws.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fusionkit.errors import ConfigError, DataError, FusionkitError
from fusionkit.io import atomic_write_text, read_yaml, write_json, write_yaml
from fusionkit.training.augment import drop_modalities, swap_modalities
from fusionkit.training.cache import (
    CacheStats,
    FeatureCollator,
    batch_tokens,
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
from fusionkit.training.distributed import (
    DistContext,
    all_gather_objects,
    init_distributed,
    local_main_first,
    mask_targets,
    parameters_digest,
    shard,
    sharded_loss,
    shutdown,
    unused_parameters,
    wrap_ddp,
)
from fusionkit.training.evaluate import (
    EvalOutputs,
    collect_outputs,
    compute_report,
    forward_batch,
)

__all__ = [
    "TrainResult",
    "Trainer",
    "TrainingError",
    "build_run_config",
    "image_data_config",
    "resolve_device",
    "resolve_precision",
    "resolve_run_dir",
    "train",
]

_LOG = logging.getLogger("fusionkit.training")
METRICS_FILE = "metrics.jsonl"
REPLICAS_FILE = "replicas.json"
VAL_REPORT_FILE = "val_report.json"


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

    Examples:
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
    """A checkpoint folder from a checkpoint or run folder.

    A run folder gives its ``best/``, or its ``last/`` when it has no ``best/`` (a run trained
    without a validation set).

    Args:
        path: ``run/best``, ``run/last`` or ``run``.

    Returns:
        The folder holding ``config.yaml`` and ``model.safetensors``.

    Examples:
        >>> resolve_run_dir("runs/quickstart")  # doctest: +SKIP
        PosixPath('runs/quickstart/best')
    """
    folder = Path(path)
    if (folder / "model.safetensors").is_file():
        return folder
    for name in ("best", "last"):
        if (folder / name).is_dir():
            return folder / name
    return folder


def image_data_config(model: Any, image_size: int | None) -> dict[str, Any]:
    """The vision backbone's timm data config, with ``input_size`` set to ``image_size``.

    Args:
        model: A model with a ``vision`` encoder.
        image_size: Square side in pixels, or ``None`` for the backbone's default.

    Returns:
        A data config for :func:`~fusionkit.data.build_image_transform`.

    Examples:
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
    preset: str | None = None,
) -> Any:
    """Read a run config and apply command-line overrides; infer tasks from the data if needed.

    Without a config this is the default preset's model (offline EfficientNet-Lite0 + MiniLM
    CMA-CLIP, see :mod:`fusionkit.training.presets`) with every label column of ``train`` (or
    the ``tasks`` named) as a task.

    Args:
        config: YAML path or mapping (``None`` = the preset alone).
        train: Training manifest (overrides ``data.train``).
        val: Validation manifest (overrides ``data.val``).
        tasks: Task columns (overrides ``data.tasks``).
        epochs: Overrides ``train.epochs``.
        seed: Overrides ``train.seed``.
        device: Overrides ``train.device``.
        preset: A preset (``fast``, ``medium``, ``best``) filling in what the config leaves
            out; without a config, ``None`` means the default preset.

    Returns:
        The validated :class:`~fusionkit.models.ModelConfig`.

    Raises:
        ConfigError: An invalid config or preset name, or no tasks and no training data to
            infer them from.
        DataError: The training manifest cannot be read.

    Examples:
        >>> config = build_run_config(train="train.csv", val="val.csv")  # doctest: +SKIP
    """
    from fusionkit.data import infer_tasks
    from fusionkit.models import ModelConfig
    from fusionkit.training.presets import DEFAULT_PRESET, apply_preset

    if config is None:
        raw: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raw = read_yaml(config)
    if preset is None and config is None:
        preset = DEFAULT_PRESET
    if preset is not None:
        raw = apply_preset(raw, preset)
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
        best_score: Mean validation accuracy of the final ``best/`` model (with its fitted
            blend, for a model with unimodal heads); ``-inf`` without a validation set.
        cache_stats: Feature cache counters (``None`` without the cache).
    """

    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = float("-inf")
    cache_stats: CacheStats | None = None

    @property
    def best_dir(self) -> Path:
        """The best checkpoint (absent for a run without a validation set)."""
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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (``None`` = float32, no autocast).

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: The training device.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or ``None``. ``auto`` is bfloat16 on CUDA and
        float32 on CPU.

    Raises:
        ConfigError: ``fp16`` on a device other than CUDA (float16 training needs a gradient
            scaler and CUDA kernels; use ``bf16`` or ``fp32`` there).

    Examples:
        >>> resolve_precision("auto", torch.device("cpu")) is None
        True
    """
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision: fp16 needs CUDA, but the device is {device.type}; "
            "use bf16 or fp32 (the default on CPU)"
        )
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    # A disabled autocast still validates its dtype; bfloat16 is valid on every device.
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class _CompileFallback:
    """``torch.compile(fn)`` that falls back to ``fn`` for good when compiling fails.

    Compilation is lazy: it can fail when ``torch.compile`` is called or at the first call
    (no C++ compiler, an unsupported operation); a failure is logged once as a warning.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.eager = fn
        self.compiled: Callable[..., Any] | None = None
        try:
            self.compiled = torch.compile(fn)
        except Exception as error:  # any compiler failure means: run eagerly
            self._give_up(error)

    def _give_up(self, error: Exception) -> None:
        self.compiled = None
        _LOG.warning(
            "train.compile: torch.compile failed (%s: %s); training without compilation",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # a genuine error reappears eagerly
                self._give_up(error)
        return self.eager(*args, **kwargs)


class _TrainingForward(nn.Module):
    """The training forward as a module, so that DDP can hook it.

    Runs the encoders (or takes cached features of frozen ones) and then the fusion stack,
    compiled with ``train.compile``. The model's own ``forward`` stays eager and its state
    dict unchanged.
    """

    def __init__(self, model: nn.Module, device: torch.device, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.device = device
        self.modality_dropout = config.modality_dropout
        self.modality_swap = config.modality_swap
        self.swap_modality = config.swap_modality
        self.fuse = (
            _CompileFallback(model.forward_head) if config.compile else model.forward_head
        )

    def forward(self, batch: Any) -> Any:
        tokens, masks = batch_tokens(self.model, batch, self.device)
        if self.modality_swap and self.swap_modality in tokens:
            tokens, masks = swap_modalities(tokens, masks, self.modality_swap, self.swap_modality)
        if self.modality_dropout:
            masks = drop_modalities(masks, self.modality_dropout)
        return self.fuse(tokens, masks)


def _fit_blend(model: Any, blend: Any, outputs: EvalOutputs) -> EvalOutputs:
    """Fit ``blend`` on ``outputs`` (see :func:`~fusionkit.training.blend.fit_blend`), set it
    on the model, and return the outputs with the blended scores."""
    from fusionkit.training.blend import blend_probabilities, fit_blend

    available = {"fused": torch.ones(len(outputs.ids), dtype=torch.bool), **outputs.present}
    scores, rows = dict(outputs.scores), {}
    for task, spec in model.tasks.items():
        by_source = {s: outputs.sources[s][task] for s in blend.sources}
        fitted = fit_blend(by_source, outputs.targets[task], spec, available=available)
        blend.set_weights(task, fitted.weights, fitted.scale)
        scores[task] = blend_probabilities(
            by_source, fitted.weights, spec.multi_label, fitted.scale, available
        ).float()
        rows[task] = {**fitted.weights, "scale": fitted.scale}
    return dataclasses.replace(outputs, scores=scores, blend=rows)


def _heads(model: Any) -> list[Any]:
    """Every classification head of ``model``: the fused one and any unimodal ones."""
    unimodal = getattr(model, "unimodal", None)
    return [model.head, *([] if unimodal is None else unimodal.heads.values())]


def _join_outputs(parts: Sequence[EvalOutputs]) -> EvalOutputs:
    """Concatenate per-batch outputs; the loss is the mean of the batch losses."""
    first = parts[0]
    return EvalOutputs(
        {t: torch.cat([p.scores[t] for p in parts]) for t in first.scores},
        {t: torch.cat([p.targets[t] for p in parts]) for t in first.targets},
        {t: torch.cat([p.weights[t] for p in parts]) for t in first.weights},
        sum(p.loss for p in parts) / len(parts),
        [i for p in parts for i in p.ids],
        {
            s: {t: torch.cat([p.sources[s][t] for p in parts]) for t in by_task}
            for s, by_task in first.sources.items()
        },
        first.blend,
        {m: torch.cat([p.present[m] for p in parts]) for m in first.present},
    )


class Trainer:
    """Trains a model from a run config (model + ``data`` + ``train`` sections).

    Started by ``torchrun``, every process runs the same ``fit``: the processes join one
    process group, split every global batch (``data.batch_size``) and average gradients with
    DDP; rank 0 alone writes the run folder. See :mod:`fusionkit.training.distributed`.

    Args:
        config: The run config (see :func:`build_run_config`).
        output_dir: The run folder.
        resume: Continue from ``output_dir/last`` when it exists.
        progress: Show tqdm progress bars (rank 0 only).

    Raises:
        ConfigError: Invalid ``data``/``train`` sections, a missing ``data.train`` or
            ``train.precision: fp16`` without CUDA.
        DataError: ``data.train`` or ``data.val`` is missing, unreadable or lacks a column the
            model needs (checked here, before the model is built).

    Examples:
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
        if self.data.train is None:
            raise ConfigError("data.train: missing; give a manifest (--train)")
        self.device = resolve_device(self.train_config.device)
        self.autocast_dtype = resolve_precision(self.train_config.precision, self.device)
        from fusionkit.data.sources import check_manifest

        for manifest in (self.data.train, self.data.val):
            # Checked before any backbone loads: a wrong path fails at once, not minutes later.
            if manifest is not None:
                check_manifest(manifest, modalities=config.modalities, tasks=list(config.tasks))
        self.ctx = DistContext(0, 1, 0, self.device)
        self.cache_stats: CacheStats | None = None
        self.model: Any = None
        self.val_report: dict[str, Any] | None = None
        self._class_weight_tensors: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------

    def _build_model(self) -> Any:
        from fusionkit.models import build_model

        # The same seed on every rank: replicas start identical.
        _seed_everything(self.train_config.seed)
        model = build_model(self.config).to(self.device)
        if self.ctx.distributed:
            # Per-rank streams for dropout and augmentation, so ranks do not draw alike.
            _seed_everything(self.train_config.seed + self.ctx.rank)
        return model

    def _frozen_modalities(self, model: Any) -> list[str]:
        encoders = {m: model.vision if m == "image" else model.text for m in model.modalities}
        return [m for m, encoder in encoders.items() if getattr(encoder, "frozen", False)]

    def _all_frozen(self, model: Any) -> bool:
        return len(self._frozen_modalities(model)) == len(model.modalities)

    def _sources(self, model: Any) -> tuple[Any, Any, Any]:
        """Training and validation sources (``None`` without ``data.val``) and their collate."""
        from fusionkit.data import (
            ManifestDataset,
            build_image_transform,
            make_collate,
            transform_key,
        )

        cfg = self.train_config
        frozen = self._frozen_modalities(model)
        if cfg.cache_features is True and not frozen:
            raise ConfigError(
                "train.cache_features: true needs at least one used encoder frozen (freeze: true)"
            )
        cached = frozen if cfg.cache_features is not False else []
        live = [m for m in model.modalities if m not in cached]
        image_config = image_shape = None
        eval_transform = train_transform = None
        if model.vision is not None:
            image_config = image_data_config(model, self.data.image_size)
            image_shape = tuple(image_config["input_size"])
            eval_transform = build_image_transform(image_config, train=False)
            augment = cfg.augment and "image" not in cached
            train_transform = build_image_transform(image_config, train=augment)
            if "image" in cached and cfg.augment:
                _LOG.info("image features cached: training images are not augmented")
        tasks = model.tasks
        read = {"on_error": self.data.on_error, "modalities": model.modalities}
        train_set = ManifestDataset(self.data.train, tasks, train_transform, **read)
        splits = {"train": train_set}
        if self.data.val is not None:
            splits["val"] = ManifestDataset(self.data.val, tasks, eval_transform, **read)
        else:
            _LOG.info("no validation set: no epoch is validated and last/ holds the final weights")
        for name, dataset in splits.items():
            if len(dataset) == 0:
                raise DataError(f"data.{name}: {dataset.path} has no usable sample")
        val_set = splits.get("val")
        self._train_set = train_set
        if not cached:
            return train_set, val_set, make_collate(tasks, image_shape)
        if live:
            _LOG.info("feature cache: %s cached, %s encoded live", ", ".join(cached),
                      ", ".join(live))
        self.cache_stats = CacheStats()
        key = transform_key(image_config, train=False) if "image" in cached else "text-only"
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        dtype = getattr(torch, cfg.cache_dtype)
        # Local rank 0 encodes and stores; the node's other ranks then load the stored file.
        with local_main_first(self.ctx):
            features = [
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
                    modalities=cached,
                )
                for dataset in splits.values()
            ]
        return features[0], features[1] if val_set is not None else None, FeatureCollator(
            tasks, live, image_shape
        )

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
            weight = weight.float().to(self.device)
            for head in _heads(model):
                head.set_class_weight(task, weight)
            self._class_weight_tensors[task] = weight

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

    def _training_module(self, model: Any, source: Any, collate: Any) -> nn.Module:
        """The (DDP-wrapped) training forward; parameters that never get a gradient frozen."""
        module = _TrainingForward(model, self.device, self.train_config)
        if not self.ctx.distributed:
            return module
        size = min(len(source), max(2, math.ceil(self.data.batch_size / self.ctx.world_size)))
        probe = collate([source[i] for i in range(size)])

        def probe_loss() -> torch.Tensor:
            with _autocast(self.device, self.autocast_dtype):
                return model.loss(forward_batch(model, probe, self.device), probe.targets)

        unused = unused_parameters(model, probe_loss, self.ctx)
        if unused:
            # They would stall DDP's gradient buckets; AdamW skips them anyway (no gradient).
            named = dict(model.named_parameters())
            for name in unused:
                named[name].requires_grad_(False)
            shown = ", ".join(unused[:4]) + (", ..." if len(unused) > 4 else "")
            _LOG.info("%d parameter(s) get no gradient; not synchronised: %s", len(unused), shown)
        return wrap_ddp(module, self.ctx)

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------

    def _batches(self, source: Any, collate: Any, epoch: int, start_batch: int) -> Iterator[Any]:
        """This rank's share of each global batch of ``epoch``, from ``start_batch`` on."""
        seed = self.train_config.seed * 1_000_003 + epoch
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(source), generator=generator).tolist()
        size = self.data.batch_size
        batches = [order[i : i + size] for i in range(start_batch * size, len(order), size)]
        shards = [shard(indices, self.ctx) for indices in batches]
        # A rank left without samples (a last batch smaller than the world) still has to join
        # the gradient all-reduce: it runs one sample whose labels are masked out.
        placeholders = [not indices for indices in shards]
        shards = [mine or indices[:1] for mine, indices in zip(shards, batches, strict=True)]
        loader = DataLoader(
            source,
            batch_sampler=shards,
            collate_fn=collate,
            num_workers=self.data.num_workers,
            worker_init_fn=_seed_worker,
            # Passing a generator keeps the loader from drawing its worker seed from the
            # global RNG, which dropout uses.
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )
        for batch, placeholder in zip(loader, placeholders, strict=True):
            if placeholder:
                batch.targets = mask_targets(batch.targets)
            yield batch

    def _loss(self, output: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to backpropagate and the global batch's loss (detached)."""
        if not self.ctx.distributed:
            loss = self.model.loss(output, targets)
            return loss, loss.detach()
        losses, totals = [], []
        for head, logits, kept, weight in self.model.loss_terms(output, targets):
            loss, total = sharded_loss(head, logits, kept, self.ctx, self._class_weight_tensors)
            losses.append(weight * loss)
            totals.append(weight * total)
        return torch.stack(losses).sum(), torch.stack(totals).sum()

    def _save_last(
        self,
        model: Any,
        state: dict[str, Any],
        optimizer: Any,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
    ) -> None:
        # Every rank's RNG state is kept, so each rank resumes its own dropout stream.
        rng_ranks = all_gather_objects(self.ctx, _rng_state())
        if not self.ctx.is_main:
            return
        tensor_state: dict[str, Any] = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_ranks[0],
        }
        if self.ctx.distributed:
            tensor_state["rng_ranks"] = rng_ranks
        if scaler.is_enabled():
            tensor_state["scaler"] = scaler.state_dict()
        save_checkpoint(
            self.output_dir / "last",
            model,
            include_frozen=not self._all_frozen(model),
            state=state,
            tensor_state=tensor_state,
        )

    def _restore_rng(self, tensors: Mapping[str, Any]) -> None:
        ranks = tensors.get("rng_ranks")
        if not self.ctx.distributed:
            _set_rng_state(tensors["rng"])
        elif ranks is not None and len(ranks) == self.ctx.world_size:
            _set_rng_state(ranks[self.ctx.rank])
        else:
            saved = len(ranks) if ranks is not None else 1
            _LOG.warning(
                "resuming %d process(es) from a %d-process checkpoint: dropout and "
                "augmentation streams restart from the seed",
                self.ctx.world_size,
                saved,
            )
            _seed_everything(self.train_config.seed + self.ctx.rank)

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        if self.ctx.is_main:
            text = "".join(json.dumps(record) + "\n" for record in history)
            atomic_write_text(self.output_dir / METRICS_FILE, text)

    def _validate(self, model: Any, source: Any, collate: Any) -> dict[str, Any]:
        """Metrics over the whole validation set (see :meth:`_val_outputs`).

        A model with unimodal heads first gets its blend fit on these outputs; the metrics
        are then those of the blended model, computed from the heads' outputs as the model's
        own blend computes them.
        """
        outputs = self._val_outputs(model, source, collate)
        blend = getattr(model, "blend", None)
        if blend is not None:
            outputs = _fit_blend(model, blend, outputs)
        return compute_report(outputs, model.tasks, model.modalities)

    def _val_outputs(self, model: Any, source: Any, collate: Any) -> EvalOutputs:
        """Outputs over the whole validation set; ranks split its batches and gather them."""
        size = self.data.eval_batch_size
        batches = [list(range(i, min(i + size, len(source)))) for i in range(0, len(source), size)]
        mine = list(range(self.ctx.rank, len(batches), self.ctx.world_size))
        loader = DataLoader(
            source,
            batch_sampler=[batches[i] for i in mine],
            collate_fn=collate,
            num_workers=self.data.num_workers,
        )
        amp = self.autocast_dtype == torch.bfloat16
        parts = [
            (index, collect_outputs(model, [batch], self.device, amp=amp))
            for index, batch in zip(mine, loader, strict=True)
        ]
        gathered = sorted(
            (part for rank_parts in all_gather_objects(self.ctx, parts) for part in rank_parts),
            key=lambda part: part[0],
        )
        return _join_outputs([outputs for _, outputs in gathered])

    def _finish_best(self, model: Any, source: Any, collate: Any) -> dict[str, Any]:
        """Reload ``best/`` (with the blend fit at its epoch) and write its validation report.

        Returns:
            The validation report of ``best/``, with each head's accuracy.
        """
        load_model_weights(model, self.output_dir / "best")
        outputs = self._val_outputs(model, source, collate)
        report = compute_report(outputs, model.tasks, model.modalities)
        if self.ctx.is_main:
            write_json(self.output_dir / VAL_REPORT_FILE, report)
        for warning in report["warnings"]:
            _LOG.warning("%s", warning)
        return report

    def _check_replicas(self, model: Any) -> None:
        """Compare every rank's parameters; rank 0 writes their digests to ``replicas.json``."""
        digests = all_gather_objects(self.ctx, parameters_digest(model))
        if self.ctx.is_main:
            write_json(
                self.output_dir / REPLICAS_FILE,
                {"world_size": self.ctx.world_size, "parameters_sha256": digests},
            )
        if len(set(digests)) > 1:
            raise TrainingError(
                f"the {self.ctx.world_size} processes ended with different weights; see "
                f"{self.output_dir / REPLICAS_FILE}"
            )

    def fit(self) -> TrainResult:
        """Train for ``train.epochs`` epochs (from the last checkpoint with ``resume``).

        Under ``torchrun`` this joins the process group first and leaves it at the end.

        Returns:
            The :class:`TrainResult` (the same on every rank).

        Raises:
            TrainingError: The loss became NaN or infinite (the message names the step and
                the batch; ``last/`` keeps the last good checkpoint), or distributed replicas
                ended with different weights.
            DataError: A manifest cannot be read or has no usable sample.
            CheckpointError: ``resume`` found a checkpoint that cannot be loaded.

        Examples:
            >>> Trainer(config, "runs/x").fit().best_score  # doctest: +SKIP
        """
        self.ctx = init_distributed(self.device)
        self.device = self.ctx.device
        try:
            return self._fit()
        finally:
            shutdown(self.ctx)

    def _fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.train_config
        ctx = self.ctx
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
        scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.autocast_dtype == torch.float16
        )
        state: dict[str, Any] = {
            "epoch": 0,
            "batch_in_epoch": 0,
            "step": 0,
            "epoch_loss_sum": 0.0,
            "epoch_seconds": 0.0,
            "best_score": None,
            "best_epoch": 0,
            "stopped_early": False,
            "history": [],
        }
        # Every rank reads the same checkpoint (a shared folder on several nodes).
        checkpoint = find_checkpoint(self.output_dir / "last") if self.resume else None
        if checkpoint is not None:
            state, tensors = read_trainer_state(checkpoint)
            load_model_weights(model, checkpoint)
            optimizer.load_state_dict(tensors["optimizer"])
            scheduler.load_state_dict(tensors["scheduler"])
            if "scaler" in tensors:
                scaler.load_state_dict(tensors["scaler"])
            self._restore_rng(tensors)
            _LOG.info("resuming from %s at epoch %d, step %d", checkpoint, state["epoch"] + 1,
                      state["step"])
        elif self.resume:
            _LOG.warning("--resume: no checkpoint in %s; starting from scratch", self.output_dir)
        step_module = self._training_module(model, source, collate)
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_yaml(self.output_dir / "config.yaml", self.config.to_dict())
        trainable = [p for p in model.parameters() if p.requires_grad]

        state.setdefault("best_epoch", 0)
        state.setdefault("stopped_early", False)
        for epoch in range(state["epoch"], cfg.epochs):
            if state["stopped_early"]:
                break
            model.train()
            start_batch = state["batch_in_epoch"]
            started = time.perf_counter()
            bar = tqdm(
                total=steps_per_epoch,
                initial=start_batch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not (self.progress and ctx.is_main),
                leave=False,
            )
            batches = self._batches(source, collate, epoch, start_batch)
            for batch_index, batch in enumerate(batches, start=start_batch):
                with _autocast(self.device, self.autocast_dtype):
                    output = step_module(batch)
                    loss, global_loss = self._loss(output, batch.targets)
                # The global loss is the same on every rank, so all ranks stop together.
                if not torch.isfinite(global_loss):
                    raise TrainingError(
                        f"loss is {global_loss.item()} at step {state['step'] + 1} (epoch "
                        f"{epoch + 1}, batch {batch_index + 1}/{steps_per_epoch}, first ids "
                        f"{batch.ids[:3]}); stopped, the last good checkpoint in "
                        f"{self.output_dir / 'last'} is kept"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                state["step"] += 1
                state["epoch_loss_sum"] += global_loss.item()
                state["batch_in_epoch"] = batch_index + 1
                bar.update(1)
                bar.set_postfix(loss=f"{global_loss.item():.4f}")
                mid_epoch = batch_index + 1 < steps_per_epoch
                if cfg.save_every_steps and state["step"] % cfg.save_every_steps == 0 and mid_epoch:
                    state["epoch_seconds"] += time.perf_counter() - started
                    started = time.perf_counter()
                    self._save_last(model, state, optimizer, scheduler, scaler)
            bar.close()
            seconds = state["epoch_seconds"] + time.perf_counter() - started
            record = {
                "epoch": epoch + 1,
                "step": state["step"],
                "train_loss": state["epoch_loss_sum"] / steps_per_epoch,
            }
            if val_source is not None:
                report = self._validate(model, val_source, collate)
                score = report["mean"]["accuracy"] or 0.0
                if cfg.best_metric == "loss":
                    log_loss = report["mean"]["log_loss"]
                    score = -log_loss if log_loss is not None else float("-inf")
                record |= {
                    "val_loss": report["loss"],
                    "val_log_loss": report["mean"]["log_loss"],
                    "val_accuracy": {t: r["accuracy"] for t, r in report["tasks"].items()},
                    "val_mean_accuracy": report["mean"]["accuracy"] or 0.0,
                }
                if any("sources" in r for r in report["tasks"].values()):
                    record["val_head_accuracy"] = {
                        t: r["sources"] for t, r in report["tasks"].items()
                    }
            record |= {"lr": scheduler.get_last_lr()[-1], "epoch_seconds": round(seconds, 3)}
            _LOG.info("epoch %d: %s", epoch + 1, record)
            state.update(epoch=epoch + 1, batch_in_epoch=0, epoch_loss_sum=0.0, epoch_seconds=0.0)
            state["history"].append(record)
            if val_source is not None and (
                state["best_score"] is None or score > state["best_score"]
            ):
                state["best_score"] = score
                state["best_epoch"] = epoch + 1
                if ctx.is_main:
                    save_checkpoint(
                        self.output_dir / "best", model, include_frozen=not self._all_frozen(model)
                    )
            patience = cfg.early_stopping
            if val_source is not None and patience and epoch + 1 - state["best_epoch"] >= patience:
                _LOG.info(
                    "early stopping after epoch %d: no better val %s since epoch %d",
                    epoch + 1, cfg.best_metric, state["best_epoch"],
                )
                state["stopped_early"] = True
            self._save_last(model, state, optimizer, scheduler, scaler)
            self._write_metrics(state["history"])
            if state["stopped_early"]:
                break
        self._write_metrics(state["history"])
        best_score = float("-inf")
        if val_source is not None and state["best_epoch"]:
            self.val_report = self._finish_best(model, val_source, collate)
            best_score = self.val_report["mean"]["accuracy"] or 0.0
        if ctx.distributed:
            self._check_replicas(model)
        return TrainResult(self.output_dir, state["history"], best_score, self.cache_stats)


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

    Examples:
        >>> result = train("configs/quickstart.yaml", "runs/quickstart")  # doctest: +SKIP
    """
    from fusionkit.models import ModelConfig

    if not isinstance(config, ModelConfig):
        config = build_run_config(config)
    return Trainer(config, output_dir, resume=resume, progress=progress).fit()
