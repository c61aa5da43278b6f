"""Unimodal heads, the late-fusion blend, its fit on val, presets and the fusion report."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from fusionkit.cli import main
from fusionkit.data import generate_catalogue
from fusionkit.errors import ConfigError, ShapeError
from fusionkit.models import CMACLIP, ModelConfig, build_model
from fusionkit.models.blending import blend_probabilities
from fusionkit.models.unimodal import LateFusionBlend, masked_mean
from fusionkit.tasks import parse_tasks
from fusionkit.training import Trainer, build_run_config, format_report
from fusionkit.training.blend import fit_blend, simplex_grid
from fusionkit.training.evaluate import fusion_warnings
from fusionkit.training.presets import DEFAULT_PRESET, PRESETS, apply_preset

TASKS = {"color": {"num_classes": 3}, "pattern": {"num_classes": 4, "multi_label": True}}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    return generate_catalogue(folder, train=32, val=16, test=8, image_size=32, progress=False)


def tiny_model_config(bert, **extra):
    return {
        "vision": {"name": "timm", "model_name": "resnet18", "pretrained": False,
                   "freeze": True},
        "text": {"name": "huggingface", "model_name_or_path": str(bert), "freeze": True,
                 "max_length": 16},
        "fusion": {"dim": 16, "sequence": {"name": "transformer", "heads": 2}},
        "head": {"name": "mlp", "hidden_dim": 16, "dropout": 0.0},
        "unimodal_heads": {"loss_weight": 0.5},
        "tasks": TASKS,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Blend
# ---------------------------------------------------------------------------------------------


def test_blend_starts_as_the_fused_head_and_mixes_log_probabilities():
    tasks = parse_tasks(TASKS)
    blend = LateFusionBlend(tasks, ("text", "image"))
    fused = {"color": torch.randn(4, 3), "pattern": torch.randn(4, 4)}
    text = {"color": torch.randn(4, 3), "pattern": torch.randn(4, 4)}
    image = {"color": torch.randn(4, 3), "pattern": torch.randn(4, 4)}
    present = {"text": torch.ones(4, dtype=torch.bool), "image": torch.ones(4, dtype=torch.bool)}
    out = blend(fused, {"text": text, "image": image}, present)
    assert_close(out["color"], F.log_softmax(fused["color"], 1))
    assert_close(out["pattern"], fused["pattern"])
    blend.set_weights("color", {"fused": 0.5, "text": 0.25, "image": 0.25})
    blend.set_weights("pattern", {"text": 1.0})
    out = blend(fused, {"text": text, "image": image}, present)
    expected = (0.5 * F.log_softmax(fused["color"], 1) + 0.25 * F.log_softmax(text["color"], 1)
                + 0.25 * F.log_softmax(image["color"], 1))
    assert_close(out["color"], expected)
    assert_close(out["pattern"], text["pattern"])
    assert blend.task_weights("pattern") == {"fused": 0.0, "text": 1.0, "image": 0.0}


def test_blend_leaves_out_a_missing_modality_and_renormalises():
    blend = LateFusionBlend(parse_tasks({"color": {"num_classes": 3}}), ("text", "image"))
    blend.set_weights("color", {"fused": 0.5, "text": 0.5})
    fused, text = torch.randn(2, 3), torch.randn(2, 3)
    present = {"text": torch.tensor([True, False]), "image": torch.tensor([True, True])}
    out = blend({"color": fused}, {"text": {"color": text}}, present)["color"]
    assert_close(out[0], 0.5 * F.log_softmax(fused[0], 0) + 0.5 * F.log_softmax(text[0], 0))
    # Text missing: its weight goes to the sources present, here the fused head alone.
    assert_close(out[1], F.log_softmax(fused[1], 0))
    blend.set_weights("color", {"text": 1.0})
    out = blend({"color": fused}, {"text": {"color": text}}, present)["color"]
    assert_close(out[1], F.log_softmax(fused[1], 0))


@pytest.mark.parametrize("weights", [{"fused": 0.5}, {"fused": 1.5, "text": -0.5},
                                     {"fused": 0.5, "audio": 0.5}])
def test_blend_refuses_bad_weights(weights):
    blend = LateFusionBlend(parse_tasks({"color": {"num_classes": 3}}), ("text",))
    with pytest.raises(ShapeError):
        blend.set_weights("color", weights)


def test_simplex_grid_covers_the_simplex_once():
    grid = list(simplex_grid(3, 10))
    assert len(grid) == math.comb(12, 2)
    assert len(set(grid)) == len(grid)
    assert grid[0] == (1.0, 0.0, 0.0)
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w in grid)


def test_fit_blend_picks_the_informative_source_and_a_mixture_when_both_help():
    torch.manual_seed(0)
    targets = torch.randint(0, 4, (400,))
    truth = F.one_hot(targets, 4).float()
    noise = torch.rand(400, 4)
    good = (3 * truth + noise).softmax(1)
    useless = torch.rand(400, 4).softmax(1)
    spec = parse_tasks({"t": {"num_classes": 4}})["t"]
    fitted = fit_blend({"fused": useless, "text": good}, targets, spec)
    assert fitted.weights == {"fused": 0.0, "text": 1.0}
    mixed = blend_probabilities({"fused": useless, "text": good}, fitted.weights, False,
                                fitted.scale)
    assert F.nll_loss(mixed.log(), targets).item() == pytest.approx(fitted.log_loss, rel=1e-9)
    # Two sources each right on a different half: the blend needs both.
    half = torch.arange(400) < 200
    first = torch.where(half[:, None], good, useless)
    second = torch.where(half[:, None], useless, good)
    weights = fit_blend({"a": first, "b": second}, targets, spec).weights
    assert 0.2 <= weights["a"] <= 0.8 and weights["a"] + weights["b"] == pytest.approx(1)
    mixed = blend_probabilities({"a": first, "b": second}, weights, False)
    assert (mixed.argmax(1) == targets).float().mean() > (first.argmax(1) == targets).float().mean()


def test_fit_blend_scale_calibrates_an_overconfident_source_without_changing_its_choice():
    torch.manual_seed(1)
    targets = torch.randint(0, 3, (300,))
    logits = F.one_hot(targets, 3).float() * 2 + torch.randn(300, 3)
    overconfident = (logits * 6).softmax(1)
    spec = parse_tasks({"t": {"num_classes": 3}})["t"]
    fitted = fit_blend({"fused": overconfident}, targets, spec)
    assert fitted.scale < 1.0
    calibrated = blend_probabilities({"fused": overconfident}, fitted.weights, False, fitted.scale)
    assert torch.equal(calibrated.argmax(1), overconfident.argmax(1))


def test_fit_blend_leaves_out_sources_a_sample_lacks_as_the_model_does():
    tasks = parse_tasks({"t": {"num_classes": 3}})
    torch.manual_seed(2)
    fused, text = torch.randn(6, 3), torch.randn(6, 3)
    present = torch.tensor([True, False, True, True, False, True])
    blend = LateFusionBlend(tasks, ("text",))
    blend.set_weights("t", {"fused": 0.4, "text": 0.6}, scale=2.0)
    model_scores = blend({"t": fused}, {"text": {"t": text}}, {"text": present})["t"].softmax(1)
    probabilities = {"fused": fused.softmax(1), "text": text.softmax(1)}
    ours = blend_probabilities(probabilities, {"fused": 0.4, "text": 0.6}, False, 2.0,
                               {"text": present})
    assert_close(ours.float(), model_scores, dtype=torch.float32)


def test_fit_blend_multi_label_and_no_labels():
    spec = parse_tasks({"p": {"num_classes": 3, "multi_label": True}})["p"]
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]] * 20)
    good = targets * 0.8 + 0.1
    assert fit_blend({"fused": 1 - good, "image": good}, targets, spec).weights["image"] == 1.0
    missing = torch.full((3, 3), float("nan"))
    fitted = fit_blend({"fused": good[:3], "image": good[:3]}, missing, spec)
    assert fitted.weights == {"fused": 1.0, "image": 0.0} and fitted.scale == 1.0
    with pytest.raises(ConfigError):
        fit_blend({}, targets, spec)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def test_unimodal_heads_see_only_their_modality_and_add_their_loss(tiny_bert_dir):
    model = build_model(tiny_model_config(tiny_bert_dir)).eval()
    tokens = {"text": torch.randn(3, 5, 32), "image": torch.randn(3, 4, 512)}
    masks = {"text": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).bool(),
             "image": torch.ones(3, 4, dtype=torch.bool)}
    out = model.forward_head(tokens, masks)
    assert set(out.source_logits()) == {"fused", "text", "image"}
    pooled = model.unimodal.proj["text"](masked_mean(tokens["text"], masks["text"]))
    expected = model.unimodal.heads["text"](pooled)["color"]
    assert_close(out.unimodal_logits["text"]["color"], expected)
    # Changing the image tokens leaves the text head alone.
    other = model.forward_head({**tokens, "image": torch.randn(3, 4, 512)}, masks)
    assert_close(other.unimodal_logits["text"]["color"], out.unimodal_logits["text"]["color"])
    targets = {"color": torch.tensor([0, 1, 2]),
               "pattern": torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]])}
    loss = model.loss(out, targets)
    expected = model.head.loss(out.fused_logits, targets)
    expected = expected + 0.5 * model.unimodal.heads["image"].loss(
        out.unimodal_logits["image"], targets)
    # The third sample has no text: the text head is not trained on it.
    kept = {"color": targets["color"][:2], "pattern": targets["pattern"][:2]}
    text_logits = {t: v[:2] for t, v in out.unimodal_logits["text"].items()}
    expected = expected + 0.5 * model.unimodal.heads["text"].loss(text_logits, kept)
    assert_close(loss, expected)


def test_model_without_unimodal_heads_is_unchanged(tiny_bert_dir):
    config = tiny_model_config(tiny_bert_dir)
    del config["unimodal_heads"]
    model = build_model(config).eval()
    out = model(images=torch.randn(2, 3, 32, 32), texts=["red bag", "blue hat"])
    assert out.fused_logits is None and out.source_logits() == {}
    assert not any(k.startswith(("unimodal.", "blend.")) for k in model.state_dict())


def test_blend_weights_round_trip_through_a_checkpoint(tiny_bert_dir, tmp_path):
    model = build_model(tiny_model_config(tiny_bert_dir)).eval()
    model.blend.set_weights("color", {"fused": 0.3, "text": 0.7}, scale=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = CMACLIP.from_pretrained(tmp_path / "ckpt")
    assert loaded.blend.task_weights("color") == {"fused": 0.3, "text": 0.7, "image": 0.0}
    assert loaded.blend.task_scale("color") == 0.5
    assert loaded.config.unimodal_loss_weight == 0.5
    assert ModelConfig.from_dict(loaded.config.to_dict()).unimodal_loss_weight == 0.5


@pytest.mark.parametrize(
    ("section", "message"),
    [(3, "expected a mapping"),
     ({"loss_weight": -1}, "loss_weight: input should be greater than 0"),
     ({"los_weight": 1}, "did you mean 'loss_weight'")],
)
def test_bad_unimodal_heads_section_is_a_config_error(section, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({"unimodal_heads": section, "tasks": TASKS})


# ---------------------------------------------------------------------------------------------
# Training: early stopping, best by loss, the blend fit on val, the report
# ---------------------------------------------------------------------------------------------


def run_config(catalogue, bert, tmp_path, **train):
    return {
        **tiny_model_config(bert),
        "tasks": None,
        "data": {"train": str(catalogue["train"]), "val": str(catalogue["val"]),
                 "image_size": 32, "batch_size": 8},
        "train": {"epochs": 3, "lr": 3e-3, "device": "cpu", "warmup_ratio": 0.0,
                  "cache_dir": str(tmp_path / "cache"), **train},
    }


def _fit(config, output):
    config = {k: v for k, v in config.items() if v is not None}
    trainer = Trainer(build_run_config(config), output, progress=False)
    return trainer, trainer.fit()


def test_training_fits_the_blend_on_val_and_reports_every_head(catalogue, tiny_bert_dir,
                                                               tmp_path):
    trainer, result = _fit(run_config(catalogue, tiny_bert_dir, tmp_path, best_metric="loss"),
                           tmp_path / "run")
    report = json.loads((tmp_path / "run" / "val_report.json").read_text())
    assert report == json.loads(json.dumps(trainer.val_report))
    best = min(result.history, key=lambda r: r["val_log_loss"])
    for row in report["tasks"].values():
        assert set(row["sources"]) == {"fused", "text", "image"}
        weights = {k: v for k, v in row["blend"].items() if k != "scale"}
        assert sum(weights.values()) == pytest.approx(1.0) and row["blend"]["scale"] > 0
        assert row["accuracy"] is not None
    assert result.best_score == report["mean"]["accuracy"]
    assert all("val_head_accuracy" in r for r in result.history)
    model = CMACLIP.from_pretrained(tmp_path / "run" / "best")
    assert {t: {**model.blend.task_weights(t), "scale": model.blend.task_scale(t)}
            for t in model.tasks} == {t: r["blend"] for t, r in report["tasks"].items()}
    # best/ is the epoch of lowest val log-loss of the blended model; reloaded, its forward
    # pass gives the metrics computed from the heads' outputs when it was picked.
    assert report["mean"]["log_loss"] == pytest.approx(best["val_log_loss"], abs=1e-5)
    assert report["mean"]["accuracy"] == pytest.approx(best["val_mean_accuracy"], abs=1e-6)
    text = format_report(report)
    assert "accuracy of the model against each of its heads alone" in text
    assert "text head" in text and "fused=" in text


def test_early_stopping_stops_when_the_val_loss_stops_improving(catalogue, tiny_bert_dir,
                                                                tmp_path):
    # lr 0: nothing changes, so no epoch after the first is better.
    _, result = _fit(run_config(catalogue, tiny_bert_dir, tmp_path, epochs=6, lr=0.0,
                                best_metric="loss", early_stopping=2), tmp_path / "run")
    assert [r["epoch"] for r in result.history] == [1, 2, 3]


def test_log_loss_of_probabilities():
    from fusionkit.training.metrics import log_loss

    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    expected = -(math.log(0.7) + math.log(0.8)) / 2
    assert log_loss(scores, torch.tensor([0, 2])) == pytest.approx(expected)
    assert log_loss(scores, torch.tensor([0, -100])) == pytest.approx(-math.log(0.7))
    multi = torch.tensor([[0.9, 0.2]])
    expected = -(math.log(0.9) + math.log(0.8)) / 2
    assert log_loss(multi, torch.tensor([[1.0, 0.0]]), True) == pytest.approx(expected)
    assert math.isnan(log_loss(scores, torch.tensor([-100, -100])))


def test_fusion_warnings_say_which_modality_alone_was_better():
    tasks = {
        "color": {"accuracy": 0.8, "sources": {"fused": 0.8, "text": 0.9, "image": 0.5}},
        "pattern": {"accuracy": 0.9, "sources": {"fused": 0.85, "text": 0.9, "image": 0.5}},
        "plain": {"accuracy": 0.7},
    }
    warnings = fusion_warnings(tasks)
    assert len(warnings) == 1
    assert warnings[0].startswith("color: the model (0.800) is below text alone (0.900)")


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def test_presets_are_valid_model_configs_with_unimodal_heads():
    assert DEFAULT_PRESET in PRESETS
    for name, preset in PRESETS.items():
        config = ModelConfig.from_dict({**preset, "tasks": TASKS})
        assert config.unimodal_loss_weight is not None, name
    assert PRESETS["fast"]["text"]["freeze"] and PRESETS["fast"]["vision"]["freeze"]
    assert not PRESETS["medium"]["text"]["freeze"] and PRESETS["medium"]["vision"]["freeze"]
    assert not PRESETS["best"]["text"]["freeze"] and not PRESETS["best"]["vision"]["freeze"]


def test_a_config_wins_over_its_preset_key_by_key():
    merged = apply_preset({"train": {"epochs": 2}, "text": {"max_length": 16}}, "fast")
    assert merged["train"]["epochs"] == 2
    assert merged["train"]["best_metric"] == PRESETS["fast"]["train"]["best_metric"]
    assert merged["text"]["max_length"] == 16 and merged["text"]["freeze"] is True
    # Another backbone replaces the preset's section instead of inheriting its weights.
    other = apply_preset({"vision": {"name": "timm", "model_name": "resnet18"}}, "fast")
    assert other["vision"] == {"name": "timm", "model_name": "resnet18"}
    assert apply_preset({"vision": None}, "medium")["vision"] is None
    assert PRESETS["fast"]["train"]["epochs"] != 2  # the preset itself is not modified


def test_zero_config_uses_the_default_preset_and_unknown_presets_are_refused(catalogue):
    config = build_run_config(train=str(catalogue["train"]), val=str(catalogue["val"]))
    assert config.model.unimodal_loss_weight is not None
    assert config.model.text.options["freeze"] is PRESETS[DEFAULT_PRESET]["text"]["freeze"]
    plain = build_run_config({"tasks": TASKS})
    assert plain.model.unimodal_loss_weight is None  # a config without --preset is taken as written
    with pytest.raises(ConfigError, match="unknown preset 'fastest'; presets: best, fast"):
        build_run_config(train=str(catalogue["train"]), preset="fastest")


def test_cli_names_every_preset_and_refuses_an_unknown_one(capsys, catalogue):
    from fusionkit.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in PRESETS:
        assert name in help_text
    code = main(["train", "--preset", "slow", "--train", str(catalogue["train"])])
    assert code == 2
    assert "unknown preset 'slow'" in capsys.readouterr().err


def test_cli_train_with_a_preset_prints_the_model_against_its_heads(catalogue, tiny_bert_dir,
                                                                    tmp_path, capsys):
    import yaml

    config = run_config(catalogue, tiny_bert_dir, tmp_path, epochs=2)
    config = {k: v for k, v in config.items() if k not in ("tasks", "unimodal_heads")}
    config["fusion"] = {"dim": 16, "sequence": {"name": "transformer", "heads": 2}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["-q", "train", "--config", str(path), "--preset", "fast",
                 "--output", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    # The preset trains the unimodal models too and reports their blend with the fused one.
    assert "validation, the blend of the best checkpoint and the unimodal models" in out
    assert "accuracy of the model against each of its models alone" in out
    assert (tmp_path / "run" / "members.json").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["unimodal_heads"] == PRESETS["fast"]["unimodal_heads"]
    assert saved["train"]["early_stopping"] == PRESETS["fast"]["train"]["early_stopping"]
    assert saved["vision"]["model_name"] == "resnet18"  # the config's backbone, not the preset's
    code = main(["evaluate", "--checkpoint", str(tmp_path / "run"),
                 "--data", str(catalogue["test"])])
    assert code == 0
    assert "text model" in capsys.readouterr().out
    code = main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best"),
                 "--data", str(catalogue["test"])])
    assert code == 0
    assert "text head" in capsys.readouterr().out  # best/ is the fused model alone
