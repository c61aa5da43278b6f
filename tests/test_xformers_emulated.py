"""The xformers backend against ``math``, through the public API, on an emulated or a real kernel.

On CPU the ``kernel`` fixture is ``emulated``: `conftest.reference_memory_efficient_attention`
replaces xformers' ``memory_efficient_attention`` and refuses what the CUDA kernels refuse
(misaligned or mis-shaped biases, block-diagonal masks over a batch), so fusionkit's own
xformers code (the 8-aligned bias buffer, the block-diagonal masks and their dummy keys) runs
and is checked here. Where CUDA is present the same tests also run on the real kernels in
float16 and bfloat16 (marked ``cuda``: ``make gpu-check`` runs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from conftest import (
    TOLERANCES,
    lengths_mask,
    reference_memory_efficient_attention,
    watch_xformers,
)

import fusionkit
from fusionkit.attention import (
    PackedSequences,
    attention,
    functional,
    resolve_backend,
    varlen_attention,
    xformers_unavailable_reason,
)
from fusionkit.errors import BackendUnavailableError

ROOT = Path(__file__).resolve().parents[1]
# The GPU check lives in the repository's benchmarks/ (not in the package): import it there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402

CUDA = torch.cuda.is_available()
#: Every registered sequence fusion (built-in or plugin) runs through the xformers checks.
SEQUENCE_FUSIONS = fusionkit.list_components("sequence_fusion")


@dataclass(frozen=True)
class Kernel:
    """Which ``memory_efficient_attention`` runs, on which device, in which dtype; ``calls``
    lists the bias type of each of its calls during a test."""

    name: str
    device: str
    dtype: torch.dtype
    calls: list[str] = field(default_factory=list, compare=False, repr=False)


KERNELS = [
    pytest.param(Kernel("emulated", "cpu", torch.float32), id="emulated-fp32"),
    pytest.param(Kernel("emulated", "cpu", torch.bfloat16), id="emulated-bf16"),
]
if CUDA:
    KERNELS += [
        pytest.param(Kernel("cuda", "cuda", dtype), id=f"cuda-{name}", marks=pytest.mark.cuda)
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16))
    ]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """The kernel under test, watched (see `Kernel`)."""
    spec = request.param
    if spec.name == "emulated":
        calls = request.getfixturevalue("emulated_xformers")
    else:
        import xformers.ops

        calls = watch_xformers(monkeypatch, xformers.ops.memory_efficient_attention)
    return replace(spec, calls=calls)


def assert_matches(actual, expected, dtype, slack=1.0):
    """`conftest.TOLERANCES` of ``dtype``, times ``slack``; ``expected`` in ``actual``'s dtype."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual, expected.to(actual.dtype), rtol=rtol * slack, atol=atol * slack
    )


def randn(*shape, kernel, grad=False):
    x = torch.randn(*shape).to(kernel.device, kernel.dtype)
    return x.requires_grad_(grad)


def math_reference(q, k, v, mask):
    """``math`` on float32 copies: what a kernel in q's dtype should come close to."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = attention(q32, k32, v32, valid_keys=mask, backend="math")
    return out, (q32, k32, v32)


# attention() over a padded batch --------------------------------------------------------------

PADDED_CASES = [
    pytest.param((2, 16, 16, 4, 32), None, id="dense"),
    pytest.param((2, 16, 16, 4, 32), [16, 16], id="full-mask"),
    pytest.param((3, 12, 12, 2, 16), [12, 7, 3], id="padded-self"),
    pytest.param((3, 9, 13, 2, 16), [13, 5, 1], id="padded-cross-13-keys"),
    pytest.param((2, 4, 5, 2, 8), [5, 2], id="5-keys"),
    pytest.param((2, 6, 17, 2, 8), [17, 9], id="17-keys"),
    pytest.param((3, 10, 10, 2, 8), [10, 4, 0], id="sample-without-keys"),
    pytest.param((2, 5, 7, 2, 8), [0, 0], id="no-keys-at-all"),
]


@pytest.mark.parametrize(("shape", "lengths"), PADDED_CASES)
def test_attention_matches_math(kernel, shape, lengths):
    batch, lq, lk, heads, head_dim = shape
    q = randn(batch, lq, heads, head_dim, kernel=kernel, grad=True)
    k = randn(batch, lk, heads, head_dim, kernel=kernel, grad=True)
    v = randn(batch, lk, heads, head_dim, kernel=kernel, grad=True)
    mask = None if lengths is None else lengths_mask(lengths, lk).to(kernel.device)

    out = attention(q, k, v, valid_keys=mask, backend="xformers")
    expected, inputs32 = math_reference(q, k, v, mask)

    # On CPU a mask without padding is dropped; on CUDA it is not inspected (that would cost
    # a host sync) and travels as a bias.
    padding = lengths is not None and (kernel.device == "cuda" or min(lengths) < lk)
    assert kernel.calls == ["Tensor" if padding else "NoneType"]
    assert out.shape == q.shape and out.dtype == kernel.dtype
    assert_matches(out, expected, kernel.dtype)
    if lengths is not None:
        empty = torch.tensor(lengths, device=kernel.device) == 0
        assert torch.all(out[empty] == 0)

    cotangent = torch.randn(out.shape).to(kernel.device)
    grads = torch.autograd.grad(out, (q, k, v), cotangent.to(out.dtype))
    grads32 = torch.autograd.grad(expected, inputs32, cotangent)
    for grad, grad32 in zip(grads, grads32, strict=True):
        assert torch.isfinite(grad).all()
        assert_matches(grad, grad32, kernel.dtype, slack=2.0)


def test_attention_scale_reaches_the_kernel(kernel):
    q, k, v = (randn(2, 6, 2, 8, kernel=kernel) for _ in range(3))
    mask = lengths_mask([6, 3], 6).to(kernel.device)
    out = attention(q, k, v, valid_keys=mask, backend="xformers", scale=0.3)
    expected = attention(
        q.float(), k.float(), v.float(), valid_keys=mask, scale=0.3, backend="math"
    )
    assert_matches(out, expected, kernel.dtype)
    unscaled = attention(q.float(), k.float(), v.float(), valid_keys=mask, backend="math")
    assert not torch.allclose(out.float(), unscaled, atol=1e-2)


# varlen_attention over packed sequences -------------------------------------------------------

VARLEN_CASES = [
    pytest.param([7, 3, 5, 1, 7], None, id="self"),
    pytest.param([13, 17, 9], None, id="self-not-multiples-of-8"),
    pytest.param([7, 3, 5, 1], [4, 9, 2, 2], id="cross"),
    pytest.param([7, 3, 5, 1], [4, 9, 0, 2], id="cross-empty-key-block"),
    pytest.param([3, 4], [0, 5], id="cross-first-key-block-empty"),
    pytest.param([0, 4, 6], None, id="self-empty-query-block"),
    pytest.param([5, 0, 3], [4, 6, 2], id="cross-empty-query-block"),
    pytest.param([0, 6, 2], [3, 0, 11], id="cross-empty-query-and-key-blocks"),
]


@pytest.mark.parametrize(("q_lengths", "kv_lengths"), VARLEN_CASES)
def test_varlen_attention_matches_math_and_padded(kernel, q_lengths, kv_lengths):
    self_attention = kv_lengths is None
    kv_lengths = q_lengths if self_attention else kv_lengths
    q_mask = lengths_mask(q_lengths).to(kernel.device)
    kv_mask = lengths_mask(kv_lengths).to(kernel.device)
    batch, heads, head_dim = len(q_lengths), 2, 8
    q = randn(batch, q_mask.shape[1], heads, head_dim, kernel=kernel, grad=True)
    k = randn(batch, kv_mask.shape[1], heads, head_dim, kernel=kernel, grad=True)
    v = randn(batch, kv_mask.shape[1], heads, head_dim, kernel=kernel, grad=True)
    q_seqs = PackedSequences.from_mask(q_mask)
    kv_seqs = q_seqs if self_attention else PackedSequences.from_mask(kv_mask)

    packed = varlen_attention(
        q_seqs.pack(q),
        kv_seqs.pack(k),
        kv_seqs.pack(v),
        q_seqs,
        None if self_attention else kv_seqs,
        backend="xformers",
    )
    assert kernel.calls == ["BlockDiagonalMask"]
    assert packed.shape == (sum(q_lengths), heads, head_dim) and packed.dtype == kernel.dtype
    out = q_seqs.unpack(packed)

    keep = q_mask[..., None, None]
    expected, inputs32 = math_reference(q, k, v, kv_mask)
    assert_matches(out, expected * keep, kernel.dtype)
    padded = attention(q, k, v, valid_keys=kv_mask, backend="xformers") * keep
    assert_matches(out, padded, kernel.dtype)

    cotangent = torch.randn(out.shape).to(kernel.device) * keep
    grads = torch.autograd.grad(out, (q, k, v), cotangent.to(out.dtype))
    grads32 = torch.autograd.grad(expected, inputs32, cotangent)
    for grad, grad32 in zip(grads, grads32, strict=True):
        assert torch.isfinite(grad).all()
        assert_matches(grad, grad32, kernel.dtype, slack=2.0)


# Every registered sequence fusion, packed and padded -----------------------------------------

DIMS = {"text": 12, "image": 20}


def build_fusion(name, **options):
    options = {"dim": 32, "layers": 2, "heads": 4} | options
    return fusionkit.create("sequence_fusion", name, input_dims=DIMS, **options)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", SEQUENCE_FUSIONS)
def test_sequence_fusion_matches_math(kernel, name, packing):
    reference = build_fusion(name, attention_backend="math", packing=False).eval()
    fast = build_fusion(name, attention_backend="xformers", packing=packing).eval()
    fast.load_state_dict(reference.state_dict())
    fast.to(kernel.device, kernel.dtype)
    reference.to(kernel.device)
    # Sample 2 has no text: empty query and key blocks in the packed streams.
    text_lengths = [7, 3, 0, 13]
    tokens = {
        "text": torch.randn(4, max(text_lengths), DIMS["text"]),
        "image": torch.randn(4, 9, DIMS["image"]),
    }
    masks = {"text": lengths_mask(text_lengths).to(kernel.device)}
    tokens = {m: t.to(kernel.device) for m, t in tokens.items()}

    expected = reference(tokens, masks, return_tokens=True)
    fast_tokens = {m: t.to(kernel.dtype).requires_grad_() for m, t in tokens.items()}
    out = fast(fast_tokens, masks, return_tokens=True)

    if packing:
        assert set(kernel.calls) == {"BlockDiagonalMask"}
    else:
        assert "Tensor" in kernel.calls and "BlockDiagonalMask" not in kernel.calls
    # A whole module in 16 bits drifts further from float32 than one attention call.
    slack = 1.0 if kernel.dtype == torch.float32 else 2.5
    for modality, summary in out.summaries.items():
        assert_matches(summary, expected.summaries[modality], kernel.dtype, slack)
    for modality, fused in out.tokens.items():
        assert_matches(fused, expected.tokens[modality], kernel.dtype, slack)

    loss = sum(s.float().square().sum() for s in out.summaries.values())
    loss = loss + sum(t.float().square().sum() for t in out.tokens.values())
    loss.backward()
    for param_name, param in fast.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    for modality, t in fast_tokens.items():
        assert torch.isfinite(t.grad).all(), modality


# The emulation itself: off by default, and as strict as the kernels ---------------------------


def test_emulation_is_off_unless_a_test_turns_it_on():
    assert not functional.XFORMERS_EMULATED_DEVICES
    q = torch.zeros(1, 4, 2, 8)
    assert "CUDA only" in xformers_unavailable_reason(q)
    assert resolve_backend("auto", q) == "sdpa"


def test_emulation_lets_xformers_be_chosen_on_cpu(emulated_xformers):
    q = torch.randn(2, 4, 2, 8)
    assert xformers_unavailable_reason(q) is None
    assert resolve_backend("auto", q) == "xformers"
    attention(q, q, q, valid_keys=lengths_mask([4, 2], 4))
    assert emulated_xformers == ["Tensor"]
    with pytest.raises(BackendUnavailableError, match="float64"):
        attention(q.double(), q.double(), q.double(), backend="xformers")


def _bias_buffer(batch, heads, q_len, k_len, width):
    return torch.zeros(batch, 1, 1, width)[..., :k_len].expand(batch, heads, q_len, k_len)


def test_reference_refuses_what_the_kernels_refuse():
    from xformers.ops import fmha

    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 5, 2, 8)
    ok = reference_memory_efficient_attention(q, k, k, attn_bias=_bias_buffer(2, 2, 3, 5, 8))
    assert_matches(ok, reference_memory_efficient_attention(q, k, k), torch.float32)
    with pytest.raises(ValueError, match="multiples of 8"):
        reference_memory_efficient_attention(q, k, k, attn_bias=_bias_buffer(2, 2, 3, 5, 5))
    with pytest.raises(ValueError, match="multiples of 8"):
        reference_memory_efficient_attention(q, k, k, attn_bias=torch.zeros(2, 2, 3, 5))
    with pytest.raises(ValueError, match="expected"):
        reference_memory_efficient_attention(q, k, k, attn_bias=_bias_buffer(2, 2, 5, 3, 8))
    with pytest.raises(ValueError, match=r"attn_bias is torch\.float16"):
        reference_memory_efficient_attention(q, k, k, attn_bias=_bias_buffer(2, 2, 3, 5, 8).half())
    with pytest.raises(ValueError, match="batch 1"):
        block = fmha.BlockDiagonalMask.from_seqlens([1, 2], [2, 3])
        reference_memory_efficient_attention(q, k, k, attn_bias=block)
    with pytest.raises(AssertionError):  # block lengths that do not add up to the keys
        block = fmha.BlockDiagonalMask.from_seqlens([1, 2], [2, 2])
        reference_memory_efficient_attention(q[:1], k[:1], k[:1], attn_bias=block)
    with pytest.raises(ValueError, match="rank"):
        reference_memory_efficient_attention(q[0], k[0], k[0])
    with pytest.raises(TypeError, match="AttentionBias"):
        reference_memory_efficient_attention(q, k, k, attn_bias="causal")


def test_reference_matches_a_hand_computed_block_diagonal_case():
    from xformers.ops import fmha

    # Two blocks: query 0 sees key 0; queries 1-2 see keys 1-2. Keys differ only in values.
    q = torch.zeros(1, 3, 1, 4)
    k = torch.zeros(1, 3, 1, 4)
    v = torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1).expand(1, 3, 1, 4)
    block = fmha.BlockDiagonalMask.from_seqlens([1, 2], [1, 2])
    out = reference_memory_efficient_attention(q, k, v, attn_bias=block)
    expected = torch.tensor([1.0, 3.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 1, 4)
    assert_matches(out, expected, torch.float32)


# make gpu-check without CUDA ------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_gpu_check_stops_at_once_without_cuda(tmp_path):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert done.returncode != 0
    assert "CUDA" in done.stderr and "make gpu-check" in done.stderr
    assert seconds < 60
    assert not out.exists()


def test_gpu_check_preflight_says_why(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_unavailable_reason", lambda: "no GPU in this test")
    assert gpu_check.main(["--preflight"]) == 2
    assert "no GPU in this test" in capsys.readouterr().err


def test_gpu_check_trains_the_quickstart_briefly_in_bf16_on_xformers():
    from fusionkit.config import RunConfig

    raw = gpu_check.training_config(ROOT / "configs" / "quickstart.yaml", epochs=2)
    run = RunConfig.from_dict(raw)
    assert (run.train.epochs, run.train.precision, run.train.device) == (2, "bf16", "cuda")
    assert raw["fusion"]["sequence"]["attention_backend"] == "xformers"


def test_gpu_check_steps_report_status_and_stop_at_their_timeout(tmp_path):
    passed = gpu_check.run_step(
        "ok", [sys.executable, "-c", "print('hi')"], tmp_path / "ok.log", 30, tmp_path
    )
    assert (passed.status, passed.returncode, passed.log) == ("passed", 0, "ok.log")
    assert "hi" in (tmp_path / "ok.log").read_text()
    failed = gpu_check.run_step(
        "bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log", 30, tmp_path
    )
    assert (failed.status, failed.returncode) == ("failed", 3)
    start = time.perf_counter()
    slow = gpu_check.run_step(
        "slow",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        tmp_path / "slow.log",
        1,
        tmp_path,
    )
    assert slow.status == "timeout" and slow.returncode is None
    assert time.perf_counter() - start < 20
    skipped = gpu_check.run_step("late", ["true"], tmp_path / "late.log", 0, tmp_path)
    assert skipped.status == "skipped" and not (tmp_path / "late.log").exists()


def test_gpu_check_merges_benchmark_runs(tmp_path):
    first, second, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "gpu.json"
    first.write_text(json.dumps({"machine_info": {"node": "gpu"}, "benchmarks": [{"name": "a"}]}))
    second.write_text(json.dumps({"machine_info": {"node": "x"}, "benchmarks": [{"name": "b"}]}))
    missing = tmp_path / "cut-short.json"
    assert gpu_check.merge_benchmark_runs([first, missing, second], merged) == 2
    data = json.loads(merged.read_text())
    assert data["machine_info"] == {"node": "gpu"}
    assert [case["name"] for case in data["benchmarks"]] == ["a", "b"]
    assert gpu_check.merge_benchmark_runs([missing], tmp_path / "none.json") == 0
    assert not (tmp_path / "none.json").exists()
