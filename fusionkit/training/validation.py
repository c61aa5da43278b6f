"""Validation during training: outputs gathered over ranks, the blend fit, the report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from fusionkit.data.loading import loader_options
from fusionkit.models.blending import blend_probabilities
from fusionkit.training.blend import fit_blend
from fusionkit.training.distributed import DistContext, all_gather_objects
from fusionkit.training.evaluate import EvalOutputs, collect_outputs, compute_report

__all__ = [
    "fit_model_blend",
    "gather_batches",
    "gather_outputs",
    "join_outputs",
    "validation_report",
]


def gather_batches(
    run_batch: Callable[[Any], Any],
    source: Any,
    collate: Any,
    ctx: DistContext,
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int = 0,
    lockstep: bool = False,
) -> list[Any]:
    """``run_batch`` over all of ``source`` in batches, in order; ranks split the batches.

    Args:
        run_batch: Batch → a picklable result (e.g. :func:`collect_outputs` of one batch).
        source: Indexable samples (a data set or cached features).
        collate: Turns a list of samples into a batch.
        ctx: The distributed context (one process: everything runs here).
        device: Where the model runs (pinned memory on CUDA).
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        lockstep: Every rank runs as many batches as the busiest one, extra ones on a batch
            whose results are dropped: needed when a forward is collective (FSDP).

    Returns:
        Every batch's result in batch order, the same on every rank.
    """
    batches = [list(range(i, min(i + batch_size, len(source))))
               for i in range(0, len(source), batch_size)]
    mine = list(range(ctx.rank, len(batches), ctx.world_size))
    extra = -(-len(batches) // ctx.world_size) - len(mine) if lockstep else 0
    loader = DataLoader(
        source,
        batch_sampler=[batches[i] for i in mine] + batches[:1] * extra,
        collate_fn=collate,
        **loader_options(num_workers, device.type == "cuda"),
    )
    parts = [
        (index, run_batch(batch))
        for index, batch in zip(mine + [-1] * extra, loader, strict=True)
    ]
    parts = [part for part in parts if part[0] >= 0]
    gathered = sorted(
        (part for rank_parts in all_gather_objects(ctx, parts) for part in rank_parts),
        key=lambda part: part[0],
    )
    return [result for _, result in gathered]


def gather_outputs(
    model: Any,
    source: Any,
    collate: Any,
    ctx: DistContext,
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int = 0,
    amp: torch.dtype | bool | None = None,
    lockstep: bool = False,
) -> EvalOutputs:
    """The model's outputs over all of ``source``, in order; ranks split the batches.

    Args:
        model: The model (in any mode; evaluated without gradients).
        source: Indexable samples (a data set or cached features).
        collate: Turns a list of samples into a batch.
        ctx: The distributed context (one process: everything runs here).
        device: Where the model runs.
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        amp: The autocast dtype (see :func:`~fusionkit.training.evaluate.collect_outputs`).
        lockstep: See :func:`gather_batches` (needed for FSDP).

    Returns:
        The joined `EvalOutputs`, the same on every rank.
    """
    parts = gather_batches(
        lambda batch: collect_outputs(model, [batch], device, amp=amp),
        source, collate, ctx, device,
        batch_size=batch_size, num_workers=num_workers, lockstep=lockstep,
    )
    return join_outputs(parts)


def validation_report(model: Any, outputs: EvalOutputs, *, refit_blend: bool) -> dict[str, Any]:
    """The report of ``outputs``; with ``refit_blend`` the model's blend is fit on them first.

    A model with unimodal heads is scored as its blend: with ``refit_blend`` the blend is
    fit on these outputs (and set on the model), and the metrics are those of the blended
    probabilities, computed from the heads' outputs as the model computes them.

    Args:
        model: The model.
        outputs: Its outputs on the validation set.
        refit_blend: Fit the blend first (each epoch); ``False`` reports the stored blend.

    Returns:
        The report (see :func:`~fusionkit.training.evaluate.compute_report`).
    """
    blend = getattr(model, "blend", None)
    if refit_blend and blend is not None:
        outputs = fit_model_blend(model, blend, outputs)
    return compute_report(outputs, model.tasks, model.modalities)


def fit_model_blend(model: Any, blend: Any, outputs: EvalOutputs) -> EvalOutputs:
    """Fit ``blend`` on ``outputs`` (see :func:`~fusionkit.training.blend.fit_blend`), set it
    on the model, and return the outputs with the blended scores."""
    available = {"fused": torch.ones(len(outputs.ids), dtype=torch.bool), **outputs.present}
    scores, rows = dict(outputs.scores), {}
    for task, spec in model.tasks.items():
        by_source = {s: outputs.sources[s][task] for s in blend.sources}
        fitted = fit_blend(by_source, outputs.targets[task], spec, available=available)
        blend.set_weights(task, fitted.weights, fitted.scale)
        scores[task] = blend_probabilities(
            by_source, fitted.weights, spec.multi_label, fitted.scale, available
        ).float()
        rows[task] = {**fitted.weights, "scale": fitted.scale}
    return dataclasses.replace(outputs, scores=scores, blend=rows)


def join_outputs(parts: Sequence[EvalOutputs]) -> EvalOutputs:
    """Concatenate per-batch outputs; the loss is the mean of the batch losses."""
    first = parts[0]
    return EvalOutputs(
        {t: torch.cat([p.scores[t] for p in parts]) for t in first.scores},
        {t: torch.cat([p.targets[t] for p in parts]) for t in first.targets},
        {t: torch.cat([p.weights[t] for p in parts]) for t in first.weights},
        sum(p.loss for p in parts) / len(parts),
        [i for p in parts for i in p.ids],
        {
            s: {t: torch.cat([p.sources[s][t] for p in parts]) for t in by_task}
            for s, by_task in first.sources.items()
        },
        first.blend,
        {m: torch.cat([p.present[m] for p in parts]) for m in first.present},
    )
