"""The attention cases: ``fusionkit.attention.attention()`` per backend over CMA-CLIP's fusion
shapes (the speed grid), and peak memory against sequence length (the memory sweep)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

from benchmarks.grid import (
    MODES,
    Environment,
    attention_flops,
    check_profile,
    mode_factor,
    profile_dtypes,
    short_dtype,
    text_lengths,
)

__all__ = [
    "TARGET_MEMORY_SEQ_LEN",
    "AttentionCase",
    "AttentionShape",
    "attention_cases",
    "memory_cases",
]


@dataclass(frozen=True)
class AttentionShape:
    """One attention problem ``(B, Lq, H, D)`` × ``(B, Lk, H, D)``.

    Attributes:
        label: How the table names it, e.g. ``"self 50+77"``.
        batch: ``B``.
        q_len: ``Lq``.
        kv_len: ``Lk``.
        heads: ``H``.
        head_dim: ``D``.
        kv_real: Real keys per sample when the ``padding`` mask is used.
    """

    label: str
    batch: int
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    kv_real: tuple[int, ...]

    @classmethod
    def fusion_self(
        cls, batch: int, image: int, text: int, heads: int, head_dim: int = 64
    ) -> AttentionShape:
        """Self-attention over the concatenation of ``image`` patch and ``text`` word tokens
        (sequence-wise attention); the padding mask pads the text to ``text``."""
        real = tuple(image + n for n in text_lengths(batch, text))
        length = image + text
        return cls(f"self {image}+{text}", batch, length, length, heads, head_dim, real)

    @classmethod
    def fusion_cross(
        cls, batch: int, image: int, text: int, heads: int, head_dim: int = 64
    ) -> AttentionShape:
        """Image tokens attending to padded text tokens (co-attention)."""
        real = text_lengths(batch, text)
        return cls(f"cross {image}<-{text}", batch, image, text, heads, head_dim, real)

    @classmethod
    def sequence(cls, length: int, batch: int = 1, heads: int = 8, head_dim: int = 64):
        """A plain self-attention of ``length`` tokens; padding makes the second half padding."""
        real = tuple(max(1, length // 2) for _ in range(batch))
        return cls(f"L={length}", batch, length, length, heads, head_dim, real)


@dataclass(frozen=True)
class AttentionCase:
    """``fusionkit.attention.attention()`` on one backend, dtype, mask and mode.

    Attributes:
        family: ``"attention"`` (speed grid) or ``"memory"`` (peak memory vs length).
        backend: ``"xformers"``, ``"sdpa"`` or ``"math"``.
        dtype: Torch dtype name.
        mode: ``"fwd"`` or ``"fwd+bwd"``.
        mask: ``"none"`` (no mask) or ``"padding"`` (a key padding mask, see ``shape.kv_real``).
        shape: The problem.
    """

    family: str
    backend: str
    dtype: str
    mode: str
    mask: str
    shape: AttentionShape

    @property
    def id(self) -> str:
        s = self.shape
        return (
            f"{self.backend}-{short_dtype(self.dtype)}-{self.mode}-{self.mask}-"
            f"{s.label.replace(' ', '')}-B{s.batch}-H{s.heads}"
        )

    @property
    def flops(self) -> int:
        s = self.shape
        return attention_flops(s.batch, s.heads, s.q_len, s.kv_len, s.head_dim) * mode_factor(
            self.mode
        )

    def info(self) -> dict[str, Any]:
        """What the report needs, for ``benchmark.extra_info``."""
        s = self.shape
        real = sum(s.kv_real) / (s.batch * s.kv_len) if self.mask == "padding" else 1.0
        return {
            "family": self.family,
            "case": self.id,
            "impl": self.backend,
            "dtype": self.dtype,
            "mode": self.mode,
            "mask": self.mask,
            "shape": s.label,
            "batch": s.batch,
            "q_len": s.q_len,
            "kv_len": s.kv_len,
            "heads": s.heads,
            "head_dim": s.head_dim,
            "real_fraction": real,
            "tokens": s.batch * s.q_len,
            "samples": s.batch,
            "flops": self.flops,
            "flops_basis": "padded shape",
        }


_ATTENTION_SHAPES: dict[str, list[AttentionShape]] = {
    "quick": [AttentionShape.fusion_self(2, 6, 5, heads=2, head_dim=8)],
    "cpu": [
        AttentionShape.fusion_self(32, 50, 77, heads=8),
        AttentionShape.fusion_self(8, 197, 77, heads=12),
        AttentionShape.fusion_self(2, 577, 256, heads=12),
        AttentionShape.fusion_cross(8, 197, 77, heads=12),
    ],
    "gpu": [
        *(
            AttentionShape.fusion_self(batch, image, text, heads)
            for batch, image, text, heads in product((32, 256), (50, 197, 577), (77, 256), (8, 12))
        ),
        *(
            AttentionShape.fusion_cross(batch, image, 77, heads=12)
            for batch, image in product((32, 256), (50, 197, 577))
        ),
    ],
}


def attention_cases(profile: str, env: Environment) -> list[AttentionCase]:
    """The attention speed grid: shapes × dtypes × backends × masks × modes."""
    check_profile(profile)
    return [
        AttentionCase("attention", backend, dtype, mode, mask, shape)
        for shape, dtype, mask, mode, backend in product(
            _ATTENTION_SHAPES[profile],
            profile_dtypes(profile, env),
            ("none", "padding"),
            MODES,
            env.backends,
        )
    ]


#: Sequence lengths of the memory sweep; the last one is the memory target's length.
_MEMORY_LENGTHS: dict[str, tuple[int, ...]] = {
    "quick": (32,),
    "cpu": (256, 512, 1024, 2048, 4096),
    "gpu": (256, 512, 1024, 2048, 4096),
}
TARGET_MEMORY_SEQ_LEN = 4096
#: On CPU the plain ``math`` backward at 4096 tokens takes tens of seconds on 2 cores; the
#: training-memory curve stops here (the forward still goes to 4096).
_CPU_BACKWARD_MAX_LEN = 2048


def memory_cases(profile: str, env: Environment) -> list[AttentionCase]:
    """Peak memory (and time) against sequence length, per backend: O(L) against O(L²)."""
    check_profile(profile)
    cases = []
    for length, dtype, mode, mask, backend in product(
        _MEMORY_LENGTHS[profile],
        profile_dtypes(profile, env),
        MODES,
        ("none", "padding"),
        env.backends,
    ):
        if env.device == "cpu" and mode == "fwd+bwd" and length > _CPU_BACKWARD_MAX_LEN:
            continue
        cases.append(
            AttentionCase("memory", backend, dtype, mode, mask, AttentionShape.sequence(length))
        )
    return cases
