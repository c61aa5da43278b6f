"""CMA-CLIP assembled from the registry: backbones, masking, ablations, save/load, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_close

import fusionkit
from fusionkit import CMACLIP, build_model
from fusionkit.errors import CheckpointError, ConfigError, ShapeError
from fusionkit.models import ModelConfig

TASKS = {
    "color": {"classes": ["black", "blue", "red"]},
    "pattern": {"classes": ["plain", "striped", "floral"], "multi_label": True},
}
TEXTS = ["a red striped shirt", "blue dress", "the plain bag", "green"]
TARGETS = {
    "color": torch.tensor([2, 1, -100, 0]),
    "pattern": torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1], [float("nan")] * 3]),
}
VISION_CASES = {
    "vit_tiny_patch16_224": {"img_size": 64},
    "resnet18": {},
    "convnext_atto": {},
    "tf_efficientnet_lite0": {},
    "mobilenetv3_small_050": {},
}


def config(tiny_bert_dir, backbone="resnet18", freeze_vision=False, **overrides):
    base = {
        "vision": {
            "name": "timm",
            "model_name": backbone,
            "pretrained": False,
            "freeze": freeze_vision,
            **VISION_CASES.get(backbone, {}),
        },
        "text": {"name": "huggingface", "model_name_or_path": str(tiny_bert_dir), "max_length": 16},
        "fusion": {
            "dim": 32, "sequence": {"name": "transformer", "layers": 1, "heads": 4},
            "modality": {"name": "keyless"},
        },
        "tasks": TASKS,
    }
    base.update(overrides)
    return base


def images(batch=4, size=64):
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("vision", list(VISION_CASES))
def test_contract_over_timm_backbones(tiny_bert_dir, vision):
    model = build_model(config(tiny_bert_dir, vision, freeze_vision=True)).train()
    out = model(images=images(), texts=TEXTS)
    assert model.modalities == ("text", "image")
    assert out.logits["color"].shape == (4, 3) and out.logits["pattern"].shape == (4, 3)
    for weights in out.modality_weights.values():
        assert weights.shape == (4, 2)
        assert_close(weights.sum(1), torch.ones(4))
    model.loss(out, TARGETS).backward()
    for name, param in model.named_parameters():
        if name.startswith("vision."):
            assert param.grad is None, f"frozen backbone got a gradient: {name}"
        elif param.requires_grad and ".pooler." not in name:  # BERT pooler: unused
            assert param.grad is not None, name
    assert not model.vision.model.training


def test_sentence_transformers_adapter_in_model():
    model = build_model(
        {
            "vision": {
                "name": "timm",
                "model_name": "resnet18",
                "pretrained": False,
                "freeze": True,
            },
            "text": {
                "name": "sentence_transformers",
                "model_name_or_path": "all-MiniLM-L6-v2",
                "freeze": True,
                "max_length": 32,
            },
            "fusion": {"dim": 64, "sequence": {"name": "transformer", "heads": 4}},
            "tasks": TASKS,
        }
    )
    out = model(images=images(2), texts=TEXTS[:2])
    assert model.text.width == 384
    model.loss(out, {k: v[:2] for k, v in TARGETS.items()}).backward()
    assert all(p.grad is None for p in model.text.parameters())
    assert model.sequence_fusion.input_proj["text"].weight.grad is not None


@pytest.fixture(scope="module")
def model(tiny_bert_dir):
    return build_model(config(tiny_bert_dir)).eval()


def test_missing_text_gets_zero_weight_and_image_only_logits(model):
    with torch.no_grad():
        pixels = images()
        out = model(images=pixels, texts=[TEXTS[0], None, TEXTS[2], TEXTS[3]])
        alone = model(images=pixels[1:2])
    for task, weights in out.modality_weights.items():
        assert weights[1, 0].item() == 0.0 and weights[1, 1].item() == 1.0
        assert weights[0, 0].item() > 0
        assert_close(out.logits[task][1], alone.logits[task][0])


def test_missing_image_per_sample(model):
    with torch.no_grad():
        pixels = images()
        present = {"image": torch.tensor([True, False, True, True])}
        out = model(images=pixels, texts=TEXTS, present=present)
        text_only = model(texts=TEXTS[1:2])
    for task in TASKS:
        assert out.modality_weights[task][1, 1].item() == 0.0
        assert_close(out.logits[task][1], text_only.logits[task][0])


def test_padding_a_text_longer_never_changes_outputs(model):
    with torch.no_grad():
        pixels = images(2)
        short = model(images=pixels, texts=["red", "blue dress"])
        padded = model(images=pixels, texts=["red", "blue dress " + "a " * 10])
    for task in TASKS:
        assert_close(padded.logits[task][0], short.logits[task][0])


def test_pre_tokenised_inputs_equal_raw_texts(model):
    with torch.no_grad():
        pixels = images()
        raw = model(images=pixels, texts=TEXTS)
        tokenised = model(images=pixels, text_inputs=model.text.tokenize(TEXTS))
    for task in TASKS:
        assert_close(tokenised.logits[task], raw.logits[task])


@pytest.mark.parametrize("include_frozen", [True, False])
def test_save_load_reproduces_logits_exactly(tmp_path, tiny_bert_dir, include_frozen):
    model = build_model(config(tiny_bert_dir, freeze_vision=True)).eval()
    pixels = images()
    with torch.no_grad():
        before = model(images=pixels, texts=TEXTS)
    model.save_pretrained(tmp_path, include_frozen=include_frozen)
    loaded = CMACLIP.from_pretrained(tmp_path)
    with torch.no_grad():
        after = loaded(images=pixels, texts=TEXTS)
    if include_frozen:
        for task in TASKS:
            assert torch.equal(after.logits[task], before.logits[task])
    else:
        # Random-init frozen backbones are rebuilt from the config, so only the shapes and the
        # trained (non-frozen) weights are the same.
        trained = {k: v for k, v in model.state_dict().items() if not k.startswith("vision.")}
        reloaded = loaded.state_dict()
        assert all(torch.equal(v, reloaded[k]) for k, v in trained.items())


def test_corrupt_checkpoint_is_refused(tmp_path, model):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        CMACLIP.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.yaml"):
        CMACLIP.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        ({"fusion": {"sequence": None, "dim": 32}}, "without sequence-wise attention"),
        (
            {
                "fusion": {
                    "dim": 32, "sequence": {"name": "transformer", "heads": 4},
                    "modality": {"name": "concat"},
                }
            },
            "without modality-wise attention",
        ),
        ({"fusion": {"dim": 32, "sequence": {"name": "co_attention", "heads": 4}}}, "co-attention"),
        ({"text": None}, "image only"),
        ({"vision": None}, "text only"),
    ],
)
def test_ablations_are_one_config_change(tiny_bert_dir, overrides, kind):
    model = build_model(config(tiny_bert_dir, **overrides))
    kwargs = {}
    if model.vision is not None:
        kwargs["images"] = images()
    if model.text is not None:
        kwargs["texts"] = TEXTS
    out = model(**kwargs)
    assert out.logits["color"].shape == (4, 3), kind
    assert out.modality_weights["color"].shape == (4, len(model.modalities))
    model.loss(out, TARGETS).backward()


def test_yaml_config_and_round_trip(tmp_path, tiny_bert_dir):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config(tiny_bert_dir)))
    parsed = ModelConfig.from_yaml(path)
    assert parsed.fusion.dim == 32 and parsed.modalities == ("text", "image")
    assert ModelConfig.from_dict(parsed.to_dict()) == parsed
    assert isinstance(build_model(path), CMACLIP)
    assert isinstance(build_model(parsed), CMACLIP)


REPO = Path(__file__).parent.parent
SHIPPED_CONFIGS = sorted(
    [*(REPO / "configs").rglob("*.yaml"), *(REPO / "examples" / "configs").rglob("*.yaml")]
)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_config_is_valid(path):
    from fusionkit.training import build_run_config

    raw = yaml.safe_load(path.read_text())
    # Configs without tasks infer them from their data (the emoji source is built on first
    # use, Food-101 and Fashion-Gen are the user's own download): not done here.
    raw.setdefault("tasks", {"group": {"num_classes": 9}})
    parsed = build_run_config(raw)
    assert parsed.tasks and parsed.model.fusion.dim > 0


def test_the_concat_baseline_and_sequence_concat_differ_only_as_described():
    folder = Path(__file__).parent.parent / "configs" / "ablations"
    full, concat, sequence_concat = (
        yaml.safe_load((folder / f"{name}.yaml").read_text())
        for name in ("cma_clip", "concat", "sequence_concat")
    )
    assert concat["fusion"] == {"dim": 256, "sequence": None, "modality": {"name": "concat"}}
    assert sequence_concat["fusion"] == {**full["fusion"], "modality": {"name": "concat"}}
    for other in (concat, sequence_concat):
        assert {k: v for k, v in other.items() if k != "fusion"} == {
            k: v for k, v in full.items() if k != "fusion"
        }


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"fusoin": {}}, "fusoin: unknown top-level key; did you mean 'fusion'"),
        (
            {"fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 4, "layer": 2}}},
            "fusion.sequence.layer: unknown option .* did you mean 'layers'",
        ),
        (
            {"fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": "four"}}},
            "fusion.sequence.heads: expected int",
        ),
        (
            {"fusion": {"dim": 32, "sequence": {"name": "transfomer"}}},
            "fusion.sequence.name: unknown sequence_fusion 'transfomer'; did you mean "
            "'transformer'",
        ),
        (
            {"fusion": {"modality": {"name": "keyless", "variant": 3}}},
            "fusion.modality.variant: expected",
        ),
        ({"fusion": {"modality": {"name": "keyless", "dim": 3}}}, "fusion.modality.dim: set by"),
        ({"fusion": {"dim": 16, "sequence": {"name": "transformer", "dim": 32}}}, "disagree"),
        (
            {"vision": {"name": "timm", "model_name": "resnet18", "freeze": "yes"}},
            "vision.freeze: expected bool",
        ),
        ({"vision": None, "text": None}, "at least one modality"),
        ({"tasks": {"color": {"classes": ["a"]}}}, r"tasks\.color: .*num_classes >= 2"),
        ({"model": "cma-clip"}, "model: unknown model 'cma-clip'; did you mean 'cma_clip'"),
    ],
)
def test_config_errors_name_the_key_path(tiny_bert_dir, change, match):
    with pytest.raises(ConfigError, match=match):
        build_model(config(tiny_bert_dir, **change))


def test_bad_forward_input(model):
    with pytest.raises(ShapeError, match="nothing to classify"):
        model()
    with pytest.raises(ShapeError, match="batch size"):
        model(images=images(3), texts=TEXTS)
    with pytest.raises(ShapeError, match="images"):
        model(images=torch.randn(4, 64, 64))
    with pytest.raises(ShapeError, match=r"present\['image'\]"):
        model(images=images(), texts=TEXTS, present={"image": torch.ones(4)})


def test_models_are_registered():
    assert fusionkit.list_components("model") == ["cma_clip"]
