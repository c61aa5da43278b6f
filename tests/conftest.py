"""Shared test helpers: seeding, tolerances, registry isolation."""

from __future__ import annotations

import copy
import os
import random
import subprocess

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: (rtol, atol) per dtype when a fast path is compared with the plain reference.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def set_rng_seed(seed: int) -> None:
    """Seed every generator a test may draw from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def lengths_mask(lengths: list[int], max_len: int | None = None) -> torch.Tensor:
    """A ``(B, L)`` bool mask with the first ``lengths[b]`` positions real."""
    max_len = max(lengths) if max_len is None else max_len
    return torch.arange(max_len) < torch.tensor(lengths)[:, None]


@pytest.fixture(autouse=True)
def _seed():
    set_rng_seed(0)


@pytest.fixture
def isolated_registry():
    """Let a test register components without leaking them into other tests."""
    from fusionkit import registry

    registry.load_plugins()
    saved = copy.copy(registry._entries)
    saved = {kind: dict(entries) for kind, entries in saved.items()}
    yield registry
    registry._entries.clear()
    registry._entries.update(saved)


TINY_WORDS = [
    *("a", "red", "blue", "green", "striped", "plain", "shirt", "dress", "bag", "the"),
    *("cat", "dog", "sits", "on", "mat", "runs"),
]


def write_tiny_bert(directory) -> None:
    """Save a tiny random BERT (hidden 32, 2 layers) and its tokenizer into ``directory``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]) + "\n")
    config = BertConfig(
        vocab_size=5 + len(TINY_WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    BertTokenizer(str(vocab)).save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny BERT saved to disk, loadable by path through the ``huggingface`` adapter."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    write_tiny_bert(directory)
    return directory


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer over `TINY_WORDS`, built offline: every letter with and without
    CLIP's ``</w>`` word end, one merge chain per word; the end-of-text token has the largest id.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(f"{letter}</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        symbols = [*word[:-1], f"{word[-1]}</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def write_tiny_clip(directory) -> None:
    """Save a tiny random CLIPModel (towers of width 32, 2 layers, 2 heads; 32x32 images in
    8-pixel patches; projections to 16), its tokenizer and its image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config={
            # Room for ids past the end-of-text id (tests of the legacy argmax rule).
            "vocab_size": len(tokenizer) + 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    crop = {"height": 32, "width": 32}
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size=crop).save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny Hugging Face CLIPModel folder, loadable by path as a ``huggingface`` vision or
    text encoder."""
    directory = tmp_path_factory.mktemp("tiny-clip")
    write_tiny_clip(directory)
    return directory


#: A tiny open_clip CLIP (ViT width 64 at 64x64 with 16-pixel patches, 2 layers per tower,
#: CLIP's 49408-id vocabulary and 77-token context), registered under `TINY_OPEN_CLIP_NAME`.
TINY_OPEN_CLIP_NAME = "fusionkit-tiny-clip"
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_open_clip(directory):
    """Register the tiny open_clip config and save a random model's state dict; its path."""
    import json

    import open_clip

    config = directory / f"{TINY_OPEN_CLIP_NAME}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    path = directory / "tiny-clip.pt"
    torch.save(open_clip.create_model(TINY_OPEN_CLIP_NAME).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """``(model_name, checkpoint path)`` of a tiny random open_clip CLIP saved to disk."""
    pytest.importorskip("open_clip")
    path = write_tiny_open_clip(tmp_path_factory.mktemp("tiny-open-clip"))
    return TINY_OPEN_CLIP_NAME, path


#: The tasks of `save_tiny_image_text_model`.
TINY_TASKS = {"color": {"classes": ["blue", "red"]},
              "pattern": {"classes": ["plain", "striped", "floral"], "multi_label": True}}


def save_tiny_image_text_model(folder, tiny_bert_dir):
    """Save a tiny random shorthand image + text CMA-CLIP (timm's test_efficientnet at 32 px and
    the tiny BERT, tasks `TINY_TASKS`) to ``folder``; the folder."""
    from fusionkit.models import build_model

    torch.manual_seed(0)
    model = build_model({
        "vision": {"name": "timm", "model_name": "test_efficientnet", "pretrained": False},
        "text": {"name": "huggingface", "model_name_or_path": str(tiny_bert_dir),
                 "max_length": 16},
        "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
        "head": {"name": "mlp", "hidden_dim": 32},
        "tasks": TINY_TASKS,
        "image_size": 32,
    })
    return model.save_pretrained(folder)


# xformers without a GPU --------------------------------------------------------------------

#: Row alignment, in elements, of a tensor ``attn_bias`` for xformers' CUDA kernels: every
#: stride but the last a multiple of it (16 bytes in 16-bit dtypes; the emulation asks it of
#: every dtype, as fusionkit's bias buffer provides).
XFORMERS_BIAS_ALIGNMENT = 8


def reference_memory_efficient_attention(
    query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None
):
    """Plain-PyTorch stand-in for ``xformers.ops.memory_efficient_attention``.

    Takes what the kernel takes, ``(B, M, H, K)`` tensors and an ``attn_bias`` that is a
    tensor of shape ``(B, H, Mq, Mk)`` or an xformers ``AttentionBias`` (materialised with
    ``.materialize``), and computes ``softmax(q kᵀ · scale + bias) v`` in float32. It refuses
    what the CUDA kernels refuse: other ranks or shapes, mixed dtypes, a bias tensor of
    another dtype or with rows that are not `XFORMERS_BIAS_ALIGNMENT`-aligned in memory, a
    block-diagonal bias with a batch other than 1. A query row whose keys are all masked
    comes out NaN: the kernel leaves it undefined, so callers must never produce one.
    """
    import torch.nn.functional as F
    from xformers.ops import fmha

    qkv = (query, key, value)
    if any(t.dim() != 4 for t in qkv):
        raise ValueError(f"query, key and value must be (B, M, H, K), got ranks "
                         f"{[t.dim() for t in qkv]}")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(f"query, key and value dtypes differ: {[t.dtype for t in qkv]}")
    batch, q_len, heads, head_dim = query.shape
    k_len = key.shape[1]
    if tuple(key.shape) != (batch, k_len, heads, head_dim) or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"shapes do not match: query {tuple(query.shape)}, key "
                         f"{tuple(key.shape)}, value {tuple(value.shape)}")
    bias_shape = (batch, heads, q_len, k_len)
    if attn_bias is None:
        bias = None
    elif isinstance(attn_bias, torch.Tensor):
        if tuple(attn_bias.shape) != bias_shape:
            raise ValueError(f"attn_bias has shape {tuple(attn_bias.shape)}, "
                             f"expected {bias_shape}")
        if attn_bias.dtype != query.dtype:
            raise ValueError(f"attn_bias is {attn_bias.dtype}, the query {query.dtype}")
        strides = attn_bias.stride()
        if strides[-1] != 1 or any(s % XFORMERS_BIAS_ALIGNMENT for s in strides[:-1]):
            raise ValueError(f"attn_bias strides {strides}: the last must be 1 and the others "
                             f"multiples of {XFORMERS_BIAS_ALIGNMENT}")
        bias = attn_bias.float()
    elif isinstance(attn_bias, fmha.attn_bias.AttentionBias):
        if isinstance(attn_bias, fmha.BlockDiagonalMask) and batch != 1:
            raise ValueError(f"a block-diagonal bias needs batch 1, got {batch}")
        bias = attn_bias.materialize(bias_shape, dtype=torch.float32, device=query.device)
    else:
        raise TypeError(f"attn_bias must be a tensor or an AttentionBias, got {type(attn_bias)}")
    scale = head_dim**-0.5 if scale is None else scale
    scores = torch.einsum("bqhk,bmhk->bhqm", query.float(), key.float()) * scale
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(-1)
    if p > 0:
        probs = F.dropout(probs, p)
    out = torch.einsum("bhqm,bmhk->bqhk", probs, value.float())
    return out.to(output_dtype or query.dtype)


def watch_xformers(monkeypatch, kernel) -> list[str]:
    """Put ``kernel`` in place of ``memory_efficient_attention`` (``xformers.ops`` and
    ``xformers.ops.fmha``); returns the list it appends each call's bias type name to."""
    import xformers.ops
    from xformers.ops import fmha

    calls: list[str] = []

    def watched(query, key, value, attn_bias=None, p=0.0, scale=None, **kwargs):
        calls.append(type(attn_bias).__name__)
        return kernel(query, key, value, attn_bias=attn_bias, p=p, scale=scale, **kwargs)

    monkeypatch.setattr(xformers.ops, "memory_efficient_attention", watched)
    monkeypatch.setattr(fmha, "memory_efficient_attention", watched)
    return calls


@pytest.fixture
def emulated_xformers(monkeypatch) -> list[str]:
    """Let the xformers backend run on CPU through `reference_memory_efficient_attention`.

    The reference replaces xformers' kernel and ``"cpu"`` joins
    ``fusionkit.attention.functional.XFORMERS_EMULATED_DEVICES``, so ``backend="xformers"``
    (and ``auto``) runs fusionkit's own xformers code on CPU tensors. Returns the bias type
    name of every kernel call (see `watch_xformers`).
    """
    from fusionkit.attention import functional

    calls = watch_xformers(monkeypatch, reference_memory_efficient_attention)
    monkeypatch.setattr(functional, "XFORMERS_EMULATED_DEVICES", frozenset({"cpu"}))
    return calls


def pytest_collection_modifyitems(items) -> None:
    # A case parametrised with the device "cuda" belongs to the CUDA subset (`-m cuda`).
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(value, str) and value == "cuda" for value in params.values()):
            item.add_marker(pytest.mark.cuda)


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process a test started (a server): SIGTERM, then SIGKILL after ``timeout`` s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
