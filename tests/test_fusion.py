"""Sequence-wise, co-attention and modality-wise fusion: references, invariances, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, lengths_mask

import fusionkit
from fusionkit.attention import functional
from fusionkit.errors import ShapeError
from fusionkit.fusion import ModalityWiseAttention, SequenceWiseAttention, should_pack

DIMS = {"text": 12, "image": 20}
#: Every registered sequence fusion (built-in or plugin) goes through the same checks.
SEQUENCE_FUSIONS = fusionkit.list_components("sequence_fusion")


def build(name, **kwargs):
    options = {"dim": 32, "layers": 2, "heads": 4} | kwargs
    return fusionkit.create("sequence_fusion", name, input_dims=DIMS, **options).eval()


def inputs(text_lengths=(7, 3, 0, 5), image_tokens=9):
    batch = len(text_lengths)
    tokens = {
        "text": torch.randn(batch, max(text_lengths), DIMS["text"]),
        "image": torch.randn(batch, image_tokens, DIMS["image"]),
    }
    return tokens, {"text": lengths_mask(list(text_lengths))}


def outputs_close(a, b, masks):
    for name in a.summaries:
        assert_close(a.summaries[name], b.summaries[name])
    if a.tokens is not None:
        for name in a.tokens:
            keep = masks.get(name, torch.ones(a.tokens[name].shape[:2], dtype=torch.bool))
            assert_close(a.tokens[name][keep], b.tokens[name][keep])


SUMMARY_OPTIONS = [("transformer", {"summary": "mean"})]


@pytest.mark.parametrize(("name", "options"), [(n, {}) for n in SEQUENCE_FUSIONS] + SUMMARY_OPTIONS)
def test_packed_equals_padded(name, options):
    fusion = build(name, **options)
    tokens, masks = inputs()
    fusion.packing = False
    padded = fusion(tokens, masks, return_tokens=True)
    fusion.packing = True
    packed = fusion(tokens, masks, return_tokens=True)
    outputs_close(packed, padded, masks)
    for name_ in packed.tokens:
        assert not packed.tokens[name_].isnan().any()


@pytest.mark.parametrize("name", SEQUENCE_FUSIONS)
@pytest.mark.parametrize("backend", functional.BACKENDS)
def test_backends_agree(request, name, backend):
    tokens, masks = inputs()
    if backend == "xformers":  # on CPU, the emulated kernel (conftest.emulated_xformers)
        request.getfixturevalue("emulated_xformers")
    reference = build(name, attention_backend="math", packing=False)
    fast = build(name, attention_backend=backend)
    fast.load_state_dict(reference.state_dict())
    outputs_close(
        fast(tokens, masks, return_tokens=True), reference(tokens, masks, return_tokens=True), masks
    )


@pytest.mark.parametrize(("name", "options"), [(n, {}) for n in SEQUENCE_FUSIONS] + SUMMARY_OPTIONS)
@pytest.mark.parametrize("packing", [False, True])
def test_appending_padding_never_changes_outputs(name, options, packing):
    fusion = build(name, packing=packing, **options)
    tokens, masks = inputs()
    base = fusion(tokens, masks, return_tokens=True)
    longer = {
        "text": torch.cat([tokens["text"], 50 * torch.randn(4, 6, DIMS["text"])], 1),
        "image": tokens["image"],
    }
    longer_masks = {"text": torch.cat([masks["text"], torch.zeros(4, 6, dtype=torch.bool)], 1)}
    out = fusion(longer, longer_masks, return_tokens=True)
    for name_ in base.summaries:
        assert_close(out.summaries[name_], base.summaries[name_])
    assert_close(out.tokens["text"][:, :7][masks["text"]], base.tokens["text"][masks["text"]])
    assert_close(out.tokens["image"], base.tokens["image"])


@pytest.mark.parametrize("name", SEQUENCE_FUSIONS)
def test_missing_modality_equals_single_modality_forward(name):
    fusion = build(name)
    tokens, masks = inputs()
    both = fusion(tokens, masks)
    image_only = fusion({"image": tokens["image"]})
    # Sample 2 has no text at all.
    assert not bool(both.present["text"][2]) and bool(both.present["text"][0])
    assert_close(both.summaries["image"][2], image_only.summaries["image"][2])
    assert set(image_only.summaries) == {"image"}
    assert not both.summaries["text"].isnan().any()


@pytest.mark.parametrize("name", SEQUENCE_FUSIONS)
def test_every_parameter_gets_a_gradient(name):
    fusion = build(name).train()
    tokens, masks = inputs((7, 3, 2, 5))
    out = fusion(tokens, masks, return_tokens=True)
    loss = sum(s.square().sum() for s in out.summaries.values())
    loss = loss + sum(t.square().sum() for t in out.tokens.values())
    loss.backward()
    for param_name, param in fusion.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def test_returned_attention_matches_and_is_normalised():
    fusion = build("transformer", attention_backend="math", packing=False)
    tokens, masks = inputs()
    plain = fusion(tokens, masks)
    observed = fusion(tokens, masks, return_attention=True)
    assert len(observed.attentions) == 2
    probs = observed.attentions[0]
    total = 1 + tokens["text"].shape[1] + 1 + tokens["image"].shape[1]
    assert probs.shape == (4, 4, total, total)
    assert_close(probs.sum(-1), torch.ones(4, 4, total))
    start, end = observed.spans["text"]
    assert (start, end) == (0, 1 + tokens["text"].shape[1])
    # Padded text keys get exactly zero attention.
    assert torch.all(probs[0, :, :, 1 + 7 : end] == 0) and torch.all(
        probs[1, :, :, 1 + 3 : end] == 0
    )
    for name in plain.summaries:
        assert_close(observed.summaries[name], plain.summaries[name])


def test_first_token_summary():
    fusion = SequenceWiseAttention(DIMS, dim=16, heads=2, summary="first")
    tokens, masks = inputs((7, 3, 1, 5))
    out = fusion(tokens, masks, return_tokens=True)
    assert_close(out.summaries["text"], out.tokens["text"][:, 0])
    bad = {"text": torch.tensor([[False, True, True]] * 4)}
    with pytest.raises(ValueError, match="first text token"):
        fusion({"text": torch.randn(4, 3, 12), "image": tokens["image"]}, bad)


@pytest.mark.parametrize("packing", [False, True])
def test_mean_summary_starts_from_the_modality_mean(packing):
    fusion = SequenceWiseAttention(DIMS, dim=16, heads=2, summary="mean", packing=packing).eval()
    with torch.no_grad():
        fusion.summary_tokens.normal_()
    # Without layers the summaries are what enters the first layer (then the final norm).
    fusion.layers = torch.nn.ModuleList()
    tokens, masks = inputs((7, 3, 0, 5))
    out = fusion(tokens, masks)
    real = masks["text"][..., None].float()
    text_mean = (tokens["text"] * real).sum(1) / real.sum(1).clamp(min=1)
    for i, (name, mean) in enumerate([("text", text_mean), ("image", tokens["image"].mean(1))]):
        start = fusion.input_proj[name](mean) + fusion.type_embed[i] + fusion.summary_tokens[i]
        expected = fusion.norm(start).masked_fill(~out.present[name][:, None], 0.0)
        assert_close(out.summaries[name], expected)
    assert torch.all(out.summaries["text"][2] == 0)
    with pytest.raises(ValueError, match="'learned', 'mean' or 'first'"):
        SequenceWiseAttention(DIMS, dim=16, heads=2, summary="cls")


def test_auto_packing_policy_and_cuda_selection(monkeypatch):
    full, sparse = lengths_mask([4, 4]), lengths_mask([4, 1])
    assert not should_pack("auto", "sdpa", full)
    assert should_pack("auto", "sdpa", sparse)
    assert should_pack("auto", "xformers", lengths_mask([4, 3]))
    assert not should_pack(False, "xformers", sparse)
    with pytest.raises(ValueError, match="packing"):
        should_pack("sometimes", "sdpa", full)
    # What a CUDA machine with xformers would choose, decided by the same code path.
    monkeypatch.setattr(functional, "xformers_unavailable_reason", lambda tensor: None)
    assert functional.resolve_backend("auto", torch.zeros(1)) == "xformers"


@pytest.mark.parametrize("name", SEQUENCE_FUSIONS)
def test_bad_input(name):
    fusion = build(name)
    tokens, _masks = inputs()
    with pytest.raises(ShapeError, match=r"tokens\['text'\] must have shape \(B, N, C\)"):
        fusion({"text": tokens["text"][0], "image": tokens["image"]})
    with pytest.raises(ShapeError, match="width C = 12"):
        fusion({"text": torch.randn(4, 7, 13), "image": tokens["image"]})
    with pytest.raises(ShapeError, match="batch size"):
        fusion({"text": tokens["text"], "image": tokens["image"][:2]})
    with pytest.raises(ShapeError, match=r"masks\['text'\] must have shape \(B, N\)"):
        fusion(tokens, {"text": torch.ones(4, 6, dtype=torch.bool)})
    with pytest.raises(ShapeError, match="bool"):
        fusion(tokens, {"text": torch.ones(4, 7)})
    with pytest.raises(ShapeError, match="unknown modality"):
        fusion({"audio": torch.randn(4, 3, 12)})
    with pytest.raises(ValueError, match=r"heads \(5\) must divide dim \(32\)"):
        build(name, heads=5)
    with pytest.raises(ValueError, match="input_dims"):
        fusionkit.create("sequence_fusion", name, input_dims={}, dim=8, heads=2)


# Modality-wise fusion.

MODALITIES = ("text", "image")


def test_keyless_linear_matches_hand_computation():
    fusion = ModalityWiseAttention(3, MODALITIES)
    with torch.no_grad():
        fusion.score.weight.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    text, image = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 5.0, 1.0]])
    fused, weights = fusion({"text": text, "image": image})
    expected = torch.tensor([[2.0, -1.0]]).softmax(-1)
    assert_close(weights, expected)
    assert_close(fused, expected[0, 0] * text + expected[0, 1] * image)


def test_keyless_tanh_matches_hand_computation():
    fusion = ModalityWiseAttention(2, MODALITIES, variant="tanh", hidden_dim=2)
    x = {"text": torch.randn(3, 2), "image": torch.randn(3, 2)}
    lin, _, out = fusion.score
    scores = torch.stack([out(torch.tanh(lin(x[m]))).squeeze(-1) for m in MODALITIES], 1)
    _, weights = fusion(x)
    assert_close(weights, scores.softmax(-1))


@pytest.mark.parametrize("name", ["keyless", "gated", "concat", "mean"])
def test_weights_sum_to_one_and_absent_gets_zero(name):
    fusion = fusionkit.create("modality_fusion", name, dim=8, modalities=MODALITIES)
    text = torch.randn(4, 8)
    text[1] = float("nan")  # absent rows may hold garbage; it must not leak
    present = {"text": torch.tensor([True, False, True, True])}
    fused, weights = fusion({"text": text, "image": torch.randn(4, 8)}, present)
    assert weights.shape == (4, 2)
    assert_close(weights.sum(1), torch.ones(4))
    assert weights[1, 0].item() == 0.0 and weights[1, 1].item() == 1.0
    assert torch.isfinite(fused).all()
    _fused_image_only, weights_image_only = fusion({"image": torch.randn(4, 8)})
    assert torch.equal(weights_image_only[:, 0], torch.zeros(4))


@pytest.mark.parametrize("name", ["keyless", "gated", "concat", "mean"])
def test_modality_fusion_bad_input(name):
    fusion = fusionkit.create("modality_fusion", name, dim=8, modalities=MODALITIES)
    x = {"text": torch.randn(2, 8), "image": torch.randn(2, 8)}
    with pytest.raises(ShapeError, match="no modality present"):
        fusion(x, {"text": torch.tensor([True, False]), "image": torch.tensor([True, False])})
    with pytest.raises(ShapeError, match=r"must have shape \(B, 8\)"):
        fusion({"text": torch.randn(2, 7)})
    with pytest.raises(ShapeError, match="batch size"):
        fusion({"text": torch.randn(2, 8), "image": torch.randn(3, 8)})
    with pytest.raises(ShapeError, match="unknown modality"):
        fusion({"audio": torch.randn(2, 8)})
    with pytest.raises(ShapeError, match=r"\(B,\) = \(2,\) bool"):
        fusion(x, {"text": torch.ones(2)})


def test_keyless_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        ModalityWiseAttention(8, MODALITIES, variant="relu")
