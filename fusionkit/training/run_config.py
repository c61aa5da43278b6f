"""The run config a training reads: a config file or mapping, a preset and command-line values;
and the checks it must pass before any model loads."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from fusionkit.config import DataConfig, RunConfig, TrainConfig
from fusionkit.config.inputs import parse_inputs
from fusionkit.data import check_manifest, infer_tasks
from fusionkit.errors import ConfigError, did_you_mean
from fusionkit.io import read_yaml
from fusionkit.training.presets import DEFAULT_PRESET, apply_preset

__all__ = ["build_run_config", "check_run_config"]


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
) -> RunConfig:
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
        The validated :class:`~fusionkit.config.RunConfig`.

    Raises:
        ConfigError: An invalid config or preset name, or no tasks and no training data to
            infer them from.
        DataError: The training manifest cannot be read.

    Examples:
        >>> config = build_run_config(train="train.csv", val="val.csv")  # doctest: +SKIP
    """
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
    data_cfg = DataConfig.parse(data, "data")
    TrainConfig.parse(section, "train")
    if "tasks" not in raw:
        if data_cfg.train is None:
            raise ConfigError("tasks: missing, and no data.train (--train) to infer them from")
        inputs = parse_inputs(raw["inputs"], "inputs") if raw.get("inputs") is not None else {}
        inferred = infer_tasks(data_cfg.train, data_cfg.tasks, data_cfg.multi_label or None,
                               input_columns=[spec.column for spec in inputs.values()])
        raw["tasks"] = {name: spec.to_dict() for name, spec in inferred.items()}
    return RunConfig.from_dict(raw)



def check_run_config(config: RunConfig) -> None:
    """What a training needs that the sections cannot check alone, checked in a second.

    Runs before any backbone loads, so a wrong path or name fails at once, not minutes later.

    Args:
        config: The run config.

    Raises:
        ConfigError: No ``data.train``, or ``train.swap_modality`` names no input of the model
            while ``train.modality_swap`` is on.
        DataError: A manifest of ``data.train`` / ``data.val`` is missing, unreadable, or
            lacks a task column or every input column.

    Examples:
        >>> check_run_config(build_run_config(train="train.csv"))  # doctest: +SKIP
    """
    data, train = config.data, config.train
    if data.train is None:
        raise ConfigError("data.train: missing; give a manifest (--train)")
    inputs = config.model.inputs
    if train.modality_swap and train.swap_modality not in inputs:
        raise ConfigError(
            f"train.swap_modality: the model has no input {train.swap_modality!r}; "
            + did_you_mean(train.swap_modality, inputs, what="its inputs")
        )
    for manifest in (data.train, data.val):
        if manifest is not None:
            check_manifest(manifest, inputs=inputs, tasks=list(config.tasks))
