"""Benchmark cases: what runs, at which shapes, dtypes and masks, and how much work it is.

As in xformers' ``benchmarks/``, every family is a product (shapes × dtypes × masks ×
implementations × modes) with a plain-PyTorch baseline in the same table: the ``math``
attention backend, and ``torch.nn.TransformerEncoderLayer`` / timm's ViT ``Block`` next to
fusionkit's layer. Shapes are CMA-CLIP's: image tokens 50 / 197 / 577 (ViT-B/32 and /16 at
224, ViT-B/16 at 384), text tokens up to 77 (CLIP) or 256, width 256–768, heads 4–12.

A *profile* sets the size of the grid: ``quick`` (tiny shapes, one pass of every family: the
smoke test), ``cpu`` (a reduced grid that fits in a few minutes on 2 cores) and ``gpu`` (the
full grid). The *environment* removes what cannot run there: xformers kernels are CUDA-only.

Work is counted with closed-form FLOP formulas (a multiply-add is 2 FLOPs; elementwise ops,
softmax and norms are not counted), so the achieved FLOP rate of every case can be set
against the measured matmul ceiling of the same run.

This module does not import torch at import time: the report uses the definitions below
without paying for it.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from itertools import product
from typing import Any, Literal

__all__ = [
    "BACKENDS",
    "CONTENDED_SHARE",
    "DENSE_IMPLS",
    "MODES",
    "PROFILES",
    "TARGET_LAYER_SHAPE",
    "TARGET_MEMORY_SEQ_LEN",
    "TEXT_MEAN_FRACTION",
    "VARLEN_IMPLS",
    "AttentionCase",
    "AttentionShape",
    "CeilingCase",
    "Environment",
    "LayerCase",
    "LayerShape",
    "ModelCase",
    "attention_cases",
    "attention_flops",
    "ceiling_cases",
    "cuda_available",
    "default_profile",
    "detect_environment",
    "layer_cases",
    "layer_flops",
    "matmul_flops",
    "memory_cases",
    "mode_factor",
    "model_cases",
    "text_lengths",
    "varlen_cases",
    "xformers_importable",
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


#: A CPU case counts as timed on a shared machine when other processes used more than this
#: share of the CPUs meanwhile; the harness can wait for the machine to calm down below it.
CONTENDED_SHARE = 0.10


def cuda_available() -> bool:
    """Whether CUDA can be used (the check that the tests monkeypatch)."""
    import torch

    return torch.cuda.is_available()


def xformers_importable() -> bool:
    """Whether ``xformers.ops`` imports (only asked on CUDA: its kernels are CUDA-only)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # any import failure means "not usable here"
        return False
    return True


def detect_environment(device: str) -> Environment:
    """The environment for ``device``.

    Raises:
        ValueError: ``device`` is neither ``"cpu"`` nor ``"cuda"``.
        RuntimeError: ``"cuda"`` was asked for where CUDA is not available.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not cuda_available():
        raise RuntimeError("CUDA benchmarks were asked for, but torch.cuda is not available")
    return Environment(device=device, xformers=device == "cuda" and xformers_importable())


def default_profile(env: Environment) -> str:
    """The grid a plain run gets: ``gpu`` (full) on CUDA, ``cpu`` (reduced) on CPU."""
    return "gpu" if env.device == "cuda" else "cpu"


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")


def _dtypes(profile: str, env: Environment) -> tuple[str, ...]:
    return env.dtypes if profile == "gpu" else (env.fast_dtype,)


# Attention ----------------------------------------------------------------------------------


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
    _check_profile(profile)
    return [
        AttentionCase("attention", backend, dtype, mode, mask, shape)
        for shape, dtype, mask, mode, backend in product(
            _ATTENTION_SHAPES[profile],
            _dtypes(profile, env),
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
    _check_profile(profile)
    cases = []
    for length, dtype, mode, mask, backend in product(
        _MEMORY_LENGTHS[profile], _dtypes(profile, env), MODES, ("none", "padding"), env.backends
    ):
        if env.device == "cpu" and mode == "fwd+bwd" and length > _CPU_BACKWARD_MAX_LEN:
            continue
        cases.append(
            AttentionCase("memory", backend, dtype, mode, mask, AttentionShape.sequence(length))
        )
    return cases


# Layers -------------------------------------------------------------------------------------


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
        for shape, dtype, mode, impl in product(shapes, _dtypes(profile, env), MODES, impls)
    ]


def layer_cases(profile: str, env: Environment) -> list[LayerCase]:
    """Dense batches: fusionkit's layer against its peers on every-token-real inputs."""
    _check_profile(profile)
    return _layer_grid("layer", _DENSE_SHAPES[profile], DENSE_IMPLS, profile, env)


def varlen_cases(profile: str, env: Environment) -> list[LayerCase]:
    """Variable-length batches: packed against padded, fusionkit against its peers."""
    _check_profile(profile)
    return _layer_grid("varlen", _VARLEN_SHAPES[profile], VARLEN_IMPLS, profile, env)


# Ceiling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CeilingCase:
    """A large square matmul: the FLOP rate the machine reaches at best, per dtype."""

    dtype: str
    n: int

    @property
    def id(self) -> str:
        return f"matmul-{short_dtype(self.dtype)}-n{self.n}"

    def info(self) -> dict[str, Any]:
        """What the report needs, for ``benchmark.extra_info``."""
        return {
            "family": "ceiling",
            "case": self.id,
            "impl": "matmul",
            "dtype": self.dtype,
            "mode": "fwd",
            "shape": f"{self.n}x{self.n}x{self.n}",
            "n": self.n,
            "flops": matmul_flops(self.n, self.n, self.n),
            "flops_basis": "2·n³",
        }


def ceiling_cases(profile: str, env: Environment) -> list[CeilingCase]:
    """fp32 on CPU; bf16 (the ceiling of mixed precision) and fp32 on CUDA."""
    _check_profile(profile)
    # Big enough to reach the peak, small enough for a few rounds on 2 CPU cores.
    n = {"quick": 128}.get(profile, 2048 if env.device == "cpu" else 8192)
    return [CeilingCase(dtype, n) for dtype in env.dtypes]


# Full model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    """A whole CMA-CLIP built by ``fusionkit.models.build_model``: inference or a training step.

    Encoders are frozen (the paper's setting for its strongest results: the fusion and heads
    train); the vision backbone has random weights (no hub), the text model is the offline
    all-MiniLM-L6-v2. Texts are synthetic, with word counts from :func:`text_lengths`.

    Attributes:
        mode: ``"fwd"`` (inference) or ``"fwd+bwd"`` (forward, multi-task loss, backward).
        dtype: Torch dtype name of the model.
        batch: Samples per batch.
        vision: timm model name.
        image_size: Input resolution.
        text: Offline text model name, or ``None`` for an image-only model.
        text_tokens: Text truncation length.
        dim: Fusion width.
        heads: Fusion heads.
    """

    mode: str
    dtype: str
    batch: int
    vision: str
    image_size: int
    text: str | None
    text_tokens: int
    dim: int
    heads: int

    @property
    def label(self) -> str:
        text = f"{self.text} {self.text_tokens}" if self.text else "no text"
        return f"B{self.batch} {self.vision}@{self.image_size} + {text} d{self.dim}"

    @property
    def id(self) -> str:
        text = self.text or "notext"
        return (
            f"cmaclip-{short_dtype(self.dtype)}-{self.mode}-B{self.batch}-{self.vision}"
            f"{self.image_size}-{text}{self.text_tokens}-d{self.dim}"
        )

    def config(self) -> dict[str, Any]:
        """The ``build_model`` config."""
        vision: dict[str, Any] = {
            "name": "timm",
            "model_name": self.vision,
            "pretrained": False,
            "freeze": True,
            "img_size": self.image_size,
        }
        text = None
        if self.text is not None:
            text = {
                "name": "huggingface",
                "model_name_or_path": self.text,
                "max_length": self.text_tokens,
                "freeze": True,
            }
        return {
            "model": "cma_clip",
            "vision": vision,
            "text": text,
            "fusion": {
                "sequence": {"name": "transformer", "dim": self.dim, "heads": self.heads},
                "modality": {"name": "keyless"},
            },
            "tasks": {
                "category": {"num_classes": 10},
                "attributes": {"num_classes": 8, "multi_label": True},
            },
        }

    def info(self) -> dict[str, Any]:
        """What the report needs; tokens and FLOPs are added once the model is built."""
        return {
            "family": "model",
            "case": self.id,
            "impl": "fusionkit CMACLIP",
            "dtype": self.dtype,
            "mode": self.mode,
            "shape": self.label,
            "batch": self.batch,
            "samples": self.batch,
            "dim": self.dim,
            "heads": self.heads,
        }


_MODEL_SHAPES: dict[str, list[tuple[int, str, int, str | None, int, int]]] = {
    # A tiny image-only model: the smoke run checks the plumbing without loading a text model.
    "quick": [(2, "vit_tiny_patch16_224", 32, None, 8, 16)],
    "cpu": [(8, "vit_base_patch32_224", 224, "all-MiniLM-L6-v2", 77, 512)],
    "gpu": [
        (batch, vision, 224, "all-MiniLM-L6-v2", 77, 512)
        for batch, vision in product((32, 256), ("vit_base_patch32_224", "vit_base_patch16_224"))
    ],
}


def model_cases(profile: str, env: Environment) -> list[ModelCase]:
    """Whole-model inference and training steps (fp32: the encoders' own precision)."""
    _check_profile(profile)
    return [
        ModelCase(mode, "float32", batch, vision, size, text, text_len, dim, max(2, dim // 64))
        for (batch, vision, size, text, text_len, dim), mode in product(
            _MODEL_SHAPES[profile], MODES
        )
    ]
