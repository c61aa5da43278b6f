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

The shared axes, the environment and the formulas live in :mod:`benchmarks.grid`, the attention
and memory cases in :mod:`benchmarks.attention_grid`, the layer cases in
:mod:`benchmarks.layer_grid`; every name is importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

from benchmarks.attention_grid import (
    TARGET_MEMORY_SEQ_LEN,
    AttentionCase,
    AttentionShape,
    attention_cases,
    memory_cases,
)
from benchmarks.grid import (
    BACKENDS,
    DENSE_IMPLS,
    MODES,
    PROFILES,
    TEXT_MEAN_FRACTION,
    VARLEN_IMPLS,
    Environment,
    attention_flops,
    check_profile,
    layer_flops,
    matmul_flops,
    mode_factor,
    text_lengths,
)
from benchmarks.grid import BACKWARD_FACTOR as BACKWARD_FACTOR
from benchmarks.grid import PEER_IMPLS as PEER_IMPLS
from benchmarks.grid import TEXT_LENGTH_SIGMA as TEXT_LENGTH_SIGMA
from benchmarks.grid import Mode as Mode
from benchmarks.grid import Profile as Profile
from benchmarks.grid import short_dtype as short_dtype
from benchmarks.layer_grid import (
    TARGET_LAYER_SHAPE,
    LayerCase,
    LayerShape,
    layer_cases,
    varlen_cases,
)

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

# Environment --------------------------------------------------------------------------------

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
    check_profile(profile)
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
    check_profile(profile)
    return [
        ModelCase(mode, "float32", batch, vision, size, text, text_len, dim, max(2, dim // 64))
        for (batch, vision, size, text, text_len, dim), mode in product(
            _MODEL_SHAPES[profile], MODES
        )
    ]
