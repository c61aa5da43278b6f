"""The checkpoints a training writes: ``best/`` (weights) and ``last/`` (weights and state).

Both are written by rank 0 only, after every rank took part in gathering the weights (a
sharded model gathers its full weights collectively; see :mod:`fusionkit.training.sharding`).
``last/`` holds what a resume needs beside the weights: the trainer's counters, the optimizer,
scheduler and gradient-scaler states, every rank's RNG state and the moving average of the
weights (``train.ema_decay``).

Examples:
    >>> save_best(model, Path("runs/x/best"), ctx)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fusionkit.runs import save_checkpoint
from fusionkit.training.averaging import WeightAverage
from fusionkit.training.distributed import DistContext, all_gather_objects
from fusionkit.training.sharding import load_optimizer_state, optimizer_state, savable
from fusionkit.training.state import restore_rng_state, rng_state

__all__ = ["include_frozen", "restore_last", "save_best", "save_last"]

_LOG = logging.getLogger("fusionkit.training")


def include_frozen(model: Any) -> bool:
    """Whether checkpoints of ``model`` store its frozen encoders: unless every encoder is
    frozen (then its config rebuilds them from their pretrained weights).

    Args:
        model: A fusionkit model.

    Returns:
        ``True`` when at least one encoder is trained.
    """
    return len(model.frozen_modalities()) < len(model.modalities)


def save_best(model: Any, folder: Path, ctx: DistContext) -> None:
    """Save the model's weights (as it holds them now) into ``folder``; call on every rank.

    Args:
        model: The model, sharded or not.
        folder: The checkpoint folder (replaced atomically).
        ctx: The process group context.
    """
    saved = savable(model)  # on every rank: a sharded model gathers its weights
    if ctx.is_main:
        save_checkpoint(folder, saved, include_frozen=include_frozen(model))


def save_last(
    folder: Path,
    ctx: DistContext,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    state: dict[str, Any],
    average: WeightAverage | None = None,
) -> None:
    """Save the weights and everything a resume needs into ``folder``; call on every rank.

    Args:
        folder: The checkpoint folder (replaced atomically).
        ctx: The process group context.
        model: The model being trained, sharded or not.
        optimizer: Its optimizer.
        scheduler: The learning-rate scheduler.
        scaler: The gradient scaler (its state is kept when it is enabled).
        state: The trainer's counters and history (JSON).
        average: The moving average of the weights, if the run keeps one.
    """
    # Every rank's RNG state is kept, so each rank resumes its own dropout stream.
    rng_ranks = all_gather_objects(ctx, rng_state())
    optimizer_tensors, saved = optimizer_state(model, optimizer), savable(model)
    if not ctx.is_main:
        return
    tensor_state: dict[str, Any] = {
        "optimizer": optimizer_tensors,
        "scheduler": scheduler.state_dict(),
        "rng": rng_ranks[0],
    }
    if ctx.distributed:
        tensor_state["rng_ranks"] = rng_ranks
    if scaler.is_enabled():
        tensor_state["scaler"] = scaler.state_dict()
    if average is not None:
        tensor_state["ema"] = average.state_dict()
    save_checkpoint(folder, saved, include_frozen=include_frozen(model), state=state,
                    tensor_state=tensor_state)


def restore_last(
    tensors: Mapping[str, Any],
    ctx: DistContext,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    seed: int,
    average: WeightAverage | None = None,
) -> None:
    """Restore what :func:`save_last` kept beside the weights (which load before sharding).

    Args:
        tensors: The checkpoint's tensor state (see :func:`~fusionkit.runs.read_trainer_state`).
        ctx: The process group context.
        model: The model, its weights already loaded.
        optimizer: Its optimizer, built on the (sharded) parameters.
        scheduler: The learning-rate scheduler.
        scaler: The gradient scaler.
        seed: The run's seed (RNG streams restart from it when the number of processes
            changed).
        average: The run's moving average of the weights; a checkpoint without one leaves it
            at the checkpoint's weights, with a warning.

    Raises:
        CheckpointError: The saved average does not match the model's trainable parameters.
    """
    load_optimizer_state(model, optimizer, tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    if "scaler" in tensors:
        scaler.load_state_dict(tensors["scaler"])
    restore_rng_state(tensors, ctx, seed)
    if average is not None and "ema" in tensors:
        average.load_state_dict(tensors["ema"])
    elif average is not None:
        _LOG.warning("resume: the checkpoint has no weight average; it starts from the "
                     "checkpoint's weights")
