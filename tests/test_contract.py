"""One contract every registered fusion component and head passes; a new plugin adds nothing.

Kinds with a constructor contract (see :mod:`fusionkit.registry`) are built with the same
arguments; the checks are shapes, no NaN, absent modalities and gradients for every parameter.
"""

from __future__ import annotations

import pytest
import torch
from conftest import lengths_mask

import fusionkit

INPUT_DIMS = {"text": 24, "image": 40}
DIM = 32
TASKS = {"color": {"num_classes": 5}, "pattern": {"num_classes": 3, "multi_label": True}}


@pytest.mark.parametrize("name", fusionkit.list_components("sequence_fusion"))
def test_sequence_fusion_contract(name):
    fusion = fusionkit.create(
        "sequence_fusion", name, input_dims=INPUT_DIMS, dim=DIM, layers=1, heads=4
    )
    tokens = {"text": torch.randn(3, 6, 24), "image": torch.randn(3, 10, 40)}
    masks = {"text": lengths_mask([6, 2, 0])}
    out = fusion(tokens, masks, return_tokens=True)
    assert set(out.summaries) == {"text", "image"}
    for modality, summary in out.summaries.items():
        assert summary.shape == (3, DIM)
        assert torch.isfinite(summary).all(), modality
        assert out.tokens[modality].shape == (*tokens[modality].shape[:2], DIM)
    assert out.present["text"].tolist() == [True, True, False]
    assert torch.equal(out.summaries["text"][2], torch.zeros(DIM))
    sum(s.sum() for s in out.summaries.values()).backward()
    for param_name, param in fusion.named_parameters():
        assert param.grad is not None, param_name


@pytest.mark.parametrize("name", fusionkit.list_components("modality_fusion"))
def test_modality_fusion_contract(name):
    fusion = fusionkit.create("modality_fusion", name, dim=DIM, modalities=("text", "image"))
    text = torch.randn(4, DIM, requires_grad=True)
    image = torch.randn(4, DIM, requires_grad=True)
    present = {
        "text": torch.tensor([True, True, False, True]),
        "image": torch.tensor([True, False, True, True]),
    }
    fused, weights = fusion({"text": text, "image": image}, present)
    assert fused.shape == (4, DIM) and weights.shape == (4, 2)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    assert weights[2, 0] == 0 and weights[1, 1] == 0
    fused.sum().backward()
    assert text.grad is not None and image.grad is not None
    for param_name, param in fusion.named_parameters():
        assert param.grad is not None, param_name


@pytest.mark.parametrize("name", fusionkit.list_components("head"))
def test_head_contract(name):
    head = fusionkit.create("head", name, dim=DIM, tasks=TASKS)
    logits = head(torch.randn(4, DIM))
    assert logits["color"].shape == (4, 5) and logits["pattern"].shape == (4, 3)
    targets = {
        "color": torch.tensor([0, 4, -100, 2]),
        "pattern": torch.tensor([[1.0, 0, 1], [0, 0, 0], [float("nan")] * 3, [0, 1, 0]]),
    }
    loss = head.loss(logits, targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for param_name, param in head.named_parameters():
        assert param.grad is not None, param_name
