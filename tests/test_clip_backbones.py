"""The paper's backbones end to end: CLIP towers from open_clip and Hugging Face checkpoints.

Each builds CMA-CLIP with one tiny random checkpoint feeding both towers, trains it one epoch
through the CLI, then evaluates, predicts and explains; and the shipped paper config trains one
step with ``pretrained: false``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fusionkit.cli import main
from fusionkit.data import generate_catalogue

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return generate_catalogue(tmp_path_factory.mktemp("clip-data"), train=16, val=8, test=8,
                              progress=False)


def _towers(backend: str, tiny_open_clip, tiny_clip_dir) -> tuple[dict, dict, int]:
    """The vision and text sections of one checkpoint, and its image size."""
    if backend == "open_clip":
        name, path = tiny_open_clip
        section = {"name": "open_clip", "model_name": name, "pretrained": str(path)}
        return section, {**section, "max_length": 16}, 64
    section = {"name": "huggingface", "model_name_or_path": str(tiny_clip_dir)}
    return section, {**section, "max_length": 16}, 32


@pytest.mark.parametrize("backend", ["open_clip", "huggingface"])
def test_clip_towers_train_evaluate_predict_and_explain(
    backend, catalogue, tiny_open_clip, tiny_clip_dir, tmp_path, capsys
):
    vision, text, size = _towers(backend, tiny_open_clip, tiny_clip_dir)
    config = {
        "vision": {**vision, "freeze": True},  # image tokens cached, the text tower fine-tuned
        "text": text,
        "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
        "head": {"name": "mlp", "hidden_dim": 32},
        "data": {"train": str(catalogue["train"]), "val": str(catalogue["val"]),
                 "image_size": size, "batch_size": 8},
        "train": {"epochs": 1, "lr": 1e-3, "device": "cpu", "cache_dir": str(tmp_path / "c")},
    }
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run = tmp_path / "run"
    assert main(["-q", "train", "--config", str(path), "--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["-q", "evaluate", "--checkpoint", str(run), "--data", str(catalogue["test"]),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["tasks"]["color"]["modality_weights"]) == {"text", "image"}
    image = catalogue["test"].parent / "images" / "test-00000.png"
    assert main(["-q", "predict", "--checkpoint", str(run), "--image", str(image), "--text",
                 "a red striped shirt", "--json"]) == 0
    assert "color" in json.loads(capsys.readouterr().out)
    out = tmp_path / "explain.png"
    assert main(["-q", "explain", "--checkpoint", str(run), "--image", str(image), "--text",
                 "a red striped shirt", "--out", str(out)]) == 0
    assert out.is_file() and "token" in capsys.readouterr().out


def test_the_paper_config_trains_a_step_with_random_towers(catalogue, tmp_path):
    from fusionkit.training import Trainer, build_run_config

    raw = yaml.safe_load((REPO / "configs" / "cma_clip_vit_b32.yaml").read_text())
    assert raw["vision"] == raw["text"] == {"name": "open_clip", "model_name": "ViT-B-32",
                                            "pretrained": False, "freeze": False}
    raw["data"].update(train=str(catalogue["train"]), val=str(catalogue["val"]), batch_size=16)
    raw["train"].update(epochs=1, device="cpu")
    result = Trainer(build_run_config(raw), tmp_path / "run", progress=False).fit()
    assert [record["epoch"] for record in result.history] == [1]
    assert result.history[0]["train_loss"] > 0
