"""Attention backends (xformers, sdpa, math), automatic selection and varlen packing."""

from fusionkit.attention.functional import (
    BACKENDS,
    Backend,
    attention,
    attention_probabilities,
    resolve_backend,
    xformers_unavailable_reason,
)
from fusionkit.attention.packing import PackedSequences, varlen_attention

__all__ = [
    "BACKENDS",
    "Backend",
    "PackedSequences",
    "attention",
    "attention_probabilities",
    "resolve_backend",
    "varlen_attention",
    "xformers_unavailable_reason",
]
