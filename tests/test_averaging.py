"""The moving average of the trained weights (``train.ema_decay``)."""

from __future__ import annotations

import json

import pytest
import torch
from test_training import catalogue, fit, tiny_config  # noqa: F401 (catalogue: a fixture)

from fusionkit.config import TrainConfig, parse_section
from fusionkit.errors import CheckpointError, ConfigError, TrainingError
from fusionkit.io import load_weights
from fusionkit.models import CMACLIP, build_model
from fusionkit.runs import read_trainer_state
from fusionkit.training import build_run_config
from fusionkit.training.averaging import WeightAverage
from fusionkit.training.evaluate import evaluate_checkpoint


def two_layers() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    return model


def test_the_average_follows_the_formula_with_its_warm_up_over_trainable_parameters_only():
    model = two_layers()
    average = WeightAverage(model, decay=0.9)
    assert len(average.averages) == 2  # the frozen first layer is not averaged
    reference = [p.detach().clone() for p in model[1].parameters()]
    g = torch.Generator().manual_seed(1)
    for t in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        decay = min(0.9, (1 + t) / (10 + t))
        assert average.current_decay() == pytest.approx(decay)
        average.update()
        reference = [r + (1 - decay) * (p.detach() - r)
                     for r, p in zip(reference, model[1].parameters(), strict=True)]
    assert average.updates == 30
    for got, want in zip(average.averages, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_swapped_holds_the_average_and_gives_the_weights_back_bit_for_bit_even_on_error():
    model = two_layers()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    average.update()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = [a.clone() for a in average.averages]
    with average.swapped():
        assert all(torch.equal(p, a) for p, a in zip(model[1].parameters(), averaged,
                                                       strict=True))
        assert torch.equal(model[0].weight, own["0.weight"])  # frozen: untouched
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"), average.swapped():
        raise RuntimeError("inside")
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(average.averages, averaged, strict=True))


def test_state_round_trips_and_a_mismatched_state_is_refused():
    model = two_layers()
    average = WeightAverage(model, decay=0.99)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    average.update()
    restored = WeightAverage(two_layers(), decay=0.99)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(average.averages, restored.averages,
                                                 strict=True))
    other = torch.nn.Linear(3, 5)
    with pytest.raises(CheckpointError, match="do not match the model's 2 trainable"):
        WeightAverage(other, decay=0.99).load_state_dict(average.state_dict())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_a_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ConfigError, match=r"train\.ema_decay must be in \(0, 1\)"):
        WeightAverage(torch.nn.Linear(2, 2), decay)


def test_bad_ema_settings_are_config_errors():
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameter"):
        WeightAverage(frozen, 0.9)
    with pytest.raises(ConfigError, match=r"train\.ema_decay: input should be less than 1"):
        parse_section(TrainConfig, {"ema_decay": 1.0}, "train")
    with pytest.raises(ConfigError, match=r"train\.ema_decay: input should be greater"):
        parse_section(TrainConfig, {"ema_decay": -0.1}, "train")
    assert parse_section(TrainConfig, {}, "train").ema_decay == 0.0


def _trainable_names(config) -> list[str]:
    model = build_model(build_run_config(config))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_training_validates_and_keeps_the_average_and_last_holds_both(catalogue,  # noqa: F811
                                                                      tiny_bert_dir, tmp_path):
    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, epochs=1, ema_decay=0.9,
                         cache_dtype="float32")
    result = fit(config, tmp_path / "run")
    best = load_weights(tmp_path / "run" / "best" / "model.safetensors")
    last = load_weights(tmp_path / "run" / "last" / "model.safetensors")
    _, tensors = read_trainer_state(tmp_path / "run" / "last")
    ema = tensors["ema"]
    names = _trainable_names(config)
    assert ema["updates"] == 5 and len(ema["averages"]) == len(names)  # 40 samples, batch 8
    # One epoch: best/ is the average after it, last/ the trained weights.
    for name, averaged in zip(names, ema["averages"], strict=True):
        assert torch.equal(best[name], averaged), name
    assert any(not torch.equal(best[n], last[n]) for n in names)
    frozen = [k for k in best if k not in names and k in last]
    assert all(torch.equal(best[k], last[k]) for k in frozen)
    # The validation report describes the averaged model that best/ holds.
    report = json.loads((tmp_path / "run" / "val_report.json").read_text())
    again = evaluate_checkpoint(tmp_path / "run" / "best", catalogue["val"], device="cpu")
    assert again["mean"]["accuracy"] == pytest.approx(report["mean"]["accuracy"], abs=1e-6)
    assert result.best_score == report["mean"]["accuracy"]
    assert CMACLIP.from_pretrained(tmp_path / "run" / "best") is not None
    # Without the average, last/ holds no EMA state.
    fit({**config, "train": {**config["train"], "ema_decay": 0.0}}, tmp_path / "plain")
    assert "ema" not in read_trainer_state(tmp_path / "plain" / "last")[1]


def test_an_interrupted_run_with_an_average_resumes_to_the_same_weights(
        catalogue, tiny_bert_dir, tmp_path, monkeypatch):  # noqa: F811
    config = tiny_config(catalogue, tiny_bert_dir, tmp_path, epochs=3, ema_decay=0.8,
                         save_every_steps=1)
    fit(config, tmp_path / "reference")
    original, calls = CMACLIP.loss, {"n": 0}

    def failing(self, output, targets):
        calls["n"] += 1
        if calls["n"] == 8:  # epoch 2, batch 3: last/ holds step 7, mid-epoch
            raise TrainingError("interrupted")
        return original(self, output, targets)

    monkeypatch.setattr(CMACLIP, "loss", failing)
    with pytest.raises(TrainingError, match="interrupted"):
        fit(config, tmp_path / "run")
    monkeypatch.setattr(CMACLIP, "loss", original)
    fit(config, tmp_path / "run", resume=True)
    for folder in ("best", "last"):
        a = load_weights(tmp_path / "run" / folder / "model.safetensors")
        b = load_weights(tmp_path / "reference" / folder / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in b), folder
    ema_a = read_trainer_state(tmp_path / "run" / "last")[1]["ema"]
    ema_b = read_trainer_state(tmp_path / "reference" / "last")[1]["ema"]
    assert ema_a["updates"] == ema_b["updates"] == 15
    assert all(torch.equal(x, y) for x, y in zip(ema_a["averages"], ema_b["averages"],
                                                 strict=True))
