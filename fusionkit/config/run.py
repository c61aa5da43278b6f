"""Validated ``data`` and ``train`` sections of a run config.

:class:`~fusionkit.models.ModelConfig` keeps these two sections as given; this module turns them
into typed dataclasses. Unknown keys and wrong types raise :class:`~fusionkit.errors.ConfigError`
naming the key path (``train.lr``) with a "did you mean" hint.

```yaml
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
```

Under ``torchrun``, ``data.batch_size`` is the global batch, split across the processes.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fusionkit.config.model import matches_type
from fusionkit.errors import ConfigError

__all__ = ["DataConfig", "TrainConfig", "parse_section"]


@dataclass
class DataConfig:
    """The ``data`` section: where the manifests are and how batches are built.

    Attributes:
        train: Training manifest (``.csv`` / ``.jsonl``) or named data source
            (``synthetic:train``, see :mod:`fusionkit.data.sources`).
        val: Validation manifest, used for per-epoch metrics and the best checkpoint; without
            one the trainer validates nothing and keeps the final weights in ``last/``.
        test: Test manifest, used by ``fusionkit evaluate`` when no ``--data`` is given.
        tasks: Task columns to use (default: every label column, or the model's tasks).
        multi_label: Task columns to treat as multi-label even without a ``|`` cell.
        image_size: Square input side in pixels, overriding the backbone's default size.
        batch_size: Training batch size; under ``torchrun`` the global batch, split across
            processes.
        eval_batch_size: Batch size for evaluation and feature encoding.
        num_workers: DataLoader worker processes (0 = load in the main process).
        on_error: ``skip`` bad rows (counted and logged) or ``raise`` on the first one.

    Examples:
        >>> parse_section(DataConfig, {"train": "train.csv", "batch_size": 8}, "data").batch_size
        8
    """

    train: str | None = None
    val: str | None = None
    test: str | None = None
    tasks: list[str] | None = None
    multi_label: list[str] = field(default_factory=list)
    image_size: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 0
    on_error: Literal["skip", "raise"] = "skip"

    def __post_init__(self) -> None:
        _positive(self.batch_size, "data.batch_size")
        _positive(self.eval_batch_size, "data.eval_batch_size")
        if self.image_size is not None:
            _positive(self.image_size, "data.image_size")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: expected >= 0, got {self.num_workers}")


@dataclass
class TrainConfig:
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
        seed: Seed of model init, shuffling, dropout and augmentation.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        class_weight: ``balanced`` weights every task's loss by inverse class frequency.
        augment: Random crop and flip on training images (not when image features are cached).
        modality_dropout: Probability that a training sample has one of its modalities hidden
            (see :func:`~fusionkit.training.augment.drop_modalities`); 0 disables it.
        modality_swap: Probability that a training sample gets the ``swap_modality`` of
            another sample of its batch, its labels kept (see
            :func:`~fusionkit.training.augment.swap_modalities`): training with misleading
            inputs; 0 disables it.
        swap_modality: The modality ``modality_swap`` replaces: ``text`` or ``image``.
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
        deterministic: Ask torch for deterministic algorithms (``warn_only``).

    Examples:
        >>> parse_section(TrainConfig, {"epochs": 3, "lr": 5e-4}, "train").lr
        0.0005
    """

    epochs: int = 10
    lr: float = 1e-3
    lr_backbone: float = 1e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    class_weight: Literal["none", "balanced"] = "none"
    augment: bool = True
    modality_dropout: float = 0.0
    modality_swap: float = 0.0
    swap_modality: Literal["text", "image"] = "text"
    cache_features: bool | Literal["auto"] = "auto"
    cache_dir: str | None = None
    cache_dtype: Literal["float16", "float32"] = "float16"
    save_every_steps: int = 0
    best_metric: Literal["accuracy", "loss"] = "accuracy"
    early_stopping: int = 0
    deterministic: bool = True

    def __post_init__(self) -> None:
        _positive(self.epochs, "train.epochs")
        for name in (
            "lr", "lr_backbone", "weight_decay", "grad_clip", "save_every_steps", "early_stopping"
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("warmup_ratio", "min_lr_ratio", "modality_dropout", "modality_swap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name}: expected a number in [0, 1]")


def _positive(value: int, path: str) -> None:
    if value < 1:
        raise ConfigError(f"{path}: expected a positive integer, got {value}")


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "null")


_Section = typing.TypeVar("_Section", DataConfig, TrainConfig)


def parse_section(cls: type[_Section], raw: Mapping[str, Any] | None, path: str) -> _Section:
    """Validate a raw config section into its dataclass.

    Args:
        cls: :class:`DataConfig` or :class:`TrainConfig`.
        raw: The section as read from YAML (``None`` = all defaults).
        path: The section's key (``"data"`` or ``"train"``) for error messages.

    Returns:
        The dataclass with defaults filled in; floats given as ints are converted.

    Raises:
        ConfigError: Not a mapping, an unknown key (with a "did you mean"), a wrong type or an
            out-of-range value; the message starts with the key path.

    Examples:
        >>> parse_section(TrainConfig, {"epoch": 3}, "train")
        Traceback (most recent call last):
        fusionkit.errors.ConfigError: train.epoch: unknown key; did you mean 'epochs'? ...
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{path}.{key}: unknown key; {hint}accepted: {', '.join(names)}")
        if not matches_type(value, hints[key]):
            raise ConfigError(f"{path}.{key}: expected {_describe(hints[key])}, got {value!r}")
        values[key] = float(value) if hints[key] is float else value
    return cls(**values)
