"""The training forward: encoders (or cached features), augmentation, then the fusion stack,
replicated with DDP or sharded with FSDP under ``torchrun``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fusionkit.config import TrainConfig
from fusionkit.device import autocast
from fusionkit.training.accelerator import to_device
from fusionkit.training.augment import drop_modalities, swap_modalities
from fusionkit.training.cache import batch_tokens
from fusionkit.training.distributed import DistContext, unused_parameters, wrap_ddp
from fusionkit.training.evaluate import forward_batch
from fusionkit.training.sharding import checkpoint_blocks, shard_model

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
        self.compiled = CompileFallback(model.forward_head) if config.compile else None

    def forward(self, batch: Any) -> Any:
        tokens, masks = batch_tokens(self.model, to_device(batch, self.device), self.device)
        if self.modality_swap and self.swap_modality in tokens:
            tokens, masks = swap_modalities(tokens, masks, self.modality_swap, self.swap_modality)
        if self.modality_dropout:
            masks = drop_modalities(masks, self.modality_dropout)
        # Looked up per call: FSDP replaces the model's forward_head with one that gathers.
        return (self.compiled or self.model.forward_head)(tokens, masks)


def training_module(
    model: Any,
    sources: Any,
    ctx: DistContext,
    device: torch.device,
    config: TrainConfig,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
) -> nn.Module:
    """The training forward, wrapped in DDP, or over a model sharded with FSDP, under
    ``torchrun`` (``train.strategy``).

    Parameters that get no gradient from a probe batch are frozen first: they would stall
    DDP's gradient buckets, and AdamW skips them anyway. With ``strategy: fsdp`` the model is
    sharded in place (see :func:`~fusionkit.training.sharding.shard_model`): build the
    optimizer after this call. ``train.activation_checkpointing`` wraps the blocks of the
    trainable backbones first (see :func:`~fusionkit.training.sharding.checkpoint_blocks`).

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
    if config.activation_checkpointing:
        count = checkpoint_blocks(model)
        _LOG.info("activation checkpointing: %d backbone blocks recomputed in backward", count)
    if not ctx.distributed:
        if config.strategy == "fsdp":
            _LOG.info("train.strategy fsdp in one process: nothing to shard; training unsharded")
        return TrainingForward(model, device, config)
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
    if config.strategy == "fsdp":
        shard_model(model, ctx, autocast_dtype)
        return TrainingForward(model, device, config)
    return wrap_ddp(TrainingForward(model, device, config), ctx)

