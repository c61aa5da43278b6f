"""The layer cases: one transformer layer over a fusion batch, fusionkit's against its peers,
on dense batches and on variable-length (padded or packed) ones."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

from benchmarks.grid import (
    DENSE_IMPLS,
    MODES,
    VARLEN_IMPLS,
    Environment,
    check_profile,
    layer_flops,
    mode_factor,
    profile_dtypes,
    short_dtype,
    text_lengths,
)

__all__ = ["TARGET_LAYER_SHAPE", "LayerCase", "LayerShape", "layer_cases", "varlen_cases"]


@dataclass(frozen=True)
class LayerShape:
    """A fusion batch: ``batch`` samples of ``image`` + ``text`` tokens, width ``dim``."""

    batch: int
    image_tokens: int
    text_tokens: int
    dim: int
    heads: int
    mlp_ratio: float = 4.0

    @property
    def label(self) -> str:
        return f"B{self.batch} {self.image_tokens}+{self.text_tokens} d{self.dim} h{self.heads}"


#: The shape of the dense and variable-length targets.
TARGET_LAYER_SHAPE = LayerShape(batch=32, image_tokens=50, text_tokens=77, dim=512, heads=8)


@dataclass(frozen=True)
class LayerCase:
    """One transformer layer over a fusion batch, for one implementation.

    Attributes:
        family: ``"layer"`` (every text token real) or ``"varlen"`` (text lengths drawn by
            :func:`text_lengths`, padded to ``shape.text_tokens``).
        impl: One of :data:`DENSE_IMPLS` or :data:`VARLEN_IMPLS`.
        dtype: Torch dtype name.
        mode: ``"fwd"`` or ``"fwd+bwd"``.
        shape: The batch.
    """

    family: str
    impl: str
    dtype: str
    mode: str
    shape: LayerShape

    @property
    def id(self) -> str:
        s = self.shape
        return (
            f"{self.impl}-{short_dtype(self.dtype)}-{self.mode}-B{s.batch}-"
            f"{s.image_tokens}+{s.text_tokens}-d{s.dim}-h{s.heads}"
        )

    @property
    def text_lengths(self) -> tuple[int, ...]:
        s = self.shape
        if self.family == "varlen":
            return text_lengths(s.batch, s.text_tokens)
        return (s.text_tokens,) * s.batch

    @property
    def real_lengths(self) -> tuple[int, ...]:
        """Real tokens per sample of the concatenation (summary tokens not counted)."""
        return tuple(self.shape.image_tokens + n for n in self.text_lengths)

    @property
    def flops(self) -> int:
        s = self.shape
        return layer_flops(self.real_lengths, s.dim, s.mlp_ratio) * mode_factor(self.mode)

    def info(self) -> dict[str, Any]:
        """What the report needs, for ``benchmark.extra_info``."""
        s = self.shape
        lengths = self.text_lengths
        return {
            "family": self.family,
            "case": self.id,
            "impl": self.impl,
            "dtype": self.dtype,
            "mode": self.mode,
            "shape": s.label,
            "batch": s.batch,
            "image_tokens": s.image_tokens,
            "text_tokens": s.text_tokens,
            "text_mean": sum(lengths) / len(lengths),
            "dim": s.dim,
            "heads": s.heads,
            "mlp_ratio": s.mlp_ratio,
            "real_fraction": sum(self.real_lengths) / (s.batch * (s.image_tokens + s.text_tokens)),
            "tokens": sum(self.real_lengths),
            "samples": s.batch,
            "flops": self.flops,
            "flops_basis": "real tokens, one layer",
        }


_GPU_LAYER_SHAPES = [
    LayerShape(batch, image, text, dim, heads)
    for batch, (image, text), (dim, heads) in product(
        (32, 256), ((50, 77), (197, 77), (577, 256)), ((512, 8), (768, 12))
    )
]
_DENSE_SHAPES: dict[str, list[LayerShape]] = {
    "quick": [LayerShape(2, 6, 5, dim=16, heads=2)],
    "cpu": [TARGET_LAYER_SHAPE, LayerShape(4, 197, 77, dim=768, heads=12)],
    "gpu": _GPU_LAYER_SHAPES,
}
_VARLEN_SHAPES: dict[str, list[LayerShape]] = {
    "quick": [LayerShape(4, 6, 8, dim=16, heads=2)],
    "cpu": [TARGET_LAYER_SHAPE, LayerShape(4, 197, 256, dim=768, heads=12)],
    "gpu": [
        LayerShape(batch, image, text, dim, heads)
        for batch, (image, text), (dim, heads) in product(
            (32, 256), ((50, 77), (197, 256), (577, 256)), ((512, 8), (768, 12))
        )
    ],
}


def _layer_grid(
    family: str, shapes: list[LayerShape], impls: tuple[str, ...], profile: str, env: Environment
) -> list[LayerCase]:
    return [
        LayerCase(family, impl, dtype, mode, shape)
        for shape, dtype, mode, impl in product(shapes, profile_dtypes(profile, env), MODES, impls)
    ]


def layer_cases(profile: str, env: Environment) -> list[LayerCase]:
    """Dense batches: fusionkit's layer against its peers on every-token-real inputs."""
    check_profile(profile)
    return _layer_grid("layer", _DENSE_SHAPES[profile], DENSE_IMPLS, profile, env)


def varlen_cases(profile: str, env: Environment) -> list[LayerCase]:
    """Variable-length batches: packed against padded, fusionkit against its peers."""
    check_profile(profile)
    return _layer_grid("varlen", _VARLEN_SHAPES[profile], VARLEN_IMPLS, profile, env)
