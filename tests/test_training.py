"""The trainer: checkpoints, exact resume after SIGKILL, the feature cache, NaN handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers_training import assert_same_final_run

from fusionkit.config import TrainConfig, parse_section
from fusionkit.data import generate_catalogue
from fusionkit.errors import ConfigError
from fusionkit.io import load_weights
from fusionkit.models import CMACLIP, build_model
from fusionkit.serving import Predictor
from fusionkit.training import Trainer, TrainingError, build_run_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    return generate_catalogue(folder, train=40, val=12, test=12, image_size=32, progress=False)


def tiny_config(catalogue, bert, tmp_path, *, frozen=True, **train):
    """A tiny run config: random resnet18 at 32 px, the tiny BERT, a 32-wide fusion."""
    return {
        "vision": {"name": "timm", "model_name": "resnet18", "pretrained": False,
                   "freeze": frozen},
        "text": {"name": "huggingface", "model_name_or_path": str(bert), "freeze": frozen,
                 "max_length": 16},
        "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
        "head": {"name": "mlp", "hidden_dim": 32},
        "data": {"train": str(catalogue["train"]), "val": str(catalogue["val"]),
                 "test": str(catalogue["test"]), "image_size": 32, "batch_size": 8},
        "train": {"epochs": 2, "lr": 3e-3, "device": "cpu", "warmup_ratio": 0.0,
                  "cache_dir": str(tmp_path / "cache"), **train},
    }


def fit(config, output, **kwargs):
    return Trainer(build_run_config(config), output, progress=False, **kwargs).fit()


def test_train_two_epochs_writes_metrics_and_loadable_checkpoints(catalogue, tiny_bert_dir,
                                                                   tmp_path):
    result = fit(tiny_config(catalogue, tiny_bert_dir, tmp_path, epochs=2), tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    for name in ("best", "last"):
        model = CMACLIP.from_pretrained(tmp_path / "run" / name)
        assert set(model.tasks) == {"color", "pattern", "category"}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["epochs"] == 2
    predictor = Predictor.from_pretrained(tmp_path / "run", device="cpu")
    image = catalogue["test"].parent / "images" / "test-00000.png"
    out = predictor.predict(images=[image, None], texts=["red striped shirt", "blue bag"])
    assert out[0]["color"]["label"] in predictor.model.tasks["color"].classes
    assert isinstance(out[0]["pattern"]["labels"], list)
    assert out[1]["color"]["modality_weights"]["image"] == 0.0
    assert sum(out[0]["category"]["modality_weights"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("frozen", [True, False], ids=["cached", "live"])
def test_train_without_validation_keeps_the_final_weights(catalogue, tiny_bert_dir, tmp_path,
                                                          frozen):
    from fusionkit.runs import resolve_run_dir
    from fusionkit.training import evaluate_checkpoint

    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, frozen=frozen, epochs=2)
    del config["data"]["val"]
    run = tmp_path / "run"
    result = fit(config, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert not any(key.startswith("val") for r in records for key in r)
    assert result.best_score == float("-inf") and not (run / "best").exists()
    assert resolve_run_dir(run) == run / "last"
    report = evaluate_checkpoint(run)
    assert report["num_samples"] == 12 and report["data"] == str(catalogue["test"])
    assert Predictor.from_pretrained(run, device="cpu").predict(texts=["red shirt"])


def _count_calls(monkeypatch, owner, method="forward_features"):
    """Count the calls of ``owner.method`` (default: the encoders of ``CMACLIP``)."""
    calls = {"n": 0}
    original = getattr(owner, method)

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, counting)
    return calls


def test_feature_cache_encodes_once_and_matches_uncached(catalogue, tiny_bert_dir, tmp_path,
                                                          monkeypatch):
    calls = _count_calls(monkeypatch, CMACLIP)
    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, epochs=3, augment=False,
                         cache_dtype="float32")
    cached = fit(config, tmp_path / "cached")
    # One encoding pass per split (40 and 12 samples, eval batches of 64), none in epochs 2+.
    assert calls["n"] == 2
    assert cached.cache_stats.misses == 2 and cached.cache_stats.encoded_batches == 2
    again = fit(config, tmp_path / "cached-again")
    assert calls["n"] == 2 and again.cache_stats.hits == 2
    # Filling the cache draws nothing from the RNG: reading it trains bit-identically.
    torch.testing.assert_close(
        load_weights(tmp_path / "cached-again" / "last" / "model.safetensors"),
        load_weights(tmp_path / "cached" / "last" / "model.safetensors"), rtol=0, atol=0,
    )

    plain = fit({**config, "train": {**config["train"], "cache_features": False}},
                tmp_path / "plain")
    assert plain.cache_stats is None
    assert calls["n"] > 2 + 3 * 5
    a = load_weights(tmp_path / "cached" / "last" / "model.safetensors")
    b = load_weights(tmp_path / "plain" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        # Both paths compute the same losses, but float rounding of near-zero gradients differs
        # and Adam turns it into steps of up to lr each: 15 steps x lr 3e-3 bound the drift.
        torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=15 * 3e-3)
    assert cached.history[-1]["val_loss"] == pytest.approx(plain.history[-1]["val_loss"],
                                                           rel=0.02)


def _train_cli(config_path, output, *extra):
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fusionkit", "-q", "train", "--config", str(config_path),
               "--output", str(output), *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _state(folder):
    path = folder / "last" / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_partial_feature_cache_keeps_frozen_image_and_trains_text_live(catalogue, tiny_bert_dir,
                                                                        tmp_path, monkeypatch):
    from fusionkit.encoders.vision import TimmVisionEncoder

    image_calls = _count_calls(monkeypatch, TimmVisionEncoder, "forward")
    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, epochs=3, augment=False,
                         cache_dtype="float32", lr_backbone=1e-3)
    config["text"]["freeze"] = False
    cached = fit(config, tmp_path / "cached")
    # The frozen image backbone runs once per split, the trainable text encoder every batch.
    assert image_calls["n"] == 2
    assert cached.cache_stats.misses == 2 and cached.cache_stats.encoded_batches == 2

    plain = fit({**config, "train": {**config["train"], "cache_features": False}},
                tmp_path / "plain")
    assert plain.cache_stats is None and image_calls["n"] > 2 + 3 * 5
    a = load_weights(tmp_path / "cached" / "last" / "model.safetensors")
    b = load_weights(tmp_path / "plain" / "last" / "model.safetensors")
    start = build_model(build_run_config(config)).state_dict()
    assert a.keys() == b.keys()
    text_keys = [k for k in a if k.startswith("text.") and "pooler" not in k]
    assert any(not torch.equal(a[k], start[k]) for k in text_keys), "text encoder did not train"
    for key in a:
        # As in the all-frozen test: the same losses, Adam-amplified rounding drift.
        torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=15 * 3e-3)
    assert cached.history[-1]["val_loss"] == pytest.approx(plain.history[-1]["val_loss"],
                                                           rel=0.02)
    # A rerun loads the image cache and still trains the text encoder live.
    again = fit(config, tmp_path / "again")
    assert again.cache_stats.hits == 2 and image_calls["n"] > 2 + 3 * 5
    torch.testing.assert_close(
        load_weights(tmp_path / "again" / "last" / "model.safetensors"), a, rtol=0, atol=0
    )


def test_cache_features_true_without_a_frozen_encoder_is_a_config_error(catalogue, tiny_bert_dir,
                                                                        tmp_path):
    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, frozen=False, cache_features=True)
    with pytest.raises(ConfigError, match="at least one used encoder frozen"):
        fit(config, tmp_path / "run")


def test_sigkill_mid_epoch_then_resume_is_bit_identical(catalogue, tiny_bert_dir, tmp_path):
    # Trainable encoders with augmentation: no cache, dropout and crops draw from the RNG.
    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, frozen=False, epochs=4,
                         save_every_steps=2, lr_backbone=1e-4)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    reference = _train_cli(path, tmp_path / "reference")
    killed_dir = tmp_path / "killed"
    run = _train_cli(path, killed_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        state = _state(killed_dir)
        if state and state["epoch"] == 1 and state["batch_in_epoch"] >= 2:
            break
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert _state(killed_dir)["epoch"] < 4

    resumed = _train_cli(path, killed_dir, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    assert_same_final_run(killed_dir, tmp_path / "reference")


def test_nan_loss_raises_and_keeps_last_checkpoint(catalogue, tiny_bert_dir, tmp_path,
                                                    monkeypatch):
    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, epochs=2)
    fit(config, tmp_path / "run")
    before = load_weights(tmp_path / "run" / "last" / "model.safetensors")
    original = CMACLIP.loss
    calls = {"n": 0}

    def poisoned(self, output, targets):
        calls["n"] += 1
        loss = original(self, output, targets)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(CMACLIP, "loss", poisoned)
    config["train"]["epochs"] = 3
    with pytest.raises(TrainingError, match=r"step 3 \(epoch 1, batch 3/5"):
        fit(config, tmp_path / "run")
    after = load_weights(tmp_path / "run" / "last" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert CMACLIP.from_pretrained(tmp_path / "run" / "last") is not None


def test_train_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key; did you mean 'epochs'"):
        parse_section(TrainConfig, {"epoch": 3}, "train")
    with pytest.raises(ConfigError, match=r"train\.lr: input should be a valid number, got 'fast'"):
        parse_section(TrainConfig, {"lr": "fast"}, "train")
    with pytest.raises(ConfigError, match=r"data\.train: missing"):
        Trainer(build_run_config({"tasks": {"a": {"num_classes": 2}},
                                  "data": {"val": "x.csv"}}), "out")
    with pytest.raises(ConfigError, match=r"train\.modality_dropout: input should be less"):
        parse_section(TrainConfig, {"modality_dropout": 1.5}, "train")
    with pytest.raises(ConfigError, match=r"train\.modality_swap: input should be greater"):
        parse_section(TrainConfig, {"modality_swap": -0.5}, "train")
    swapped = {"tasks": {"a": {"num_classes": 2}}, "data": {"train": "x.csv"},
               "train": {"modality_swap": 0.5, "swap_modality": "txt"}}
    with pytest.raises(ConfigError, match=r"^train\.swap_modality: the model has no input 'txt'; "
                                          r"did you mean 'text'\? its inputs: text, image"):
        Trainer(build_run_config(swapped), "out")


def test_modality_dropout_hides_one_modality_in_training_only(catalogue, tiny_bert_dir, tmp_path,
                                                               monkeypatch):
    seen = {"train": [], "eval": []}
    original = CMACLIP.forward_head

    def recording(self, tokens, masks, **kwargs):
        present = torch.stack([masks[m].any(dim=1) for m in ("image", "text")], dim=1)
        seen["train" if self.training else "eval"].append(present)
        return original(self, tokens, masks, **kwargs)

    monkeypatch.setattr(CMACLIP, "forward_head", recording)
    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, epochs=1, modality_dropout=1.0)
    fit(config, tmp_path / "run")
    trained = torch.cat(seen["train"])
    # Every catalogue sample has both modalities; with p = 1 each trains on exactly one.
    assert len(trained) == 40 and (trained.sum(dim=1) == 1).all()
    assert 0 < trained[:, 0].sum() < 40
    assert torch.cat(seen["eval"]).all()


def test_modality_swap_runs_on_every_training_batch(catalogue, tiny_bert_dir, tmp_path,
                                                    monkeypatch):
    import fusionkit.training.step as loop

    calls = []
    original = loop.swap_modalities

    def recording(tokens, masks, p, modality, generator=None):
        calls.append((p, modality, tokens[modality].shape[0]))
        return original(tokens, masks, p, modality, generator)

    monkeypatch.setattr(loop, "swap_modalities", recording)
    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, epochs=1, modality_swap=0.5,
                         swap_modality="image")
    fit(config, tmp_path / "run")
    # 40 training samples in batches of 8; validation batches are never swapped.
    assert calls == [(0.5, "image", 8)] * 5


def test_label_smoothing_reaches_every_head_and_changes_only_the_training(catalogue,
                                                                          tiny_bert_dir, tmp_path):
    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, epochs=1, label_smoothing=0.2)
    config["unimodal_heads"] = {"loss_weight": 1.0}
    trainer = Trainer(build_run_config(config), tmp_path / "smooth", progress=False)
    smooth = trainer.fit()
    heads = [trainer.model.head, *trainer.model.unimodal.heads.values()]
    assert len(heads) == 3 and all(h.label_smoothing == 0.2 for h in heads)
    plain = fit({**config, "train": {**config["train"], "label_smoothing": 0.0}},
                tmp_path / "plain")
    assert smooth.history[0]["train_loss"] != plain.history[0]["train_loss"]
    # A training choice: the checkpoint loads without it.
    assert CMACLIP.from_pretrained(tmp_path / "smooth" / "best").head.label_smoothing == 0.0
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"train\.label_smoothing"):
            parse_section(TrainConfig, {"label_smoothing": bad}, "train")
