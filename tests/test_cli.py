"""The ``fusionkit`` command, run as a user runs it (``python -m fusionkit``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusionkit.data import generate_catalogue

REPO = Path(__file__).resolve().parents[1]


def fusionkit(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusionkit", "-q", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert_dir):
    """A tiny run trained through ``fusionkit train --config M --train T --val V --tasks``."""
    folder = tmp_path_factory.mktemp("cli")
    paths = generate_catalogue(folder / "data", train=40, val=12, test=12, image_size=32,
                               progress=False)
    config = {
        "vision": {"name": "timm", "model_name": "resnet18", "pretrained": False,
                   "freeze": True},
        "text": {"name": "huggingface", "model_name_or_path": str(tiny_bert_dir),
                 "freeze": True, "max_length": 16},
        "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
        "head": {"name": "mlp", "hidden_dim": 32},
        "data": {"image_size": 32, "batch_size": 8},
        "train": {"epochs": 1, "device": "cpu", "cache_dir": str(folder / "cache")},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(config))
    result = fusionkit(
        "train", "--config", str(folder / "model.yaml"), "--train", str(paths["train"]),
        "--val", str(paths["val"]), "--tasks", "color,pattern", "--output", str(folder / "run"),
    )
    assert result.returncode == 0, result.stderr
    return folder, paths


def test_list_prints_the_registry():
    result = fusionkit("list")
    assert result.returncode == 0
    assert "model: cma_clip" in result.stdout
    assert "keyless" in result.stdout
    only = fusionkit("list", "modality_fusion", "--pattern", "c*")
    assert only.stdout.strip() == "modality_fusion: concat"


def test_train_with_train_val_infers_the_named_tasks(run):
    folder, _ = run
    config = yaml.safe_load((folder / "run" / "config.yaml").read_text())
    assert list(config["tasks"]) == ["color", "pattern"]
    assert config["tasks"]["pattern"]["multi_label"] is True
    assert len((folder / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_evaluate_writes_report_with_three_metrics(run):
    folder, paths = run
    result = fusionkit("evaluate", "--checkpoint", str(folder / "run"), "--data",
                       str(paths["test"]), "--precision", "0.9", "0.5")
    assert result.returncode == 0, result.stderr
    assert "R@P0.9" in result.stdout and "R@P0.5" in result.stdout
    report = json.loads((folder / "run" / "report.json").read_text())
    for task in ("color", "pattern"):
        row = report["tasks"][task]
        assert 0.0 <= row["accuracy"] <= 1.0
        assert 0.0 <= row["macro_f1"] <= 1.0
        assert set(row["recall_at_precision"]) == {"0.9", "0.5"}
        assert sum(row["modality_weights"].values()) == pytest.approx(1.0, abs=1e-3)


def test_predict_json_and_manifest(run):
    folder, paths = run
    image = paths["test"].parent / "images" / "test-00001.png"
    result = fusionkit("predict", "--checkpoint", str(folder / "run"), "--image", str(image),
                       "--text", "red striped shirt", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert set(output) == {"color", "pattern"}
    assert set(output["color"]["modality_weights"]) == {"text", "image"}
    out = folder / "predictions.csv"
    result = fusionkit("predict", "--checkpoint", str(folder / "run"), "--manifest",
                       str(paths["test"]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert len(out.read_text().splitlines()) == 13


def _assert_clean_error(result, needle):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    # Skipped rows are logged as warnings before it; the error itself is one line.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], result.stderr


def test_bad_data_exits_2_with_one_line(run, tmp_path):
    folder, paths = run
    checkpoint = str(folder / "run")
    no_inputs = tmp_path / "no_inputs.csv"
    no_inputs.write_text("id,color,pattern\na,red,plain\n")
    _assert_clean_error(fusionkit("evaluate", "--checkpoint", checkpoint, "--data",
                                  str(no_inputs)), "no column 'text' or 'image'")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("image,text,color,pattern\n,red tee,mauve,plain\n")
    config = yaml.safe_load((folder / "model.yaml").read_text())
    config["data"]["on_error"] = "raise"
    (tmp_path / "raise.yaml").write_text(yaml.safe_dump(config))
    _assert_clean_error(
        fusionkit("train", "--config", str(tmp_path / "raise.yaml"), "--train",
                  str(paths["train"]), "--val", str(unknown), "--tasks", "color,pattern",
                  "--output", str(tmp_path / "bad")),
        "'mauve' is not a known class",
    )
    missing = tmp_path / "missing.csv"
    missing.write_text("image,text,color,pattern\nnope.png,,red,plain\n")
    _assert_clean_error(fusionkit("evaluate", "--checkpoint", checkpoint, "--data",
                                  str(missing)), "no usable sample")
    _assert_clean_error(fusionkit("evaluate", "--checkpoint", str(tmp_path)), "config.yaml")
    bad_key = tmp_path / "typo.yaml"
    bad_key.write_text(yaml.safe_dump({**config, "train": {"epoch": 2}}))
    _assert_clean_error(fusionkit("train", "--config", str(bad_key), "--train",
                                  str(paths["train"]), "--val", str(paths["val"])),
                        "did you mean 'epochs'")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    _assert_clean_error(fusionkit("predict", "--checkpoint", checkpoint, "--image",
                                  str(corrupt), "--text", "red"), "cannot read image")
