"""Checkpoints written by fusionkit 0.1 load and predict as they did.

``tests/data/checkpoint-0.1`` was saved by fusionkit 0.1 (a tiny random model: timm's
``test_efficientnet`` at 64 px, the tiny BERT of ``conftest.write_tiny_bert``, unimodal heads
with a set blend). Its ``config.yaml`` has that version's layout: the width as
``fusion.sequence.dim`` and the run's ``data`` and ``train`` sections. Next to it are the
predictions 0.1 made on three samples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fusionkit.io import write_checksums
from fusionkit.models import CMACLIP
from fusionkit.serving import Predictor

DATA = Path(__file__).parent / "data"
IMAGE = str(DATA / "checkpoint-0.1-shirt.png")
IMAGES = [IMAGE, None, IMAGE]
TEXTS = ["a red striped shirt", "the blue bag", None]


@pytest.fixture
def legacy_checkpoint(tmp_path, tiny_bert_dir):
    """The 0.1 checkpoint, its text encoder path pointed at this session's tiny BERT."""
    folder = tmp_path / "checkpoint-0.1"
    shutil.copytree(DATA / "checkpoint-0.1", folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["text"]["model_name_or_path"] = str(tiny_bert_dir)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_checksums(folder, ["config.yaml", "model.safetensors"])
    return folder


def assert_same_predictions(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert set(got) == set(want)
        for task, entry in want.items():
            assert got[task].get("label") == entry.get("label")
            assert got[task].get("labels") == entry.get("labels")
            for field in ("scores", "modality_weights"):
                assert got[task][field] == pytest.approx(entry[field], abs=1e-5), (task, field)


def test_a_checkpoint_of_0_1_loads_with_its_settings(legacy_checkpoint):
    with pytest.warns(FutureWarning, match=r"fusion\.sequence\.dim is read as fusion\.dim"):
        model = CMACLIP.from_pretrained(legacy_checkpoint)
    assert model.config.fusion.dim == 32
    assert model.config.image_size == 64  # read from the old data section
    written = model.config.to_dict()
    assert "data" not in written and "train" not in written
    assert written["fusion"]["dim"] == 32 and "dim" not in written["fusion"]["sequence"]


def test_a_checkpoint_of_0_1_predicts_as_it_did(legacy_checkpoint, tmp_path):
    expected = json.loads((DATA / "checkpoint-0.1-predictions.json").read_text())
    with pytest.warns(FutureWarning):
        predictor = Predictor.from_pretrained(legacy_checkpoint)
    assert_same_predictions(predictor.predict(images=IMAGES, texts=TEXTS), expected)

    # Saved again, it takes today's layout and still predicts the same, without a warning.
    resaved = predictor.model.save_pretrained(tmp_path / "resaved")
    config = yaml.safe_load((resaved / "config.yaml").read_text())
    assert config["fusion"]["dim"] == 32 and config["image_size"] == 64
    assert "data" not in config
    again = Predictor.from_pretrained(resaved)
    assert_same_predictions(again.predict(images=IMAGES, texts=TEXTS), expected)
