"""Unimodal heads and the late-fusion blend of a fused model with its own unimodal heads.

Joint training of a multimodal network tends to overfit, and the fused model can end below its
best single modality (Wang, Tran and Feiszli, *What Makes Training Multi-modal Classification
Networks Hard?*, CVPR 2020). Two parts guard against it:

- :class:`UnimodalHeads`: per modality, a classifier for every task over that modality's own
  encoder tokens (masked mean, projected), before any fusion. Trained beside the fused head
  (unimodal supervision, as in UniS-MMC), they also tell the user what each modality alone
  predicts.
- :class:`LateFusionBlend`: per task, non-negative weights over the sources (the fused head,
  then each modality's head) that sum to 1, and a scale (an inverse temperature); the model's
  final scores are the scaled, weighted sum of the sources' log-probabilities (single-label)
  or logits (multi-label). The trainer fits them on validation data after every epoch
  (:func:`fusionkit.training.blend.fit_blend`); until then the fused head alone decides. A
  source whose modality a sample lacks is left out and the others renormalised, so a missing
  modality is never read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionkit import registry
from fusionkit.errors import ShapeError
from fusionkit.tasks import TaskSpec

__all__ = ["FUSED", "LateFusionBlend", "UnimodalHeads", "masked_mean"]

#: The name of the fused head among the blend's sources.
FUSED = "fused"


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of the real tokens of each sample (zeros where a sample has none).

    Args:
        tokens: ``(B, N, C)``.
        mask: ``(B, N)`` bool, True = real token.

    Returns:
        ``(B, C)``.

    Examples:
        >>> masked_mean(torch.ones(1, 3, 2), torch.tensor([[True, False, False]]))
        tensor([[1., 1.]])
    """
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class UnimodalHeads(nn.Module):
    """One multi-task head per modality over that modality's pooled encoder tokens.

    Args:
        widths: Modality → encoder token width.
        dim: Width the pooled tokens are projected to (the head's input).
        tasks: Task name → :class:`~fusionkit.tasks.TaskSpec`.
        head: Registered ``head`` name.
        head_options: Options of that head (as in the model's ``head`` section).

    Examples:
        >>> from fusionkit.tasks import parse_tasks
        >>> heads = UnimodalHeads({"text": 8}, 4, parse_tasks({"color": {"num_classes": 3}}))
        >>> mask = torch.ones(2, 5, dtype=torch.bool)
        >>> out = heads({"text": torch.randn(2, 5, 8)}, {"text": mask})
        >>> tuple(out["text"]["color"].shape)
        (2, 3)
    """

    def __init__(
        self,
        widths: Mapping[str, int],
        dim: int,
        tasks: Mapping[str, TaskSpec],
        head: str = "mlp",
        head_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.proj = nn.ModuleDict(
            {m: nn.Sequential(nn.LayerNorm(w), nn.Linear(w, dim)) for m, w in widths.items()}
        )
        self.heads = nn.ModuleDict(
            {
                m: registry.create("head", head, dim=dim, tasks=tasks, **(head_options or {}))
                for m in widths
            }
        )

    def forward(
        self, tokens: Mapping[str, Tensor], masks: Mapping[str, Tensor]
    ) -> dict[str, dict[str, Tensor]]:
        """Modality → task → logits, for every modality present in ``tokens``."""
        return {
            m: self.heads[m](self.proj[m](masked_mean(tokens[m], masks[m])))
            for m in self.heads
            if m in tokens
        }


class LateFusionBlend(nn.Module):
    """Per-task weights over the fused head and each modality's head.

    The weights live in a persistent buffer ``weights`` of shape ``(tasks, 1 + modalities)``,
    columns ``(FUSED, *modalities)``, and the scales in ``scale`` ``(tasks,)``; they start as
    the fused head alone, unscaled. The scale calibrates the blend (it changes no argmax).

    Args:
        tasks: Task name → :class:`~fusionkit.tasks.TaskSpec`.
        modalities: The modalities with a unimodal head, in order.

    Examples:
        >>> from fusionkit.tasks import parse_tasks
        >>> blend = LateFusionBlend(parse_tasks({"color": {"num_classes": 2}}), ("text",))
        >>> blend.sources
        ('fused', 'text')
    """

    def __init__(self, tasks: Mapping[str, TaskSpec], modalities: Sequence[str]) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.sources = (FUSED, *modalities)
        weights = torch.zeros(len(self.tasks), len(self.sources))
        weights[:, 0] = 1.0
        self.register_buffer("weights", weights)
        self.register_buffer("scale", torch.ones(len(self.tasks)))

    def task_weights(self, task: str) -> dict[str, float]:
        """Source → weight of ``task``."""
        row = self.weights[list(self.tasks).index(task)]
        return {s: round(float(w), 6) for s, w in zip(self.sources, row, strict=True)}

    def task_scale(self, task: str) -> float:
        """The scale (inverse temperature) of ``task``."""
        return round(float(self.scale[list(self.tasks).index(task)]), 6)

    def set_weights(self, task: str, weights: Mapping[str, float], scale: float = 1.0) -> None:
        """Set the weights (missing sources get 0) and the scale of ``task``.

        Raises:
            ShapeError: An unknown source, a negative weight, weights that do not sum to 1, or
                a scale that is not positive.
        """
        unknown = set(weights) - set(self.sources)
        if unknown:
            raise ShapeError(f"unknown blend sources {sorted(unknown)}; sources: {self.sources}")
        row = torch.tensor([float(weights.get(s, 0.0)) for s in self.sources])
        if bool((row < 0).any()) or abs(float(row.sum()) - 1.0) > 1e-4:
            raise ShapeError(f"blend weights must be >= 0 and sum to 1, got {dict(weights)}")
        if not scale > 0:
            raise ShapeError(f"blend scale must be > 0, got {scale}")
        index = list(self.tasks).index(task)
        self.weights[index] = row.to(self.weights)
        self.scale[index] = float(scale)

    def forward(
        self,
        fused: Mapping[str, Tensor],
        unimodal: Mapping[str, Mapping[str, Tensor]],
        present: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """Blend the sources' scores per task.

        Args:
            fused: Task → ``(B, C)`` logits of the fused head.
            unimodal: Modality → task → ``(B, C)`` logits of that modality's head.
            present: Modality → ``(B,)`` bool.

        Returns:
            Task → ``(B, C)`` blended logits: scaled log-probabilities for a single-label
            task (``softmax`` of them is the blended distribution), logits for a multi-label
            one.
        """
        out = {}
        for k, (task, spec) in enumerate(self.tasks.items()):
            reference = fused[task]
            scores, available = [], []
            for source in self.sources:
                if source == FUSED:
                    logits = reference
                    here = torch.ones_like(reference[:, 0], dtype=torch.bool)
                elif source in unimodal:
                    logits = unimodal[source][task]
                    here = present[source].to(reference.device)
                else:
                    logits = torch.zeros_like(reference)
                    here = torch.zeros_like(reference[:, 0], dtype=torch.bool)
                logits = logits.float()
                scores.append(logits if spec.multi_label else F.log_softmax(logits, dim=1))
                available.append(here)
            weights = self.weights[k].float()[None, :] * torch.stack(available, 1).float()
            total = weights.sum(1, keepdim=True)
            # Where every weighted source is missing, the fused head alone decides.
            fallback = torch.zeros_like(weights)
            fallback[:, 0] = 1.0
            weights = torch.where(total > 0, weights / total.clamp(min=1e-12), fallback)
            mixed = (torch.stack(scores, 1) * weights[:, :, None]).sum(1) * self.scale[k].float()
            out[task] = mixed.to(reference.dtype)
        return out
