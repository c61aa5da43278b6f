"""Fit the late-fusion blend of a model's fused and unimodal heads on validation data.

The blend (:class:`~fusionkit.models.unimodal.LateFusionBlend`) mixes, per task, the fused
head's and every modality head's log-probabilities (logits for multi-label tasks) with
non-negative weights that sum to 1, times a scale (an inverse temperature). :func:`fit_blend`
searches the weights on a grid over the simplex and the scale on a log grid, and keeps those
with the lowest validation log-loss: a proper scoring rule, smoother than accuracy on a few
hundred samples. The scale calibrates each mixture before it is scored, so an accurate but
overconfident head is not passed over for a less accurate, better calibrated one. Where the
fused head is the best source on its own, the weights are ``(1, 0, ...)``, so blending never
hides a good fused model.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fusionkit.errors import ConfigError
from fusionkit.models.blending import availability, log_scores, mix_sources
from fusionkit.tasks import TaskSpec
from fusionkit.training.metrics import valid_rows

__all__ = ["SCALES", "BlendFit", "fit_blend", "simplex_grid"]

#: The scales (inverse temperatures) :func:`fit_blend` tries.
SCALES = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0)


class BlendFit(NamedTuple):
    """What :func:`fit_blend` found.

    Attributes:
        weights: Source → weight (non-negative, summing to 1).
        scale: The inverse temperature of the mixture.
        log_loss: The validation log-loss of the blend (NaN without a labelled sample).
    """

    weights: dict[str, float]
    scale: float
    log_loss: float


def simplex_grid(sources: int, steps: int) -> Iterator[tuple[float, ...]]:
    """Every weight vector of ``sources`` non-negative multiples of ``1/steps`` summing to 1.

    Args:
        sources: Number of weights.
        steps: Grid resolution (10 → multiples of 0.1).

    Yields:
        Weight tuples; the first is ``(1, 0, ..., 0)``.

    Examples:
        >>> list(simplex_grid(2, 2))
        [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    """
    for cut in itertools.combinations_with_replacement(range(steps + 1), sources - 1):
        edges = (0, *cut, steps)
        counts = [edges[i + 1] - edges[i] for i in range(sources)]
        yield tuple(c / steps for c in reversed(counts))


def _log_loss(scores: Tensor, targets: Tensor, multi_label: bool) -> float:
    if multi_label:
        return F.binary_cross_entropy_with_logits(scores, targets.double()).item()
    return F.cross_entropy(scores, targets.long()).item()


def fit_blend(
    sources: Mapping[str, Tensor],
    targets: Tensor,
    spec: TaskSpec,
    *,
    steps: int = 10,
    scales: tuple[float, ...] = SCALES,
    available: Mapping[str, Tensor] | None = None,
) -> BlendFit:
    """The blend weights and scale with the lowest log-loss on labelled data.

    Args:
        sources: Source name (``fused`` first, then modalities) → ``(N, C)`` probabilities
            (softmax, or sigmoid for a multi-label task) of that source on the data.
        targets: ``(N,)`` class indices or ``(N, C)`` multi-hot (missing labels skipped).
        spec: The task.
        steps: Grid resolution over the simplex.
        scales: The scales to try.
        available: Source → ``(N,)`` bool, as in
            :func:`~fusionkit.models.blending.blend_probabilities`.

    Returns:
        The :class:`BlendFit`. Ties go to the earlier grid point, so with no labelled sample
        the first source alone is kept, unscaled.

    Raises:
        ConfigError: No source, ``steps`` below 1, or no positive scale.

    Examples:
        >>> from fusionkit.tasks import TaskSpec
        >>> good = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> fit_blend({"fused": good.flip(1), "text": good}, torch.tensor([0, 1]), TaskSpec(2))
        ... # doctest: +ELLIPSIS
        BlendFit(weights={'fused': 0.0, 'text': 1.0}, scale=4.0, log_loss=0.0...)
    """
    if not sources:
        raise ConfigError("fit_blend needs at least one source")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if not scales or min(scales) <= 0:
        raise ConfigError(f"scales must be positive numbers, got {scales}")
    names = list(sources)
    keep = valid_rows(targets)
    if not bool(keep.any()):
        return BlendFit({name: float(i == 0) for i, name in enumerate(names)}, 1.0, float("nan"))
    stacked = torch.stack([log_scores(sources[n][keep], spec.multi_label) for n in names])
    labels = targets[keep]
    mask = availability(names, available, keep)
    best, best_loss = (None, 1.0), float("inf")
    for weights in simplex_grid(len(names), steps):
        mixed = mix_sources(stacked, weights, mask)
        for scale in scales:
            loss = _log_loss(scale * mixed, labels, spec.multi_label)
            if loss < best_loss - 1e-12:
                best, best_loss = (weights, scale), loss
    weights, scale = best
    assert weights is not None
    return BlendFit(
        {name: round(w, 6) for name, w in zip(names, weights, strict=True)}, scale, best_loss
    )
