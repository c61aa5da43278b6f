"""The state a run resumes from: the trainer's counters, seeding, and the RNG states a
checkpoint keeps."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "fresh_state",
    "restore_rng_state",
    "rng_state",
    "seed_everything",
    "seed_worker",
    "set_rng_state",
]

_LOG = logging.getLogger("fusionkit.training")


def fresh_state() -> dict[str, Any]:
    """The trainer's counters at the start of a run (saved in ``last/`` and resumed from)."""
    return {
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


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy and torch (every device) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and numpy in a DataLoader worker from its torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), numpy and ``random``, as tensors and lists."""
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


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_state(tensors: Mapping[str, Any], ctx: Any, seed: int) -> None:
    """Restore this rank's RNG state from a checkpoint's tensor state.

    A checkpoint keeps every rank's state; resuming with another number of processes restarts
    the dropout and augmentation streams from the seed instead (with a warning).

    Args:
        tensors: The checkpoint's tensor state (``rng``, and ``rng_ranks`` when distributed).
        ctx: The distributed context (``distributed``, ``rank``, ``world_size``).
        seed: The run's seed.
    """
    ranks = tensors.get("rng_ranks")
    if not ctx.distributed:
        set_rng_state(tensors["rng"])
    elif ranks is not None and len(ranks) == ctx.world_size:
        set_rng_state(ranks[ctx.rank])
    else:
        saved = len(ranks) if ranks is not None else 1
        _LOG.warning(
            "resuming %d process(es) from a %d-process checkpoint: dropout and augmentation "
            "streams restart from the seed",
            ctx.world_size,
            saved,
        )
        seed_everything(seed + ctx.rank)

