"""Models over named inputs: several texts and images, encoders shared between inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_close

from fusionkit.config import ModelConfig
from fusionkit.data import write_manifest
from fusionkit.errors import ConfigError, ShapeError
from fusionkit.models import CMACLIP, build_model
from fusionkit.training import Trainer, build_run_config

TASKS = {"color": {"classes": ["blue", "red"]},
         "pattern": {"classes": ["plain", "striped", "floral"], "multi_label": True}}
IMAGE = {"name": "timm", "model_name": "test_efficientnet", "pretrained": False}


def text_encoder(tiny_bert_dir, **options):
    return {"name": "huggingface", "model_name_or_path": str(tiny_bert_dir), "max_length": 16,
            **options}


def three_inputs(tiny_bert_dir):
    """Title, description (sharing the title's encoder) and a front photo."""
    return {
        "inputs": {
            "title": {"encoder": text_encoder(tiny_bert_dir), "column": "title"},
            "description": {"share": "title", "column": "description"},
            "front": {"encoder": IMAGE, "column": "image"},
        },
        "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
        "head": {"name": "mlp", "hidden_dim": 32},
        "unimodal_heads": {"loss_weight": 1.0},
        "tasks": TASKS,
    }


@pytest.fixture
def model(tiny_bert_dir):
    torch.manual_seed(0)
    return build_model(three_inputs(tiny_bert_dir)).eval()


def batch():
    """Three samples; the images are drawn from the global (seeded) RNG."""
    return {
        "title": ["a red shirt", "the blue bag", "a striped dress"],
        "description": ["striped red", None, "blue dress on the mat"],
        "front": torch.randn(3, 3, 32, 32),
    }


def test_config_reads_inputs_and_writes_them_back(tiny_bert_dir):
    config = ModelConfig.from_dict(three_inputs(tiny_bert_dir))
    assert config.modalities == ("title", "description", "front")
    assert [config.inputs[n].kind for n in config.modalities] == ["text", "text", "image"]
    assert config.inputs["description"].share == "title"
    assert not config.shorthand and config.vision is None and config.text is None
    again = ModelConfig.from_dict(config.to_dict())
    assert again.inputs == config.inputs


def test_the_shorthand_is_two_named_inputs(tiny_bert_dir):
    config = ModelConfig.from_dict({"vision": IMAGE, "text": text_encoder(tiny_bert_dir),
                                    "tasks": TASKS})
    assert config.shorthand and config.modalities == ("text", "image")
    assert (config.inputs["image"].column, config.inputs["text"].column) == ("image", "text")
    assert "inputs" not in config.to_dict()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, r"^inputs: expected a mapping of input names"),
        ({"a b": {"share": "x"}}, r"^inputs\.a b: an input name is a Python identifier"),
        ({"t": {"column": "t"}}, r"^inputs\.t: give exactly one of encoder or share"),
        ({"t": {"share": "u"}}, r"^inputs\.t\.share: no input 'u'"),
        ({"t": {"encoder": {"name": "timmy"}}},
         r"^inputs\.t\.encoder\.name: .*did you mean 'timm'"),
        ({"t": {"encoder": IMAGE, "colum": "x"}}, r"^inputs\.t\.colum: unknown key; did you mean"),
        ({"t": {"encoder": {**IMAGE, "freez": True}}},
         r"^inputs\.t\.encoder\.freez: unknown option .*did you mean 'freeze'"),
        ({"t": {"encoder": IMAGE}, "u": {"share": "t"}, "v": {"share": "u"}},
         r"^inputs\.v\.share: 'u' shares an encoder itself"),
        ({"t": {"encoder": IMAGE}, "u": {"share": "t", "kind": "text"}},
         r"^inputs\.u\.kind: 't' is an image input"),
        ({"id": {"encoder": IMAGE}}, r"^inputs\.id: 'id' is reserved"),
        ({"t": {"encoder": IMAGE}, "u": {"share": "t", "column": "t"}},
         r"^inputs\.u\.column: 't' is already read by 't'"),
    ],
)
def test_bad_inputs_name_the_key_path(inputs, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({"inputs": inputs, "tasks": TASKS})
    with pytest.raises(ConfigError, match=r"^vision: give the inputs either"):
        ModelConfig.from_dict({"inputs": {"t": {"encoder": IMAGE}}, "vision": IMAGE,
                               "tasks": TASKS})


def test_three_inputs_give_three_weight_columns_and_mask_a_missing_one(model):
    out = model(inputs=batch())
    assert out.logits["color"].shape == (3, 2) and out.logits["pattern"].shape == (3, 3)
    weights = out.modality_weights["color"]
    assert weights.shape == (3, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    assert weights[1, 1] == 0  # sample 1 has no description
    assert out.present["description"].tolist() == [True, False, True]


def test_a_shared_encoder_is_one_module_run_once_per_batch(model):
    title, description = model.encoder_of("title"), model.encoder_of("description")
    assert title is description
    assert not any(k.startswith("input_encoders.description") for k in model.state_dict())
    calls = []
    handle = title.register_forward_hook(lambda module, args, out: calls.append(1))
    with torch.no_grad():
        tokens, masks = model.forward_features(inputs=batch())
    handle.remove()
    assert len(calls) == 1
    # Running each input alone gives the same tokens on every real position.
    for name in ("title", "description"):
        with torch.no_grad():
            alone, alone_masks = model.forward_features(inputs={name: batch()[name]})
        length = alone_masks[name].shape[1]
        assert torch.equal(masks[name][:, :length], alone_masks[name])
        keep = alone_masks[name]
        assert_close(tokens[name][:, :length][keep], alone[name][keep])


def test_two_images_and_one_text(tiny_bert_dir):
    torch.manual_seed(0)
    model = build_model({
        "inputs": {
            "front": {"encoder": IMAGE, "column": "image"},
            "back": {"share": "front", "column": "image_back"},
            "title": {"encoder": text_encoder(tiny_bert_dir)},
        },
        "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
        "tasks": TASKS,
    }).eval()
    images = torch.randn(2, 3, 32, 32)
    out = model(inputs={"front": images, "back": images.flip(-1)}, texts=["a red shirt", None])
    assert out.modality_weights["color"].shape == (2, 3)
    assert out.modality_weights["color"][1, 2] == 0  # no title for sample 1
    two = r"images: this model has 2 image inputs \['front', 'back'\]"
    with pytest.raises(ShapeError, match=two):
        model(images=images)
    with pytest.raises(ShapeError, match=r"no input 'side'"):
        model(inputs={"side": images})


def test_named_inputs_save_and_load(model, tmp_path):
    samples = batch()
    with torch.no_grad():
        before = model(inputs=samples)
    loaded = CMACLIP.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert loaded.config.inputs == model.config.inputs
    with torch.no_grad():
        after = loaded(inputs=samples)
    for task in TASKS:
        assert_close(after.logits[task], before.logits[task])


def products(folder: Path, count: int = 16) -> dict[str, Path]:
    """Train and val manifests with title, description, image and image_back columns: some
    descriptions and some images missing, photos of two sizes."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(count):
        color = ("red", "blue")[k % 2]
        fill = (200, 20, 20) if color == "red" else (20, 20, 200)
        front, back = f"images/{k}.png", f"images/{k}-back.png"
        Image.new("RGB", (40, 30) if k % 3 else (24, 24), fill).save(folder / front)
        Image.new("RGB", (32, 32), fill[::-1]).save(folder / back)
        rows.append([f"p{k}", f"a {color} shirt", "" if k % 4 == 1 else f"soft {color} cotton",
                     "" if k % 5 == 2 else front, back if k % 2 else "", color])
    columns = ["id", "title", "description", "image", "image_back", "color"]
    return {
        split: write_manifest(folder / f"{split}.csv", columns, part)
        for split, part in (("train", rows[: count * 3 // 4]), ("val", rows[count * 3 // 4 :]))
    }


def run_config(model: dict, manifests: dict[str, Path], cache: Path) -> dict:
    return {
        **model,
        "data": {"train": str(manifests["train"]), "val": str(manifests["val"]),
                 "tasks": ["color"], "image_size": 32, "batch_size": 4},
        "train": {"epochs": 1, "lr": 3e-3, "device": "cpu", "warmup_ratio": 0.0,
                  "cache_dir": str(cache)},
    }


def test_three_inputs_train_evaluate_and_predict_from_the_cli(tiny_bert_dir, tmp_path, capsys):
    from fusionkit.cli import main

    manifests = products(tmp_path / "data")
    model = three_inputs(tiny_bert_dir)  # the title encoder fine-tuned, the image one cached
    del model["tasks"]  # inferred from the manifest: every column no input reads
    model["inputs"]["front"]["encoder"] = {**IMAGE, "freeze": True}
    config = tmp_path / "three.yaml"
    config.write_text(yaml.safe_dump(run_config(model, manifests, tmp_path / "cache"),
                                     sort_keys=False))
    run = tmp_path / "run"
    assert main(["-q", "train", "--config", str(config), "--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["-q", "evaluate", "--checkpoint", str(run), "--data", str(manifests["val"]),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["tasks"]["color"]["modality_weights"]) == {"title", "description",
                                                                 "front"}
    assert report["num_samples"] == 4

    out = tmp_path / "val.csv"
    assert main(["-q", "predict", "--checkpoint", str(run), "--manifest",
                 str(manifests["val"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"predictions: {out} (4 rows)"
    header = out.read_text().splitlines()[0].split(",")
    assert header == ["id", "color", "color_title_weight", "color_description_weight",
                      "color_front_weight", "error"]
    photo = manifests["val"].parent / "images" / "12.png"
    assert main(["-q", "predict", "--checkpoint", str(run), "--json",
                 "--input", "title=a red shirt", "--input", "description=soft red cotton",
                 "--input", f"front={photo}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["color"]["label"] in ("red", "blue")


def test_two_images_and_a_text_train_from_a_manifest_with_cached_features(tiny_bert_dir,
                                                                          tmp_path):
    from fusionkit.training import evaluate_checkpoint

    manifests = products(tmp_path / "data")
    model = {
        "inputs": {
            "front": {"encoder": {**IMAGE, "freeze": True}, "column": "image"},
            "back": {"share": "front", "column": "image_back"},
            "title": {"encoder": text_encoder(tiny_bert_dir, freeze=True)},
        },
        "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
    }
    config = build_run_config(run_config(model, manifests, tmp_path / "cache"))
    result = Trainer(config, tmp_path / "run", progress=False).fit()
    assert result.cache_stats.misses == 2 and result.cache_stats.hits == 0
    again = Trainer(config, tmp_path / "again", progress=False).fit()
    assert again.cache_stats.hits == 2
    report = evaluate_checkpoint(tmp_path / "run", manifests["val"], device="cpu")
    assert list(report["tasks"]["color"]["modality_weights"]) == ["front", "back", "title"]
    assert report["num_samples"] == 4


def test_a_frozen_shared_encoder_is_left_out_of_a_small_checkpoint(tiny_bert_dir, tmp_path):
    config = three_inputs(tiny_bert_dir)
    config["inputs"]["title"]["encoder"] = text_encoder(tiny_bert_dir, freeze=True)
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert model.frozen_modalities() == ["title", "description"]
    assert model.frozen_prefixes() == ["input_encoders.title."]
    samples = batch()
    with torch.no_grad():
        before = model(inputs=samples)
    folder = model.save_pretrained(tmp_path / "small", include_frozen=False)
    loaded = CMACLIP.from_pretrained(folder)  # the title encoder comes from its config again
    with torch.no_grad():
        after = loaded(inputs=samples)
    assert_close(after.logits["color"], before.logits["color"])


def test_predict_named_inputs_from_python_and_the_cli(model, tmp_path, capsys):
    import json

    from PIL import Image

    from fusionkit.cli import main
    from fusionkit.serving import Predictor

    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo)
    folder = model.save_pretrained(tmp_path / "ckpt")
    predictor = Predictor.from_pretrained(folder, device="cpu")
    assert set(predictor.image_transforms) == {"front"}
    result = predictor.predict(inputs={"title": ["a red shirt"], "description": [None],
                                       "front": [str(photo)]})[0]
    weights = result["color"]["modality_weights"]
    assert list(weights) == ["title", "description", "front"] and weights["description"] == 0
    pixels = predictor.image_transforms["front"](Image.open(photo).convert("RGB"))
    with torch.no_grad():
        direct = model(inputs={"title": ["a red shirt"], "description": [None],
                               "front": pixels[None]})
    probs = direct.logits["color"].softmax(-1)[0]
    assert result["color"]["scores"]["red"] == pytest.approx(float(probs[1]), abs=1e-5)

    code = main(["-q", "predict", "--checkpoint", str(folder), "--json",
                 "--input", "title=a red shirt", "--input", "description=striped red",
                 "--input", f"front={photo}"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["color"]["modality_weights"]) == {"title", "description", "front"}
    assert main(["-q", "predict", "--checkpoint", str(folder), "--input", "side=x"]) == 2
    assert "no input 'side'" in capsys.readouterr().err
    with pytest.raises(Exception, match="give inputs="):
        predictor.predict(texts=["a red shirt"])


def test_explain_a_pair_of_named_inputs(model, tmp_path, capsys):
    from PIL import Image

    from fusionkit.cli import main
    from fusionkit.serving import explain

    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo)
    folder = model.save_pretrained(tmp_path / "ckpt")
    values = {"title": "a red shirt", "description": "soft striped cotton", "front": photo}
    with pytest.raises(ConfigError, match=r"the text inputs \['title', 'description'\]: name "
                                          r"one with text_input"):
        explain(folder, inputs=values)
    result = explain(folder, inputs=values, text_input="description")
    assert result.heatmap.shape == result.grid and result.token in ("soft", "striped", "cotton")
    assert set(result.modality_weights["color"]) == {"title", "description", "front"}
    alone = explain(folder, inputs={"title": "a red shirt", "front": photo}, text_input="title")
    assert alone.modality_weights["color"]["description"] == 0  # left out: missing
    with pytest.raises(ConfigError, match=r"no image input 'back'"):
        explain(folder, inputs=values, text_input="title", image_input="back")

    out = tmp_path / "fig.png"
    code = main(["-q", "explain", "--checkpoint", str(folder), "--input", "title=a red shirt",
                 "--input", f"front={photo}", "--text-input", "title", "--out", str(out)])
    assert code == 0 and out.is_file()
    assert "weights: title=" in capsys.readouterr().out


def test_an_encoder_name_of_both_kinds_needs_kind_except_huggingface(tiny_bert_dir):
    both = {"name": "open_clip", "model_name": "ViT-B-32"}
    with pytest.raises(ConfigError, match=r"^inputs\.t: encoder 'open_clip' is both an image "
                                          r"and a text encoder; add kind"):
        ModelConfig.from_dict({"inputs": {"t": {"encoder": both}}, "tasks": TASKS})
    config = ModelConfig.from_dict({"inputs": {"t": {"encoder": text_encoder(tiny_bert_dir)}},
                                    "tasks": TASKS})
    assert config.inputs["t"].kind == "text"  # huggingface meant the text encoder before
    assert config.to_dict()["inputs"]["t"]["kind"] == "text"  # written out: unambiguous
