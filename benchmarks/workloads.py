"""The workloads that the benchmark modules time: inputs, modules and one call each.

A workload is a zero-argument callable that runs one case once, forward only (inference:
eval mode under ``torch.inference_mode``) or forward and backward (train mode, gradients
reset at the start of each call so none accumulate across rounds).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from benchmarks.cases import AttentionCase, CeilingCase, LayerCase, ModelCase, text_lengths
from fusionkit.attention import PackedSequences, attention, resolve_backend, varlen_attention
from fusionkit.fusion import SequenceWiseAttention
from fusionkit.fusion.layers import TransformerLayer, init_weights

__all__ = ["attention_workload", "ceiling_workload", "layer_workload", "model_workload"]

Workload = Callable[[], None]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _lengths_mask(lengths: tuple[int, ...], max_len: int, device: str) -> Tensor:
    return torch.arange(max_len, device=device) < torch.tensor(lengths, device=device)[:, None]


def _clear_grads(tensors: list[Tensor]) -> None:
    for t in tensors:
        t.grad = None


def attention_workload(case: AttentionCase, device: str) -> Workload:
    """``fusionkit.attention.attention`` on contiguous ``(B, L, H, D)`` q, k, v."""
    s, dtype = case.shape, _dtype(case.dtype)
    train = case.mode == "fwd+bwd"

    def make(length: int) -> Tensor:
        shape = (s.batch, length, s.heads, s.head_dim)
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=train)

    q, k, v = make(s.q_len), make(s.kv_len), make(s.kv_len)
    mask = None if case.mask == "none" else _lengths_mask(s.kv_real, s.kv_len, device)

    if not train:

        def forward() -> None:
            with torch.inference_mode():
                attention(q, k, v, valid_keys=mask, backend=case.backend)

        return forward

    grad = torch.randn_like(q)

    def step() -> None:
        _clear_grads([q, k, v])
        attention(q, k, v, valid_keys=mask, backend=case.backend).backward(grad)

    return step


def _fusionkit_module(case: LayerCase) -> nn.Module:
    s = case.shape
    packing = {"fusionkit-packed": True, "fusionkit-padded": False}.get(case.impl, "auto")
    return SequenceWiseAttention(
        {"text": s.dim, "image": s.dim},
        dim=s.dim,
        layers=1,
        heads=s.heads,
        mlp_ratio=s.mlp_ratio,
        packing=packing,
    )


class _FusionkitLayer(nn.Module):
    """fusionkit's ``TransformerLayer`` on the padded concatenation, like the peers, or on its
    real tokens only (pack, layer with ``varlen_attention``, unpack)."""

    def __init__(self, case: LayerCase, packed: bool) -> None:
        super().__init__()
        s = case.shape
        self.packed = packed
        self.layer = TransformerLayer(s.dim, s.heads, s.mlp_ratio)
        init_weights(self.layer)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        backend = resolve_backend("auto", x)
        if self.packed:
            seqs = PackedSequences.from_mask(mask)

            def attend_packed(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return varlen_attention(q, k, v, seqs, backend=backend)

            return seqs.unpack(self.layer(seqs.pack(x), attend_packed))
        key_mask = None if bool(mask.all()) else mask

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return attention(q, k, v, valid_keys=key_mask, backend=backend)

        return self.layer(x, attend)


def _peer(case: LayerCase) -> nn.Module:
    s = case.shape
    if case.impl == "torch":
        return nn.TransformerEncoderLayer(
            s.dim,
            s.heads,
            dim_feedforward=round(s.dim * s.mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
    # qkv_bias=True: fusionkit's and torch's layers have a qkv bias, so the work is equal.
    return Block(s.dim, s.heads, mlp_ratio=s.mlp_ratio, qkv_bias=True)


def _build_layer_module(case: LayerCase) -> nn.Module:
    if case.impl.startswith("fusionkit-layer"):
        return _FusionkitLayer(case, packed=case.impl == "fusionkit-layer-packed")
    if case.impl.startswith("fusionkit"):
        return _fusionkit_module(case)
    return _peer(case)


def layer_workload(case: LayerCase, device: str) -> Workload:
    """One layer over a fusion batch: ``(B, text, dim)`` and ``(B, image, dim)`` tokens.

    fusionkit's module takes the per-modality tokens and masks; the layers take their padded
    concatenation ``[text | image]`` with a key padding mask (None when every token is real).
    The backward starts from the sum of every output token (and of the fusion summaries), so
    every position of every implementation gets a gradient.
    """
    s, dtype = case.shape, _dtype(case.dtype)
    train = case.mode == "fwd+bwd"
    text = torch.randn(s.batch, s.text_tokens, s.dim, device=device, dtype=dtype)
    image = torch.randn(s.batch, s.image_tokens, s.dim, device=device, dtype=dtype)
    text_mask = _lengths_mask(case.text_lengths, s.text_tokens, device)
    dense = bool(text_mask.all())
    x = torch.cat([text, image], dim=1)
    mask = torch.cat([text_mask, torch.ones_like(image[..., 0], dtype=torch.bool)], dim=1)

    module = _build_layer_module(case)
    key_mask = None if dense else mask

    def run() -> list[Tensor]:
        if case.impl.startswith("fusionkit-layer"):
            return [module(x, mask)]
        if case.impl.startswith("fusionkit"):
            masks = None if dense else {"text": text_mask}
            out = module({"text": text, "image": image}, masks, return_tokens=train)
            return [*out.summaries.values(), *(out.tokens or {}).values()]
        if case.impl == "torch":
            padding = None if key_mask is None else ~key_mask
            return [module(x, src_key_padding_mask=padding)]
        keep = None if key_mask is None else key_mask[:, None, None, :]
        return [module(x, attn_mask=keep)]

    module.to(device=device, dtype=dtype).train(train)
    params = list(module.parameters())

    if not train:

        def forward() -> None:
            with torch.inference_mode():
                run()

        return forward

    def step() -> None:
        _clear_grads(params)
        torch.stack([out.sum() for out in run()]).sum().backward()

    return step


def ceiling_workload(case: CeilingCase, device: str) -> Workload:
    """``a @ b`` into a preallocated output: the machine's matmul rate for the dtype."""
    dtype = _dtype(case.dtype)
    a = torch.randn(case.n, case.n, device=device, dtype=dtype)
    b = torch.randn(case.n, case.n, device=device, dtype=dtype)
    out = torch.empty(case.n, case.n, device=device, dtype=dtype)

    def matmul() -> None:
        torch.matmul(a, b, out=out)

    return matmul


#: Words of the synthetic product texts (one word-piece each for a BERT-style tokenizer).
_WORDS = [
    "red",
    "blue",
    "black",
    "white",
    "green",
    "striped",
    "floral",
    "plain",
    "cotton",
    "silk",
    "wool",
    "linen",
    "dress",
    "shirt",
    "skirt",
    "jacket",
    "coat",
    "shoe",
    "boot",
    "bag",
    "hat",
    "scarf",
    "long",
    "short",
    "sleeve",
    "slim",
    "loose",
    "summer",
    "winter",
    "casual",
    "formal",
    "vintage",
    "classic",
    "soft",
    "light",
    "warm",
    "women",
    "men",
    "kids",
    "size",
    "small",
    "large",
]


@functools.cache
def _cma_clip(case: ModelCase) -> nn.Module:
    # Building loads a text model (seconds): the fwd and fwd+bwd cases share one model.
    from fusionkit.models import build_model

    return build_model(case.config())


def _synthetic_texts(case: ModelCase) -> list[str]:
    rng = random.Random(0)
    # Word counts: two special tokens leave ``text_tokens - 2`` for words.
    counts = text_lengths(case.batch, case.text_tokens - 2)
    return [" ".join(rng.choice(_WORDS) for _ in range(n)) for n in counts]


def model_workload(case: ModelCase, device: str) -> tuple[Workload, dict[str, Any]]:
    """A CMA-CLIP inference call or training step on a synthetic batch.

    Returns:
        The workload and what only the built model knows: real tokens (image tokens plus
        real text tokens) and the FLOPs of one call counted by ``torch.utils.flop_counter``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    dtype = _dtype(case.dtype)
    model = _cma_clip(dataclasses.replace(case, mode="fwd")).to(device=device, dtype=dtype)
    train = case.mode == "fwd+bwd"
    model.train(train)
    inputs: dict[str, Any] = {
        "images": torch.randn(
            case.batch, 3, case.image_size, case.image_size, device=device, dtype=dtype
        )
    }
    if case.text is not None:
        inputs["texts"] = _synthetic_texts(case)
    with torch.inference_mode():
        _, masks = model.forward_features(**inputs)
    targets = {
        "category": torch.randint(0, 10, (case.batch,), device=device),
        "attributes": torch.randint(0, 2, (case.batch, 8), device=device).to(dtype),
    }
    params = [p for p in model.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.inference_mode():
            model(**inputs)

    def step() -> None:
        _clear_grads(params)
        model.loss(model(**inputs), targets).backward()

    workload = step if train else forward
    with FlopCounterMode(display=False) as counter:
        workload()
    text_mask = masks.get("text")
    extra = {
        "tokens": sum(int(m.sum()) for m in masks.values()),
        "image_tokens": masks["image"].shape[1],
        "text_mean": 0.0 if text_mask is None else float(text_mask.sum(1).float().mean()),
        "flops": counter.get_total_flops(),
        "flops_basis": "torch.utils.flop_counter (matmuls, convs; fused CPU attention not seen)",
        "trainable_params": sum(p.numel() for p in params),
    }
    return workload, extra
