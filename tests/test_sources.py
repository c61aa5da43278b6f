"""Named data sources (``synthetic:train``, ``emoji:val``): built once on first use, reused."""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers_training import tiny_run_config

from fusionkit.cli import main
from fusionkit.data import CATALOGUE_TASKS, ManifestDataset, check_manifest, infer_tasks
from fusionkit.data import synthetic as synthetic_module
from fusionkit.data.sources import (
    CATALOGUE,
    SOURCES,
    STAMP,
    DataSource,
    resolve_manifest,
    source_dir,
)
from fusionkit.errors import DataError
from fusionkit.training import Trainer, build_run_config

REPO = Path(__file__).resolve().parents[1]
TINY = {**CATALOGUE, "train": 6, "val": 4, "test": 4, "image_size": 16}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def builds(monkeypatch, tmp_path) -> list[Path]:
    """A tiny ``synthetic`` source built under ``tmp_path/data``; lists the folders built into."""
    monkeypatch.setenv("FUSIONKIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setitem(SOURCES, "synthetic", DataSource(SOURCES["synthetic"].builder, TINY))
    calls: list[Path] = []
    generate = synthetic_module.generate_catalogue

    def counted(out_dir, **kwargs):
        calls.append(Path(out_dir))
        time.sleep(0.2)  # widens the window in which a concurrent first use could interfere
        return generate(out_dir, **kwargs)

    monkeypatch.setattr(synthetic_module, "generate_catalogue", counted)
    return calls


def test_a_source_is_generated_on_first_use_then_reused(builds, tmp_path):
    train = resolve_manifest("synthetic:train")
    folder = source_dir("synthetic")
    assert train == folder / "train.csv"
    assert folder.parent == tmp_path / "data" and folder.name.startswith("synthetic-")
    assert (folder / STAMP).is_file() and len(_rows(train)) == 6
    mtime = train.stat().st_mtime_ns
    assert resolve_manifest("synthetic:test") == folder / "test.csv"
    assert len(builds) == 1 and train.stat().st_mtime_ns == mtime
    # Wherever a manifest is opened, the source name works.
    assert set(infer_tasks("synthetic:train")) == set(CATALOGUE_TASKS)
    assert len(ManifestDataset("synthetic:val", CATALOGUE_TASKS)) == 4
    assert len(builds) == 1
    # The generation parameters name the folder: other parameters, another folder.
    SOURCES["synthetic"] = DataSource(SOURCES["synthetic"].builder, {**TINY, "seed": 1})
    assert source_dir("synthetic") != folder


def test_concurrent_first_use_builds_one_complete_folder(builds, tmp_path):
    results: list[Path] = []
    errors: list[BaseException] = []

    def use() -> None:
        try:
            results.append(resolve_manifest("synthetic:train"))
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    folder = source_dir("synthetic")
    assert results == [folder / "train.csv"] * 3
    assert len(builds) == 1
    # One folder, nothing half-written left beside it (the lock file aside).
    left = sorted(p.name for p in (tmp_path / "data").iterdir() if not p.name.endswith(".lock"))
    assert left == [folder.name]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [STAMP, "images", "test.csv", "train.csv", "val.csv"]
    )
    assert len(list((folder / "images").iterdir())) == 6 + 4 + 4


def test_a_failed_build_leaves_nothing_and_the_next_use_builds(builds, tmp_path, monkeypatch):
    def broken(out_dir, **kwargs):
        (Path(out_dir) / "train.csv").write_text("id,image\n")
        raise OSError("disk full")

    monkeypatch.setattr(synthetic_module, "generate_catalogue", broken)
    with pytest.raises(DataError, match=r"data source 'synthetic': cannot build it .*disk full"):
        resolve_manifest("synthetic:train")
    assert [p.name for p in (tmp_path / "data").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    monkeypatch.setenv("FUSIONKIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setitem(SOURCES, "synthetic", DataSource(SOURCES["synthetic"].builder, TINY))
    assert len(_rows(resolve_manifest("synthetic:train"))) == 6


def test_unknown_source_or_split_names_what_exists(builds):
    with pytest.raises(DataError, match=r"unknown data source 'nope'; known sources: .*emoji.*"
                                        r"synthetic"):
        resolve_manifest("nope:train")
    with pytest.raises(DataError, match=r"no split 'bogus'; splits: \['test', 'train', 'val'\]"):
        resolve_manifest("synthetic:bogus")


def test_plain_paths_are_unchanged_and_an_existing_file_wins(builds, tmp_path, monkeypatch):
    assert resolve_manifest("runs/data/train.csv") == Path("runs/data/train.csv")
    assert resolve_manifest(Path("synthetic:train")) == Path("synthetic:train")
    monkeypatch.chdir(tmp_path)
    Path("synthetic:train").write_text("id,text,color\na,red shirt,red\nb,blue bag,blue\n")
    assert resolve_manifest("synthetic:train") == Path("synthetic:train")
    # The file is read (and refused: a manifest ends in .csv or .jsonl); nothing is built.
    with pytest.raises(DataError, match="synthetic:train: unknown manifest format ''"):
        check_manifest("synthetic:train", modalities=("text",), tasks=["color"])
    assert builds == []


def test_emoji_source_without_its_packages_names_them(monkeypatch, tmp_path):
    from fusionkit.data import emoji

    monkeypatch.setenv("FUSIONKIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(emoji, "EMOJI_TEST", tmp_path / "absent" / "emoji-test.txt")
    with pytest.raises(DataError, match=r"data source 'emoji': .*apt-get install -y "
                                        r"fonts-noto-color-emoji unicode-data unicode-cldr-core"):
        resolve_manifest("emoji:train")
    assert [p.name for p in (tmp_path / "data").iterdir() if not p.name.endswith(".lock")] == []


def test_cli_data_synthetic_writes_the_catalogue(tmp_path, capsys):
    assert main(["-q", "data", "synthetic", "--out", str(tmp_path / "cat"), "--seed", "3",
                 "--train", "5", "--val", "2", "--test", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"train: {tmp_path / 'cat' / 'train.csv'} (5 rows)",
        f"val: {tmp_path / 'cat' / 'val.csv'} (2 rows)",
        f"test: {tmp_path / 'cat' / 'test.csv'} (3 rows)",
    ]
    rows = _rows(tmp_path / "cat" / "train.csv")
    assert len(rows) == 5 and all((tmp_path / "cat" / row["image"]).is_file() for row in rows)
    reference = synthetic_module.generate_catalogue(
        tmp_path / "ref", **{**TINY, "seed": 3, "train": 5, "val": 2, "test": 3}, progress=False
    )
    assert (tmp_path / "cat" / "train.csv").read_text() == reference["train"].read_text()


def test_quickstart_config_validates_with_its_source_paths(builds):
    config = build_run_config(REPO / "configs" / "quickstart.yaml")
    data = config.data
    splits = (data.train, data.val, data.test)
    assert splits == ("synthetic:train", "synthetic:val", "synthetic:test")
    for split in (data.train, data.val, data.test):
        check_manifest(split, modalities=config.modalities, tasks=list(config.tasks))
    assert len(builds) == 1


def test_training_reads_a_named_source(builds, tiny_bert_dir, tmp_path):
    config = tiny_run_config(Path("unused"), Path("unused"), tiny_bert_dir, tmp_path / "cache",
                             frozen=True, epochs=1)
    config["data"].update(train="synthetic:train", val="synthetic:val")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code = main(["-q", "train", "--config", str(tmp_path / "config.yaml"),
                 "--output", str(tmp_path / "run")])
    assert code == 0 and (tmp_path / "run" / "best" / "model.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["train"] == "synthetic:train"
    assert len(builds) == 1


def test_a_missing_manifest_fails_before_any_model_is_built(tmp_path, monkeypatch):
    import fusionkit.models

    def no_model(*args, **kwargs):
        raise AssertionError("build_model must not be called")

    monkeypatch.setattr(fusionkit.models, "build_model", no_model)
    config = build_run_config({
        "vision": None,
        "text": {"name": "huggingface", "model_name_or_path": "absent", "freeze": True},
        "tasks": {"color": {"classes": ["blue", "red"]}},
        "data": {"train": str(tmp_path / "absent.csv")},
        "train": {"device": "cpu"},
    })
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"absent\.csv: manifest file not found"):
        Trainer(config, tmp_path / "run", progress=False).fit()
    no_task = tmp_path / "no_task.csv"
    no_task.write_text("id,text\na,red shirt\n")
    config.data.train = str(no_task)
    with pytest.raises(DataError, match="no task column 'color'"):
        Trainer(config, tmp_path / "run", progress=False).fit()
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda path: path.stem
)
def test_every_config_in_configs_reads_a_named_source(path):
    """Configs under configs/ train from a fresh clone: their data is built, never assumed."""
    data = yaml.safe_load(path.read_text())["data"]
    for split in ("train", "val", "test"):
        source, _, name = data[split].partition(":")
        assert source in SOURCES and name == split, (path.name, data[split])
