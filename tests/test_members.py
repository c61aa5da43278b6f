"""Unimodal models trained beside the fused one (``train.unimodal_models``) and their blend."""

from __future__ import annotations

import csv
import json
import logging
import time

import pytest
import torch
from test_unimodal import run_config

from fusionkit.cli import main
from fusionkit.data import generate_catalogue
from fusionkit.errors import CheckpointError
from fusionkit.io import read_yaml
from fusionkit.models.blending import blend_probabilities
from fusionkit.models.members import MEMBERS_FILE, MemberBlend, members_run
from fusionkit.serving import Predictor
from fusionkit.serving.export import export_onnx
from fusionkit.serving.predictor import MemberPredictor
from fusionkit.training import Trainer, build_run_config, format_report
from fusionkit.training.evaluate import checkpoint_outputs, evaluate_checkpoint
from fusionkit.training.members import MEMBERS_REPORT_FILE, member_configs


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    return generate_catalogue(folder, train=32, val=16, test=8, image_size=32, progress=False)


def _config(catalogue, bert, tmp_path, **train):
    raw = run_config(catalogue, bert, tmp_path, **{"unimodal_models": True, "epochs": 2, **train})
    # Trainable encoders: each model fine-tunes (and saves) encoders of its own. A frozen
    # encoder without pretrained weights would be drawn afresh at every load.
    raw["text"]["freeze"] = False
    raw["vision"] = {"name": "timm", "model_name": "test_efficientnet", "pretrained": False,
                     "freeze": False}
    return build_run_config({k: v for k, v in raw.items() if v is not None})


@pytest.fixture(scope="module")
def trained(catalogue, tiny_bert_dir, tmp_path_factory):
    """One run with unimodal models, trained once for the module."""
    tmp = tmp_path_factory.mktemp("members")
    trainer = Trainer(_config(catalogue, tiny_bert_dir, tmp), tmp / "run", progress=False)
    result = trainer.fit()
    return trainer, result, tmp / "run"


def _manual_blend(run, manifest, tasks):
    """The blend worked out from each model's own outputs, by sample id."""
    blend = MemberBlend.load(run)
    outputs = {name: checkpoint_outputs(folder, manifest)[1]
               for name, folder in blend.folders(run).items()}
    fused = outputs["fused"]
    expected = {}
    for task, spec in tasks.items():
        scores = {}
        for name, out in outputs.items():
            rows = {sample: k for k, sample in enumerate(out.ids)}
            scores[name] = torch.stack([out.scores[task][rows[i]] for i in fused.ids])
        available = {name: torch.ones(len(fused.ids), dtype=torch.bool) for name in outputs}
        available.update({m: fused.present[m] for m in ("text", "image")})
        expected[task] = blend_probabilities(scores, blend.weights[task], spec.multi_label,
                                             blend.scales[task], available).float()
    return fused, expected


def test_member_configs_drop_one_encoder_and_keep_the_rest(catalogue, tiny_bert_dir, tmp_path):
    config = _config(catalogue, tiny_bert_dir, tmp_path)
    members = member_configs(config)
    assert list(members) == ["text", "image"]
    assert members["text"].model.vision is None and members["text"].model.text is not None
    assert members["image"].model.text is None and members["image"].model.vision is not None
    for member in members.values():
        assert member.train.unimodal_models is False
        assert member.train.to_dict() == {**config.train.to_dict(), "unimodal_models": False}
        assert member.data == config.data and member.tasks == config.tasks
        assert member.model.fusion == config.model.fusion and member.model.head == config.model.head


def test_member_configs_are_empty_where_there_is_nothing_to_blend(catalogue, tiny_bert_dir,
                                                                  tmp_path, caplog):
    assert member_configs(_config(catalogue, tiny_bert_dir, tmp_path,
                                  unimodal_models=False)) == {}
    raw = run_config(catalogue, tiny_bert_dir, tmp_path, unimodal_models=True)
    text_only = build_run_config({**{k: v for k, v in raw.items() if v is not None},
                                  "vision": None})
    assert member_configs(text_only) == {}  # already unimodal: silently nothing
    no_val = {k: v for k, v in raw.items() if v is not None}
    no_val["data"] = {k: v for k, v in raw["data"].items() if k != "val"}
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert member_configs(build_run_config(no_val)) == {}
    assert "no validation data" in caplog.text


def test_training_writes_the_members_and_their_blend(trained, catalogue):
    trainer, result, run = trained
    assert members_run(run) == run and members_run(run / "best") is None
    for name, dropped in (("text", "vision"), ("image", "text")):
        member = run / "unimodal" / name
        assert (member / "best" / "model.safetensors").is_file()
        assert read_yaml(member / "config.yaml")[dropped] is None
    blend = MemberBlend.load(run)
    assert blend.members == {"fused": "best", "text": "unimodal/text/best",
                             "image": "unimodal/image/best"}
    for task in trainer.config.tasks:
        assert sum(blend.weights[task].values()) == pytest.approx(1.0)
        assert set(blend.weights[task]) == {"fused", "text", "image"}
        assert blend.scales[task] > 0
    report = json.loads((run / MEMBERS_REPORT_FILE).read_text())
    assert report == json.loads(json.dumps(trainer.val_report))
    assert report["members"] == blend.members
    for row in report["tasks"].values():
        assert set(row["sources"]) == {"fused", "text", "image"}
    text = format_report(report)
    assert "each of its models alone" in text and "text model" in text
    # The run's own report and best score stay those of the fused model.
    fused = json.loads((run / "val_report.json").read_text())
    assert "members" not in fused and result.best_score == fused["mean"]["accuracy"]


def test_evaluating_the_run_folder_scores_the_blend_of_the_three(trained, catalogue):
    trainer, _, run = trained
    tasks = trainer.config.tasks
    report = evaluate_checkpoint(run, catalogue["val"], output=run / "eval.json")
    assert report["members"] == {"fused": str(run / "best"),
                                 "text": str(run / "unimodal/text/best"),
                                 "image": str(run / "unimodal/image/best")}
    assert report["loss"] is None
    # The same data as the blend was fit on: the same report as after training.
    saved = json.loads((run / MEMBERS_REPORT_FILE).read_text())
    assert report["mean"]["accuracy"] == pytest.approx(saved["mean"]["accuracy"])
    fused_out, expected = _manual_blend(run, catalogue["test"], tasks)
    test = evaluate_checkpoint(run, catalogue["test"], output=run / "eval_test.json")
    from fusionkit.training import metrics

    for task, spec in tasks.items():
        accuracy = metrics.accuracy(expected[task], fused_out.targets[task], spec.multi_label)
        assert test["tasks"][task]["accuracy"] == pytest.approx(round(accuracy, 6))
    # run/best is the fused model alone.
    alone = evaluate_checkpoint(run / "best", catalogue["test"], output=run / "alone.json")
    assert "members" not in alone and alone["loss"] is not None


def _rows(manifest):
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    folder = manifest.parent
    return [str(folder / r["image"]) for r in rows], [r["text"] for r in rows], rows


def test_the_predictor_of_the_run_folder_gives_the_evaluated_blend(trained, catalogue):
    trainer, _, run = trained
    predictor = Predictor.from_pretrained(run, device="cpu", batch_size=5)
    assert isinstance(predictor, MemberPredictor) and sorted(predictor.members) == [
        "image", "text"]
    assert not isinstance(Predictor.from_pretrained(run / "best", device="cpu"),
                          MemberPredictor)
    images, texts, _ = _rows(catalogue["test"])
    predicted = predictor.predict(images=images, texts=texts)
    _, expected = _manual_blend(run, catalogue["test"], trainer.config.tasks)
    for task, spec in trainer.config.tasks.items():
        names = spec.class_names()
        got = torch.tensor([[p[task]["scores"][n] for n in names] for p in predicted])
        assert torch.allclose(got, expected[task], atol=2e-6)


def test_a_member_whose_input_is_missing_is_left_out(trained, catalogue):
    trainer, _, run = trained
    predictor = Predictor.from_pretrained(run, device="cpu")
    _, texts, _ = _rows(catalogue["test"])
    got = predictor.predict(texts=texts[:3])
    fused = Predictor.from_pretrained(run / "best", device="cpu").predict(texts=texts[:3])
    text = Predictor.from_pretrained(run / "unimodal/text/best", device="cpu").predict(
        texts=texts[:3])
    blend = MemberBlend.load(run)
    for task, spec in trainer.config.tasks.items():
        names = spec.class_names()

        def scores(rows, task=task, names=names):
            return torch.tensor([[r[task]["scores"][n] for n in names] for r in rows])

        # Without images the image model's weight goes to the others (to the fused model
        # alone if it had it all), as for a sample that lacks an image.
        weights = blend.weights[task]
        total = weights["fused"] + weights["text"]
        kept = ({"fused": weights["fused"] / total, "text": weights["text"] / total} if total
                else {"fused": 1.0, "text": 0.0})
        expected = blend_probabilities({"fused": scores(fused), "text": scores(text)}, kept,
                                       spec.multi_label, blend.scales[task]).float()
        assert torch.allclose(scores(got), expected, atol=1e-5)


def test_predict_manifest_and_cli_evaluate_read_the_blend(trained, catalogue, tmp_path, capsys):
    _, _, run = trained
    out = tmp_path / "predictions.jsonl"
    done = Predictor.from_pretrained(run, device="cpu").predict_manifest(catalogue["test"], out)
    assert done.rows == 8 and done.errors == 0
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(catalogue["test"]),
                 "--output", str(tmp_path / "r.json")]) == 0
    assert "each of its models alone" in capsys.readouterr().out


def test_an_onnx_export_of_the_blend_is_refused_with_the_way_out(trained, tmp_path):
    _, _, run = trained
    with pytest.raises(CheckpointError, match=r"export .*best for the fused model alone"):
        export_onnx(run, tmp_path / "export")


@pytest.mark.parametrize("damage", ["garbage", "format", "no_fused", "missing_folder"])
def test_a_damaged_members_file_is_refused(trained, tmp_path, damage):
    _, _, run = trained
    raw = json.loads((run / MEMBERS_FILE).read_text())
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("best", "unimodal"):
        (copy / name).symlink_to(run / name)
    if damage == "garbage":
        text = "{not json"
    elif damage == "format":
        text = json.dumps({**raw, "format": 99})
    elif damage == "no_fused":
        text = json.dumps({**raw, "members": {"text": "unimodal/text/best"}})
    else:
        text = json.dumps({**raw, "members": {**raw["members"], "text": "gone/best"}})
    (copy / MEMBERS_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=MEMBERS_FILE):
        MemberBlend.load(copy)
    with pytest.raises(CheckpointError):
        Predictor.from_pretrained(copy, device="cpu")


def test_the_server_answers_with_the_blend(trained, catalogue):
    from fastapi.testclient import TestClient

    from fusionkit.serving import server

    _, _, run = trained
    predictor = Predictor.from_pretrained(run, device="cpu")
    images, texts, _ = _rows(catalogue["test"])
    expected = predictor.predict(images=images[:1], texts=texts[:1])[0]
    with TestClient(server.create_app(predictor)) as client, open(images[0], "rb") as image:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:  # warming up
            assert time.monotonic() < deadline
            time.sleep(0.05)
        response = client.post("/predict", data={"text": texts[0]},
                               files={"image": ("x.png", image, "image/png")})
    assert response.status_code == 200, response.text
    for task, entry in expected.items():
        for name, score in entry["scores"].items():
            assert response.json()[task]["scores"][name] == pytest.approx(score, abs=1e-5)
