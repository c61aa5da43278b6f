"""Where a model runs: the device and the autocast precision, from their config names."""

from __future__ import annotations

from typing import Any

import torch

from fusionkit.errors import ConfigError

__all__ = ["autocast", "inference_dtype", "resolve_device", "resolve_precision"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU.

    Args:
        name: ``auto``, ``cpu`` or ``cuda`` (``cuda:N`` accepted).

    Returns:
        The device.

    Raises:
        ConfigError: CUDA asked for but not available, or an unknown name.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available here; use cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device: expected auto, cpu or cuda, got {name!r}")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (``None`` = float32, no autocast).

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: The training device.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or ``None``. ``auto`` is bfloat16 on CUDA and
        float32 on CPU.

    Raises:
        ConfigError: ``fp16`` on a device other than CUDA (float16 training needs a gradient
            scaler and CUDA kernels; use ``bf16`` or ``fp32`` there).

    Examples:
        >>> resolve_precision("auto", torch.device("cpu")) is None
        True
    """
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision: fp16 needs CUDA, but the device is {device.type}; "
            "use bf16 or fp32 (the default on CPU)"
        )
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def inference_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype that evaluation and prediction use for a run's ``train.precision``.

    As in training (see :func:`resolve_precision`): ``auto`` is bfloat16
    on CUDA and float32 on CPU, ``bf16`` is bfloat16 everywhere. A run trained in ``fp16``
    (CUDA only) is evaluated in float32 on a CPU instead of failing.

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: Where the model runs.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or ``None`` (float32).

    Examples:
        >>> inference_dtype("fp16", "cpu") is None
        True
        >>> inference_dtype("bf16", "cpu")
        torch.bfloat16
    """
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        return None
    return resolve_precision(precision, device)


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context for ``dtype=None``.

    Args:
        device: The device the computation runs on.
        dtype: The autocast dtype from `resolve_precision` (``None`` = float32).

    Returns:
        A context manager.

    Examples:
        >>> with autocast(torch.device("cpu"), None):
        ...     (torch.ones(2) * 2).dtype
        torch.float32
    """
    # A disabled autocast still validates its dtype; bfloat16 is valid on every device.
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
