"""ONNX export: the graph agrees with the eager model; predict and evaluate take the export."""

from __future__ import annotations

import ast
import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fusionkit.cli import main
from fusionkit.data import CATALOGUE_TASKS, build_image_transform, generate_catalogue, open_image
from fusionkit.errors import CheckpointError, MissingDependencyError
from fusionkit.models import CMACLIP, build_model
from fusionkit.serving import OnnxPredictor, Predictor, export_onnx
from fusionkit.serving.onnx_predictor import OnnxModel
from fusionkit.training import evaluate_checkpoint

TASKS = {name: CATALOGUE_TASKS[name].to_dict() for name in ("color", "pattern")}
IMAGE = {"name": "timm", "model_name": "test_efficientnet", "pretrained": False}
TOLERANCE = 1e-4


def _bert(tiny_bert_dir):
    return {"name": "huggingface", "model_name_or_path": str(tiny_bert_dir), "max_length": 16}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    paths = generate_catalogue(folder, train=8, val=4, test=4, image_size=32, progress=False)
    with paths["test"].open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return paths, rows


@pytest.fixture(scope="module")
def shorthand(tmp_path_factory, tiny_bert_dir):
    """A random image+text model (tiny BERT, test_efficientnet at 32 px) exported by the CLI."""
    folder = tmp_path_factory.mktemp("shorthand")
    torch.manual_seed(0)
    model = build_model({"vision": IMAGE, "text": _bert(tiny_bert_dir), "image_size": 32,
                         "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
                         "head": {"name": "mlp", "hidden_dim": 32}, "tasks": TASKS})
    model.save_pretrained(folder / "checkpoint")
    code = main(["-q", "export", "--checkpoint", str(folder / "checkpoint"), "--format", "onnx",
                 "--out", str(folder / "export")])
    assert code == 0
    return folder / "checkpoint", folder / "export"


@pytest.fixture(scope="module")
def named(tmp_path_factory, tiny_bert_dir):
    """Title and description sharing one text encoder, a front photo, unimodal heads."""
    folder = tmp_path_factory.mktemp("named")
    torch.manual_seed(1)
    model = build_model({
        "inputs": {"title": {"encoder": _bert(tiny_bert_dir), "column": "text"},
                   "description": {"share": "title"},
                   "front": {"encoder": IMAGE, "column": "image"}},
        "image_size": 32, "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
        "unimodal_heads": {"loss_weight": 1.0}, "tasks": TASKS,
    })
    model.save_pretrained(folder / "checkpoint")
    return folder / "checkpoint", export_onnx(folder / "checkpoint", folder / "export")


def _images(model, rows, paths, missing=()):
    transform = build_image_transform(_config(model))
    pixels = torch.stack([transform(open_image(paths["test"].parent / r["image"])) for r in rows])
    present = torch.tensor([k not in missing for k in range(len(rows))])
    return pixels, present


def _config(model):
    from fusionkit.data import input_image_configs

    return next(iter(input_image_configs(model).values()))


def _assert_same(eager, onnx):
    for task in eager.logits:
        for got, expected in ((onnx.logits[task], eager.logits[task]),
                              (onnx.modality_weights[task], eager.modality_weights[task])):
            assert (got - expected).abs().max() <= TOLERANCE
        assert torch.equal(onnx.logits[task].argmax(1), eager.logits[task].argmax(1))
        assert torch.equal(onnx.logits[task] > 0, eager.logits[task] > 0)


@pytest.mark.parametrize("batch", [1, 4])
def test_shorthand_graph_matches_the_model(shorthand, catalogue, batch):
    checkpoint, export = shorthand
    paths, rows = catalogue
    model = CMACLIP.from_pretrained(checkpoint)
    rows = rows[:batch]
    texts = [r["text"] for r in rows]
    missing_image = (2,) if batch == 4 else ()
    if batch == 4:
        texts[1] = None  # a missing text; texts of different lengths throughout
    pixels, present = _images(model, rows, paths, missing_image)
    with torch.no_grad():
        eager = model(inputs={"text": texts, "image": pixels}, present={"image": present})
    onnx = OnnxModel(export)({"text": texts, "image": pixels}, {"image": present})
    _assert_same(eager, onnx)
    if batch == 4:
        weights = onnx.modality_weights["color"]
        assert weights[1, 0] == 0 and weights[2, 1] == 0


def test_shared_encoder_graph_matches_the_model(named, catalogue):
    checkpoint, export = named
    paths, rows = catalogue
    model = CMACLIP.from_pretrained(checkpoint)
    titles = [r["text"] for r in rows]
    descriptions = [None, "striped red cotton", "a blue dress on the mat", titles[0]]
    titles[2] = None
    pixels, present = _images(model, rows, paths, missing=(3,))
    given = {"title": titles, "description": descriptions, "front": pixels}
    with torch.no_grad():
        eager = model(inputs=given, present={"front": present})
    onnx = OnnxModel(export)(given, {"front": present})
    _assert_same(eager, onnx)
    one = {name: values[:1] for name, values in given.items()}
    with torch.no_grad():
        _assert_same(model(inputs=one), OnnxModel(export)(one))


def test_export_json_says_how_to_feed_the_graph(shorthand, named):
    import onnx
    from transformers import AutoTokenizer

    checkpoint, export = shorthand
    description = json.loads((export / "export.json").read_text())
    assert description["fusionkit_version"] == "0.1.0"
    assert isinstance(description["opset"], int) and description["opset"] >= 17
    text, image = description["inputs"]
    assert (text["name"], text["kind"], text["column"]) == ("text", "text", "text")
    assert text["onnx_inputs"] == ["text.input_ids", "text.token_type_ids", "text.attention_mask"]
    assert text["max_length"] == 16 and text["tokenizer"] == "tokenizer-text"
    assert AutoTokenizer.from_pretrained(export / "tokenizer-text", local_files_only=True)
    assert image["onnx_inputs"] == ["image.pixels", "image.present"]
    assert image["data_config"]["input_size"] == [3, 32, 32]
    assert build_image_transform(image["data_config"])
    assert description["tasks"]["pattern"] == TASKS["pattern"]
    assert description["tasks"]["pattern"]["multi_label"] is True
    assert description["outputs"] == ["color.logits", "color.modality_weights",
                                      "pattern.logits", "pattern.modality_weights"]
    assert description["check"]["max_abs_difference"] <= 1e-4
    assert yaml.safe_load((export / "config.yaml").read_text()) == yaml.safe_load(
        (checkpoint / "config.yaml").read_text())
    graph = onnx.load(str(export / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.input}
    assert dims["image.pixels"][1:] == [3, 32, 32]
    assert isinstance(dims["image.pixels"][0], str) and isinstance(dims["text.input_ids"][1], str)
    shared = json.loads((named[1] / "export.json").read_text())["inputs"]
    assert [e["tokenizer"] for e in shared if e["kind"] == "text"] == ["tokenizer-title"] * 2
    assert shared[1]["encoder"] == "title" and shared[1]["column"] == "description"


def test_predict_and_evaluate_take_the_export_folder(shorthand, catalogue, tmp_path, capsys):
    checkpoint, export = shorthand
    paths, rows = catalogue
    rows = [dict(r) for r in rows]
    rows[1]["text"], rows[2]["image"] = "", ""
    manifest = paths["test"].parent / "test-gaps.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert isinstance(Predictor.from_pretrained(export), OnnxPredictor)
    eager = Predictor.from_pretrained(checkpoint, device="cpu")
    for suffix in (".csv", ".jsonl"):
        eager.predict_manifest(manifest, tmp_path / f"eager{suffix}")
        out = tmp_path / f"onnx{suffix}"
        assert main(["-q", "predict", "--checkpoint", str(export), "--manifest", str(manifest),
                     "--out", str(out)]) == 0
    with (tmp_path / "eager.csv").open() as a, (tmp_path / "onnx.csv").open() as b:
        expected, got = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [(r["id"], r["color"], r["pattern"]) for r in got] == [
        (r["id"], r["color"], r["pattern"]) for r in expected]
    expected, got = ([json.loads(line) for line in (tmp_path / f"{name}.jsonl").open()]
                     for name in ("eager", "onnx"))
    for a, b in zip(expected, got, strict=True):
        for task in TASKS:
            assert a[task].get("label") == b[task].get("label")
            assert a[task].get("labels") == b[task].get("labels")
            for key in ("scores", "modality_weights"):
                assert b[task][key] == pytest.approx(a[task][key], abs=1e-3)
    report = evaluate_checkpoint(checkpoint, manifest, device="cpu", output=tmp_path / "e.json")
    capsys.readouterr()
    assert main(["-q", "evaluate", "--checkpoint", str(export), "--data", str(manifest),
                 "--output", str(tmp_path / "o.json"), "--json"]) == 0
    onnx_report = json.loads(capsys.readouterr().out)
    assert onnx_report["num_samples"] == report["num_samples"] == 4
    for task in TASKS:
        mine, theirs = onnx_report["tasks"][task], report["tasks"][task]
        assert mine["accuracy"] == theirs["accuracy"] and mine["macro_f1"] == theirs["macro_f1"]
        assert mine["log_loss"] == pytest.approx(theirs["log_loss"], abs=1e-3)
        assert mine["modality_weights"] == pytest.approx(theirs["modality_weights"], abs=1e-3)


def _error(capsys, argv, needle):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err.splitlines()[0], err


def test_bad_uses_give_clean_errors(shorthand, tmp_path, capsys, monkeypatch):
    checkpoint, export = shorthand
    out = str(tmp_path / "out")
    _error(capsys, ["export", "--checkpoint", str(checkpoint), "--format", "tflite", "--out",
                    out], "--format 'tflite': unknown; known: onnx")
    _error(capsys, ["export", "--checkpoint", str(tmp_path), "--out", out], "config.yaml")
    _error(capsys, ["export", "--checkpoint", str(export), "--out", out], "is an ONNX export")
    _error(capsys, ["explain", "--checkpoint", str(export), "--text", "red", "--out",
                    str(tmp_path / "x.png")], "an ONNX export has no 'sequence_fusion'")
    _error(capsys, ["evaluate", "--checkpoint", str(export)], "pass --data")
    with pytest.raises(CheckpointError, match=r"no export\.json"):
        OnnxModel(tmp_path)
    for module in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'fusionkit\[export\]'"):
        export_onnx(checkpoint, out)
    with pytest.raises(MissingDependencyError, match="onnxruntime"):
        OnnxModel(export)


def test_onnx_packages_are_imported_lazily():
    root = Path(__file__).resolve().parents[1] / "fusionkit" / "serving"
    for name in ("export.py", "onnx_predictor.py"):
        tree = ast.parse((root / name).read_text())
        top = [a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names]
        top += [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
        assert not [m for m in top if m.split(".")[0] in ("onnx", "onnxruntime", "onnxscript")]
