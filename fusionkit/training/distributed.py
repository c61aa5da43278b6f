"""Data-parallel training under ``torchrun``: process group, batch shards, exact loss scaling.

:class:`~fusionkit.training.Trainer` calls :func:`init_distributed`; when ``torchrun`` started
the process (``WORLD_SIZE`` > 1) it joins the process group from the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL on CUDA, gloo on CPU.
Without ``torchrun`` every helper here is a no-op on a one-process :class:`DistContext`.

The pieces that make a distributed run equal a single-process run with the same
``data.batch_size``:

- ``data.batch_size`` is the *global* batch. Epoch ``e``'s permutation is the same on every
  rank; each global batch is cut into :func:`shard` pieces, one per rank.
- :func:`sharded_loss` scales each rank's loss so that DDP's gradient *average* is the gradient
  of the global batch's loss, also when ranks hold different numbers of labelled samples per
  task (missing labels, uneven last batch).
- Parameters that never receive a gradient (a Hugging Face BERT's pooler, a timm classifier's
  norm) are found once by :func:`unused_parameters` and frozen before DDP wraps the model, so
  DDP runs with ``find_unused_parameters=False``.

Examples:
    >>> ctx = init_distributed(torch.device("cpu"))
    >>> ctx.world_size, ctx.is_main
    (1, True)
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fusionkit.errors import TrainingError
from fusionkit.heads import hide_labels
from fusionkit.io import write_json
from fusionkit.tasks import MISSING_LABEL

__all__ = [
    "DistContext",
    "all_gather_objects",
    "barrier",
    "check_replicas",
    "env_rank",
    "init_distributed",
    "local_main_first",
    "mask_targets",
    "parameters_digest",
    "shard",
    "sharded_loss",
    "shutdown",
    "unused_parameters",
    "wrap_ddp",
]

_LOG = logging.getLogger("fusionkit.training")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) data-parallel run.

    Attributes:
        rank: Global rank (``RANK``).
        world_size: Number of processes (``WORLD_SIZE``).
        local_rank: Rank on this node (``LOCAL_RANK``); picks the CUDA device.
        device: The device this rank trains on.
        owns_group: Whether :func:`init_distributed` created the process group (and
            :func:`shutdown` should destroy it).

    Examples:
        >>> DistContext(0, 1, 0, torch.device("cpu")).distributed
        False
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, metrics and progress bars."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: the process that fills this node's feature cache."""
        return self.local_rank == 0


def env_rank() -> int:
    """The global rank ``torchrun`` gave this process (0 without ``torchrun``).

    Returns:
        ``int(RANK)`` or 0.

    Examples:
        >>> env_rank()
        0
    """
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: torch.device) -> DistContext:
    """Join the ``torchrun`` process group, or describe a single process.

    Args:
        device: The configured device; a CUDA device becomes ``cuda:LOCAL_RANK``.

    Returns:
        The context. With ``WORLD_SIZE`` > 1 the default process group is initialised from
        the environment (``env://``) unless the caller already did.

    Examples:
        >>> init_distributed(torch.device("cpu")).world_size
        1
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistContext(0, 1, 0, device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it.

    Args:
        ctx: The context.
    """
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process).

    Args:
        ctx: The context.
    """
    if ctx.distributed:
        # NCCL needs to know the device, or it guesses one per rank and warns.
        device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        dist.barrier(device_ids=device_ids)


@contextmanager
def local_main_first(ctx: DistContext) -> Iterator[None]:
    """Run the block on local rank 0 first, then on the other ranks.

    Used to fill the feature cache once per node: local rank 0 encodes and stores the
    features, the others then find them in the cache. Every rank must enter the block.

    Args:
        ctx: The context.

    Examples:
        >>> with local_main_first(ctx):
        ...     features = encode_dataset(model, dataset, cache_dir, key)  # doctest: +SKIP
    """
    if not ctx.is_local_main:
        barrier(ctx)
    yield
    if ctx.is_local_main:
        barrier(ctx)


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order.

    Args:
        ctx: The context.
        obj: This rank's object (tensors should be on the CPU).

    Returns:
        ``[obj_rank0, obj_rank1, ...]``; ``[obj]`` in a single process.
    """
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(indices: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's contiguous share of a global batch (sizes differ by at most one).

    Args:
        indices: The global batch's sample indices.
        ctx: The context.

    Returns:
        The indices this rank trains on; empty when the batch has fewer samples than ranks.

    Examples:
        >>> shard(list(range(5)), DistContext(1, 2, 1, torch.device("cpu")))
        [3, 4]
    """
    base, extra = divmod(len(indices), ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return list(indices[start : start + base + (ctx.rank < extra)])


def mask_targets(targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The same targets with every label marked missing (a placeholder batch's targets).

    Args:
        targets: Task → class indices ``(B,)`` or multi-hot ``(B, C)``.

    Returns:
        Task → ``-100`` everywhere (single-label) or NaN everywhere (multi-label).
    """
    return hide_labels(targets)


def _task_denominator(target: Tensor, spec: Any, class_weight: Tensor | None) -> Tensor:
    """What :func:`~fusionkit.heads.task_loss` divides its summed loss by, for this batch."""
    if spec.multi_label:
        kept = ~target.isnan().any(dim=1)
        return kept.sum().to(torch.float64) * target.shape[1]
    kept = target != MISSING_LABEL
    if class_weight is None:
        return kept.sum().to(torch.float64)
    return class_weight.to(target.device, torch.float64)[target[kept]].sum()


def sharded_loss(
    head: Any,
    logits: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    ctx: DistContext,
    class_weights: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """This rank's loss, scaled so that averaging gradients over ranks gives the global one.

    The single-process loss of a global batch is ``sum_t w_t * S_t / D_t`` with ``S_t`` the
    summed per-sample loss of task ``t`` and ``D_t`` its normaliser (labelled samples, or
    their class weights). Each rank holds part of ``S_t`` and ``D_t``; one all-reduce gives
    the global ``D_t``, and the rank returns ``world_size * sum_t w_t * S_t_rank / D_t``,
    whose gradients DDP averages into exactly the single-process gradient.

    Args:
        head: A :class:`~fusionkit.heads.MultiTaskHead` (``task_losses`` and ``tasks``).
        logits: Task → this rank's logits.
        targets: Task → this rank's targets.
        ctx: The context.
        class_weights: Task → class weights set on the head (``train.class_weight``).

    Returns:
        ``(loss, global_loss)``: the loss to backpropagate on this rank, and the detached
        loss of the whole global batch (equal on every rank; NaN if any rank's is).

    Examples:
        >>> loss, logged = sharded_loss(model.head, out.logits, batch.targets, ctx)
        ... # doctest: +SKIP
    """
    class_weights = class_weights or {}
    losses = head.task_losses(logits, targets)
    names = list(losses)
    weights = [float(head.tasks[n].weight) for n in names]
    denominators = torch.stack(
        [_task_denominator(targets[n], head.tasks[n], class_weights.get(n)) for n in names]
    ).to(next(iter(losses.values())).device)
    # task_loss returns a mean (0 with no labelled sample); times its denominator, a sum.
    sums = torch.stack([losses[n].detach().double() for n in names]) * denominators
    totals = torch.cat([sums, denominators])
    if ctx.distributed:
        dist.all_reduce(totals)
    global_sums, global_denominators = totals[: len(names)], totals[len(names) :]
    safe = global_denominators.clamp(min=torch.finfo(torch.float64).tiny)
    scale = [
        ctx.world_size * w * float(d / g)
        for w, d, g in zip(weights, denominators, safe, strict=True)
    ]
    loss = torch.stack([losses[n] * s for n, s in zip(names, scale, strict=True)]).sum()
    global_loss = sum(w * s / g for w, s, g in zip(weights, global_sums, safe, strict=True))
    return loss, torch.as_tensor(global_loss, dtype=torch.float32)


def unused_parameters(
    model: nn.Module, run_step: Callable[[], Tensor], ctx: DistContext
) -> list[str]:
    """Trainable parameters that receive no gradient on any rank, found by one probe step.

    The probe runs forward and backward on a real batch, then restores gradients, buffers
    (e.g. batch-norm statistics) and random generators, so training is unaffected.

    Args:
        model: The model.
        run_step: Runs forward on a probe batch and returns the loss.
        ctx: The context; the result is agreed on by all ranks.

    Returns:
        Names of parameters that get no gradient anywhere (they are safe to freeze: the
        optimizer would skip them anyway).

    Examples:
        >>> unused_parameters(model, lambda: model.loss(model(**inputs), targets), ctx)
        ... # doctest: +SKIP
        ['text.model.pooler.dense.weight', 'text.model.pooler.dense.bias']
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    # Transforms may draw from Python's and numpy's generators; fork_rng restores torch's.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        run_step().backward()
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    used = torch.tensor([p.grad is not None for _, p in trainable], dtype=torch.uint8)
    if ctx.distributed:
        used = used.to(ctx.device)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    for _, parameter in trainable:
        parameter.grad = None
    return [name for (name, _), flag in zip(trainable, used.tolist(), strict=True) if not flag]


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """Wrap ``module`` in :class:`~torch.nn.parallel.DistributedDataParallel`.

    Frozen parameters (``requires_grad=False``) are not synchronised; every trainable one
    must receive a gradient each step (see :func:`unused_parameters`).

    Args:
        module: The module whose forward is the training forward.
        ctx: A distributed context.

    Returns:
        The DDP module (``module`` itself in a single process).
    """
    if not ctx.distributed:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=False
    )


def parameters_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order: equal digests = identical replicas.

    Args:
        model: The model.

    Returns:
        A hex digest.

    Examples:
        >>> parameters_digest(nn.Linear(2, 2)) == parameters_digest(nn.Linear(2, 2))
        False
    """
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas(model: nn.Module, ctx: DistContext, record: Path) -> None:
    """Compare every rank's parameters; rank 0 writes their digests to ``record``.

    Args:
        model: This rank's model.
        ctx: The distributed context.
        record: Where rank 0 writes the digests (``replicas.json`` of the run folder).

    Raises:
        TrainingError: The ranks ended with different weights.
    """
    digests = all_gather_objects(ctx, parameters_digest(model))
    if ctx.is_main:
        write_json(record, {"world_size": ctx.world_size, "parameters_sha256": digests})
    if len(set(digests)) > 1:
        raise TrainingError(
            f"the {ctx.world_size} processes ended with different weights; see {record}"
        )
