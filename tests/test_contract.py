"""One contract per registry kind, walked over every registered component: a plugin adds nothing.

Each kind has a constructor contract (see :mod:`fusionkit.registry`), so every component of
a kind is built with the same arguments; the checks are shapes, masks, no NaN, absent
modalities, gradients for every parameter, and the optional outputs each kind promises.
"""

from __future__ import annotations

import pytest
import torch
from conftest import lengths_mask
from torch import nn

import fusionkit
from fusionkit.encoders import EncoderOutput
from fusionkit.errors import ConfigError
from fusionkit.fusion import FusionOutput

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


@pytest.mark.parametrize("name", fusionkit.list_components("sequence_fusion"))
def test_sequence_fusion_records_attention_or_says_it_cannot(name):
    """``return_attention=True`` gives per-layer probabilities, or a ConfigError: no TypeError."""
    fusion = fusionkit.create(
        "sequence_fusion", name, input_dims=INPUT_DIMS, dim=DIM, layers=2, heads=4
    ).eval()
    tokens = {"text": torch.randn(2, 6, 24), "image": torch.randn(2, 10, 40)}
    masks = {"text": lengths_mask([6, 3])}
    try:
        out = fusion(tokens, masks, return_attention=True)
    except ConfigError as error:
        assert "attention" in str(error)
        return
    assert out.attentions, f"{name} returned no attention probabilities"
    plain = fusion(tokens, masks)
    for modality in plain.summaries:  # recording attention must not change the result
        torch.testing.assert_close(out.summaries[modality], plain.summaries[modality])
    for probs in out.attentions:
        assert probs.dim() == 4 and probs.shape[:2] == (2, 4)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:3]))
    length = out.attentions[0].shape[-1]
    assert {"text", "image"} <= set(out.spans)
    assert max(end for _, end in out.spans.values()) == length


def test_a_fusion_without_the_attention_keyword_is_a_config_error(isolated_registry):
    """A plugin written against an older protocol fails clearly, before it is called."""

    @fusionkit.register("sequence_fusion", "no_attention_keyword")
    class OldFusion(nn.Module):
        def __init__(self, input_dims, dim, layers=1, heads=8, **options):
            super().__init__()
            self.proj = nn.ModuleDict({m: nn.Linear(c, dim) for m, c in input_dims.items()})

        def forward(self, tokens, masks=None, *, return_tokens=False):
            summaries = {m: self.proj[m](x).mean(1) for m, x in tokens.items()}
            present = {m: torch.ones(len(x), dtype=torch.bool) for m, x in tokens.items()}
            return FusionOutput(summaries=summaries, present=present)

    fusion = fusionkit.create("sequence_fusion", "no_attention_keyword", input_dims=INPUT_DIMS,
                              dim=DIM)
    with pytest.raises(ConfigError, match="OldFusion cannot record attention"):
        fusionkit.fusion.inputs.check_records_attention(fusion)


def _encoder_inputs(kind, batch):
    if kind == "vision_encoder":
        return (torch.randn(batch, 3, 64, 64),)
    return (["a red shirt", None, "the striped dress sits on the mat"][:batch],)


@pytest.fixture
def encoder_arguments(tiny_bert_dir, request):
    """The constructor contract's arguments, with the smallest offline backbones: a function
    of (kind, name), so a backbone is only built for the encoders that need it."""

    def arguments(kind, name):
        if name == "open_clip":
            model_name, path = request.getfixturevalue("tiny_open_clip")
            return {"model_name": model_name, "pretrained": str(path)}
        if (kind, name) == ("vision_encoder", "huggingface"):
            path = request.getfixturevalue("tiny_clip_dir")  # 32x32 CLIP, fed 64x64 images
            return {"model_name_or_path": str(path), "interpolate_pos_encoding": True}
        return {
            "vision_encoder": {"model_name": "resnet18", "pretrained": False},
            "text_encoder": {"model_name_or_path": str(tiny_bert_dir), "max_length": 16},
        }[kind]

    return arguments


ENCODERS = [
    (kind, name)
    for kind in ("vision_encoder", "text_encoder")
    for name in fusionkit.list_components(kind)
]


@pytest.mark.parametrize(("kind", "name"), ENCODERS, ids=[f"{k}-{n}" for k, n in ENCODERS])
def test_encoder_contract(kind, name, encoder_arguments):
    encoder = fusionkit.create(kind, name, **encoder_arguments(kind, name))
    out = encoder(*_encoder_inputs(kind, 3))
    assert isinstance(out, EncoderOutput)
    assert out.tokens.dim() == 3 and out.tokens.shape[0] == 3
    assert out.tokens.shape[2] == encoder.width
    assert out.mask.dtype == torch.bool and out.mask.shape == out.tokens.shape[:2]
    assert torch.isfinite(out.tokens).all()
    if kind == "text_encoder":
        assert not out.mask[1].any(), "a missing text has no real token"
        assert out.mask[0].any() and out.mask[2].sum() > out.mask[0].sum()
    (out.tokens * torch.randn_like(out.tokens)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())

    frozen = fusionkit.create(kind, name, freeze=True, **encoder_arguments(kind, name))
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("name", fusionkit.list_components("model"))
def test_model_contract(name, tiny_bert_dir):
    """Every model builds from a ModelConfig, classifies every task, and saves and loads."""
    config = fusionkit.ModelConfig.from_dict(
        {
            "vision": {"name": "timm", "model_name": "resnet18", "pretrained": False},
            "text": {"name": "huggingface", "model_name_or_path": str(tiny_bert_dir),
                     "max_length": 16},
            "fusion": {"dim": DIM, "sequence": {"name": "transformer", "heads": 4}},
            "head": {"name": "mlp", "hidden_dim": DIM},
            "tasks": TASKS,
        }
    )
    model = fusionkit.create("model", name, config=config).eval()
    images, texts = torch.randn(3, 3, 64, 64), ["a red shirt", None, "a bag"]
    out = model(images=images, texts=texts)
    assert out.logits["color"].shape == (3, 5) and out.logits["pattern"].shape == (3, 3)
    for weights in out.modality_weights.values():
        assert weights.shape == (3, 2)
        assert weights[1, 0] == 0  # the missing text has no weight
    assert torch.isfinite(out.logits["color"]).all()


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
