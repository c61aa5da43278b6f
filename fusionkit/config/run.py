"""The run config: the model, and the ``data`` and ``train`` sections of one training.

```yaml
# ... the model's sections (see fusionkit.config.model), then:
data:
  train: data/train.csv                    # relative paths are read from the working directory
  val: data/val.csv
  test: synthetic:test                     # or a named data source, built on first use
  image_size: 96                           # overrides the backbone's input size
  batch_size: 32
train:
  epochs: 8
  lr: 1.0e-3
  lr_backbone: 1.0e-5
  cache_features: auto                     # frozen backbones: encode once, reuse every epoch
  precision: auto                          # bf16 autocast on CUDA, fp32 on CPU
  strategy: ddp                            # or fsdp: shard the model under torchrun
```

`RunConfig` keeps the three apart: a checkpoint stores the model config alone (with the
image size, which inference needs), and the run folder's ``config.yaml`` the whole run config.
Under ``torchrun``, ``data.batch_size`` is the global batch, split across the processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, field_serializer, field_validator

from fusionkit.config.base import Section
from fusionkit.config.model import ModelConfig
from fusionkit.errors import ConfigError
from fusionkit.io import read_yaml

__all__ = [
    "RUN_SECTIONS",
    "AutoWorkers",
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "auto_num_workers",
    "parse_section",
]

#: The top-level keys of a run config that are not the model's.
RUN_SECTIONS = ("data", "train")

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Rate = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Decay = Annotated[float, Field(ge=0.0, lt=1.0)]


class AutoWorkers(int):
    """A worker count that ``data.num_workers: auto`` resolved to; written back as ``auto``."""


def auto_num_workers(cpus: int | None = None, cuda: bool | None = None) -> int:
    """What ``data.num_workers: auto`` means on this machine.

    With CUDA, one worker per CPU the process may use but one (kept for the training loop),
    at most 8: enough to keep an accelerator fed on decoded images. Without CUDA the training
    itself computes on every CPU, so only a machine of 8 CPUs or more spares workers: a
    quarter of its CPUs, at most 4.

    Args:
        cpus: CPUs available (default: this process's CPU affinity).
        cuda: Whether CUDA is available (default: ask torch).

    Returns:
        The worker count.

    Examples:
        >>> auto_num_workers(cpus=16, cuda=True), auto_num_workers(cpus=2, cuda=False)
        (8, 0)
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return max(0, min(8, cpus - 1))
    return min(4, cpus // 4) if cpus >= 8 else 0


class DataConfig(Section):
    """The ``data`` section: where the manifests are and how batches are built.

    Attributes:
        train: Training manifest (``.csv`` / ``.jsonl``) or named data source
            (``synthetic:train``, see :mod:`fusionkit.data.sources`).
        val: Validation manifest, used for per-epoch metrics and the best checkpoint; without
            one the trainer validates nothing and keeps the final weights in ``last/``.
        test: Test manifest, used by ``fusionkit evaluate`` when no ``--data`` is given.
        tasks: Task columns to use (default: every label column, or the model's tasks).
        multi_label: Task columns to treat as multi-label even without a ``|`` cell.
        image_size: Square input side in pixels, overriding the backbone's default size
            (stored with the model: inference uses it too).
        batch_size: Training batch size; under ``torchrun`` the global batch, split across
            processes.
        eval_batch_size: Batch size for evaluation and feature encoding.
        num_workers: DataLoader worker processes (0 = load in the main process); ``auto``
            (the default) picks a count from the CPUs and CUDA (see :func:`auto_num_workers`)
            when the config is read. On CUDA the loaders pin memory and prefetch 4 batches
            per worker, and the training loader's workers persist across epochs, each
            sample's augmentation seeded on its own so that ``--resume`` stays exact (see
            :class:`~fusionkit.training.sources.EpochLoader`).
        on_error: ``skip`` bad rows (counted and logged) or ``raise`` on the first one.

    Examples:
        >>> parse_section(DataConfig, {"train": "train.csv", "batch_size": 8}, "data").batch_size
        8
    """

    train: str | None = None
    val: str | None = None
    test: str | None = None
    tasks: list[str] | None = None
    multi_label: list[str] = Field(default_factory=list)
    image_size: Positive | None = None
    batch_size: Positive = 32
    eval_batch_size: Positive = 64
    num_workers: NonNegative | Literal["auto"] = Field("auto", validate_default=True)
    on_error: Literal["skip", "raise"] = "skip"

    @field_validator("num_workers", mode="after")
    @classmethod
    def _resolve_workers(cls, value: int | str) -> int:
        return AutoWorkers(auto_num_workers()) if value == "auto" else value

    @field_serializer("num_workers")
    def _write_workers(self, value: int) -> int | str:
        return "auto" if isinstance(value, AutoWorkers) else value


class TrainConfig(Section):
    """The ``train`` section: optimisation, schedule, checkpoints and the feature cache.

    Attributes:
        epochs: Number of passes over the training set.
        lr: Learning rate of the fusion layers and heads.
        lr_backbone: Learning rate of trainable encoder parameters.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        warmup_ratio: Share of all steps spent in linear warm-up before the cosine decay.
        min_lr_ratio: Final learning rate as a share of the peak.
        grad_clip: Max gradient norm; 0 disables clipping.
        precision: ``auto`` (bfloat16 autocast on CUDA, float32 on CPU), ``fp32``, ``bf16``
            (autocast on CUDA or CPU) or ``fp16`` (autocast with a gradient scaler; CUDA only).
        compile: ``torch.compile`` the fusion layers and heads; if compiling fails, a warning
            is logged and training goes on eagerly.
        strategy: How ``torchrun`` processes share the model: ``ddp`` replicates it and
            averages gradients; ``fsdp`` shards parameters, gradients and optimizer states
            with FSDP2 (``fully_shard`` per backbone block and fusion layer, then the whole
            model) and gathers full weights on rank 0 for every checkpoint. One process
            trains the same either way (see :mod:`fusionkit.training.sharding`).
        activation_checkpointing: Recompute the activations of every block of the trainable
            backbones in the backward pass instead of keeping them: less memory, about a
            third more backbone compute, the same gradients.
        channels_last: Run CNN backbones in ``channels_last`` memory format: ``auto`` on
            CUDA only (faster convolutions on tensor cores), ``true`` everywhere, ``false``
            never. Outputs are the same up to float rounding.
        seed: Seed of model init, shuffling, dropout and augmentation.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        class_weight: ``balanced`` weights every task's loss by inverse class frequency.
        label_smoothing: Smooth the training targets of every head by this much (see
            :func:`~fusionkit.heads.task_loss`); 0 disables it. The validation loss logged
            during training is smoothed too; evaluation and the blend fit are not.
        augment: Random crop and flip on training images (not when image features are cached).
        modality_dropout: Probability that a training sample has one of its modalities hidden
            (see :func:`~fusionkit.training.augment.drop_modalities`); 0 disables it.
        modality_swap: Probability that a training sample gets the ``swap_modality`` of
            another sample of its batch, its labels kept (see
            :func:`~fusionkit.training.augment.swap_modalities`): training with misleading
            inputs; 0 disables it.
        swap_modality: The input ``modality_swap`` replaces (``text`` or ``image`` with the
            shorthand, an input name otherwise).
        cache_features: ``auto``: cache the tokens of every frozen encoder (trainable
            encoders run live on each batch); ``true`` requires at least one frozen encoder;
            ``false`` never caches.
        cache_dir: Folder of the feature cache (default ``~/.cache/fusionkit/features``).
        cache_dtype: Storage dtype of cached tokens.
        save_every_steps: Also checkpoint ``last/`` every N optimizer steps (0 = epoch ends).
        best_metric: What picks the ``best/`` checkpoint among the validated epochs: the
            highest mean validation ``accuracy`` over tasks, or the lowest mean validation
            ``loss``: the log-loss of the model's final probabilities (for a model with
            unimodal heads, of its blend, which the scale of the blend calibrates).
        early_stopping: Stop after this many validated epochs without a better
            ``best_metric``; 0 trains every epoch.
        refit_heads: After the epochs, train the unimodal heads of the ``best/`` model again
            on its own pooled features, keep each refit head whose validation loss is lower,
            and fit the blend again (see :mod:`fusionkit.training.refit`); no effect on a
            model without unimodal heads or a run without validation data. Off by default:
            on the real sets it helped on icons and hurt on emoji
            (``docs/results/refit_heads.md``).
        ema_decay: Validate, and keep as ``best/``, an exponential moving average of the
            trainable weights with this decay (see :mod:`fusionkit.training.averaging`);
            0 disables it. Not with ``strategy: fsdp`` under ``torchrun``. Without validation
            data the average is not used. Off by default: on the real sets it helped on icons
            and hurt on emoji (``docs/results/recipe.md``).
        unimodal_models: After the fused model, train a text-only and an image-only model
            with the same recipe (``vision: null`` / ``text: null``) into the run folder's
            ``unimodal/``, and blend the three per task with weights fit on validation data
            (see :mod:`fusionkit.training.members`): the run folder then evaluates, predicts
            and serves as that blend, while its ``best/`` stays the fused model alone. Needs
            the ``vision:`` / ``text:`` shorthand with both encoders and validation data;
            about doubles the training time.
        deterministic: Ask torch for deterministic algorithms (``warn_only``).
        tensorboard: Write every epoch's metrics as TensorBoard events into the run folder's
            ``tensorboard/`` (see :mod:`fusionkit.training.tracking`); ``false`` writes none.

    Examples:
        >>> parse_section(TrainConfig, {"epochs": 3, "lr": 5e-4}, "train").lr
        0.0005
    """

    epochs: Positive = 10
    lr: Rate = 1e-3
    lr_backbone: Rate = 1e-5
    weight_decay: Rate = 0.01
    warmup_ratio: Fraction = 0.05
    min_lr_ratio: Fraction = 0.0
    grad_clip: Rate = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False
    channels_last: bool | Literal["auto"] = "auto"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    class_weight: Literal["none", "balanced"] = "none"
    label_smoothing: Decay = 0.0
    augment: bool = True
    modality_dropout: Fraction = 0.0
    modality_swap: Fraction = 0.0
    swap_modality: str = "text"
    cache_features: bool | Literal["auto"] = "auto"
    cache_dir: str | None = None
    cache_dtype: Literal["float16", "float32"] = "float16"
    save_every_steps: NonNegative = 0
    best_metric: Literal["accuracy", "loss"] = "accuracy"
    early_stopping: NonNegative = 0
    refit_heads: bool = False
    ema_decay: Decay = 0.0
    unimodal_models: bool = False
    deterministic: bool = True
    tensorboard: bool = True


_Section = TypeVar("_Section", bound=Section)


def parse_section(cls: type[_Section], raw: Mapping[str, Any] | None, path: str) -> _Section:
    """Validate a raw config section (``cls.parse``).

    Args:
        cls: A `Section` type, e.g. :class:`DataConfig` or :class:`TrainConfig`.
        raw: The section as read from YAML (``None`` = all defaults).
        path: The section's key (``"data"`` or ``"train"``) for error messages.

    Returns:
        The section with defaults filled in.

    Raises:
        ConfigError: Not a mapping, an unknown key (with a "did you mean"), a wrong type or an
            out-of-range value; the message starts with the key path.

    Examples:
        >>> parse_section(TrainConfig, {"epoch": 3}, "train")
        Traceback (most recent call last):
        fusionkit.errors.ConfigError: train.epoch: unknown key; did you mean 'epochs'? ...
    """
    return cls.parse(raw, path)


@dataclass
class RunConfig:
    """A whole run: the model, and how to train it.

    Build it with `from_dict` or `load`; `to_dict` writes it back as one mapping (the model's
    sections and ``data`` and ``train``), which is what a run folder's ``config.yaml`` holds.
    Attribute access the trainer needs most (``tasks``, ``modalities``) reads the model.

    Attributes:
        model: The model config (what a checkpoint stores).
        data: The ``data`` section.
        train: The ``train`` section.

    Examples:
        >>> run = RunConfig.from_dict({"vision": None, "tasks": {"c": {"num_classes": 2}},
        ...                            "train": {"epochs": 2}})
        >>> run.train.epochs, run.model.modalities
        (2, ('text',))
    """

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Read and validate a run config mapping.

        Raises:
            ConfigError: Any problem, with the key path.
        """
        if isinstance(raw, RunConfig):
            return raw
        if isinstance(raw, ModelConfig):
            return cls(raw)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a config must be a mapping, got {type(raw).__name__}")
        data = DataConfig.parse(raw.get("data"), "data")
        train = TrainConfig.parse(raw.get("train"), "train")
        model = {k: v for k, v in raw.items() if k not in RUN_SECTIONS}
        if data.image_size is not None:
            model.setdefault("image_size", data.image_size)
        return cls(ModelConfig.from_dict(model), data, train)

    @classmethod
    def load(cls, config: RunConfig | Mapping[str, Any] | str | os.PathLike[str]) -> RunConfig:
        """Accept a `RunConfig`, a `ModelConfig`, a mapping, or a YAML path."""
        if isinstance(config, (str, os.PathLike)):
            return cls.from_dict(read_yaml(Path(config)))
        return cls.from_dict(config)

    @property
    def tasks(self) -> dict[str, Any]:
        """The model's tasks."""
        return self.model.tasks

    @property
    def modalities(self) -> tuple[str, ...]:
        """The model's modalities."""
        return self.model.modalities

    def to_dict(self) -> dict[str, Any]:
        """The run config as one mapping that `from_dict` reads back."""
        return {**self.model.to_dict(), "data": self.data.to_dict(), "train": self.train.to_dict()}
