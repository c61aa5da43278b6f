"""Safe file I/O: atomic writes, safetensors weights, safe YAML.

A leaf module (imports nothing of fusionkit but `fusionkit.errors`). Every file fusionkit
writes goes through `atomic_write`: the content lands in a temporary file in the same
folder, is flushed and fsynced, then renamed over the target, so a run killed at any moment
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fusionkit.errors import CheckpointError, ConfigError

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "load_weights",
    "read_yaml",
    "save_weights",
    "write_json",
    "write_yaml",
]


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(tmp_path)`` fills a temporary file, which then replaces
    ``path``.

    Args:
        path: The target file; its folder is created if needed.
        write: Called with the temporary path to write to.

    Returns:
        The target path.

    Raises:
        OSError: Writing failed (disk full, permissions); the previous file is left untouched
            and the temporary file removed.

    Example:
        >>> atomic_write("out.txt", lambda tmp: tmp.write_text("done"))
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write text (UTF-8) atomically; see `atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON atomically, pretty-printed."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Write YAML atomically (block style, key order kept)."""
    return atomic_write_text(path, yaml.safe_dump(dict(data), sort_keys=False))


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load`` (no arbitrary objects).

    Raises:
        ConfigError: The file is missing, not valid YAML, or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def save_weights(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save tensors as safetensors, atomically.

    Tensors that share memory (tied weights) are stored as separate copies.

    Args:
        path: The ``.safetensors`` file.
        tensors: Name → tensor.
        metadata: String metadata stored in the header.

    Returns:
        The path.
    """
    contiguous = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), dict(metadata or {})))


def load_weights(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupt file is detected by its header check.

    Raises:
        CheckpointError: The file is missing, truncated or not safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({error}); it was not loaded"
        ) from None
