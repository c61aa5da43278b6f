"""The open_clip encoders: tokens whose summary reproduces the checkpoint's own embeddings."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

import fusionkit
import fusionkit.encoders.open_clip as oc  # registers the "open_clip" encoders
import fusionkit.encoders.open_clip_loading as loading
from fusionkit.data import build_image_transform
from fusionkit.errors import CheckpointError, ConfigError, MissingDependencyError, ShapeError
from fusionkit.serving.explain import _words

open_clip = pytest.importorskip("open_clip")

TEXTS = ["a red dress", "the striped dress sits on the mat"]
ATOL = 1e-5


@pytest.fixture
def reference(tiny_open_clip):
    """The whole open_clip model, loaded by open_clip itself from the same file."""
    name, path = tiny_open_clip
    return open_clip.create_model(name, pretrained=str(path)).eval()


@pytest.fixture
def count_loads(monkeypatch):
    """How many CLIP models the encoders create (one per checkpoint load)."""
    oc.clear_cache()
    calls = []
    create = open_clip.create_model

    def counting(*args, **kwargs):
        calls.append(kwargs.get("pretrained"))
        return create(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", counting)
    yield calls
    oc.clear_cache()


def test_vision_summary_with_the_checkpoint_head_is_encode_image(tiny_open_clip, reference):
    name, path = tiny_open_clip
    encoder = oc.OpenCLIPVisionEncoder(name, pretrained=path).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = encoder(images)
        expected = reference.encode_image(images)
    assert out.tokens.shape == (2, 17, 64) and encoder.width == 64 and encoder.embed_dim == 32
    assert encoder.num_prefix_tokens == 1 and out.mask.all()
    assert out.summary.tolist() == [0, 0]
    # Tokens are taken after ln_post: the checkpoint's head is then the projection alone.
    torch.testing.assert_close(out.summary_tokens() @ reference.visual.proj, expected,
                               rtol=0, atol=ATOL)
    torch.testing.assert_close(encoder.project(out.summary_tokens()), expected, rtol=0, atol=ATOL)


def test_text_summary_with_the_checkpoint_head_is_encode_text(tiny_open_clip, reference):
    name, path = tiny_open_clip
    encoder = oc.OpenCLIPTextEncoder(name, pretrained=path).eval()
    inputs = encoder.tokenize(TEXTS)
    full = open_clip.get_tokenizer(name)(TEXTS)  # open_clip's own ids, padded to 77
    length = inputs["input_ids"].shape[1]
    assert torch.equal(inputs["input_ids"], full[:, :length]) and not full[:, length:].any()
    with torch.no_grad():
        out = encoder(TEXTS)
        expected = reference.encode_text(full)
    assert out.tokens.shape == (2, length, 64)
    assert out.summary.tolist() == full.argmax(-1).tolist() == [4, 8]
    assert out.mask.sum(1).tolist() == [5, 9]  # start, the words, end: nothing after the end
    # Tokens are taken after ln_final: the checkpoint's head is the projection alone.
    torch.testing.assert_close(out.summary_tokens() @ reference.text_projection, expected,
                               rtol=0, atol=ATOL)
    torch.testing.assert_close(encoder.project(out.summary_tokens()), expected, rtol=0, atol=ATOL)
    with torch.no_grad():
        again = encoder(text_inputs=inputs)
    torch.testing.assert_close(again.tokens, out.tokens)


def test_truncation_keeps_the_end_of_text_token_as_open_clip_does(tiny_open_clip, reference):
    name, path = tiny_open_clip
    encoder = oc.OpenCLIPTextEncoder(name, pretrained=path, max_length=6).eval()
    ids = encoder.tokenize(TEXTS)["input_ids"]
    short = open_clip.get_tokenizer(name)(TEXTS, context_length=6)
    assert torch.equal(ids, short) and ids[1, -1] == encoder.tokenizer.eot_token_id
    with torch.no_grad():
        out = encoder(TEXTS)
        expected = reference.encode_text(torch.nn.functional.pad(short, (0, 71)))
    torch.testing.assert_close(encoder.project(out.summary_tokens()), expected, rtol=0, atol=ATOL)


def test_custom_text_towers_eos_pooling_and_late_norms_keep_the_reference(tmp_path):
    """CustomTextCLIP (text tower in ``model.text``), the ``eos`` rule, a linear text head and
    a vision ``ln_post`` applied after pooling: `project` still reproduces open_clip."""
    import json

    from conftest import TINY_OPEN_CLIP

    config = json.loads(json.dumps(TINY_OPEN_CLIP))
    config["custom_text"] = True
    config["vision_cfg"]["final_ln_after_pool"] = True
    config["text_cfg"].update(pool_type="eos", eos_id=49407, proj_bias=True)
    (tmp_path / "fusionkit-tiny-custom.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fusionkit-tiny-custom.json")
    reference = open_clip.create_model("fusionkit-tiny-custom").eval()
    torch.save(reference.state_dict(), tmp_path / "custom.pt")
    vision = oc.OpenCLIPVisionEncoder("fusionkit-tiny-custom", tmp_path / "custom.pt").eval()
    text = oc.OpenCLIPTextEncoder("fusionkit-tiny-custom", tmp_path / "custom.pt").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        image_out, text_out = vision(images), text(TEXTS)
        image_expected = reference.encode_image(images)
        text_expected = reference.encode_text(open_clip.get_tokenizer("ViT-B-32")(TEXTS))
    assert isinstance(text.text_projection, torch.nn.Linear) and text_out.summary.tolist() == [4, 8]
    torch.testing.assert_close(vision.project(image_out.summary_tokens()), image_expected,
                               rtol=0, atol=ATOL)
    torch.testing.assert_close(text.project(text_out.summary_tokens()), text_expected,
                               rtol=0, atol=ATOL)


def test_a_missing_text_has_an_all_false_mask_row(tiny_open_clip):
    name, path = tiny_open_clip
    encoder = oc.OpenCLIPTextEncoder(name, pretrained=path)
    out = encoder(["a cat", None])
    assert out.mask.tolist() == [[True] * 4, [False] * 4]
    assert out.summary.tolist() == [3, 1] and torch.isfinite(out.tokens).all()


def test_the_tokenizer_serves_explain(tiny_open_clip):
    encoder = oc.OpenCLIPTextEncoder(*tiny_open_clip)
    tokenizer = encoder.tokenizer
    ids = encoder.tokenize(["a fusionkit dress"])["input_ids"][0].tolist()
    assert ids[0] == tokenizer.sot_token_id and ids[-1] == tokenizer.eot_token_id
    assert set(tokenizer.all_special_ids) == {ids[0], ids[-1]}
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in ids[1:-1]]
    assert pieces[0] == "a</w>" and pieces[-1] == "dress</w>"
    word = pieces[1:-1]  # "fusionkit" is several pieces; only the last ends the word
    assert len(word) > 1 and word[-1].endswith("</w>")
    assert not any(p.endswith("</w>") for p in word[:-1])
    assert "".join(word).removesuffix("</w>") == "fusionkit"
    words = _words(tokenizer, ids, [True] * len(ids))  # what explain draws a map for
    assert [w for w, _ in words] == ["a", "fusionkit", "dress"]
    assert words[1][1] == list(range(2, 2 + len(word)))


def test_both_towers_load_the_checkpoint_once(tiny_open_clip, count_loads):
    name, path = tiny_open_clip
    vision = oc.OpenCLIPVisionEncoder(name, pretrained=path)
    text = oc.OpenCLIPTextEncoder(name, pretrained=str(path))
    assert len(count_loads) == 1 and loading._PENDING == {}  # nothing is left in the cache
    # A tower taken already is loaded again, never shared between two encoders.
    second = oc.OpenCLIPVisionEncoder(name, pretrained=path)
    assert len(count_loads) == 2 and set(loading._PENDING[next(iter(loading._PENDING))]) == {"text"}
    ids = {id(p) for p in vision.parameters()}
    assert not ids & {id(p) for p in second.parameters()}
    assert not ids & {id(p) for p in text.parameters()}
    torch.testing.assert_close(second.visual.proj, vision.visual.proj)


def test_freeze_keeps_eval_mode_and_stops_gradients(tiny_open_clip):
    for factory in (oc.OpenCLIPVisionEncoder, oc.OpenCLIPTextEncoder):
        frozen = factory(*tiny_open_clip, freeze=True).train()
        assert frozen.frozen and not any(p.requires_grad for p in frozen.parameters())
        assert not any(module.training for module in frozen.modules() if module is not frozen)
        trainable = factory(*tiny_open_clip).train()
        assert all(p.requires_grad for p in trainable.parameters())
        assert all(module.training for module in trainable.modules())


def test_data_config_is_open_clips_preprocessing(tiny_open_clip):
    encoder = oc.OpenCLIPVisionEncoder(*tiny_open_clip)
    assert encoder.data_config == {
        "input_size": (3, 64, 64),
        "mean": (0.48145466, 0.4578275, 0.40821073),
        "std": (0.26862954, 0.26130258, 0.27577711),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    pixels = build_image_transform(encoder.data_config)(Image.new("RGB", (90, 60), "red"))
    assert pixels.shape == (3, 64, 64)
    with pytest.raises(ShapeError, match=r"takes shape \(B, 3, 64, 64\)"):
        encoder(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    ("kind", "model_name", "pretrained", "error", "match"),
    [
        ("vision", "ViT-B-33", False, ConfigError, "did you mean 'ViT-B-32'"),
        ("text", "ViT-B-32", True, ConfigError, "never downloads"),
        ("vision", "ViT-B-32", "openai", ConfigError, "a hub tag of 'ViT-B-32'"),
        ("text", "ViT-B-32", "/no/such/clip.pt", CheckpointError, "does not exist"),
        ("vision", "RN50", False, ConfigError, "not open_clip's class-token ViT"),
        ("text", "ViT-B-16-SigLIP", False, ConfigError, "Hugging Face tokenizer"),
        ("vision", "roberta-ViT-B-32", False, ConfigError, "text tower is a Hugging Face model"),
    ],
)
def test_bad_configs_are_refused_before_anything_is_built(
    kind, model_name, pretrained, error, match, count_loads
):
    factory = oc.OpenCLIPVisionEncoder if kind == "vision" else oc.OpenCLIPTextEncoder
    with pytest.raises(error, match=match):
        factory(model_name, pretrained=pretrained)
    assert count_loads == []


def test_bad_checkpoints_and_lengths(tiny_open_clip, tmp_path):
    name, _ = tiny_open_clip
    with pytest.raises(CheckpointError, match="is a directory"):
        oc.OpenCLIPVisionEncoder(name, pretrained=tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot load .*junk\.pt"):
        oc.OpenCLIPVisionEncoder(name, pretrained=tmp_path / "junk.pt")
    torch.save({"proj": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"cannot load .*other\.pt"):
        oc.OpenCLIPTextEncoder(name, pretrained=tmp_path / "other.pt")
    for length in (1, 78):
        with pytest.raises(ConfigError, match=r"max_length must be an int in \[2, 77\]"):
            oc.OpenCLIPTextEncoder(name, max_length=length)


def test_without_open_clip_the_error_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingDependencyError, match="pip install open_clip_torch"):
        oc.OpenCLIPTextEncoder("ViT-B-32")


def test_a_cma_clip_of_open_clip_towers_builds_and_runs(tiny_open_clip, count_loads):
    name, path = tiny_open_clip
    tower = {"name": "open_clip", "model_name": name, "pretrained": str(path), "freeze": True}
    model = fusionkit.build_model(
        {
            "vision": tower,
            "text": {**tower, "max_length": 16},
            "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
            "tasks": {"color": {"classes": ["blue", "red"]}},
        }
    ).eval()
    assert len(count_loads) == 1
    assert set(model.frozen_modalities()) == {"image", "text"}
    out = model(images=torch.randn(2, 3, 64, 64), texts=["a red dress", None])
    assert out.logits["color"].shape == (2, 2) and torch.isfinite(out.logits["color"]).all()
