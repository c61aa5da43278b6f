"""The training forward: encoders (or cached features), augmentation, then the fusion stack."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fusionkit.config import TrainConfig
from fusionkit.device import autocast
from fusionkit.training.augment import drop_modalities, swap_modalities
from fusionkit.training.cache import batch_tokens
from fusionkit.training.distributed import DistContext, unused_parameters, wrap_ddp
from fusionkit.training.evaluate import forward_batch

__all__ = ["CompileFallback", "TrainingForward", "training_module"]

_LOG = logging.getLogger("fusionkit.training")


class CompileFallback:
    """``torch.compile(fn)`` that falls back to ``fn`` for good when compiling fails.

    Compilation is lazy: it can fail when ``torch.compile`` is called or at the first call
    (no C++ compiler, an unsupported operation); a failure is logged once as a warning.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.eager = fn
        self.compiled: Callable[..., Any] | None = None
        try:
            self.compiled = torch.compile(fn)
        except Exception as error:  # any compiler failure means: run eagerly
            self._give_up(error)

    def _give_up(self, error: Exception) -> None:
        self.compiled = None
        _LOG.warning(
            "train.compile: torch.compile failed (%s: %s); training without compilation",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # a genuine error reappears eagerly
                self._give_up(error)
        return self.eager(*args, **kwargs)


class TrainingForward(nn.Module):
    """The training forward as a module, so that DDP can hook it.

    Runs the encoders (or takes cached features of frozen ones) and then the fusion stack,
    compiled with ``train.compile``. The model's own ``forward`` stays eager and its state
    dict unchanged.
    """

    def __init__(self, model: nn.Module, device: torch.device, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.device = device
        self.modality_dropout = config.modality_dropout
        self.modality_swap = config.modality_swap
        self.swap_modality = config.swap_modality
        self.fuse = (
            CompileFallback(model.forward_head) if config.compile else model.forward_head
        )

    def forward(self, batch: Any) -> Any:
        tokens, masks = batch_tokens(self.model, batch, self.device)
        if self.modality_swap and self.swap_modality in tokens:
            tokens, masks = swap_modalities(tokens, masks, self.modality_swap, self.swap_modality)
        if self.modality_dropout:
            masks = drop_modalities(masks, self.modality_dropout)
        return self.fuse(tokens, masks)


def training_module(
    model: Any,
    sources: Any,
    ctx: DistContext,
    device: torch.device,
    config: TrainConfig,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
) -> nn.Module:
    """The training forward, wrapped in DDP under ``torchrun``.

    Parameters that get no gradient from a probe batch are frozen first: they would stall
    DDP's gradient buckets, and AdamW skips them anyway.

    Args:
        model: The model.
        sources: The run's `~fusionkit.training.sources.Sources`.
        ctx: The distributed context.
        device: The training device.
        config: The ``train`` section.
        batch_size: The global batch size.
        autocast_dtype: The autocast dtype (``None`` = float32).

    Returns:
        A module whose ``forward(batch)`` returns the model output.
    """
    module = TrainingForward(model, device, config)
    if not ctx.distributed:
        return module
    source, collate = sources.train, sources.collate
    size = min(len(source), max(2, math.ceil(batch_size / ctx.world_size)))
    probe = collate([source[i] for i in range(size)])

    def probe_loss() -> torch.Tensor:
        with autocast(device, autocast_dtype):
            return model.loss(forward_batch(model, probe, device), probe.targets)

    unused = unused_parameters(model, probe_loss, ctx)
    if unused:
        named = dict(model.named_parameters())
        for name in unused:
            named[name].requires_grad_(False)
        shown = ", ".join(unused[:4]) + (", ..." if len(unused) > 4 else "")
        _LOG.info("%d parameter(s) get no gradient; not synchronised: %s", len(unused), shown)
    return wrap_ddp(module, ctx)

