"""Pre-norm transformer sub-layers that take their attention as a callable.

The attention is passed in (``attend(q, k, v) -> out``) so one layer runs unchanged on a
padded batch ``(B, L, dim)`` or on a packed token stream ``(T, dim)``, on any backend, and can
be observed (explanations record the probabilities) without a second implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "Attend",
    "CrossAttention",
    "FeedForward",
    "SelfAttention",
    "TransformerLayer",
    "attention_dropout",
    "init_weights",
]

#: ``attend(q, k, v)`` with q ``(..., Lq, H, D)`` and k, v ``(..., Lk, H, D)``.
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights (std 0.02), zero biases, unit LayerNorms (as ViT)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a residual: ``x + proj(attend(qkv(norm(x))))``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        # "...": (B, L) on a padded batch, (T,) on a packed stream.
        qkv = rearrange(self.qkv(self.norm(x)), "... (n h d) -> n ... h d", n=3, h=self.heads)
        out = attend(*qkv.unbind(0))
        return x + self.drop(self.proj(rearrange(out, "... h d -> ... (h d)")))


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention: queries from ``x``, keys and values from ``context``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, attend: Attend) -> Tensor:
        q = rearrange(self.q(self.norm_q(x)), "... (h d) -> ... h d", h=self.heads)
        kv = self.kv(self.norm_kv(context))
        k, v = rearrange(kv, "... (n h d) -> n ... h d", n=2, h=self.heads).unbind(0)
        out = attend(q, k, v)
        return x + self.drop(self.proj(rearrange(out, "... h d -> ... (h d)")))


class FeedForward(nn.Module):
    """Pre-norm MLP with a residual: ``x + fc2(gelu(fc1(norm(x))))``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm(x))))))


class TransformerLayer(nn.Module):
    """One pre-norm transformer encoder layer: self-attention, then the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = SelfAttention(dim, heads, dropout)
        self.mlp = FeedForward(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        return self.mlp(self.attn(x, attend))


def attention_dropout(module: nn.Module, dropout: float) -> float:
    """The attention-probability dropout to use now: ``dropout`` in training, else 0."""
    return dropout if module.training and torch.is_grad_enabled() else 0.0
