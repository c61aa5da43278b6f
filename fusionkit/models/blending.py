"""Blending the probabilities of several sources: log-probabilities mixed with weights.

The arithmetic of every late-fusion blend in fusionkit: the model's own blend of its fused and
unimodal heads (:class:`~fusionkit.models.unimodal.LateFusionBlend`, fit by
:func:`~fusionkit.training.blend.fit_blend`) and the blend of a run's fused and unimodal models
(:class:`~fusionkit.models.members.MemberBlend`). Per task, each source's log-probabilities
(logits for multi-label tasks) are mixed with non-negative weights that sum to 1, times a scale;
a source a sample lacks is left out and the others renormalised.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["availability", "blend_logits", "blend_probabilities", "log_scores", "mix_sources"]

#: Probabilities are clipped to ``[EPS, 1 - EPS]`` before their logarithm.
EPS = 1e-6


def log_scores(probabilities: Tensor, multi_label: bool) -> Tensor:
    """Probabilities back to the blend's space: log-probabilities or logits (float64).

    Examples:
        >>> log_scores(torch.tensor([[0.5, 0.5]]), multi_label=True)
        tensor([[0., 0.]], dtype=torch.float64)
    """
    p = probabilities.double().clamp(EPS, 1 - EPS)
    return torch.log(p / (1 - p)) if multi_label else torch.log(p)


def mix_sources(stacked: Tensor, weights: tuple[float, ...], available: Tensor | None) -> Tensor:
    """The weighted sum over sources ``(S, N, C)``; per sample, sources not ``available``
    ``(S, N)`` are left out and the rest renormalised (the first source alone if none is
    left), as in :class:`~fusionkit.models.unimodal.LateFusionBlend`.

    Examples:
        >>> mix_sources(torch.ones(2, 1, 3), (0.5, 0.5), None)
        tensor([[1., 1., 1.]])
    """
    w = torch.tensor(weights, dtype=stacked.dtype)[:, None].expand(-1, stacked.shape[1])
    if available is not None:
        w = w * available.to(stacked.dtype)
        total = w.sum(0, keepdim=True)
        fallback = torch.zeros_like(w)
        fallback[0] = 1.0
        w = torch.where(total > 0, w / total.clamp(min=1e-12), fallback)
    return (w[:, :, None] * stacked).sum(0)


def availability(
    names: list[str], available: Mapping[str, Tensor] | None, keep: Tensor
) -> Tensor | None:
    """The ``(S, N)`` availability of the sources ``names`` on the rows ``keep`` (a source
    missing from ``available`` is available everywhere); ``None`` if ``available`` is."""
    if available is None:
        return None
    rows = [available.get(n, torch.ones_like(keep))[keep] for n in names]
    return torch.stack([row.bool() for row in rows])


def blend_probabilities(
    sources: Mapping[str, Tensor],
    weights: Mapping[str, float],
    multi_label: bool,
    scale: float = 1.0,
    available: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Blend sources' probabilities with weights and a scale, as the model's blend does.

    Args:
        sources: Source → ``(N, C)`` probabilities.
        weights: Source → weight (e.g. from :func:`~fusionkit.training.blend.fit_blend`).
        multi_label: Sigmoid task (blend logits) rather than softmax (blend log-probabilities).
        scale: Inverse temperature of the mixture.
        available: Source → ``(N,)`` bool, False where a sample lacks that source's modality
            (left out of its mixture); ``None``: every source everywhere.

    Returns:
        ``(N, C)`` blended probabilities.

    Examples:
        >>> p = torch.tensor([[0.8, 0.2]])
        >>> blend_probabilities({"a": p, "b": p.flip(1)}, {"a": 1.0, "b": 0.0}, False)
        tensor([[0.8000, 0.2000]], dtype=torch.float64)
    """
    mixed = blend_logits(sources, weights, multi_label, scale, available)
    return mixed.sigmoid() if multi_label else mixed.softmax(dim=1)


def blend_logits(
    sources: Mapping[str, Tensor],
    weights: Mapping[str, float],
    multi_label: bool,
    scale: float = 1.0,
    available: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The blend of :func:`blend_probabilities` before its softmax (or sigmoid): the scaled,
    weighted sum of the sources' log-probabilities (or logits).

    Args:
        sources: Source → ``(N, C)`` probabilities.
        weights: Source → weight.
        multi_label: Sigmoid task (blend logits) rather than softmax (blend log-probabilities).
        scale: Inverse temperature of the mixture.
        available: As in :func:`blend_probabilities`.

    Returns:
        ``(N, C)`` float64 logits.

    Examples:
        >>> p = torch.tensor([[0.5, 0.5]])
        >>> blend_logits({"a": p}, {"a": 1.0}, False)
        tensor([[-0.6931, -0.6931]], dtype=torch.float64)
    """
    names = list(sources)
    stacked = torch.stack([log_scores(sources[n], multi_label) for n in names])
    keep = torch.ones(stacked.shape[1], dtype=torch.bool)
    mixed = mix_sources(stacked, tuple(float(weights.get(n, 0.0)) for n in names),
                        availability(names, available, keep))
    return scale * mixed
