"""The refit of a trained model's unimodal heads on its own pooled features."""

from __future__ import annotations

import json

import pytest
import torch
from test_unimodal import _fit, run_config

from fusionkit.data import generate_catalogue
from fusionkit.models import CMACLIP
from fusionkit.models.unimodal import UnimodalHeads
from fusionkit.tasks import parse_tasks
from fusionkit.training.evaluate import evaluate_checkpoint
from fusionkit.training.refit import PooledFeatures, refit_unimodal_heads

TASKS = parse_tasks({"color": {"num_classes": 3}, "pattern": {"num_classes": 4,
                                                              "multi_label": True}})


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    return generate_catalogue(folder, train=32, val=16, test=8, image_size=32, progress=False)


def pooled_set(n: int, seed: int, present_rate: float = 1.0) -> PooledFeatures:
    """Features from which the labels follow (linearly), for a text and an image modality."""
    g = torch.Generator().manual_seed(seed)
    text, image = torch.randn(n, 8, generator=g), torch.randn(n, 6, generator=g)
    color = (text[:, :3] + image[:, :3]).argmax(1)
    pattern = (torch.cat([text[:, 3:5], image[:, 3:5]], 1) > 0).float()
    present = torch.rand(n, generator=g) < present_rate
    return PooledFeatures(
        {"text": text, "image": image},
        {"text": torch.ones(n, dtype=torch.bool), "image": present},
        {"color": color, "pattern": pattern},
    )


def heads(seed: int = 0) -> UnimodalHeads:
    torch.manual_seed(seed)
    return UnimodalHeads({"text": 8, "image": 6}, 16, TASKS, "mlp", {"hidden_dim": 16})


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_refit_lowers_the_val_loss_of_untrained_heads_and_keeps_the_better_head():
    train, val = pooled_set(256, 0), pooled_set(128, 1)
    model = heads()
    results = refit_unimodal_heads(model, train, val, max_epochs=60, patience=5)
    assert [r.modality for r in results] == ["text", "image"]
    for r in results:
        assert r.kept_refit and 1 <= r.epochs <= 60 and r.val_loss < r.val_loss_before
    # Refitting a refit model with a learning rate of 0 cannot do better: it keeps it as is.
    before = state(model)
    again = refit_unimodal_heads(model, train, val, lr=0.0, max_epochs=3, patience=2)
    assert all(not r.kept_refit and r.val_loss == r.val_loss_before for r in again)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [round(r.val_loss_before, 6) for r in again] == [round(r.val_loss, 6)
                                                             for r in results]


def test_refit_is_deterministic_for_a_seed_and_differs_for_another():
    train, val = pooled_set(128, 0), pooled_set(64, 1)
    a, b, c = heads(), heads(), heads()
    refit_unimodal_heads(a, train, val, max_epochs=4, seed=3)
    refit_unimodal_heads(b, train, val, max_epochs=4, seed=3)
    refit_unimodal_heads(c, train, val, max_epochs=4, seed=4)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_samples_without_the_modality_are_left_out():
    train, val = pooled_set(192, 0, present_rate=0.6), pooled_set(96, 1, present_rate=0.6)
    keep_train, keep_val = train.present["image"], val.present["image"]
    # What the absent rows hold must not matter: make it garbage.
    spoiled = PooledFeatures(
        {"text": train.features["text"],
         "image": train.features["image"].masked_fill(~keep_train[:, None], 1e4)},
        train.present, train.targets,
    )
    only = PooledFeatures(
        {"image": train.features["image"][keep_train]},
        {"image": keep_train[keep_train]},
        {t: v[keep_train] for t, v in train.targets.items()},
    )
    val_only = PooledFeatures(
        {"image": val.features["image"][keep_val]},
        {"image": keep_val[keep_val]},
        {t: v[keep_val] for t, v in val.targets.items()},
    )
    a, b = heads(), heads()
    ra = refit_unimodal_heads(a, spoiled, val, max_epochs=5)
    rb = refit_unimodal_heads(b, only, val_only, max_epochs=5)
    image_a = {k: v for k, v in a.state_dict().items() if ".image." in k}
    image_b = {k: v for k, v in b.state_dict().items() if ".image." in k}
    assert image_a and all(torch.equal(v, image_b[k]) for k, v in image_a.items())
    assert ra[1].val_loss == pytest.approx(rb[0].val_loss)


def test_a_modality_missing_from_the_features_is_skipped_and_bad_settings_refused():
    train, val = pooled_set(64, 0), pooled_set(32, 1)
    text_only = PooledFeatures({"text": train.features["text"]}, {"text": train.present["text"]},
                               train.targets)
    model = heads()
    image_before = {k: v.clone() for k, v in model.state_dict().items() if ".image." in k}
    results = refit_unimodal_heads(model, text_only, val, max_epochs=2)
    assert [r.modality for r in results] == ["text"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in image_before.items())
    for bad in ({"max_epochs": 0}, {"patience": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            refit_unimodal_heads(model, train, val, **bad)


def test_pooled_features_join_in_order():
    a, b = pooled_set(3, 0), pooled_set(2, 1)
    joined = PooledFeatures.join([a, b])
    assert len(joined) == 5 and len(PooledFeatures.join([])) == 0
    assert torch.equal(joined.features["text"][3:], b.features["text"])
    assert torch.equal(joined.targets["pattern"][:3], a.targets["pattern"])


def test_training_refits_the_heads_saves_them_in_best_and_reports_it(catalogue, tiny_bert_dir,
                                                                     tmp_path):
    # float32 cached features: the evaluation below encodes the images anew.
    config = run_config(catalogue, tiny_bert_dir, tmp_path, cache_dtype="float32",
                        refit_heads=True)
    _, result = _fit(config, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "val_report.json").read_text())
    assert [r["modality"] for r in report["head_refit"]] == ["text", "image"]
    for r in report["head_refit"]:
        assert r["val_loss"] <= r["val_loss_before"]
    # best/ holds the refit heads and the blend fit after them: reloaded, it reproduces the
    # report's numbers.
    model = CMACLIP.from_pretrained(tmp_path / "run" / "best")
    assert {t: {**model.blend.task_weights(t), "scale": model.blend.task_scale(t)}
            for t in model.tasks} == {t: r["blend"] for t, r in report["tasks"].items()}
    again = evaluate_checkpoint(tmp_path / "run" / "best", catalogue["val"], device="cpu")
    assert again["mean"]["accuracy"] == pytest.approx(report["mean"]["accuracy"], abs=1e-6)
    assert result.best_score == report["mean"]["accuracy"]


def test_without_refit_heads_best_is_the_epoch_as_trained(catalogue, tiny_bert_dir, tmp_path):
    _, result = _fit(run_config(catalogue, tiny_bert_dir, tmp_path), tmp_path / "run")
    report = json.loads((tmp_path / "run" / "val_report.json").read_text())
    assert "head_refit" not in report
    best = max(result.history, key=lambda r: r["val_mean_accuracy"])
    assert report["mean"]["accuracy"] == pytest.approx(best["val_mean_accuracy"], abs=1e-6)


def test_refit_can_continue_from_the_trained_heads_and_leave_a_modality_alone():
    train, val = pooled_set(128, 0), pooled_set(64, 1)
    model = heads()
    image_before = {k: v.clone() for k, v in model.state_dict().items() if ".image." in k}
    results = refit_unimodal_heads(model, train, val, max_epochs=3, restart=False,
                                   modalities=["text"])
    assert [r.modality for r in results] == ["text"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in image_before.items())
    # Continuing with a learning rate of 0, the candidate is the trained head itself: its
    # validation loss is not lower, so the trained head stays, bit for bit.
    before = state(model)
    again = refit_unimodal_heads(model, train, val, max_epochs=2, lr=0.0, restart=False)
    assert all(not r.kept_refit for r in again)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
