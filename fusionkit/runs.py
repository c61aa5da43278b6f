"""The run folder and checkpoint layout, in one place: what a run writes and where.

A run folder holds:

- ``config.yaml``: the resolved run config (`CONFIG_FILE`);
- ``metrics.jsonl``: one JSON line per finished epoch (`METRICS_FILE`);
- ``val_report.json``: the validation report of ``best/`` (`VAL_REPORT_FILE`);
- ``report.json``: written by ``fusionkit evaluate`` (`report_path`);
- ``replicas.json``: the parameter digests of every distributed rank (`REPLICAS_FILE`);
- ``tensorboard/``: TensorBoard event files of the per-epoch metrics (`TENSORBOARD_DIR`);
- ``curves.png``: loss, accuracy and modality-weight curves over the epochs (`CURVES_FILE`);
- ``best/`` and ``last/``: checkpoint folders (`BEST`, `LAST`; `resolve_run_dir` picks one).

A checkpoint folder (``best/`` or ``last/``) holds ``config.yaml`` and ``model.safetensors``
(loadable with :meth:`~fusionkit.models.CMACLIP.from_pretrained`) and, for resuming,
``trainer_state.json`` (epoch, step, history, best score) and ``trainer_state.pt`` (optimizer,
scheduler and RNG states; read back with ``torch.load(weights_only=True)`` only).

Each file is written atomically, and the folder as a whole is swapped in: the new checkpoint is
written to ``.<name>.new/``, the old folder renamed to ``.<name>.old/``, the new one renamed into
place, then the old one removed. Only a complete folder is ever renamed into place (it holds
``trainer_state.json``); :func:`find_checkpoint` falls back to ``.<name>.old/`` if a kill hit
between the renames.

``checksums.json`` lists the SHA-256 of every other file; the loaders check it first, so a
damaged file is refused with :class:`~fusionkit.errors.CheckpointError` before it is parsed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusionkit.errors import CheckpointError
from fusionkit.io import (
    atomic_write,
    load_weights,
    read_yaml,
    verify_checksums,
    write_checksums,
    write_json,
)

__all__ = [
    "BEST",
    "CONFIG_FILE",
    "CURVES_FILE",
    "LAST",
    "METRICS_FILE",
    "REPLICAS_FILE",
    "STATE_FILE",
    "TENSORBOARD_DIR",
    "TENSOR_STATE_FILE",
    "VAL_REPORT_FILE",
    "find_checkpoint",
    "load_model_weights",
    "read_trainer_state",
    "report_path",
    "resolve_run_dir",
    "run_config_path",
    "run_folder",
    "run_precision",
    "save_checkpoint",
]

BEST, LAST = "best", "last"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
REPLICAS_FILE = "replicas.json"
VAL_REPORT_FILE = "val_report.json"
REPORT_FILE = "report.json"
STATE_FILE = "trainer_state.json"
TENSOR_STATE_FILE = "trainer_state.pt"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"
_WEIGHTS_FILE = "model.safetensors"
_MODEL_FILES = (_WEIGHTS_FILE, CONFIG_FILE)


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

    Raises:
        StorageError: A file cannot be written (e.g. the disk is full); the previous
            checkpoint at ``directory`` is left as it was.

    Examples:
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
    written = [*_MODEL_FILES, STATE_FILE]
    if tensor_state is not None:
        written.append(TENSOR_STATE_FILE)
    write_checksums(new, written)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    # Without ``target``, ``old`` is what a torn swap left: the only complete checkpoint, so it
    # is removed only once the new one is in place.
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def find_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint at ``directory``, or its previous version after a torn swap.

    Args:
        directory: The checkpoint folder (e.g. ``run/last``).

    Returns:
        The folder holding a complete checkpoint, or ``None``.

    Examples:
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
        CheckpointError: A file is missing, unreadable, damaged (its SHA-256 differs from
            ``checksums.json``), or holds anything but plain tensors and containers:
            ``trainer_state.pt`` is read with ``torch.load(weights_only=True)``, which refuses
            to unpickle arbitrary objects instead of running their code.

    Examples:
        >>> state, tensors = read_trainer_state("run/last")  # doctest: +SKIP
    """
    directory = Path(directory)
    verify_checksums(directory, [STATE_FILE, TENSOR_STATE_FILE])
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        tensor_state = torch.load(
            directory / TENSOR_STATE_FILE, map_location="cpu", weights_only=True
        )
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"cannot resume from {directory}: {TENSOR_STATE_FILE} holds objects other than "
            f"tensors and plain containers, which fusionkit never unpickles ({error})"
        ) from None
    except (OSError, ValueError, RuntimeError, EOFError) as error:
        raise CheckpointError(f"cannot resume from {directory}: {error}") from None
    for name, loaded in ((STATE_FILE, state), (TENSOR_STATE_FILE, tensor_state)):
        if not isinstance(loaded, dict):
            raise CheckpointError(
                f"cannot resume from {directory}: {name} holds a {type(loaded).__name__}, "
                "not a mapping"
            )
    return state, tensor_state


def load_model_weights(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Load ``model.safetensors`` of a checkpoint into an already built model.

    Frozen encoder weights left out of the file keep their values (rebuilt from the config).

    Args:
        model: The model, built from the same config.
        directory: The checkpoint folder.

    Raises:
        CheckpointError: The file is missing or corrupt (its SHA-256 differs from
            ``checksums.json``, or its safetensors header is damaged), or its tensors do not
            fit the model.

    Examples:
        >>> load_model_weights(model, "run/last")  # doctest: +SKIP
    """
    verify_checksums(directory, [_WEIGHTS_FILE])
    state = load_weights(Path(directory) / _WEIGHTS_FILE)
    expected = model.state_dict()
    bad = [k for k in state if k not in expected or expected[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{directory}: weights do not fit the model: {bad[:5]}")
    model.load_state_dict(state, strict=False)


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
    if (folder / _WEIGHTS_FILE).is_file():
        return folder
    for name in (BEST, LAST):
        if (folder / name).is_dir():
            return folder / name
    return folder


def run_config_path(checkpoint: str | os.PathLike[str]) -> Path:
    """The run config of the run that wrote a checkpoint: its run folder's ``config.yaml``.

    Args:
        checkpoint: A checkpoint folder (``run/best``, ``run/last``) or a run folder.

    Returns:
        ``run/config.yaml`` (it may not exist: a checkpoint copied out of its run).

    Examples:
        >>> run_config_path("runs/q/best").as_posix()
        'runs/q/config.yaml'
    """
    return run_folder(checkpoint) / CONFIG_FILE


def report_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where ``fusionkit evaluate`` writes the report of a checkpoint: its run's ``report.json``.

    Args:
        checkpoint: A checkpoint folder (``run/best``, ``run/last``) or any other folder.

    Returns:
        ``run/report.json`` for ``run/best`` or ``run/last``, else ``checkpoint/report.json``.

    Examples:
        >>> report_path("runs/q/best").as_posix()
        'runs/q/report.json'
    """
    return run_folder(checkpoint) / REPORT_FILE


def run_folder(checkpoint: str | os.PathLike[str]) -> Path:
    """The run folder of a checkpoint: the parent of ``best/`` or ``last/``, else itself.

    Examples:
        >>> run_folder("runs/q/last").as_posix(), run_folder("exported").as_posix()
        ('runs/q', 'exported')
    """
    folder = Path(checkpoint)
    return folder.parent if folder.name in (BEST, LAST) else folder


def run_precision(checkpoint: str | os.PathLike[str]) -> str:
    """The ``train.precision`` of the run that wrote ``checkpoint`` (``auto`` if unknown).

    Args:
        checkpoint: A checkpoint folder or a run folder.

    Returns:
        ``auto``, ``fp32``, ``bf16`` or ``fp16``.

    Examples:
        >>> run_precision("runs/quickstart/best")  # doctest: +SKIP
        'auto'
    """
    folder = resolve_run_dir(checkpoint)
    for path in (run_config_path(folder), folder / CONFIG_FILE):
        if path.is_file():
            section = read_yaml(path).get("train")
            if isinstance(section, Mapping) and isinstance(section.get("precision"), str):
                return str(section["precision"])
    return "auto"
