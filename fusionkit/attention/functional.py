"""Scaled dot-product attention over padded batches, on three interchangeable backends.

``math`` is the plain reference (einsum + softmax, the only one that can return the attention
probabilities); ``sdpa`` is ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels
on CPU and CUDA); ``xformers`` is ``xformers.ops.memory_efficient_attention`` (CUDA only).
xformers is imported lazily, on the first CUDA call, so CPU users never pay for it.

The code around the xformers kernel (the 8-aligned bias buffer here, the block-diagonal masks
of `fusionkit.attention.packing`) can be tested without a GPU: a test suite that replaces
``memory_efficient_attention`` with a plain reference adds ``"cpu"`` to
`XFORMERS_EMULATED_DEVICES` for the duration of the test (see ``docs/gpu.md``).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from fusionkit.errors import BackendUnavailableError, ShapeError

__all__ = [
    "BACKENDS",
    "Backend",
    "attention",
    "attention_probabilities",
    "resolve_backend",
    "xformers_unavailable_reason",
]

Backend = Literal["auto", "xformers", "sdpa", "math"]
BACKENDS: tuple[str, ...] = ("xformers", "sdpa", "math")
_XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Device types on which the xformers backend may run besides CUDA, where an emulated kernel
#: stands in for xformers' CUDA kernels. Empty in use; fusionkit's tests add ``"cpu"`` while
#: they replace ``xformers.ops.memory_efficient_attention`` with a plain reference.
XFORMERS_EMULATED_DEVICES: frozenset[str] = frozenset()


@functools.cache
def _xformers_import_error() -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as error:  # any import failure means "not usable here"
        return f"xformers cannot be imported ({type(error).__name__}: {error})"
    return None


def xformers_unavailable_reason(tensor: Tensor) -> str | None:
    """Why the xformers backend cannot run on ``tensor``, or ``None`` if it can.

    Args:
        tensor: A query tensor; its device and dtype decide.

    Returns:
        A one-line reason, or ``None`` when xformers can run (on CUDA, or on a device of
        `XFORMERS_EMULATED_DEVICES`).

    Examples:
        >>> xformers_unavailable_reason(torch.zeros(1))
        'xformers kernels run on CUDA only and the tensors are on cpu'
    """
    device = tensor.device.type
    if device != "cuda" and device not in XFORMERS_EMULATED_DEVICES:
        return f"xformers kernels run on CUDA only and the tensors are on {device}"
    if tensor.dtype not in _XFORMERS_DTYPES:
        return f"xformers supports float16, bfloat16 and float32, not {tensor.dtype}"
    return _xformers_import_error()


def resolve_backend(backend: str, query: Tensor) -> str:
    """Turn a backend request into the backend that will run.

    ``auto`` picks ``xformers`` for CUDA tensors when xformers is importable and supports the
    dtype, and ``sdpa`` otherwise.

    Args:
        backend: ``"auto"``, ``"xformers"``, ``"sdpa"`` or ``"math"``.
        query: The query tensor (its device and dtype decide ``auto``).

    Returns:
        One of `BACKENDS`.

    Raises:
        ValueError: ``backend`` is not a known name.
        BackendUnavailableError: ``xformers`` was asked for where it cannot run.

    Examples:
        >>> resolve_backend("auto", torch.zeros(1, 4, 2, 8))
        'sdpa'
    """
    if backend == "auto":
        return "sdpa" if xformers_unavailable_reason(query) else "xformers"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    if backend == "xformers":
        reason = xformers_unavailable_reason(query)
        if reason:
            raise BackendUnavailableError(f"attention backend 'xformers' cannot run: {reason}")
    return backend


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ShapeError(f"{name} must have shape (B, L, H, D), got rank {t.dim()}")
        if not t.is_floating_point():
            raise ShapeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ShapeError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ShapeError(
            f"q (B, Lq, H, D) and k (B, Lk, H, D) must agree on B, H and D, "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if mask is not None:
        expected = (k.shape[0], k.shape[1])
        if mask.dtype != torch.bool:
            raise ShapeError(f"valid_keys must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != expected:
            raise ShapeError(
                f"valid_keys must have shape (B, Lk) = {expected}, got {tuple(mask.shape)}"
            )


def _valid_keys(valid_keys: Tensor | None, key_padding_mask: Tensor | None) -> Tensor | None:
    """The key mask, from ``valid_keys`` or (deprecated, same meaning) ``key_padding_mask``."""
    if key_padding_mask is None:
        return valid_keys
    if valid_keys is not None:
        raise TypeError("pass valid_keys only; key_padding_mask is its deprecated alias")
    warnings.warn(
        "key_padding_mask is deprecated and will be removed in fusionkit 0.3; pass "
        "valid_keys= instead. Both mean True = a real key to attend to, the opposite of "
        "torch.nn.MultiheadAttention's key_padding_mask (True = ignore).",
        FutureWarning,
        stacklevel=3,
    )
    return key_padding_mask


def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, p: float) -> Tensor:
    probs = attention_probabilities(q, k, valid_keys=mask, scale=scale)
    if p > 0:
        probs = F.dropout(probs, p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, p: float) -> Tensor:
    attn_mask = None if mask is None else rearrange(mask, "b k -> b 1 1 k")
    q, k, v = (rearrange(t, "b l h d -> b h l d") for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=scale)
    return rearrange(out, "b h l d -> b l h d")


def _xformers(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, p: float
) -> Tensor:
    import xformers.ops as xops

    bias = None
    if mask is not None:
        batch, keys = mask.shape
        # The CUDA kernels want the bias rows 8-aligned in memory: slice a wider buffer.
        aligned = -(-keys // 8) * 8
        buffer = torch.zeros(batch, 1, 1, aligned, dtype=q.dtype, device=q.device)
        buffer[..., :keys].masked_fill_(~mask[:, None, None, :], float("-inf"))
        bias = buffer[..., :keys].expand(batch, q.shape[2], q.shape[1], keys)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=p, scale=scale)


_KERNELS = {"math": _math, "sdpa": _sdpa, "xformers": _xformers}


def attention_probabilities(
    q: Tensor,
    k: Tensor,
    *,
    valid_keys: Tensor | None = None,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The attention probabilities ``softmax(q kᵀ · scale)``, with padded keys excluded.

    This is what the fused kernels never materialise; explanations use it.

    Args:
        q: Queries ``(B, Lq, H, D)``.
        k: Keys ``(B, Lk, H, D)``.
        valid_keys: ``(B, Lk)`` bool, True = a real key to attend to. A query whose sample has
            no real key gets all-zero probabilities.
        scale: Logit scale, default ``1 / sqrt(D)``.
        key_padding_mask: Deprecated alias of ``valid_keys`` (same meaning; warns).

    Returns:
        Probabilities ``(B, H, Lq, Lk)``.

    Examples:
        >>> q = torch.randn(1, 3, 2, 8)
        >>> valid = torch.tensor([[True, True, False]])
        >>> attention_probabilities(q, q, valid_keys=valid)[..., 2].abs().sum().item()
        0.0
    """
    valid_keys = _valid_keys(valid_keys, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if valid_keys is None:
        return scores.softmax(-1)
    # A finite fill (not -inf) keeps fully padded rows free of NaN, in forward and backward.
    keep = rearrange(valid_keys, "b k -> b 1 1 k")
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return scores.softmax(-1) * keep


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    valid_keys: Tensor | None = None,
    backend: Backend | str = "auto",
    scale: float | None = None,
    dropout_p: float = 0.0,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Multi-head scaled dot-product attention over a padded batch.

    Args:
        q: Queries ``(B, Lq, H, D)``.
        k: Keys ``(B, Lk, H, D)``.
        v: Values ``(B, Lk, H, D)``.
        valid_keys: Optional ``(B, Lk)`` bool, True = a real key to attend to (the opposite of
            ``torch.nn.MultiheadAttention``'s ``key_padding_mask``). Other keys get zero
            weight; a sample with no real key at all gets a zero output (never NaN).
        backend: ``"auto"`` (xformers on CUDA when it can run, else sdpa), ``"xformers"``,
            ``"sdpa"`` or ``"math"`` (the plain reference).
        scale: Logit scale, default ``1 / sqrt(D)``.
        dropout_p: Dropout on the attention probabilities (pass 0 at evaluation).
        key_padding_mask: Deprecated alias of ``valid_keys`` (same meaning, True = real key);
            warns with a ``FutureWarning`` and goes in fusionkit 0.3.

    Returns:
        The attended values ``(B, Lq, H, D)``.

    Raises:
        ShapeError: Wrong ranks, mismatched batch/heads/head size, or a mask of the wrong
            shape or dtype (a ``ValueError``).
        BackendUnavailableError: ``backend="xformers"`` where xformers cannot run.
        TypeError: Both ``valid_keys`` and its deprecated alias given.

    Examples:
        >>> q = k = v = torch.randn(2, 10, 4, 16)
        >>> valid = torch.arange(10) < torch.tensor([[10], [6]])
        >>> attention(q, k, v, valid_keys=valid).shape
        torch.Size([2, 10, 4, 16])
    """
    mask = _valid_keys(valid_keys, key_padding_mask)
    _check_inputs(q, k, v, mask)
    chosen = resolve_backend(backend, q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    empty = None
    if mask is not None:
        # Samples without any real key would give NaN in the fused kernels: let them attend to
        # everything, then zero their output. On CPU, inspecting the mask is free and lets a
        # dense mask be dropped; on an accelerator that would cost two host syncs per call.
        empty = ~mask.any(dim=1)
        if mask.device.type == "cpu":
            if bool(mask.all()):
                mask = empty = None
            elif not bool(empty.any()):
                empty = None
        if empty is not None:
            mask = mask | empty[:, None]
    out = _KERNELS[chosen](q, k, v, mask, scale, dropout_p)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out
