"""Shared test helpers: seeding, tolerances, registry isolation."""

from __future__ import annotations

import copy
import os
import random

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
