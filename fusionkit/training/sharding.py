"""Sharded training with FSDP2 (``train.strategy: fsdp``) and the checkpoints of a sharded
model; activation checkpointing of the backbones (``train.activation_checkpointing``).

Under ``torchrun`` with ``strategy: fsdp``, :func:`shard_model` applies
``torch.distributed.fsdp.fully_shard`` to every block of every backbone (see
:func:`~fusionkit.encoders.base.backbone_blocks`: a ViT's blocks, a BERT's layers, a CLIP
tower's residual blocks, a CNN's stages), to every layer of the sequence fusion, and then to
the whole model, which keeps what is left (embeddings, projections, modality-wise attention,
heads). Each rank holds ``1 / world_size`` of every parameter, gradient and AdamW state; a
block's full parameters exist only while it runs (all-gathered before, freed after, and again
in the backward pass). Gradients are reduce-scattered as averages, like DDP's all-reduce, so
:func:`~fusionkit.training.distributed.sharded_loss` makes them the single-process gradient
here too. Frozen encoders are sharded as well (FSDP2 allows frozen parameters); the
parameters that get no gradient are frozen first, as for DDP.

The model's two entry points, ``forward_features`` and ``forward_head``, are registered as
FSDP forward methods, so training and validation call them as before.
Every rank must run the same number of forwards (each one all-gathers): validation runs in
lockstep (see :func:`~fusionkit.training.validation.gather_outputs`).

Checkpoints stay the single-process layout: :func:`savable` gathers the full weights on
rank 0 (CPU), :func:`optimizer_state` the full optimizer state keyed by parameter name, and
every rank reads a checkpoint whole and keeps its shard (:func:`load_weights`,
:func:`load_optimizer_state`). ``save_pretrained`` of a sharded run is therefore the same
folder a one-process run writes, loadable by :class:`~fusionkit.serving.Predictor`.

Examples:
    >>> shard_model(model, ctx, torch.bfloat16)  # doctest: +SKIP
    21
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from fusionkit.encoders.base import backbone_blocks
from fusionkit.errors import CheckpointError
from fusionkit.runs import load_model_weights
from fusionkit.training.distributed import DistContext

__all__ = [
    "GatheredModel",
    "checkpoint_blocks",
    "full_module_state",
    "is_sharded",
    "load_optimizer_state",
    "load_weights",
    "mixed_precision",
    "optimizer_state",
    "savable",
    "set_full_weights",
    "shard_model",
    "shard_units",
]

_LOG = logging.getLogger("fusionkit.training")

#: The model methods that run its sub-modules: FSDP all-gathers the root's parameters for them.
FORWARD_METHODS = ("forward_features", "forward_head")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_model` sharded ``model``.

    Args:
        model: Any module.

    Returns:
        ``True`` for a model whose parameters are FSDP shards.

    Examples:
        >>> is_sharded(nn.Linear(2, 2))
        False
    """
    return isinstance(model, FSDPModule)


def _resharded(model: Any) -> Any:
    """``model`` with every FSDP group back in its sharded parameters.

    A forward without backward (validation) leaves the root group gathered, its module
    holding the full parameters instead of the sharded ones the optimizer knows.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _unique(modules: Any) -> list[nn.Module]:
    """Modules in order, each once (an encoder shared by two inputs is listed twice)."""
    seen: dict[int, nn.Module] = {}
    for module in modules:
        seen.setdefault(id(module), module)
    return list(seen.values())


def shard_units(model: Any) -> list[nn.Module]:
    """The modules :func:`shard_model` shards one by one before the whole model.

    Args:
        model: A :class:`~fusionkit.models.CMACLIP`.

    Returns:
        The blocks of every encoder, then the layers of the sequence fusion (if any).

    Examples:
        >>> len(shard_units(model))  # doctest: +SKIP
        14
    """
    units = [b for e in _unique(model.encoders().values()) for b in backbone_blocks(e)]
    if getattr(model, "sequence_fusion", None) is not None:
        units += backbone_blocks(model.sequence_fusion, minimum=1)
    return units


def mixed_precision(dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """FSDP's mixed precision for ``train.precision``.

    Args:
        dtype: The run's autocast dtype (``None`` = float32).

    Returns:
        Parameters all-gathered and computed in ``dtype``, gradients reduced in float32
        (the sharded master weights and AdamW states stay float32); all float32 for ``None``.
        :func:`shard_model` keeps the groups that hold batch norms in float32 (their running
        statistics are float32 buffers), under autocast like the rest.

    Examples:
        >>> mixed_precision(torch.bfloat16).param_dtype
        torch.bfloat16
    """
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _has_batch_norm(modules: Any) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)


def shard_model(model: Any, ctx: DistContext, dtype: torch.dtype | None = None) -> int:
    """Shard ``model`` in place with FSDP2: every unit of :func:`shard_units`, then the model.

    Call it after the model is on its device and holds its starting weights (a resume loads
    them first), and build the optimizer afterwards: sharding replaces the parameters.

    Args:
        model: A :class:`~fusionkit.models.CMACLIP` (any module with ``encoders()``).
        ctx: A distributed context (the default process group is used).
        dtype: The autocast dtype of ``train.precision`` (see :func:`mixed_precision`).

    Returns:
        The number of units sharded before the model itself.

    Examples:
        >>> shard_model(model, ctx)  # doctest: +SKIP
        14
    """
    # The encoders' tokens are views (a transpose, a slice); fusionkit never writes into them
    # in place, the one case in which FSDP's warning about views matters.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # FSDP2 shards contiguous parameters only: channels_last convolution weights go back to
    # the default layout; the images stay channels_last, which is what picks the NHWC kernels.
    for parameter in model.parameters():
        if not parameter.is_contiguous():
            parameter.data = parameter.data.contiguous()
    policy, full = mixed_precision(dtype), MixedPrecisionPolicy()
    units = shard_units(model)
    inside = {id(m) for unit in units for m in unit.modules()}
    for unit in units:
        fully_shard(unit, mp_policy=full if _has_batch_norm(unit.modules()) else policy)
    rest = (m for m in model.modules() if id(m) not in inside)
    fully_shard(model, mp_policy=full if _has_batch_norm(rest) else policy)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    _LOG.info(
        "FSDP: %d blocks and the model sharded over %d processes", len(units), ctx.world_size
    )
    return len(units)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def checkpoint_blocks(model: Any) -> int:
    """Recompute every block of the trainable encoders in the backward pass.

    Each block's ``forward`` becomes ``torch.utils.checkpoint.checkpoint(forward, ...)``
    (non-reentrant, random state preserved: dropout draws the same masks again), so only
    the blocks' inputs are kept. Parameter names and the state dict do not change. Frozen
    encoders keep nothing for the backward pass anyway and are left alone.

    Args:
        model: A model with ``encoders()``.

    Returns:
        The number of blocks wrapped.

    Examples:
        >>> checkpoint_blocks(model)  # doctest: +SKIP
        12
    """
    count = 0
    for encoder in _unique(model.encoders().values()):
        if getattr(encoder, "frozen", False):
            continue
        for block in backbone_blocks(encoder):
            block.forward = _checkpointed(block.forward)
            count += 1
    return count


class GatheredModel:
    """A sharded model's full weights, gathered on rank 0, saved as the model saves itself.

    :func:`~fusionkit.runs.save_checkpoint` calls ``save_pretrained`` on it as on a model.

    Args:
        model: The sharded model.
        state: Its full state dict (CPU tensors).
    """

    def __init__(self, model: Any, state: Mapping[str, Tensor]) -> None:
        self.model = model
        self.state = dict(state)

    def save_pretrained(
        self, directory: str | os.PathLike[str], *, include_frozen: bool = True
    ) -> Path:
        """Write the gathered weights with the model's config.

        Args:
            directory: Target folder.
            include_frozen: Also store frozen encoder weights.

        Returns:
            The folder (see :meth:`~fusionkit.models.CMACLIP.save_pretrained`).
        """
        return self.model.save_pretrained(
            directory, include_frozen=include_frozen, state_dict=self.state
        )


def savable(model: Any) -> Any:
    """What rank 0 hands to ``save_checkpoint``: the model, or its gathered full weights.

    Every rank must call it for a sharded model (the gather is collective).

    Args:
        model: The model, sharded or not.

    Returns:
        ``model`` itself, or a :class:`GatheredModel` (its weights empty on ranks above 0).

    Examples:
        >>> saved = savable(model)  # doctest: +SKIP
        >>> if ctx.is_main:  # doctest: +SKIP
        ...     save_checkpoint("run/best", saved, include_frozen=True)
    """
    if not is_sharded(model):
        return model
    return GatheredModel(model, get_model_state_dict(_resharded(model), options=_FULL))


def optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state to checkpoint; every rank must call it for a sharded model.

    Args:
        model: The model the optimizer trains.
        optimizer: The optimizer.

    Returns:
        ``optimizer.state_dict()``, or for a sharded model the full state gathered on rank 0
        (CPU tensors), keyed by parameter name instead of position.

    Examples:
        >>> tensor_state = {"optimizer": optimizer_state(model, optimizer)}  # doctest: +SKIP
    """
    if not is_sharded(model):
        return optimizer.state_dict()
    return get_optimizer_state_dict(_resharded(model), optimizer, options=_FULL)


def _keyed_by_name(state: Mapping[str, Any]) -> bool:
    groups = state.get("param_groups") or []
    return any(isinstance(p, str) for group in groups for p in group.get("params", []))


def load_optimizer_state(
    model: Any, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Load what :func:`optimizer_state` returned (on every rank, each reading it whole).

    Args:
        model: The model (sharded or not).
        optimizer: Its optimizer.
        state: The checkpoint's optimizer state.

    Raises:
        CheckpointError: A sharded model and a state keyed by position (written by a DDP or
            one-process run, whose optimizer also holds the parameters FSDP leaves out).

    Examples:
        >>> load_optimizer_state(model, optimizer, tensors["optimizer"])  # doctest: +SKIP
    """
    if _keyed_by_name(state):
        # Not strict: a parameter that never had a gradient (a task without labels so far)
        # has no AdamW state, as in ``optimizer.state_dict()``.
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(_resharded(model), optimizer, dict(state), options=options)
    elif is_sharded(model):
        raise CheckpointError(
            "the checkpoint's optimizer state was written by a ddp or one-process run; "
            "resume it with train.strategy: ddp (strategy: fsdp resumes fsdp checkpoints)"
        )
    else:
        optimizer.load_state_dict(dict(state))


class _FullStateTarget:
    """A sharded model as :func:`~fusionkit.runs.load_model_weights` sees it: a full state
    dict goes in, every rank keeps its shard."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return _resharded(self.model).state_dict()  # DTensors: their shapes are the full ones

    def load_state_dict(self, state: Mapping[str, Tensor], strict: bool = False) -> None:
        options = StateDictOptions(full_state_dict=True, strict=strict)
        set_model_state_dict(_resharded(self.model), dict(state), options=options)


def load_weights(model: Any, directory: str | os.PathLike[str]) -> None:
    """:func:`~fusionkit.runs.load_model_weights` for a sharded model too.

    Args:
        model: The model, sharded or not.
        directory: A checkpoint folder.

    Raises:
        CheckpointError: See :func:`~fusionkit.runs.load_model_weights`.

    Examples:
        >>> load_weights(model, "runs/fsdp/best")  # doctest: +SKIP
    """
    load_model_weights(_FullStateTarget(model) if is_sharded(model) else model, directory)


def full_module_state(model: Any, module: nn.Module) -> dict[str, Tensor]:
    """The full state dict of ``module``, a part of ``model``, as CPU tensors on every rank.

    For a sharded model every rank must call it (each sharded tensor is all-gathered).

    Args:
        model: The model ``module`` belongs to, sharded or not.
        module: A sub-module of ``model`` (e.g. its unimodal heads).

    Returns:
        Parameter and buffer name (relative to ``module``) → full tensor.

    Examples:
        >>> state = full_module_state(model, model.unimodal)  # doctest: +SKIP
    """
    _resharded(model)
    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        for name, value in module.state_dict().items()
    }


def set_full_weights(model: Any, state: Mapping[str, Tensor]) -> None:
    """Load some of ``model``'s weights from full tensors; a sharded model keeps its shards.

    Args:
        model: The model, sharded or not.
        state: Parameter or buffer name (relative to ``model``) → full tensor; the others
            are left as they are.

    Examples:
        >>> set_full_weights(model, {"head.heads.color.weight": w})  # doctest: +SKIP
    """
    (_FullStateTarget(model) if is_sharded(model) else model).load_state_dict(
        dict(state), strict=False
    )
