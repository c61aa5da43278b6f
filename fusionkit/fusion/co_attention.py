"""Co-attention (ViLBERT / LXMERT style): one stream per modality, crossing over each layer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fusionkit.attention import PackedSequences, attention, resolve_backend, varlen_attention
from fusionkit.errors import ConfigError
from fusionkit.fusion.inputs import (
    FusionOutput,
    check_dims,
    check_input_dims,
    check_token_inputs,
)
from fusionkit.fusion.layers import (
    Attend,
    CrossAttention,
    FeedForward,
    SelfAttention,
    attention_dropout,
    init_weights,
)
from fusionkit.fusion.sequence import Packing, should_pack
from fusionkit.registry import register

__all__ = ["CoAttention"]


class _CoAttentionLayer(nn.Module):
    def __init__(
        self, modalities: tuple[str, ...], dim: int, heads: int, mlp_ratio: float, dropout: float
    ) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict({m: SelfAttention(dim, heads, dropout) for m in modalities})
        self.cross_attn = nn.ModuleDict(
            {m: CrossAttention(dim, heads, dropout) for m in modalities}
        )
        self.mlp = nn.ModuleDict({m: FeedForward(dim, mlp_ratio, dropout) for m in modalities})


@register("sequence_fusion", "co_attention")
class CoAttention(nn.Module):
    """Bidirectional cross-attention between modality streams (ViLBERT / LXMERT).

    Each modality keeps its own stream: tokens projected to ``dim``, a learned summary token
    prepended. Every layer runs, per stream, self-attention, then cross-attention whose queries
    are the stream's tokens and whose keys are the other modalities' tokens (text queries over
    image keys and image queries over text keys), then an MLP. The stream's own summary token
    is also a key of its cross-attention, so a sample whose other modalities are all missing
    still has a defined output. Streams are updated in parallel.

    Same constructor and output contract as
    `fusionkit.fusion.SequenceWiseAttention` (without ``summary``).

    Args:
        input_dims: Modality name → token width.
        dim: Width of the fused tokens.
        layers: Number of co-attention layers.
        heads: Attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: Dropout on attention probabilities and residual branches.
        attention_backend: ``"auto"``, ``"xformers"``, ``"sdpa"`` or ``"math"``.
        packing: ``"auto"``, ``True`` or ``False``: attention on real tokens only; on xformers
            one block-diagonal call per attention with different query and key lengths.

    Raises:
        ValueError: Bad sizes, ``heads`` not dividing ``dim``, fewer than two modalities.

    Examples:
        >>> fusion = CoAttention({"text": 32, "image": 48}, dim=64, heads=4)
        >>> out = fusion({"text": torch.randn(2, 5, 32), "image": torch.randn(2, 9, 48)})
        >>> out.summaries["text"].shape
        torch.Size([2, 64])
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
    ) -> None:
        super().__init__()
        self.input_dims = check_input_dims(input_dims)
        if len(self.input_dims) < 2:
            raise ValueError("co_attention needs at least two modalities in input_dims")
        check_dims(dim, heads, layers)
        should_pack(packing, "sdpa", torch.ones(1, 1, dtype=torch.bool))
        self.modalities = tuple(self.input_dims)
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.attention_backend, self.packing = attention_backend, packing
        self.input_proj = nn.ModuleDict({m: nn.Linear(c, dim) for m, c in self.input_dims.items()})
        self.summary_tokens = nn.Parameter(torch.zeros(len(self.modalities), dim))
        self.layers = nn.ModuleList(
            _CoAttentionLayer(self.modalities, dim, heads, mlp_ratio, dropout)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        init_weights(self)
        nn.init.trunc_normal_(self.summary_tokens, std=0.02)

    def _attend(self, q_mask: Tensor, kv_mask: Tensor, backend: str) -> Attend:
        dropout_p = attention_dropout(self, self.dropout)
        if should_pack(self.packing, backend, torch.cat([q_mask, kv_mask], dim=1)):
            q_seqs = PackedSequences.from_mask(q_mask)
            kv_seqs = q_seqs if kv_mask is q_mask else PackedSequences.from_mask(kv_mask)

            def packed(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                out = varlen_attention(
                    q_seqs.pack(q),
                    kv_seqs.pack(k),
                    kv_seqs.pack(v),
                    q_seqs,
                    kv_seqs,
                    backend=backend,
                    dropout_p=dropout_p,
                )
                return q_seqs.unpack(out)

            return packed

        def padded(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return attention(
                q, k, v, valid_keys=kv_mask, backend=backend, dropout_p=dropout_p
            )

        return padded

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
            tokens: Modality → ``(B, N_m, C_m)``; a modality left out is absent for the batch.
            masks: Modality → ``(B, N_m)`` bool, True = real token (default: all real).
            return_tokens: Also return every fused token.
            return_attention: Not supported: the streams attend separately, so there is no
                single token-to-token attention map to record (use the ``transformer``
                sequence fusion to explain).

        Returns:
            A `fusionkit.fusion.FusionOutput`.

        Raises:
            ShapeError: Inputs of the wrong rank, width, batch size or mask shape.
            ConfigError: ``return_attention=True``.
        """
        if return_attention:
            raise ConfigError(
                "sequence fusion 'co_attention' cannot record attention probabilities: each "
                "modality's stream attends separately, so there is no one token-to-token map "
                "(fusionkit explain needs fusion.sequence.name: transformer)"
            )
        _, masks = check_token_inputs(tokens, masks, self.input_dims)
        streams, stream_masks, present = {}, {}, {}
        for i, name in enumerate(self.modalities):
            if name not in tokens:
                continue
            x = self.input_proj[name](tokens[name])
            present[name] = masks[name].any(dim=1)
            summary = self.summary_tokens[i].to(x.dtype).expand(x.shape[0], 1, -1)
            streams[name] = torch.cat([summary, x], dim=1)
            stream_masks[name] = torch.cat([present[name][:, None], masks[name]], dim=1)
        backend = resolve_backend(self.attention_backend, next(iter(streams.values())))
        self_attend = {m: self._attend(stream_masks[m], stream_masks[m], backend) for m in streams}
        contexts = {}
        for m in streams:
            others = [o for o in streams if o != m]
            own_summary = torch.ones_like(stream_masks[m][:, :1])
            kv_mask = torch.cat([own_summary, *(stream_masks[o] for o in others)], dim=1)
            contexts[m] = (others, self._attend(stream_masks[m], kv_mask, backend))
        for layer in self.layers:
            streams = {m: layer.self_attn[m](x, self_attend[m]) for m, x in streams.items()}
            crossed = {}
            for m, x in streams.items():
                others, attend = contexts[m]
                context = torch.cat([x[:, :1], *(streams[o] for o in others)], dim=1)
                crossed[m] = layer.mlp[m](layer.cross_attn[m](x, context, attend))
            streams = crossed
        streams = {m: self.norm(x) for m, x in streams.items()}
        out = FusionOutput(
            summaries={
                m: x[:, 0].masked_fill(~present[m][:, None], 0.0) for m, x in streams.items()
            },
            present=present,
        )
        if return_tokens:
            out.tokens = {
                m: x[:, 1:].masked_fill(~masks[m][..., None], 0.0) for m, x in streams.items()
            }
            out.masks = masks
        return out
