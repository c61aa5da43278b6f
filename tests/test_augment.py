"""Modality dropout: which samples lose which modality, and what the model then sees."""

from __future__ import annotations

import pytest
import torch

from fusionkit.training.augment import drop_modalities


def _masks(batch=2000, image=3, text=5):
    return {"image": torch.ones(batch, image, dtype=torch.bool),
            "text": torch.ones(batch, text, dtype=torch.bool)}


def _present(masks):
    return torch.stack([m.any(dim=1) for m in masks.values()], dim=1)


def test_each_sample_loses_one_modality_at_rate_p_never_its_last():
    masks = _masks()
    dropped = drop_modalities(masks, 0.3, torch.Generator().manual_seed(0))
    present = _present(dropped)
    assert present.any(dim=1).all()
    lost = (~present).sum(dim=1)
    assert lost.max() == 1
    # 2000 Bernoulli(0.3) draws: within 4 standard deviations (0.041) of 0.3.
    assert abs(lost.float().mean().item() - 0.3) < 0.041
    # The lost modality is uniform: about half images, half texts.
    share_image = (~present[:, 0]).sum() / lost.sum()
    assert abs(share_image.item() - 0.5) < 0.09
    # A hidden modality is hidden whole; the kept one is untouched.
    for name in masks:
        rows = dropped[name].any(dim=1)
        assert torch.equal(dropped[name][rows], masks[name][rows])
        assert not dropped[name][~rows].any()
    # The inputs are not modified.
    assert all(m.all() for m in masks.values())


def test_samples_with_one_present_modality_keep_it():
    masks = _masks(batch=64)
    masks["text"][:32] = False
    dropped = drop_modalities(masks, 1.0, torch.Generator().manual_seed(1))
    assert dropped["image"][:32].all() and not dropped["text"][:32].any()
    assert (_present(dropped)[32:].sum(dim=1) == 1).all()


def test_zero_probability_and_single_modality_are_identities():
    masks = _masks(batch=8)
    for out in (drop_modalities(masks, 0.0), drop_modalities({"image": masks["image"]}, 1.0)):
        for name, mask in out.items():
            assert torch.equal(mask, masks[name])


def test_seeded_generator_is_deterministic():
    masks = _masks(batch=100)
    a = drop_modalities(masks, 0.5, torch.Generator().manual_seed(7))
    b = drop_modalities(masks, 0.5, torch.Generator().manual_seed(7))
    assert all(torch.equal(a[name], b[name]) for name in masks)


@pytest.mark.parametrize(
    ("masks", "p", "match"),
    [
        (_masks(batch=4), 1.5, "probability"),
        (_masks(batch=4), -0.1, "probability"),
        ({"image": torch.ones(4, 3), "text": torch.ones(4, 2, dtype=torch.bool)}, 0.5, "bool"),
        ({"image": torch.ones(4, dtype=torch.bool)}, 0.5, r"\(B, N\)"),
        ({"image": torch.ones(4, 3, dtype=torch.bool),
          "text": torch.ones(5, 2, dtype=torch.bool)}, 0.5, "batch size"),
    ],
)
def test_bad_arguments_raise(masks, p, match):
    with pytest.raises(ValueError, match=match):
        drop_modalities(masks, p)
