"""Hugging Face CLIP-family encoders: the summary token reproduces the model's own embedding.

Everything is offline: tiny random CLIP and SigLIP models saved with ``save_pretrained`` to
temporary folders (see ``tests/conftest.py``). The references are the models' own
``get_text_features`` / ``get_image_features`` on the same inputs.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_clip_tokenizer
from PIL import Image
from torch import Tensor

import fusionkit
from fusionkit.data import build_image_transform
from fusionkit.encoders import EncoderOutput, HuggingFaceTextEncoder
from fusionkit.encoders.hf_clip import HuggingFaceVisionEncoder  # registers it
from fusionkit.errors import CheckpointError, ConfigError, ShapeError

TEXTS = ["a red dress", "the striped cat sits on the mat", None, "blue bag"]
ATOL = RTOL = 1e-5


def _features(output) -> Tensor:
    """``get_*_features`` returns a tensor in older transformers, a model output in newer."""
    return output if isinstance(output, Tensor) else output.pooler_output


@pytest.fixture(scope="module")
def clip_model(tiny_clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_dir).eval()


@pytest.fixture(scope="module")
def clip_text(tiny_clip_dir) -> HuggingFaceTextEncoder:
    return HuggingFaceTextEncoder(str(tiny_clip_dir), max_length=16).eval()


@pytest.fixture(scope="module")
def clip_vision(tiny_clip_dir) -> HuggingFaceVisionEncoder:
    return HuggingFaceVisionEncoder(str(tiny_clip_dir)).eval()


def _write_siglip(directory, family: str) -> None:
    """A tiny SigLIP (``"Siglip"``) or SigLIP 2 (``"Siglip2"``) model; its tokenizer is the tiny
    CLIP one (SigLIP's own needs sentencepiece), padding with the end-of-text id as SigLIP's."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, f"{family}Model"):
        pytest.skip(f"this transformers has no {family}Model")
    tokenizer = tiny_clip_tokenizer()
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text = {
        **tower,
        "num_attention_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 16,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    patches = {"image_size": 32} if family == "Siglip" else {"num_patches": 16}
    vision = {**tower, "num_attention_heads": 2, "patch_size": 8, **patches}
    config = getattr(transformers, f"{family}Config")(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    getattr(transformers, f"{family}Model")(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if family == "Siglip":
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2)
        processor.save_pretrained(directory)


@pytest.fixture(scope="module", params=["Siglip", "Siglip2"])
def siglip_family_dir(request, tmp_path_factory):
    """``(family, folder)`` of a tiny SigLIP and SigLIP 2 model."""
    directory = tmp_path_factory.mktemp(f"tiny-{request.param.lower()}")
    _write_siglip(directory, request.param)
    return request.param, directory


def test_clip_text_summary_is_the_pooled_end_of_text_token(clip_text, clip_model):
    """``text_projection(summary token)`` is ``get_text_features`` of the same ids."""
    inputs = clip_text.tokenize(TEXTS)
    out = clip_text(text_inputs=inputs)
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    eos = clip_text.tokenizer.eos_token_id
    assert out.summary.dtype == torch.long
    assert out.summary.tolist() == [row.tolist().index(eos) for row in ids]
    assert out.mask[[0, 1, 3], out.summary[[0, 1, 3]]].all()
    assert not out.mask[2].any()  # the missing text
    with torch.no_grad():
        expected = _features(clip_model.get_text_features(input_ids=ids, attention_mask=attention))
        tokens = clip_model.text_model(input_ids=ids, attention_mask=attention).last_hidden_state
        projected = clip_model.text_projection(out.summary_tokens())
    torch.testing.assert_close(out.tokens, tokens, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(projected, expected, atol=ATOL, rtol=RTOL)
    assert clip_text.width == 32 and clip_text.pooling == "eos" and clip_text.padding == "longest"


def test_clip_text_summary_follows_the_legacy_argmax_rule(tiny_clip_dir):
    """``eos_token_id == 2`` (configs before transformers #24773): the largest id is pooled."""
    encoder = HuggingFaceTextEncoder(str(tiny_clip_dir), max_length=16).eval()
    tower = encoder.model
    eos = encoder.tokenizer.eos_token_id
    larger = eos + 3  # an id past the end-of-text id tells the two rules apart
    ids = torch.tensor([[eos - 1, 5, larger, eos, eos], [eos - 1, 7, 9, 11, eos]])
    inputs = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1] * 5])}
    for eos_token_id, positions in ((eos, [3, 4]), (2, [2, 4])):
        tower.eos_token_id = tower.config.eos_token_id = eos_token_id
        with torch.no_grad():
            out = encoder(text_inputs=inputs)
            pooled = tower(**inputs).pooler_output
        assert out.summary.tolist() == positions
        torch.testing.assert_close(out.summary_tokens(), pooled, atol=ATOL, rtol=RTOL)


def test_clip_vision_summary_is_the_class_token(clip_vision, clip_model):
    """``visual_projection(post_layernorm(summary token))`` is ``get_image_features``."""
    images = torch.randn(3, 3, 32, 32)
    out = clip_vision(images)
    assert isinstance(out, EncoderOutput)
    assert out.tokens.shape == (3, 1 + 4 * 4, 32) and out.mask.all()
    assert out.summary.tolist() == [0, 0, 0] and clip_vision.num_prefix_tokens == 1
    with torch.no_grad():
        expected = _features(clip_model.get_image_features(pixel_values=images))
        vision = clip_model.vision_model
        projected = clip_model.visual_projection(vision.post_layernorm(out.summary_tokens()))
    torch.testing.assert_close(projected, expected, atol=ATOL, rtol=RTOL)
    assert clip_vision.width == 32 and clip_vision.in_chans == 3


def test_clip_towers_alone(tiny_clip_dir, clip_text, clip_vision, clip_model, tmp_path):
    """CLIPTextModel, CLIPVisionModel and CLIPVisionModelWithProjection folders give the same
    tokens as the CLIPModel folder."""
    from transformers import CLIPVisionModelWithProjection

    clip_model.text_model.save_pretrained(tmp_path / "text")
    clip_text.tokenizer.save_pretrained(tmp_path / "text")
    clip_model.vision_model.save_pretrained(tmp_path / "vision")
    vision_config = clip_model.config.vision_config.to_dict()
    vision_config["projection_dim"] = clip_model.config.projection_dim
    with_projection = CLIPVisionModelWithProjection(type(clip_model.config.vision_config)(
        **vision_config
    ))
    with_projection.vision_model.load_state_dict(clip_model.vision_model.state_dict())
    with_projection.visual_projection.load_state_dict(clip_model.visual_projection.state_dict())
    with_projection.save_pretrained(tmp_path / "projection")

    text = HuggingFaceTextEncoder(str(tmp_path / "text"), max_length=16).eval()
    torch.testing.assert_close(text(TEXTS).tokens, clip_text(TEXTS).tokens)
    assert torch.equal(text(TEXTS).summary, clip_text(TEXTS).summary)
    images = torch.randn(2, 3, 32, 32)
    for folder in ("vision", "projection"):
        vision = HuggingFaceVisionEncoder(str(tmp_path / folder)).eval()
        assert type(vision.model) is type(clip_vision.model)
        torch.testing.assert_close(vision(images).tokens, clip_vision(images).tokens)


def test_siglip_text_pools_the_last_position_of_max_length_ids(siglip_family_dir):
    import transformers

    family, directory = siglip_family_dir
    model = getattr(transformers, f"{family}Model").from_pretrained(directory).eval()
    encoder = HuggingFaceTextEncoder(str(directory), max_length=16).eval()
    assert encoder.pooling == "last" and encoder.padding == "max_length"
    inputs = encoder.tokenize(TEXTS)
    out = encoder(text_inputs=inputs)
    assert out.tokens.shape == (4, 16, 32)
    assert out.summary.tolist() == [15] * 4
    assert torch.equal(out.mask[[0, 1, 3]], inputs["attention_mask"][[0, 1, 3]].bool() | (
        torch.arange(16) == 15
    ))
    assert not out.mask[2].any()
    with torch.no_grad():  # as SigLIP was trained: max_length ids, no attention mask
        expected = _features(model.get_text_features(input_ids=inputs["input_ids"]))
        pooled = model.text_model.head(out.summary_tokens())
    torch.testing.assert_close(pooled, expected, atol=ATOL, rtol=RTOL)


def test_siglip_vision_has_no_class_token(siglip_family_dir):
    from transformers import SiglipModel

    family, directory = siglip_family_dir
    if family == "Siglip2":  # patches of any aspect ratio, with a pixel mask: not supported
        with pytest.raises(ConfigError, match="not a CLIP or SigLIP vision model"):
            HuggingFaceVisionEncoder(str(directory))
        return
    model = SiglipModel.from_pretrained(directory).eval()
    encoder = fusionkit.create("vision_encoder", "huggingface", model_name_or_path=str(directory))
    encoder.eval()
    images = torch.randn(2, 3, 32, 32)
    out = encoder(images)
    assert out.tokens.shape == (2, 4 * 4, 32) and out.summary is None
    assert encoder.num_prefix_tokens == 0 and encoder.family == "siglip"
    with torch.no_grad():  # SigLIP pools every token with its attention head
        expected = _features(model.get_image_features(pixel_values=images))
        pooled = model.vision_model.head(out.tokens)
    torch.testing.assert_close(pooled, expected, atol=ATOL, rtol=RTOL)
    assert encoder.data_config == {
        "input_size": (3, 32, 32),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }


def test_bert_marks_no_summary(tiny_bert_dir):
    encoder = HuggingFaceTextEncoder(str(tiny_bert_dir), max_length=16)
    out = encoder(["a red dress", None])
    assert out.summary is None and encoder.pooling is None and encoder.padding == "longest"
    assert out.tokens.shape[1] == 5  # padded to the longest text, as before


def test_freeze(tiny_clip_dir):
    vision = HuggingFaceVisionEncoder(str(tiny_clip_dir), freeze=True).train()
    text = HuggingFaceTextEncoder(str(tiny_clip_dir), max_length=16, freeze=True).train()
    for encoder in (vision, text):
        assert encoder.frozen and not encoder.model.training
        assert not any(p.requires_grad for p in encoder.parameters())
    trainable = HuggingFaceVisionEncoder(str(tiny_clip_dir)).train()
    assert trainable.model.training and all(p.requires_grad for p in trainable.parameters())


def test_data_config_from_the_preprocessor(clip_vision, tiny_clip_dir, tmp_path):
    assert clip_vision.data_config == {
        "input_size": (3, 32, 32),
        "mean": (0.48145466, 0.4578275, 0.40821073),
        "std": (0.26862954, 0.26130258, 0.27577711),
        "interpolation": "bicubic",
        "crop_pct": 0.8,  # resize the shortest edge to 40, crop 32
        "crop_mode": "center",
    }
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    assert build_image_transform(clip_vision.data_config)(image).shape == (3, 32, 32)
    # Without preprocessor_config.json: the config's image_size and CLIP's preprocessing.
    shutil.copytree(tiny_clip_dir, tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").unlink()
    bare = HuggingFaceVisionEncoder(str(tmp_path / "clip"))
    assert bare.data_config == {**clip_vision.data_config, "crop_pct": 1.0}


def test_refusals(tiny_clip_dir, tiny_bert_dir, tmp_path, clip_vision):
    missing = str(tmp_path / "no" / "such-folder")
    for kind in ("vision_encoder", "text_encoder"):
        with pytest.raises(CheckpointError, match="does not exist"):
            fusionkit.create(kind, "huggingface", model_name_or_path=missing)
        with pytest.raises(ConfigError, match="never downloads"):
            fusionkit.create(kind, "huggingface", model_name_or_path="openai/clip-vit-base-patch32")
    with pytest.raises(ConfigError, match="not a CLIP or SigLIP vision model"):
        HuggingFaceVisionEncoder(str(tiny_bert_dir))
    with pytest.raises(ShapeError, match="interpolate_pos_encoding=True"):
        clip_vision(torch.randn(1, 3, 64, 64))
    with pytest.raises(ShapeError, match="NaN"):
        clip_vision(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ShapeError, match=r"\(B, 3, H, W\)"):
        clip_vision(torch.randn(1, 1, 32, 32))


def test_interpolate_pos_encoding(tiny_clip_dir):
    encoder = HuggingFaceVisionEncoder(str(tiny_clip_dir), interpolate_pos_encoding=True)
    assert encoder(torch.randn(1, 3, 64, 64)).tokens.shape == (1, 1 + 8 * 8, 32)


def test_cma_clip_with_one_clip_folder_for_both_encoders(tiny_clip_dir, tmp_path):
    """The same CLIP folder as vision and text encoder; a fusionkit checkpoint round-trips
    (loading rebuilds the vision tower with ``pretrained=False``)."""
    model = fusionkit.build_model(
        {
            "vision": {"name": "huggingface", "model_name_or_path": str(tiny_clip_dir)},
            "text": {"name": "huggingface", "model_name_or_path": str(tiny_clip_dir),
                     "max_length": 16},
            "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 4}},
            "head": {"name": "mlp", "hidden_dim": 32},
            "tasks": {"color": {"num_classes": 5}},
        }
    ).eval()
    images, texts = torch.randn(3, 3, 32, 32), ["a red shirt", None, "a blue bag"]
    with torch.no_grad():
        logits = model(images=images, texts=texts).logits["color"]
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    loaded = type(model).from_pretrained(model.save_pretrained(tmp_path / "checkpoint"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images=images, texts=texts).logits["color"], logits)
