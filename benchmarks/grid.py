"""The axes shared by every benchmark case: profiles, modes, implementations, the environment
the cases run in, and the closed-form work formulas (FLOPs, text lengths)."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BACKENDS",
    "BACKWARD_FACTOR",
    "DENSE_IMPLS",
    "MODES",
    "PEER_IMPLS",
    "PROFILES",
    "TEXT_LENGTH_SIGMA",
    "TEXT_MEAN_FRACTION",
    "VARLEN_IMPLS",
    "Environment",
    "Mode",
    "Profile",
    "attention_flops",
    "check_profile",
    "layer_flops",
    "matmul_flops",
    "mode_factor",
    "profile_dtypes",
    "short_dtype",
    "text_lengths",
]

Profile = Literal["quick", "cpu", "gpu"]
Mode = Literal["fwd", "fwd+bwd"]
PROFILES: tuple[str, ...] = ("quick", "cpu", "gpu")
#: ``fwd``: inference (eval mode, ``torch.inference_mode``); ``fwd+bwd``: one training step's
#: forward and backward (train mode, dropout 0), gradients for every parameter and input.
MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
#: Attention backends in table order: the fast kernels first, the plain reference last.
BACKENDS: tuple[str, ...] = ("xformers", "sdpa", "math")
#: Dense layer comparison. ``fusionkit`` is the whole ``SequenceWiseAttention`` module (input
#: projections, type embeddings, summary tokens, one layer, final norm) on the per-modality
#: tokens; ``fusionkit-layer`` is its ``TransformerLayer`` alone on the padded concatenation,
#: i.e. exactly the peers' work.
DENSE_IMPLS: tuple[str, ...] = ("fusionkit", "fusionkit-layer", "torch", "timm")
#: Variable-length comparison: fusionkit's module packed and padded, its bare layer packed
#: (pack, layer, unpack) and padded, and the peers on the padded batch.
VARLEN_IMPLS: tuple[str, ...] = (
    "fusionkit-packed",
    "fusionkit-padded",
    "fusionkit-layer-packed",
    "fusionkit-layer-padded",
    "torch",
    "timm",
)
PEER_IMPLS: tuple[str, ...] = ("torch", "timm")
#: Mean real text length as a fraction of the padded length in variable-length batches.
TEXT_MEAN_FRACTION = 0.25
#: Spread (sigma of the log) of text lengths: right-skewed like captions and product titles,
#: coefficient of variation about 0.65.
TEXT_LENGTH_SIGMA = 0.6
#: Backward work relative to forward: each forward matmul has two backward ones (input and
#: weight gradients; for attention dQ/dK and dP/dV). Recomputation inside fused kernels is
#: not counted: the rate is useful work per second.
BACKWARD_FACTOR = 2

_SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def mode_factor(mode: str) -> int:
    """FLOPs of ``mode`` as a multiple of the forward FLOPs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return 1 if mode == "fwd" else 1 + BACKWARD_FACTOR


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """Forward FLOPs of scaled dot-product attention: ``q kᵀ`` and ``p v``, 2 FLOPs per MAC.

    Counted on the padded shape (what a kernel computes; a mask saves nothing in it).
    """
    return 4 * batch * heads * q_len * kv_len * head_dim


def layer_flops(lengths: tuple[int, ...] | list[int], dim: int, mlp_ratio: float) -> int:
    """Forward FLOPs of one pre-norm transformer layer over samples of the given real lengths.

    Per sample of ``n`` tokens: the qkv and output projections ``2·n·dim·4·dim``, the MLP
    ``2·n·dim·2·hidden`` and attention ``4·n²·dim``. Counted on real tokens only, so padded
    and packed implementations of the same batch share one count and the rate shows the
    useful work per second.
    """
    hidden = max(1, round(dim * mlp_ratio))
    per_token = 2 * dim * (4 * dim + 2 * hidden)
    return sum(n * per_token + 4 * n * n * dim for n in lengths)


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an ``(m, k) @ (k, n)`` matmul."""
    return 2 * m * n * k


def text_lengths(
    batch: int, max_len: int, *, mean_fraction: float = TEXT_MEAN_FRACTION, seed: int = 0
) -> tuple[int, ...]:
    """Real text lengths of a variable-length batch, deterministic for a seed.

    Lengths follow a log-normal law (right-skewed: many short texts, a few long ones) with
    mean ``mean_fraction · max_len``, cut to ``[1, max_len]``. They are the law's quantiles at
    ``(i + ½) / batch`` in a seeded random order, so even a small batch has the intended mean
    instead of a noisy draw.

    Args:
        batch: Number of samples.
        max_len: The padded length.
        mean_fraction: Mean length over ``max_len``.
        seed: Seed of the order.

    Returns:
        ``batch`` lengths.

    Examples:
        >>> lengths = text_lengths(32, 77)
        >>> round(sum(lengths) / len(lengths) / 77, 2)
        0.25
    """
    mean = mean_fraction * max_len
    mu = math.log(mean) - TEXT_LENGTH_SIGMA**2 / 2
    normal = statistics.NormalDist()
    lengths = [
        min(max_len, max(1, round(math.exp(mu + TEXT_LENGTH_SIGMA * normal.inv_cdf(q)))))
        for q in ((i + 0.5) / batch for i in range(batch))
    ]
    random.Random(seed).shuffle(lengths)
    return tuple(lengths)


def short_dtype(dtype: str) -> str:
    """``float32`` → ``fp32`` (for case ids)."""
    return _SHORT_DTYPES.get(dtype, dtype)


# Environment --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    """Where the cases run.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        xformers: Whether xformers kernels can run there (CUDA and an importable xformers).
    """

    device: str
    xformers: bool

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtypes of the full grid on this device: fp32 on CPU, bf16 and fp32 on CUDA."""
        return ("float32",) if self.device == "cpu" else ("bfloat16", "float32")

    @property
    def fast_dtype(self) -> str:
        """The one dtype of the reduced grids: fp32 on CPU, bf16 on CUDA."""
        return self.dtypes[0]

    @property
    def backends(self) -> tuple[str, ...]:
        """Attention backends that can run here, in table order."""
        return tuple(b for b in BACKENDS if b != "xformers" or self.xformers)


def check_profile(profile: str) -> None:
    """Raise ``ValueError`` unless ``profile`` is one of :data:`PROFILES`."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")


def profile_dtypes(profile: str, env: Environment) -> tuple[str, ...]:
    """The dtypes of a grid: every dtype of ``env`` on ``gpu``, its fast one otherwise."""
    return env.dtypes if profile == "gpu" else (env.fast_dtype,)
