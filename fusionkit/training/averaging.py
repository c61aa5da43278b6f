"""An exponential moving average (EMA) of the trained weights, validated and kept as ``best/``.

With ``train.ema_decay: d`` (``0 < d < 1``), :class:`WeightAverage` follows every trainable
parameter of the model after each optimizer step::

    average = average + (1 - decay_t) * (parameter - average)

with ``decay_t = min(d, (1 + t) / (10 + t))`` at update ``t``: a warm-up, so that the average
does not hold on to the random initial heads. It lasts ``(10d - 1) / (1 - d)`` updates (290
for ``d = 0.97``, 890 for 0.99), which on a small data set can be the whole run.

At the end of every epoch the trainer swaps the average into the model
(:meth:`WeightAverage.swapped`), validates it, saves it as ``best/`` when it is the best so
far, and swaps the trained weights back to go on training. The averaged weights are therefore
what the run's reports, ``best/`` and the blend describe; ``last/`` holds the trained weights
and the average beside them, so a resume continues both.

Only trainable parameters are averaged: frozen encoders do not move, and batch norm
statistics of trainable CNN backbones are the trained model's. A sharded model
(``train.strategy: fsdp``) is refused (see :func:`weight_average`).

Examples:
    >>> layer = torch.nn.Linear(2, 1)
    >>> average = WeightAverage(layer, decay=0.9)
    >>> average.update()
    >>> average.updates
    1
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fusionkit.errors import CheckpointError, ConfigError
from fusionkit.training.sharding import is_sharded

__all__ = ["WeightAverage", "weight_average"]


class WeightAverage:
    """The moving average of a model's trainable parameters.

    Args:
        model: The model being trained; its parameters with ``requires_grad`` at this call are
            the ones averaged.
        decay: The decay ``d`` of the average, in ``(0, 1)``: the average spans about
            ``1 / (1 - d)`` of the last updates.

    Raises:
        ConfigError: ``decay`` outside ``(0, 1)``, or a model without trainable parameters.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> average = WeightAverage(model, decay=0.99)
        >>> with average.swapped():
        ...     pass  # validate the averaged weights here
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ConfigError("train.ema_decay: the model has no trainable parameter to average")
        self.averages = [p.detach().clone() for p in self.parameters]
        self.updates = 0

    def current_decay(self) -> float:
        """The decay of the next update: ``min(d, (1 + t) / (10 + t))`` after ``t`` updates."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current parameters (after an optimizer step)."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.averages, self.parameters, weight)  # under no_grad
        self.updates += 1

    @torch.no_grad()
    def _exchange(self) -> None:
        for parameter, average in zip(self.parameters, self.averages, strict=True):
            held = parameter.detach().clone()
            parameter.copy_(average)
            average.copy_(held)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block, the model holds the averaged weights; after it, its own again.

        The exchange is exact (copies, no arithmetic), so training goes on bit for bit.
        """
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    def state_dict(self) -> dict[str, Any]:
        """The averages and the update count, for ``last/``."""
        return {"decay": self.decay, "updates": self.updates,
                "averages": [a.detach().cpu() for a in self.averages]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (on a resume).

        Raises:
            CheckpointError: The saved averages do not match the model's trainable parameters.
        """
        averages = state["averages"]
        shapes = [tuple(a.shape) for a in averages]
        expected = [tuple(p.shape) for p in self.parameters]
        if shapes != expected:
            raise CheckpointError(
                f"the checkpoint's weight average has {len(shapes)} tensors that do not match "
                f"the model's {len(expected)} trainable parameters; was it saved by another "
                "model or with other encoders frozen?"
            )
        for average, saved in zip(self.averages, averages, strict=True):
            average.copy_(saved)
        self.updates = int(state["updates"])


def weight_average(model: nn.Module, decay: float) -> WeightAverage | None:
    """The run's moving average for ``train.ema_decay``: ``None`` when ``decay`` is 0.

    Args:
        model: The model as it trains (after any parameter was frozen).
        decay: ``train.ema_decay``.

    Returns:
        A :class:`WeightAverage` over the trainable parameters, or ``None``.

    Raises:
        ConfigError: ``decay`` outside ``[0, 1)``, or a sharded model (``strategy: fsdp``).

    Examples:
        >>> weight_average(torch.nn.Linear(2, 2), 0.0) is None
        True
    """
    if not decay:
        return None
    if is_sharded(model):
        raise ConfigError("train.ema_decay is not supported with train.strategy: fsdp; use "
                          "strategy: ddp or ema_decay: 0")
    return WeightAverage(model, decay)
