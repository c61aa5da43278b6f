"""Safe file I/O: atomic writes, safetensors weights, safe YAML.

A leaf module (imports nothing of fusionkit but `fusionkit.errors`). Every file fusionkit
writes goes through `atomic_write`: the content lands in a temporary file in the same
folder, is flushed and fsynced, then renamed over the target, so a run killed at any moment
leaves either the old file or the new one, never half of one.

A checkpoint folder also holds ``checksums.json`` (`write_checksums`): the SHA-256 of each of its
files, checked by `verify_checksums` before anything is loaded, so a bit flip inside tensor data
(which the safetensors header check cannot see) is an error, not silently wrong weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fusionkit.errors import CheckpointError, ConfigError, StorageError

__all__ = [
    "CHECKSUM_FILE",
    "atomic_write",
    "atomic_write_text",
    "file_sha256",
    "load_weights",
    "read_yaml",
    "save_weights",
    "verify_checksums",
    "write_checksums",
    "write_json",
    "write_yaml",
]

#: The file of a checkpoint folder that lists the SHA-256 of the other files.
CHECKSUM_FILE = "checksums.json"
_HASH_CHUNK = 1 << 20


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
        StorageError: Writing failed (disk full, permissions); the previous file is left
            untouched and the temporary file removed. It is an `OSError` with the original
            ``errno``.

    Examples:
        >>> atomic_write("out.txt", lambda tmp: tmp.write_text("done"))
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
        )
    except OSError as error:
        raise _storage_error(target, error) from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _storage_error(target, error) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def _storage_error(target: Path, error: OSError) -> StorageError:
    if isinstance(error, StorageError):
        return error
    reason = error.strerror or str(error)
    return StorageError(
        error.errno, f"cannot write {target}: {reason}; the previous version is left untouched"
    )


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
        ConfigError: The file is missing, not UTF-8, not valid YAML (including any
            ``!!python/...`` tag: nothing but plain data is ever constructed), or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text ({error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        # Also a tag such as !!python/object/apply: safe_load constructs plain data only.
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path} nests too deeply to be a config") from None
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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, as hex, read in chunks (memory stays flat for big files).

    Args:
        path: The file.

    Returns:
        64 hex digits.

    Raises:
        OSError: The file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: str | os.PathLike[str], names: Iterable[str]) -> Path:
    """Write ``folder/checksums.json``: the SHA-256 of each named file of ``folder``.

    Args:
        folder: The checkpoint folder.
        names: File names inside ``folder`` to cover; they must exist.

    Returns:
        The path of ``checksums.json``.

    Raises:
        StorageError: The file cannot be written.

    Examples:
        >>> write_checksums("run/best", ["model.safetensors", "config.yaml"])
    """
    folder = Path(folder)
    sums = {name: file_sha256(folder / name) for name in sorted(names)}
    return write_json(folder / CHECKSUM_FILE, {"algorithm": "sha256", "files": sums})


def verify_checksums(folder: str | os.PathLike[str], names: Iterable[str]) -> bool:
    """Check named files of ``folder`` against its ``checksums.json``.

    A folder without ``checksums.json`` (written before checksums existed) passes unchecked;
    a named file the list does not cover passes too, so a caller may name every file it
    reads.

    Args:
        folder: The checkpoint folder.
        names: File names inside ``folder`` to check.

    Returns:
        Whether a checksum list was found (and every listed file matched).

    Raises:
        CheckpointError: ``checksums.json`` is unreadable, or a file is missing or its SHA-256
            differs (a corrupt or tampered file); the message names the file.

    Examples:
        >>> verify_checksums("run/best", ["model.safetensors"])
        True
    """
    folder = Path(folder)
    listing = folder / CHECKSUM_FILE
    if not listing.is_file():
        return False
    try:
        data = json.loads(listing.read_text(encoding="utf-8"))
        sums = data["files"]
        if data.get("algorithm") != "sha256" or not isinstance(sums, dict):
            raise ValueError("not a sha256 file list")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{listing} is corrupt ({error}); the checkpoint was not loaded"
        ) from None
    for name in names:
        expected = sums.get(name)
        if expected is None:
            continue
        path = folder / name
        try:
            actual = file_sha256(path)
        except OSError as error:
            raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
        if actual != expected:
            raise CheckpointError(
                f"{path} is corrupt or truncated: its SHA-256 does not match "
                f"{CHECKSUM_FILE} (a damaged or modified file); it was not loaded"
            )
    return True
