"""Attention backends against the plain reference, packed against padded, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, lengths_mask

from fusionkit.attention import (
    BACKENDS,
    PackedSequences,
    attention,
    attention_probabilities,
    resolve_backend,
    varlen_attention,
    xformers_unavailable_reason,
)
from fusionkit.errors import BackendUnavailableError, ShapeError

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def reference(q, k, v, mask=None):
    """Hand-written attention in float64, independent of the library code."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v64).to(q.dtype)


def xformers_here(request, backend, tensor):
    """On CPU, the xformers backend runs fusionkit's xformers code on the emulated kernel
    (``conftest.emulated_xformers``); on CUDA, on the real one."""
    if backend == "xformers" and tensor.device.type == "cpu":
        request.getfixturevalue("emulated_xformers")


CASES = [
    pytest.param((2, 16, 16, 4, 32), None, id="dense"),
    pytest.param((3, 9, 13, 2, 16), [13, 5, 1], id="padded-cross"),
    pytest.param((3, 12, 12, 4, 8), [12, 7, 0], id="padded-with-empty-sample"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("shape", "lengths"), CASES)
def test_backends_match_reference(request, backend, device, dtype, shape, lengths):
    batch, lq, lk, heads, head_dim = shape
    q = torch.randn(batch, lq, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, lk, heads, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, lk, heads, head_dim, device=device, dtype=dtype)
    xformers_here(request, backend, q)
    mask = None if lengths is None else lengths_mask(lengths, lk).to(device)
    if backend == "xformers" and dtype == torch.float64:
        with pytest.raises(BackendUnavailableError, match=r"not torch\.float64"):
            attention(q, k, v, valid_keys=mask, backend=backend)
        return
    expected = reference(q, k, v, mask)
    out = attention(q, k, v, valid_keys=mask, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert not out.isnan().any()
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_appending_padding_never_changes_output(request, backend):
    q, k, v = torch.randn(3, 2, 10, 4, 16).unbind(0)
    xformers_here(request, backend, q)
    mask = lengths_mask([10, 6], 10)
    base = attention(q, k, v, valid_keys=mask, backend=backend)
    pad = torch.randn(2, 5, 4, 16) * 100
    longer = attention(
        q,
        torch.cat([k, pad], 1),
        torch.cat([v, pad], 1),
        valid_keys=torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1),
        backend=backend,
    )
    assert_close(longer, base)


def test_fully_masked_sample_is_zero_with_finite_gradients():
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 2, 5, 2, 8).unbind(0))
    mask = lengths_mask([5, 0], 5)
    for backend in ("math", "sdpa"):
        out = attention(q, k, v, valid_keys=mask, backend=backend)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        out.sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
            t.grad = None


def test_dense_mask_equals_no_mask():
    q, k, v = torch.randn(3, 2, 6, 2, 8).unbind(0)
    full = torch.ones(2, 6, dtype=torch.bool)
    assert_close(attention(q, k, v, valid_keys=full), attention(q, k, v))


def test_auto_picks_sdpa_on_cpu_and_xformers_refuses_with_reason():
    q = torch.randn(1, 4, 2, 8)
    assert resolve_backend("auto", q) == "sdpa"
    assert resolve_backend("math", q) == "math"
    with pytest.raises(BackendUnavailableError, match="CUDA only"):
        attention(q, q, q, backend="xformers")
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, q, q, backend="flash")


def test_xformers_reason_names_the_device():
    assert "on cpu" in xformers_unavailable_reason(torch.zeros(1))
    assert xformers_unavailable_reason(torch.zeros(1, dtype=torch.float64)) is not None


@pytest.mark.parametrize(
    ("q_lengths", "kv_lengths"),
    [
        pytest.param([7, 3, 5, 1, 7], None, id="self"),
        pytest.param([7, 3, 5, 1], [4, 9, 0, 2], id="cross-with-empty-keys"),
        pytest.param([64, 3, 40, 17, 9, 64, 33], None, id="many-buckets"),
        pytest.param([0, 4], None, id="empty-query-sample"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_padded(request, q_lengths, kv_lengths, backend):
    xformers_here(request, backend, torch.zeros(1))
    kv_lengths = q_lengths if kv_lengths is None else kv_lengths
    q_mask, kv_mask = lengths_mask(q_lengths), lengths_mask(kv_lengths)
    batch, heads, head_dim = len(q_lengths), 2, 8
    q = torch.randn(batch, q_mask.shape[1], heads, head_dim, requires_grad=True)
    k = torch.randn(batch, kv_mask.shape[1], heads, head_dim, requires_grad=True)
    v = torch.randn(batch, kv_mask.shape[1], heads, head_dim, requires_grad=True)
    padded = attention(q, k, v, valid_keys=kv_mask, backend=backend) * q_mask[..., None, None]

    q_seqs = PackedSequences.from_mask(q_mask)
    kv_seqs = q_seqs if kv_lengths is q_lengths else PackedSequences.from_mask(kv_mask)
    packed = varlen_attention(
        q_seqs.pack(q), kv_seqs.pack(k), kv_seqs.pack(v), q_seqs, kv_seqs, backend=backend
    )
    assert packed.shape == (sum(q_lengths), heads, head_dim)
    assert_close(q_seqs.unpack(packed), padded)

    grads_padded = torch.autograd.grad(padded.square().sum(), (q, k, v))
    grads_packed = torch.autograd.grad(q_seqs.unpack(packed).square().sum(), (q, k, v))
    for a, b in zip(grads_packed, grads_padded, strict=True):
        assert_close(a, b)


def test_pack_unpack_round_trip():
    mask = lengths_mask([3, 0, 2], 4)
    seqs = PackedSequences.from_mask(mask)
    x = torch.arange(24.0).view(3, 4, 2)
    packed = seqs.pack(x)
    assert seqs.total == 5 and seqs.lengths == [3, 0, 2]
    assert packed[:, 0].tolist() == [0.0, 2.0, 4.0, 16.0, 18.0]
    assert torch.equal(seqs.unpack(packed), x * mask[..., None])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(2, 4, 8),) * 3, "q must have shape \\(B, L, H, D\\)"),
        ((torch.randn(2, 4, 2, 8), torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8)), "agree on B"),
        ((torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 5, 2, 8)), "same shape"),
        ((torch.randint(0, 3, (2, 4, 2, 8)),) * 3, "floating-point"),
    ],
)
def test_bad_shapes(args, match):
    with pytest.raises(ShapeError, match=match):
        attention(*args)


def test_bad_masks():
    q = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"valid_keys must have shape \(B, Lk\)"):
        attention(q, q, q, valid_keys=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        attention(q, q, q, valid_keys=torch.ones(2, 4))
    seqs = PackedSequences.from_mask(lengths_mask([4, 2]))
    with pytest.raises(ShapeError, match="do not match the packings"):
        varlen_attention(torch.randn(5, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8), seqs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_mask_is_a_deprecated_alias_of_valid_keys(request, backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    xformers_here(request, backend, q)
    valid = lengths_mask([7, 3])
    expected = attention(q, k, v, valid_keys=valid, backend=backend)
    with pytest.warns(FutureWarning, match="valid_keys"):
        old = attention(q, k, v, key_padding_mask=valid, backend=backend)
    assert_close(old, expected)
    with pytest.warns(FutureWarning, match="opposite of torch.nn.MultiheadAttention"):
        probs = attention_probabilities(q, k, key_padding_mask=valid)
    assert_close(probs, attention_probabilities(q, k, valid_keys=valid))
    with pytest.raises(TypeError, match="valid_keys only"):
        attention(q, k, v, valid_keys=valid, key_padding_mask=valid)
