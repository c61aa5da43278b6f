"""Training you can watch: TensorBoard events, curves.png, custom loggers, resume without
duplicate epochs."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
from helpers_training import tiny_run_config
from PIL import Image

from fusionkit.data import generate_catalogue
from fusionkit.training import Trainer, build_run_config
from fusionkit.training.curves import write_curves
from fusionkit.training.tracking import MetricLogger, epoch_scalars

TASKS = ("color", "pattern", "category")
INPUTS = ("image", "text")


class Collect(MetricLogger):
    """A custom logger: keeps what it is handed."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, dict]] = []
        self.closed = 0

    def log_epoch(self, epoch, record):
        self.epochs.append((epoch, json.loads(json.dumps(record))))

    def close(self):
        self.closed += 1


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    return generate_catalogue(folder, train=16, val=8, test=0, image_size=32, progress=False)


def config(catalogue, bert, tmp_path, **train):
    """Frozen tiny encoders (features cached once): 2 steps per epoch."""
    return tiny_run_config(catalogue["train"], catalogue["val"], bert, tmp_path / "cache",
                           frozen=True, augment=False, **train)


def fit(config, output, **kwargs):
    return Trainer(build_run_config(config), output, progress=False, **kwargs).fit()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag → (step, value) of every scalar, as TensorBoard reads the run's events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def assert_events_match_metrics(run: Path) -> None:
    """Every number of every metrics.jsonl record is in the events once, at its epoch."""
    records = metrics(run)
    scalars = events(run)
    expected = {tag for record in records for tag in epoch_scalars(record)}
    assert set(scalars) == expected
    for tag, logged in scalars.items():
        want = [(r["epoch"], epoch_scalars(r)[tag]) for r in records if tag in epoch_scalars(r)]
        assert [step for step, _ in logged] == [step for step, _ in want], tag
        for (_, value), (_, target) in zip(logged, want, strict=True):
            assert value == pytest.approx(target, rel=1e-6, abs=1e-12), tag  # float32 events


@pytest.fixture(scope="module")
def watched(catalogue, tiny_bert_dir, tmp_path_factory):
    """A 2-epoch run with TensorBoard on (the default) and a custom logger."""
    folder = tmp_path_factory.mktemp("watched")
    logger = Collect()
    result = fit(config(catalogue, tiny_bert_dir, folder), folder / "run", loggers=[logger])
    return folder / "run", logger, result


def test_events_hold_every_epoch_of_the_metrics(watched):
    run, _, _ = watched
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    scalars = events(run)
    wanted = {"train/loss", "val/loss", "val/mean_accuracy", "lr"}
    wanted |= {f"val/accuracy/{task}" for task in TASKS}
    wanted |= {f"val/modality_weight/{task}/{name}" for task in TASKS for name in INPUTS}
    assert wanted <= set(scalars)
    records = metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    for task in TASKS:
        for name in INPUTS:
            logged = scalars[f"val/modality_weight/{task}/{name}"]
            assert [step for step, _ in logged] == [1, 2]
            for (_, value), record in zip(logged, records, strict=True):
                assert value == pytest.approx(record["val_modality_weights"][task][name],
                                              rel=1e-6)
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [r["train_loss"] for r in records], rel=1e-6)
    assert_events_match_metrics(run)


def test_records_hold_the_modality_weights_of_every_task(watched):
    run, _, result = watched
    for record in metrics(run):
        weights = record["val_modality_weights"]
        assert set(weights) == set(TASKS)
        for task in TASKS:
            assert set(weights[task]) == set(INPUTS)
            assert sum(weights[task].values()) == pytest.approx(1.0, abs=1e-5)
    assert result.history == metrics(run)


def test_curves_png_is_written(watched):
    run, _, _ = watched
    path = run / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_a_custom_logger_receives_every_epoch(watched):
    run, logger, _ = watched
    assert logger.epochs == [(r["epoch"], r) for r in metrics(run)]
    assert logger.closed == 1


def test_tensorboard_false_writes_no_events(catalogue, tiny_bert_dir, tmp_path):
    logger = Collect()
    fit(config(catalogue, tiny_bert_dir, tmp_path, epochs=1, tensorboard=False),
        tmp_path / "run", loggers=[logger])
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert [epoch for epoch, _ in logger.epochs] == [1]
    assert (tmp_path / "run" / "curves.png").is_file()


def test_resume_does_not_duplicate_epochs_in_the_events(catalogue, tiny_bert_dir, tmp_path):
    run = tmp_path / "run"
    fit(config(catalogue, tiny_bert_dir, tmp_path, epochs=1), run)
    shutil.copytree(run / "last", tmp_path / "last-after-epoch-1")
    two = config(catalogue, tiny_bert_dir, tmp_path, epochs=2)
    fit(two, run, resume=True)
    assert_events_match_metrics(run)
    # As if the run had been killed after logging epoch 2 but before last/ held it: the next
    # resume trains epoch 2 again, and TensorBoard keeps only its second logging.
    shutil.rmtree(run / "last")
    shutil.copytree(tmp_path / "last-after-epoch-1", run / "last")
    logger = Collect()
    fit(two, run, resume=True, loggers=[logger])
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 3
    assert [epoch for epoch, _ in logger.epochs] == [2]
    assert [r["epoch"] for r in metrics(run)] == [1, 2]
    assert_events_match_metrics(run)
    assert [step for step, _ in events(run)["train/loss"]] == [1, 2]


def test_a_fresh_run_hides_the_events_of_the_run_it_replaces(catalogue, tiny_bert_dir, tmp_path):
    run = tmp_path / "run"
    fit(config(catalogue, tiny_bert_dir, tmp_path, epochs=2), run)
    fit(config(catalogue, tiny_bert_dir, tmp_path, epochs=1, lr=1e-2), run)
    assert [r["epoch"] for r in metrics(run)] == [1]
    assert_events_match_metrics(run)


def test_write_curves_without_matplotlib_logs_one_info_line(tmp_path, monkeypatch, caplog):
    for name in [n for n in sys.modules if n.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    history = [{"epoch": 1, "train_loss": 1.0, "lr": 1e-3}]
    with caplog.at_level(logging.DEBUG, logger="fusionkit.training"):
        assert write_curves(history, tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()
    assert [(r.levelno, "matplotlib" in r.getMessage()) for r in caplog.records] == [
        (logging.INFO, True)
    ]


def test_write_curves_without_validation_draws_the_train_loss(tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / e, "lr": 1e-3} for e in (1, 2, 3)]
    path = write_curves(history, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG"


def test_a_logger_without_close_is_a_type_error(catalogue, tmp_path):
    class NoClose:
        def log_epoch(self, epoch, record):
            pass

    run_config = build_run_config(config(catalogue, None, tmp_path))
    with pytest.raises(TypeError, match=r"log_epoch.*close.*got NoClose"):
        Trainer(run_config, tmp_path / "run", loggers=[NoClose()])


def test_epoch_scalars_flatten_nested_records_and_skip_undefined_values():
    record = {"epoch": 3, "step": 9, "train_loss": 0.5, "val_log_loss": None,
              "val_accuracy": {"color": 0.75, "pattern": None},
              "val_head_accuracy": {"color": {"fused": 0.5, "text": 0.25}},
              "val_modality_weights": {"color": {"text": 0.4, "image": 0.6}}, "lr": 1e-3}
    assert epoch_scalars(record) == {
        "train/loss": 0.5,
        "val/accuracy/color": 0.75,
        "val/head_accuracy/color/fused": 0.5,
        "val/head_accuracy/color/text": 0.25,
        "val/modality_weight/color/text": 0.4,
        "val/modality_weight/color/image": 0.6,
        "lr": 1e-3,
    }
