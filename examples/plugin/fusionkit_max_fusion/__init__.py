"""An example fusionkit plugin: the ``modality_fusion`` component ``"max"``.

Installed, this package exposes :func:`register_components` in the entry-point group
``fusionkit.plugins``; fusionkit calls it the first time its registry is used, after which a
config can say ``fusion: {modality: {name: max}}``.
"""

from __future__ import annotations

from torch import Tensor

from fusionkit import register
from fusionkit.fusion import ModalityFusion

__all__ = ["MaxFusion", "register_components"]


class MaxFusion(ModalityFusion):
    """Elementwise maximum over the present modalities' embeddings.

    ``fused[b, d] = max over the present modalities m of x[b, m, d]``. Absent modalities are
    excluded from the maximum (not treated as zeros). The fusion learns no modality weights;
    like the ``mean`` and ``concat`` baselines it reports weights uniform over the present
    modalities (each present one ``1 / #present``, an absent one exactly 0), so explanations
    keep their shape.

    Args:
        dim: Embedding width.
        modalities: Modality names (column order of the weights).
    """

    def fuse(self, x: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        masked = x.masked_fill(~present[..., None], float("-inf"))
        weights = present.to(x.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True)
        return masked.amax(dim=1), weights


def register_components() -> None:
    """Register this package's components (idempotent: safe to call again)."""
    register("modality_fusion", "max", MaxFusion)
