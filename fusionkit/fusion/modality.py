"""Modality-wise fusion: one embedding per modality in, one fused embedding and weights out.

Every component here returns ``(fused (B, dim), weights (B, M))`` where ``weights`` sums to 1
over the modalities present for each sample and is exactly 0 for an absent one, so the same
explanation ("which modality did this task trust?") can be read from any of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from fusionkit.fusion.inputs import check_modality_inputs
from fusionkit.fusion.layers import init_weights
from fusionkit.registry import register

__all__ = ["ConcatFusion", "GatedFusion", "MeanFusion", "ModalityFusion", "ModalityWiseAttention"]


class ModalityFusion(nn.Module):
    """Base class: validates the inputs and stacks them into ``(B, M, dim)``.

    Args:
        dim: Embedding width of every modality.
        modalities: Modality names; the column order of the returned weights.

    Raises:
        ValueError: ``dim`` is not positive, or ``modalities`` is empty or has duplicates.
    """

    def __init__(self, dim: int, modalities: Sequence[str]) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        modalities = tuple(modalities) if not isinstance(modalities, str) else (modalities,)
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be distinct names, got {modalities!r}")
        self.dim = dim
        self.modalities = modalities

    def fuse(self, x: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Fuse stacked `(B, M, dim)` embeddings (zeros where absent) given `(B, M)` presence."""
        raise NotImplementedError

    def forward(
        self, embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Fuse per-modality embeddings.

        Args:
            embeddings: Modality → ``(B, dim)``. A modality left out is absent for the batch.
            present: Modality → ``(B,)`` bool, False where the sample lacks that modality
                (default: present wherever given).

        Returns:
            ``(fused (B, dim), weights (B, M))``; weights follow `modalities`.

        Raises:
            ShapeError: Unknown modality, wrong shapes, or a sample with no modality present.
        """
        x, mask = check_modality_inputs(embeddings, present, self.modalities, self.dim)
        return self.fuse(x, mask)


def _uniform(present: Tensor, dtype: torch.dtype) -> Tensor:
    weights = present.to(dtype)
    return weights / weights.sum(dim=1, keepdim=True)


@register("modality_fusion", "keyless")
class ModalityWiseAttention(ModalityFusion):
    """CMA-CLIP's modality-wise (keyless) attention.

    ``α_m = softmax_m(s(x_m))`` over the present modalities, with ``s(x) = wᵀx`` (``linear``)
    or ``s(x) = wᵀ tanh(W x + b)`` (``tanh``); the fused embedding is ``Σ_m α_m x_m``.
    An absent modality is masked out of the softmax (weight exactly 0), never zero-filled.

    Args:
        dim: Embedding width.
        modalities: Modality names (column order of the weights).
        variant: ``"linear"`` or ``"tanh"``.
        hidden_dim: Width of ``W`` in the ``tanh`` variant (default ``dim``).

    Raises:
        ValueError: Unknown variant or bad sizes.

    Examples:
        >>> fusion = ModalityWiseAttention(8, ("text", "image"))
        >>> fused, weights = fusion({"text": torch.randn(3, 8), "image": torch.randn(3, 8)})
        >>> weights.sum(dim=1)
        tensor([1., 1., 1.], grad_fn=<SumBackward1>)
    """

    def __init__(
        self,
        dim: int,
        modalities: Sequence[str],
        variant: Literal["linear", "tanh"] = "linear",
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__(dim, modalities)
        if variant == "linear":
            self.score: nn.Module = nn.Linear(dim, 1, bias=False)
        elif variant == "tanh":
            hidden = hidden_dim or dim
            self.score = nn.Sequential(
                nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False)
            )
        else:
            raise ValueError(f"variant must be 'linear' or 'tanh', got {variant!r}")
        self.variant = variant
        init_weights(self)

    def fuse(self, x: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.score(x).squeeze(-1).masked_fill(~present, float("-inf"))
        weights = scores.softmax(dim=1)
        return torch.einsum("bm,bmd->bd", weights, x), weights


@register("modality_fusion", "gated")
class GatedFusion(ModalityFusion):
    """Gated multimodal unit (GMU, Arevalo et al. 2017), generalised to M modalities.

    ``h_m = tanh(W_m x_m)``; a sigmoid gate per modality and dimension,
    ``z = σ(W_z [x_1; …; x_M])``, normalised over the present modalities,
    ``g_m = z_m / Σ_m' z_m'``; fused ``Σ_m g_m ⊙ h_m``. The reported weight of a modality is
    its mean gate share ``mean_d g_m``.

    Args:
        dim: Embedding width.
        modalities: Modality names (column order of the weights).

    Examples:
        >>> fused, weights = GatedFusion(8, ("text", "image"))(
        ...     {"text": torch.randn(2, 8), "image": torch.randn(2, 8)})
    """

    def __init__(self, dim: int, modalities: Sequence[str]) -> None:
        super().__init__(dim, modalities)
        self.transform = nn.ModuleList(nn.Linear(dim, dim) for _ in self.modalities)
        self.gate = nn.Linear(len(self.modalities) * dim, len(self.modalities) * dim)
        init_weights(self)

    def fuse(self, x: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        hidden = torch.stack([torch.tanh(f(x[:, i])) for i, f in enumerate(self.transform)], dim=1)
        gates = torch.sigmoid(self.gate(x.flatten(1))).view_as(x) * present[..., None]
        shares = gates / gates.sum(dim=1, keepdim=True)
        return (shares * hidden).sum(dim=1), shares.mean(dim=-1)


@register("modality_fusion", "concat")
class ConcatFusion(ModalityFusion):
    """Baseline: concatenate the modality embeddings (zeros where absent) and project to ``dim``.

    It learns no modality weights; the reported weights are uniform over present modalities.

    Args:
        dim: Embedding width.
        modalities: Modality names.
    """

    def __init__(self, dim: int, modalities: Sequence[str]) -> None:
        super().__init__(dim, modalities)
        self.proj = nn.Linear(len(self.modalities) * dim, dim)
        init_weights(self)

    def fuse(self, x: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        return self.proj(x.flatten(1)), _uniform(present, x.dtype)


@register("modality_fusion", "mean")
class MeanFusion(ModalityFusion):
    """Baseline: the mean of the present modality embeddings (no parameters).

    Args:
        dim: Embedding width.
        modalities: Modality names.
    """

    def fuse(self, x: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        weights = _uniform(present, x.dtype)
        return torch.einsum("bm,bmd->bd", weights, x), weights
