"""Fit the late-fusion blend of a model's fused and unimodal heads on validation data.

The blend (:class:`~fusionkit.models.unimodal.LateFusionBlend`) mixes, per task, the fused
head's and every modality head's log-probabilities (logits for multi-label tasks) with
non-negative weights that sum to 1. :func:`fit_blend` searches the weights on a grid over the
simplex and keeps those with the lowest validation log-loss: a proper scoring rule, smoother
than accuracy on a few hundred samples. Where the fused head is the best source on its own,
that is the weight vector ``(1, 0, ...)``, so blending never hides a good fused model.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from fusionkit.errors import ConfigError
from fusionkit.tasks import TaskSpec
from fusionkit.training.metrics import valid_rows

__all__ = ["blend_probabilities", "fit_blend", "simplex_grid"]

_EPS = 1e-6


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


def _log_scores(probabilities: Tensor, multi_label: bool) -> Tensor:
    """Probabilities back to the blend's space: log-probabilities or logits."""
    p = probabilities.double().clamp(_EPS, 1 - _EPS)
    return torch.log(p / (1 - p)) if multi_label else torch.log(p)


def _log_loss(scores: Tensor, targets: Tensor, multi_label: bool) -> float:
    if multi_label:
        return F.binary_cross_entropy_with_logits(scores, targets.double()).item()
    return F.cross_entropy(scores, targets.long()).item()


def _mix(stacked: Tensor, weights: tuple[float, ...]) -> Tensor:
    return (torch.tensor(weights, dtype=stacked.dtype)[:, None, None] * stacked).sum(0)


def blend_probabilities(
    sources: Mapping[str, Tensor], weights: Mapping[str, float], multi_label: bool
) -> Tensor:
    """Blend sources' probabilities with weights, as the model's blend does.

    Args:
        sources: Source → ``(N, C)`` probabilities.
        weights: Source → weight (e.g. from :func:`fit_blend`).
        multi_label: Sigmoid task (blend logits) rather than softmax (blend log-probabilities).

    Returns:
        ``(N, C)`` blended probabilities.

    Examples:
        >>> p = torch.tensor([[0.8, 0.2]])
        >>> blend_probabilities({"a": p, "b": p.flip(1)}, {"a": 1.0, "b": 0.0}, False)
        tensor([[0.8000, 0.2000]], dtype=torch.float64)
    """
    names = list(sources)
    stacked = torch.stack([_log_scores(sources[n], multi_label) for n in names])
    mixed = _mix(stacked, tuple(float(weights.get(n, 0.0)) for n in names))
    return mixed.sigmoid() if multi_label else mixed.softmax(dim=1)


def fit_blend(
    sources: Mapping[str, Tensor],
    targets: Tensor,
    spec: TaskSpec,
    *,
    steps: int = 10,
) -> dict[str, float]:
    """The blend weights with the lowest log-loss on labelled data.

    Args:
        sources: Source name (``fused`` first, then modalities) → ``(N, C)`` probabilities
            (softmax, or sigmoid for a multi-label task) of that source on the data.
        targets: ``(N,)`` class indices or ``(N, C)`` multi-hot (missing labels skipped).
        spec: The task.
        steps: Grid resolution over the simplex.

    Returns:
        Source → weight (non-negative, summing to 1). Ties go to the earlier grid point, so
        with no labelled sample the first source alone is kept.

    Raises:
        ConfigError: No source, or ``steps`` below 1.

    Examples:
        >>> from fusionkit.tasks import TaskSpec
        >>> good = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> fit_blend({"fused": good.flip(1), "text": good}, torch.tensor([0, 1]), TaskSpec(2))
        {'fused': 0.0, 'text': 1.0}
    """
    if not sources:
        raise ConfigError("fit_blend needs at least one source")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    names = list(sources)
    keep = valid_rows(targets)
    if not bool(keep.any()):
        return {name: float(i == 0) for i, name in enumerate(names)}
    stacked = torch.stack([_log_scores(sources[n][keep], spec.multi_label) for n in names])
    labels = targets[keep]
    best, best_loss = None, float("inf")
    for weights in simplex_grid(len(names), steps):
        loss = _log_loss(_mix(stacked, weights), labels, spec.multi_label)
        if loss < best_loss - 1e-12:
            best, best_loss = weights, loss
    assert best is not None
    return {name: round(w, 6) for name, w in zip(names, best, strict=True)}
