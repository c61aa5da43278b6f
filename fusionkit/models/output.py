"""What `CMACLIP` returns, and the token pooling of its no-sequence-fusion ablation."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from fusionkit.models.unimodal import masked_mean

__all__ = ["CMACLIPOutput", "TokenPool"]


@dataclass
class CMACLIPOutput:
    """What `CMACLIP` returns.

    Attributes:
        logits: Task → ``(B, num_classes)``: the model's final scores. Without unimodal heads
            these are the fused head's logits; with them, the late-fusion blend of the fused
            and unimodal heads (log-probabilities for single-label tasks, see
            `fusionkit.models.unimodal.LateFusionBlend`).
        modality_weights: Task → ``(B, M)``, columns in ``model.modalities`` order; each row
            sums to 1 over the sample's present modalities, an absent one gets exactly 0.
        embeddings: Task → fused embedding ``(B, dim)`` fed to that task's head.
        summaries: Modality → summary embedding ``(B, dim)`` after the sequence fusion.
        present: Modality → ``(B,)`` bool.
        attentions: Per fusion layer ``(B, heads, L, L)`` when asked for (explanations).
        spans: Modality → ``(start, end)`` in the fused sequence, with ``attentions``.
    """

    logits: dict[str, Tensor]
    modality_weights: dict[str, Tensor]
    embeddings: dict[str, Tensor]
    summaries: dict[str, Tensor]
    present: dict[str, Tensor]
    attentions: list[Tensor] | None = None
    spans: dict[str, tuple[int, int]] | None = field(default=None)
    fused_logits: dict[str, Tensor] | None = None
    unimodal_logits: dict[str, dict[str, Tensor]] | None = None

    def source_logits(self) -> dict[str, dict[str, Tensor]]:
        """Source (``fused`` and each modality with a head of its own) → task → logits.

        Empty for a model without unimodal heads: its ``logits`` are the fused head's.
        """
        if self.fused_logits is None or self.unimodal_logits is None:
            return {}
        return {"fused": self.fused_logits, **self.unimodal_logits}


class TokenPool(nn.Module):
    """Summary of an encoder's tokens without sequence fusion: first (prefix) token or mean,
    projected to ``dim`` (the "without sequence-wise attention" ablation)."""

    def __init__(self, width: int, dim: int, first_token: bool) -> None:
        super().__init__()
        self.first_token = first_token
        self.proj = nn.Sequential(nn.Linear(width, dim), nn.LayerNorm(dim))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        pooled = tokens[:, 0] if self.first_token else masked_mean(tokens, mask)
        return self.proj(pooled)
