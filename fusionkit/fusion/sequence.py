"""Sequence-wise attention: one transformer over the concatenated tokens of all modalities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from fusionkit.attention import (
    PackedSequences,
    attention,
    attention_probabilities,
    resolve_backend,
    varlen_attention,
)
from fusionkit.fusion.inputs import (
    FusionOutput,
    check_dims,
    check_input_dims,
    check_token_inputs,
)
from fusionkit.fusion.layers import TransformerLayer, attention_dropout, init_weights
from fusionkit.registry import register

__all__ = ["Packing", "SequenceWiseAttention", "should_pack"]

Packing = Literal["auto"] | bool
#: On CPU, pack when at most this fraction of the padded positions holds real tokens.
CPU_PACKING_THRESHOLD = 0.85


def should_pack(packing: Packing, backend: str, mask: Tensor) -> bool:
    """Decide whether to run on packed tokens.

    ``auto`` packs on the xformers backend whenever there is padding (one block-diagonal kernel
    call costs no more than the padded one), and elsewhere when at most 85% of the padded
    positions are real (below that the saved work outweighs the gather and scatter).

    Args:
        packing: ``"auto"``, ``True`` or ``False``.
        backend: The resolved attention backend.
        mask: ``(B, L)`` bool, True = real token.

    Returns:
        True to pack.
    """
    if packing is not True and packing is not False and packing != "auto":
        raise ValueError(f"packing must be 'auto', True or False, got {packing!r}")
    if packing != "auto":
        return bool(packing)
    real = float(mask.float().mean())
    if backend == "xformers":
        return real < 1.0
    return real <= CPU_PACKING_THRESHOLD


@register("sequence_fusion", "transformer")
class SequenceWiseAttention(nn.Module):
    """CMA-CLIP's sequence-wise attention: every token of every modality attends to all others.

    Each modality's tokens are projected to ``dim`` and tagged with a learned modality-type
    embedding; a learned summary token is prepended per modality (``summary="learned"``), or
    one that starts from the mean of the modality's own tokens plus a learned embedding
    (``summary="mean"``: each summary enters the fusion already holding its modality, as the
    CLS outputs of the paper's CLIP encoders do), or the modality's first token is used
    (``summary="first"``, e.g. a CLS token); ``layers``
    pre-norm transformer layers then run over the concatenation, with padded tokens masked
    out as keys. The summaries of each modality leave the block.

    Args:
        input_dims: Modality name → token width, in the order of the concatenation, e.g.
            ``{"text": 384, "image": 1280}``.
        dim: Width of the fused tokens.
        layers: Number of transformer layers.
        heads: Attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: Dropout on attention probabilities and residual branches.
        attention_backend: ``"auto"``, ``"xformers"``, ``"sdpa"`` or ``"math"``.
        packing: ``"auto"``, ``True`` or ``False``: run on the real tokens only (see
            `should_pack`). Results are the same either way.
        summary: ``"learned"``, ``"mean"`` or ``"first"``.

    Raises:
        ValueError: Bad sizes, ``heads`` not dividing ``dim``, or an unknown option.

    Examples:
        >>> fusion = SequenceWiseAttention({"text": 384, "image": 192}, dim=256, heads=4)
        >>> out = fusion({"text": torch.randn(2, 7, 384), "image": torch.randn(2, 49, 192)})
        >>> out.summaries["image"].shape
        torch.Size([2, 256])
    """

    def __init__(
        self,
        input_dims: Mapping[str, int],
        dim: int,
        layers: int = 1,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_backend: str = "auto",
        packing: Packing = "auto",
        summary: Literal["learned", "mean", "first"] = "learned",
    ) -> None:
        super().__init__()
        self.input_dims = check_input_dims(input_dims)
        check_dims(dim, heads, layers)
        if summary not in ("learned", "mean", "first"):
            raise ValueError(f"summary must be 'learned', 'mean' or 'first', got {summary!r}")
        if attention_backend not in ("auto", "xformers", "sdpa", "math"):
            raise ValueError(
                "attention_backend must be one of 'auto', 'xformers', 'sdpa', 'math', "
                f"got {attention_backend!r}"
            )
        should_pack(packing, "sdpa", torch.ones(1, 1, dtype=torch.bool))
        self.modalities = tuple(self.input_dims)
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.attention_backend, self.packing, self.summary = attention_backend, packing, summary
        self.input_proj = nn.ModuleDict({m: nn.Linear(c, dim) for m, c in self.input_dims.items()})
        self.type_embed = nn.Parameter(torch.zeros(len(self.modalities), dim))
        self.summary_tokens = (
            nn.Parameter(torch.zeros(len(self.modalities), dim)) if summary != "first" else None
        )
        self.layers = nn.ModuleList(
            TransformerLayer(dim, heads, mlp_ratio, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        init_weights(self)
        nn.init.trunc_normal_(self.type_embed, std=0.02)
        if self.summary_tokens is not None:
            nn.init.trunc_normal_(self.summary_tokens, std=0.02)

    def _layout(
        self, tokens: Mapping[str, Tensor], masks: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, tuple[int, int]], dict[str, Tensor]]:
        """The concatenated sequence's mask, each modality's span in it, and presence."""
        pieces, spans, present = [], {}, {}
        start = 0
        for name in self.modalities:
            if name not in tokens:
                continue
            mask = masks[name]
            present[name] = mask.any(dim=1)
            if self.summary_tokens is not None:
                # The summary is a key only where its modality is present, so an absent
                # modality leaves the others exactly as if it had not been given at all.
                mask = torch.cat([present[name][:, None], mask], dim=1)
            elif mask.shape[1] == 0 or bool((mask[:, 0] != present[name]).any()):
                raise ValueError(
                    f"summary='first' needs the first {name} token to be real wherever any "
                    f"{name} token is"
                )
            pieces.append(mask)
            spans[name] = (start, start + mask.shape[1])
            start += mask.shape[1]
        return torch.cat(pieces, dim=1), spans, present

    def _embed(self, index: int, name: str, x: Tensor) -> Tensor:
        return self.input_proj[name](x) + self.type_embed[index]

    def _summary(self, index: int, name: str, tokens: Tensor, mask: Tensor) -> Tensor:
        """The ``(B, dim)`` summary token of one modality before the first layer."""
        assert self.summary_tokens is not None
        learned = self.summary_tokens[index]
        if self.summary == "learned":
            return learned.to(tokens.dtype).expand(tokens.shape[0], -1)
        weights = mask.to(tokens.dtype)[..., None]
        mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        # A linear projection of the mean is the mean of the projected tokens.
        return self._embed(index, name, mean) + learned.to(tokens.dtype)

    def _embed_padded(self, tokens: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> Tensor:
        pieces = []
        for i, name in enumerate(self.modalities):
            if name not in tokens:
                continue
            x = self._embed(i, name, tokens[name])
            if self.summary_tokens is not None:
                summary = self._summary(i, name, tokens[name], masks[name]).to(x.dtype)
                x = torch.cat([summary[:, None], x], dim=1)
            pieces.append(x)
        return torch.cat(pieces, dim=1)

    def _embed_packed(
        self,
        tokens: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        spans: Mapping[str, tuple[int, int]],
        present: Mapping[str, Tensor],
        positions: Tensor,
        total: int,
    ) -> Tensor:
        # Project only the real tokens: padding never reaches a matmul.
        values, where = [], []
        skip = 1 if self.summary_tokens is not None else 0
        for i, name in enumerate(self.modalities):
            if name not in spans:
                continue
            start, end = spans[name]
            real = masks[name]
            values.append(self._embed(i, name, tokens[name][real]))
            where.append(positions[:, start + skip : end][real])
            if self.summary_tokens is not None:
                here = present[name]
                where.append(positions[:, start][here])
                summary = self._summary(i, name, tokens[name][here], masks[name][here])
                values.append(summary.to(values[-1].dtype))
        source = torch.cat(values)
        return source.new_zeros(total, self.dim).index_copy(0, torch.cat(where), source)

    def _run_padded(self, x: Tensor, mask: Tensor, backend: str, record: list | None) -> Tensor:
        dropout_p = attention_dropout(self, self.dropout)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if record is not None:
                probs = attention_probabilities(q, k, valid_keys=mask)
                record.append(probs)
                return torch.einsum("bhqk,bkhd->bqhd", probs, v)
            return attention(q, k, v, valid_keys=mask, backend=backend, dropout_p=dropout_p)

        for layer in self.layers:
            x = layer(x, attend)
        return x

    def _run_packed(self, x: Tensor, seqs: PackedSequences, backend: str) -> Tensor:
        dropout_p = attention_dropout(self, self.dropout)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return varlen_attention(q, k, v, seqs, backend=backend, dropout_p=dropout_p)

        for layer in self.layers:
            x = layer(x, attend)
        return x

    def forward(
        self,
        tokens: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None = None,
        *,
        return_tokens: bool = False,
        return_attention: bool = False,
    ) -> FusionOutput:
        """Fuse the tokens of all given modalities.

        Args:
            tokens: Modality → ``(B, N_m, C_m)``. A modality left out is absent for the whole
                batch; an all-False mask row makes it absent for one sample.
            masks: Modality → ``(B, N_m)`` bool, True = real token (default: all real).
            return_tokens: Also return every fused token.
            return_attention: Also return the attention probabilities of every layer (runs the
                plain ``math`` attention on the padded batch for this call).

        Returns:
            A `fusionkit.fusion.FusionOutput`.

        Raises:
            ShapeError: Inputs of the wrong rank, width, batch size or mask shape.
        """
        _, masks = check_token_inputs(tokens, masks, self.input_dims)
        mask, spans, present = self._layout(tokens, masks)
        backend = resolve_backend(self.attention_backend, next(iter(tokens.values())))
        record: list[Tensor] | None = [] if return_attention else None
        out = FusionOutput(summaries={}, present=present, attentions=record, spans=spans)
        if record is None and should_pack(self.packing, backend, mask):
            seqs = PackedSequences.from_mask(mask)
            # Position of every real token of the concatenation in the packed stream.
            positions = seqs.offsets[:-1, None] + mask.long().cumsum(dim=1) - 1
            x = self._embed_packed(tokens, masks, spans, present, positions, seqs.total)
            x = self._run_packed(x, seqs, backend)
            for name, (start, _) in spans.items():
                # Absent summaries read any row (clamped) and are zeroed below.
                rows = positions[:, start].clamp(0, max(seqs.total - 1, 0))
                out.summaries[name] = x[rows] if seqs.total else x.new_zeros(len(rows), self.dim)
            full = seqs.unpack(self.norm(x)) if return_tokens else None
        else:
            x = self._run_padded(self._embed_padded(tokens, masks), mask, backend, record)
            out.summaries = {name: x[:, start] for name, (start, _) in spans.items()}
            full = self.norm(x) if return_tokens else None
        out.summaries = {
            name: self.norm(summary).masked_fill(~present[name][:, None], 0.0)
            for name, summary in out.summaries.items()
        }
        if full is not None:
            skip = 1 if self.summary_tokens is not None else 0
            out.tokens = {
                name: full[:, start + skip : end].masked_fill(~masks[name][..., None], 0.0)
                for name, (start, end) in spans.items()
            }
            out.masks = masks
        return out
