"""The optimizer and its schedule: AdamW in parameter groups, warm-up then cosine decay."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fusionkit.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(model: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, in groups.

    Encoder parameters learn at ``train.lr_backbone``, the rest at ``train.lr``; biases and
    norm scales (1-d parameters) are not decayed, the usual transformer recipe.

    Args:
        model: A model with ``encoders()`` (modality → encoder module).
        config: The ``train`` section.

    Returns:
        The optimizer.

    Examples:
        >>> optimizer = build_optimizer(model, TrainConfig(lr=1e-3))  # doctest: +SKIP
    """
    backbone_ids = {id(p) for encoder in model.encoders().values() for p in encoder.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        key = (id(parameter) in backbone_ids, parameter.ndim >= 2)
        groups.setdefault(key, []).append(parameter)
    param_groups = [
        {
            "params": params,
            "lr": config.lr_backbone if backbone else config.lr,
            "weight_decay": config.weight_decay if decay else 0.0,
        }
        for (backbone, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=config.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``train.warmup_ratio`` of the steps, then cosine decay to
    ``train.min_lr_ratio`` of each group's learning rate.

    Args:
        optimizer: The optimizer.
        total_steps: Optimizer steps of the whole run.
        config: The ``train`` section.

    Returns:
        A scheduler to step once per optimizer step.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total_steps, config.warmup_ratio, config.min_lr_ratio)
    )


def _warmup_cosine(total: int, warmup_ratio: float, min_ratio: float) -> Any:
    warmup = round(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor

