"""Training checkpoints: the model (``save_pretrained``) plus the trainer's state, swapped in whole.

A checkpoint folder (``best/`` or ``last/``) holds ``config.yaml`` and ``model.safetensors``
(loadable with :meth:`~fusionkit.models.CMACLIP.from_pretrained`) and, for resuming,
``trainer_state.json`` (epoch, step, history, best score) and ``trainer_state.pt`` (optimizer,
scheduler and RNG states; read back with ``torch.load(weights_only=True)`` only).

Each file is written atomically, and the folder as a whole is swapped in: the new checkpoint is
written to ``.<name>.new/``, the old folder renamed to ``.<name>.old/``, the new one renamed into
place, then the old one removed. ``trainer_state.json`` is written last, so a folder holding it is
complete; :func:`find_checkpoint` falls back to ``.<name>.old/`` if a kill hit between renames.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusionkit.errors import CheckpointError
from fusionkit.io import atomic_write, load_weights, write_json

__all__ = [
    "STATE_FILE",
    "TENSOR_STATE_FILE",
    "find_checkpoint",
    "load_model_weights",
    "read_trainer_state",
    "save_checkpoint",
]

STATE_FILE = "trainer_state.json"
TENSOR_STATE_FILE = "trainer_state.pt"


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    *,
    include_frozen: bool,
    state: Mapping[str, Any] | None = None,
    tensor_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder, replacing any previous one as a whole.

    Args:
        directory: The folder (e.g. ``run/last``).
        model: The model; saved with ``save_pretrained``.
        include_frozen: Store frozen encoder weights too.
        state: JSON-serialisable trainer state (omit for a model-only checkpoint).
        tensor_state: Optimizer/scheduler/RNG states (tensors, numbers, lists, dicts).

    Returns:
        The folder.

    Example:
        >>> save_checkpoint("run/best", model, include_frozen=False)  # doctest: +SKIP
    """
    target = Path(directory)
    new = target.with_name(f".{target.name}.new")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(new, ignore_errors=True)
    model.save_pretrained(new, include_frozen=include_frozen)
    if tensor_state is not None:
        buffer = io.BytesIO()
        torch.save(dict(tensor_state), buffer)
        atomic_write(new / TENSOR_STATE_FILE, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    write_json(new / STATE_FILE, dict(state or {}))
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def find_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint at ``directory``, or its previous version after a torn swap.

    Args:
        directory: The checkpoint folder (e.g. ``run/last``).

    Returns:
        The folder holding a complete checkpoint, or ``None``.

    Example:
        >>> find_checkpoint("run/last")  # doctest: +SKIP
        PosixPath('run/last')
    """
    target = Path(directory)
    for candidate in (target, target.with_name(f".{target.name}.old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def read_trainer_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``trainer_state.json`` and ``trainer_state.pt`` of a checkpoint.

    Args:
        directory: A checkpoint folder written by :func:`save_checkpoint` with a state.

    Returns:
        ``(state, tensor_state)``.

    Raises:
        CheckpointError: A file is missing or unreadable.

    Example:
        >>> state, tensors = read_trainer_state("run/last")  # doctest: +SKIP
    """
    directory = Path(directory)
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        tensor_state = torch.load(directory / TENSOR_STATE_FILE, weights_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot resume from {directory}: {error}") from None
    return state, tensor_state


def load_model_weights(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Load ``model.safetensors`` of a checkpoint into an already built model.

    Frozen encoder weights left out of the file keep their values (rebuilt from the config).

    Args:
        model: The model, built from the same config.
        directory: The checkpoint folder.

    Raises:
        CheckpointError: The file is missing or corrupt, or its tensors do not fit the model.

    Example:
        >>> load_model_weights(model, "run/last")  # doctest: +SKIP
    """
    state = load_weights(Path(directory) / "model.safetensors")
    expected = model.state_dict()
    bad = [k for k in state if k not in expected or expected[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{directory}: weights do not fit the model: {bad[:5]}")
    model.load_state_dict(state, strict=False)
