"""Variable-length ("packed") attention: compute on real tokens only, never on padding.

A padded batch ``(B, L, ...)`` with a mask ``(B, L)`` is packed into one token stream
``(T, ...)`` with ``T = mask.sum()``. Position-wise work (projections, MLP, norms) then costs
``T`` instead of ``B * L``. Attention over a packed stream runs

* on CUDA with xformers: one kernel call with a ``BlockDiagonalMask`` (each sample attends
  within its own block), for self- and cross-attention (different query and key lengths);
* elsewhere: per *length bucket*. Samples are sorted by length and grouped so that each
  group is padded only up to the next bucket boundary, and each group runs through
  ``scaled_dot_product_attention``. The cost follows the real token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusionkit.attention.functional import attention, resolve_backend
from fusionkit.errors import ShapeError

__all__ = ["PackedSequences", "varlen_attention"]


@dataclass(eq=False)
class PackedSequences:
    """Where the real tokens of a padded batch sit once packed.

    Build it with `from_mask`; then `pack` and `unpack` move tensors
    between the padded ``(B, L, ...)`` and packed ``(T, ...)`` layouts.

    Attributes:
        lengths: Real tokens per sample, a Python list (B entries).
        padded_length: ``L`` of the padded layout.
        indices: ``(T,)`` flat positions of the real tokens in ``B * L``.
        offsets: ``(B + 1,)`` start of each sample in the packed stream.

    Examples:
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> seqs = PackedSequences.from_mask(mask)
        >>> seqs.pack(torch.arange(6).view(2, 3)).tolist()
        [0, 1, 3]
    """

    lengths: list[int]
    padded_length: int
    indices: Tensor
    offsets: Tensor
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, mask: Tensor) -> PackedSequences:
        """Describe the packing of a ``(B, L)`` bool mask (True = real token).

        Raises:
            ShapeError: ``mask`` is not a 2-d bool tensor.
        """
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ShapeError(
                f"mask must be a (B, L) bool tensor, got {tuple(mask.shape)} {mask.dtype}"
            )
        counts = mask.sum(dim=1)
        offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.long, device=mask.device)
        offsets[1:] = counts.cumsum(0)
        indices = mask.reshape(-1).nonzero().squeeze(1)
        return cls(counts.tolist(), mask.shape[1], indices, offsets)

    @property
    def batch_size(self) -> int:
        """Number of sequences ``B``."""
        return len(self.lengths)

    @property
    def total(self) -> int:
        """Number of real tokens ``T``."""
        return int(self.indices.numel())

    def pack(self, x: Tensor) -> Tensor:
        """``(B, L, ...)`` → ``(T, ...)``: keep the real tokens, in order."""
        if tuple(x.shape[:2]) != (self.batch_size, self.padded_length):
            raise ShapeError(
                f"expected a tensor of shape ({self.batch_size}, {self.padded_length}, ...), "
                f"got {tuple(x.shape)}"
            )
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.indices)

    def unpack(self, x: Tensor) -> Tensor:
        """``(T, ...)`` → ``(B, L, ...)`` with zeros at padded positions."""
        if x.shape[0] != self.total:
            raise ShapeError(f"expected {self.total} packed tokens, got {x.shape[0]}")
        out = x.new_zeros(self.batch_size * self.padded_length, *x.shape[1:])
        out = out.index_copy(0, self.indices, x)
        return out.view(self.batch_size, self.padded_length, *x.shape[1:])


def _bucket_of(length: int, granularity: int) -> int:
    return -(-length // granularity)


@dataclass
class _Bucket:
    q_index: Tensor  # (b, Pq) positions in the packed query stream (clamped at padding)
    kv_index: Tensor  # (b, Pk) positions in the packed key stream
    kv_mask: Tensor | None  # (b, Pk) True = real key; None when no key is padded
    q_keep: Tensor  # (b, Pq) True = real query
    q_positions: Tensor  # positions of the real queries in the packed stream, row-major


def _bucket_plan(q_seqs: PackedSequences, kv_seqs: PackedSequences) -> list[_Bucket]:
    key = ("buckets", kv_seqs)
    cached = q_seqs._cache.get(key)
    if cached is not None:
        return cached
    device = q_seqs.indices.device
    longest = max(max(q_seqs.lengths, default=1), max(kv_seqs.lengths, default=1), 1)
    # Eight buckets across the length range bound padding waste to ~1/8 of the longest.
    granularity = max(8, math.ceil(longest / 8))
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (lq, lk) in enumerate(zip(q_seqs.lengths, kv_seqs.lengths, strict=True)):
        if lq:
            groups.setdefault(
                (_bucket_of(lq, granularity), _bucket_of(lk, granularity)), []
            ).append(i)
    buckets = []
    q_offsets, kv_offsets = q_seqs.offsets.tolist(), kv_seqs.offsets.tolist()
    for samples in groups.values():
        lq = torch.tensor([q_seqs.lengths[i] for i in samples], device=device)
        lk = torch.tensor([kv_seqs.lengths[i] for i in samples], device=device)
        pq, pk = int(lq.max()), max(int(lk.max()), 1)
        q_pos, k_pos = torch.arange(pq, device=device), torch.arange(pk, device=device)
        q_keep = q_pos < lq[:, None]
        k_keep = k_pos < lk[:, None]
        q_start = torch.tensor([q_offsets[i] for i in samples], device=device)[:, None]
        k_start = torch.tensor([kv_offsets[i] for i in samples], device=device)[:, None]
        # Padded slots read a real token (index clamped) and are masked or dropped after.
        q_index = (q_start + q_pos).clamp(max=max(q_seqs.total - 1, 0))
        kv_index = (k_start + k_pos).clamp(max=max(kv_seqs.total - 1, 0))
        kv_mask = None if bool(k_keep.all()) else k_keep
        buckets.append(_Bucket(q_index, kv_index, kv_mask, q_keep, q_index[q_keep]))
    plan = buckets
    q_seqs._cache[key] = plan
    return plan


def _bucketed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_seqs: PackedSequences,
    kv_seqs: PackedSequences,
    backend: str,
    scale: float | None,
    dropout_p: float,
) -> Tensor:
    # Each bucket writes its real queries straight into place: one copy, no reordering pass.
    out = q.new_zeros(q.shape)
    for bucket in _bucket_plan(q_seqs, kv_seqs):
        attended = attention(
            q[bucket.q_index],
            k[bucket.kv_index],
            v[bucket.kv_index],
            valid_keys=bucket.kv_mask,
            backend=backend,
            scale=scale,
            dropout_p=dropout_p,
        )
        out.index_copy_(0, bucket.q_positions, attended[bucket.q_keep])
    return out


def _xformers_block_diagonal(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_seqs: PackedSequences,
    kv_seqs: PackedSequences,
    scale: float | None,
    dropout_p: float,
) -> Tensor:
    from xformers.ops import fmha

    key = ("xformers", kv_seqs)
    bias = q_seqs._cache.get(key)
    if bias is None:
        # Empty key blocks would leave their queries undefined: give them one (dummy) key
        # and zero their output below.
        kv_lengths = [max(n, 1) for n in kv_seqs.lengths]
        bias = fmha.BlockDiagonalMask.from_seqlens(q_seqs.lengths, kv_lengths, device=q.device)
        q_seqs._cache[key] = bias
    if any(n == 0 for n in kv_seqs.lengths):
        k, v = _with_dummy_keys(k, kv_seqs), _with_dummy_keys(v, kv_seqs)
    out = fmha.memory_efficient_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_bias=bias, p=dropout_p, scale=scale
    ).squeeze(0)
    empty = torch.tensor([n == 0 for n in kv_seqs.lengths], device=q.device)
    if bool(empty.any()):
        per_token = torch.repeat_interleave(empty, torch.tensor(q_seqs.lengths, device=q.device))
        out = out.masked_fill(per_token[:, None, None], 0.0)
    return out


def _with_dummy_keys(x: Tensor, seqs: PackedSequences) -> Tensor:
    pieces = []
    for start, n in zip(seqs.offsets.tolist(), seqs.lengths, strict=False):
        pieces.append(x[start : start + n] if n else x.new_zeros(1, *x.shape[1:]))
    return torch.cat(pieces)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_seqs: PackedSequences,
    kv_seqs: PackedSequences | None = None,
    *,
    backend: str = "auto",
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention over packed sequences: each sample's queries attend to its own keys only.

    Args:
        q: Packed queries ``(Tq, H, D)``.
        k: Packed keys ``(Tk, H, D)``.
        v: Packed values ``(Tk, H, D)``.
        q_seqs: Packing of the queries.
        kv_seqs: Packing of the keys; defaults to ``q_seqs`` (self-attention).
        backend: As for `fusionkit.attention.attention`. With xformers the whole stream
            runs as one block-diagonal kernel call; otherwise per length bucket.
        scale: Logit scale, default ``1 / sqrt(D)``.
        dropout_p: Dropout on the attention probabilities.

    Returns:
        Packed outputs ``(Tq, H, D)``; a sample without keys gets zeros.

    Raises:
        ShapeError: The tensors do not match their packings.
        BackendUnavailableError: ``backend="xformers"`` where xformers cannot run.

    Examples:
        >>> mask = torch.arange(6) < torch.tensor([[6], [2]])
        >>> seqs = PackedSequences.from_mask(mask)
        >>> q = k = v = torch.randn(seqs.total, 4, 8)
        >>> varlen_attention(q, k, v, seqs).shape
        torch.Size([8, 4, 8])
    """
    kv_seqs = q_seqs if kv_seqs is None else kv_seqs
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ShapeError("packed q, k and v must have shape (T, H, D)")
    if q.shape[0] != q_seqs.total or k.shape[0] != kv_seqs.total or v.shape != k.shape:
        raise ShapeError(
            f"packed shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
            f"match the packings ({q_seqs.total} query and {kv_seqs.total} key tokens)"
        )
    if q_seqs.batch_size != kv_seqs.batch_size:
        raise ShapeError(
            f"query and key packings disagree on the batch size: "
            f"{q_seqs.batch_size} vs {kv_seqs.batch_size}"
        )
    chosen = resolve_backend(backend, q)
    if chosen == "xformers":
        return _xformers_block_diagonal(q, k, v, q_seqs, kv_seqs, scale, dropout_p)
    return _bucketed(q, k, v, q_seqs, kv_seqs, chosen, scale, dropout_p)
