"""Modality dropout and swap: which samples lose or swap which modality."""

from __future__ import annotations

import pytest
import torch

from fusionkit.training.augment import drop_modalities, swap_modalities


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


def _tokens(batch=1000):
    # Sample i's text tokens are all i, its image tokens all -i: a swap is easy to trace.
    index = torch.arange(batch, dtype=torch.float32)
    tokens = {"text": index.view(-1, 1, 1).expand(batch, 4, 2).clone(),
              "image": (-index).view(-1, 1, 1).expand(batch, 3, 2).clone()}
    masks = {"text": torch.ones(batch, 4, dtype=torch.bool),
             "image": torch.ones(batch, 3, dtype=torch.bool)}
    masks["text"][:, 3] = index % 2 == 0  # even samples have a longer text
    return tokens, masks


def test_swap_gives_chosen_samples_another_samples_modality():
    tokens, masks = _tokens()
    out_tokens, out_masks = swap_modalities(tokens, masks, 0.25, "text",
                                            torch.Generator().manual_seed(0))
    source = out_tokens["text"][:, 0, 0].long()
    swapped = source != torch.arange(1000)
    # 1000 Bernoulli(0.25) draws: within 4 standard deviations (0.055) of 0.25.
    assert abs(swapped.float().mean().item() - 0.25) < 0.055
    # Tokens and mask travel together, from the source sample; the image is untouched.
    assert torch.equal(out_tokens["text"], tokens["text"][source])
    assert torch.equal(out_masks["text"], masks["text"][source])
    assert torch.equal(out_tokens["image"], tokens["image"])
    assert torch.equal(out_masks["image"], masks["image"])
    assert tokens["text"][:, 0, 0].long().tolist() == list(range(1000))


def test_swap_at_probability_one_never_keeps_the_own_modality():
    tokens, masks = _tokens(batch=50)
    out, _ = swap_modalities(tokens, masks, 1.0, "image", torch.Generator().manual_seed(3))
    assert (out["image"][:, 0, 0] != tokens["image"][:, 0, 0]).all()


def test_swap_identities():
    tokens, masks = _tokens(batch=6)
    for p, batch in ((0.0, 6), (1.0, 1)):
        t = {m: v[:batch] for m, v in tokens.items()}
        k = {m: v[:batch] for m, v in masks.items()}
        out_tokens, out_masks = swap_modalities(t, k, p, "text")
        assert all(torch.equal(out_tokens[m], t[m]) and torch.equal(out_masks[m], k[m])
                   for m in t)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t, m: (t, m, 2.0, "text"), "probability"),
        (lambda t, m: (t, m, 0.5, "audio"), "'audio' is not among"),
        (lambda t, m: ({"text": t["text"]}, m, 0.5, "text"), "different modalities"),
        (lambda t, m: ({**t, "text": t["text"][:, :2]}, m, 0.5, "text"), "matching"),
        (lambda t, m: (t, {**m, "text": m["text"].float()}, 0.5, "text"), "bool"),
    ],
)
def test_swap_bad_arguments_raise(change, match):
    tokens, masks = _tokens(batch=4)
    with pytest.raises(ValueError, match=match):
        swap_modalities(*change(tokens, masks))
