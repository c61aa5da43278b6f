"""The accelerator paths: batches copied from pinned memory without blocking, evaluation and
prediction in the run's precision, ``channels_last`` CNN backbones.

On CUDA every DataLoader of training and evaluation pins its batches and :func:`to_device`
copies them with ``non_blocking=True``; the model runs under the autocast of
``train.precision`` in training, validation, ``fusionkit evaluate`` and the
:class:`~fusionkit.serving.Predictor` alike (:func:`~fusionkit.device.inference_dtype`,
:func:`~fusionkit.runs.run_precision`); CNN image encoders
run in ``channels_last`` on CUDA (``train.channels_last``, :func:`apply_channels_last`).
On a CPU all of this is a no-op unless asked for (``bf16``, ``channels_last: true``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fusionkit.training.cache import FeatureBatch

__all__ = ["apply_channels_last", "to_device"]


def to_device(batch: Any, device: torch.device | str) -> Any:
    """A data batch or cached-feature batch with its tensors on ``device``.

    Copies are ``non_blocking``: from pinned host memory (``DataLoader(pin_memory=True)``,
    which fusionkit sets on CUDA) they overlap with the computation.

    Args:
        batch: A :class:`~fusionkit.data.Batch` or a
            :class:`~fusionkit.training.cache.FeatureBatch`.
        device: The target device.

    Returns:
        The batch on ``device`` (the same object when there is nothing to move).

    Examples:
        >>> batch = to_device(batch, "cuda")  # doctest: +SKIP
    """
    device = torch.device(device)
    if isinstance(batch, FeatureBatch):

        def move(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {k: t.to(device, non_blocking=True) for k, t in tensors.items()}

        inputs = batch.inputs.to(device, non_blocking=True) if batch.inputs is not None else None
        return dataclasses.replace(batch, tokens=move(batch.tokens), masks=move(batch.masks),
                                   targets=move(batch.targets), inputs=inputs)
    if hasattr(batch, "to"):
        return batch.to(device, non_blocking=True)
    return batch






def apply_channels_last(model: Any, setting: bool | str, device: torch.device) -> list[str]:
    """Switch the CNN image encoders to ``channels_last`` (``train.channels_last``).

    Args:
        model: The model.
        setting: ``True``, ``False`` or ``"auto"`` (on CUDA only).
        device: The training device.

    Returns:
        The inputs whose encoder was switched.

    Examples:
        >>> apply_channels_last(model, True, torch.device("cpu"))  # doctest: +SKIP
        ['image']
    """
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return []
    switched = []
    for name, encoder in model.encoders().items():
        if getattr(encoder, "convolutional", False) and hasattr(encoder, "use_channels_last"):
            encoder.use_channels_last()
            switched.append(name)
    return switched
