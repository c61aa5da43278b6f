"""Adapters for UPMC Food-101 and Fashion-Gen: tiny fixtures in the published layouts."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
from PIL import Image

from fusionkit.cli import main
from fusionkit.data import infer_tasks
from fusionkit.data.public import convert_fashiongen, convert_food101
from fusionkit.errors import DataError, MissingDependencyError
from fusionkit.training import Trainer, build_run_config

FOODS = ("apple_pie", "pizza")
CATEGORIES = (("TOPS", "SHIRTS"), ("BAGS", "TOTE BAGS"), ("SHOES", "SNEAKERS"))


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _colour(index: int) -> tuple[int, int, int]:
    return (40 * index % 255, 255 - 30 * index % 255, 90)


@pytest.fixture
def food_root(tmp_path):
    """UPMC Food-101's layout: images/{split}/<class>/<file>, texts/{split}_titles.csv."""
    root = tmp_path / "upmc_food101"
    for split, per_class in (("train", 6), ("test", 2)):
        lines = []
        for label in FOODS:
            folder = root / "images" / split / label
            folder.mkdir(parents=True)
            for k in range(per_class):
                name = f"{label}_{k}.jpg"
                Image.new("RGB", (40, 30), _colour(k)).save(folder / name)
                lines.append([name, f"Best {label.replace('_', ' ')} recipe, easy #{k}", label])
        (root / "texts").mkdir(exist_ok=True)
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            if split == "test":
                writer.writerow(["image_path", "text", "food"])  # the Kaggle copies' header
            writer.writerows(lines)
    # A title whose image is missing is skipped, not fatal.
    with open(root / "texts" / "train_titles.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["pizza_99.jpg", "lost pizza", "pizza"])
    return root


@pytest.fixture
def fashion_files(tmp_path):
    """Fashion-Gen's HDF5 layout: uint8 images and (N, 1) byte-string columns."""
    h5py = pytest.importorskip("h5py")
    paths = {}
    for split, count in (("train", 9), ("validation", 3)):
        path = tmp_path / f"fashiongen_256_256_{split}.h5"
        pairs = [CATEGORIES[k % len(CATEGORIES)] for k in range(count)]
        images = np.stack(
            [np.full((256, 256, 3), _colour(k), dtype=np.uint8) for k in range(count)]
        )
        with h5py.File(path, "w") as handle:
            handle["input_image"] = images
            handle["input_description"] = np.array(
                [[f"A {sub.lower()} in soft cotton, n\xb0{k}".encode("latin-1")]
                 for k, (_, sub) in enumerate(pairs)], dtype="S64"
            )
            handle["input_category"] = np.array([[c.encode()] for c, _ in pairs], dtype="S16")
            handle["input_subcategory"] = np.array([[s.encode()] for _, s in pairs], dtype="S16")
        paths[split] = path
    return paths


def _train_one_step(paths, bert, tmp_path):
    config = build_run_config(
        {
            "vision": {"name": "timm", "model_name": "resnet18", "pretrained": False,
                       "freeze": True},
            "text": {"name": "huggingface", "model_name_or_path": str(bert), "freeze": True,
                     "max_length": 16},
            "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
            "head": {"name": "mlp", "hidden_dim": 32},
            "data": {"train": str(paths["train"]), "val": str(paths["val"]),
                     "image_size": 32, "batch_size": 64},
            "train": {"epochs": 1, "device": "cpu", "cache_dir": str(tmp_path / "cache")},
        }
    )
    result = Trainer(config, tmp_path / "run", progress=False).fit()
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_food101_converts_and_trains(food_root, tiny_bert_dir, tmp_path):
    paths = convert_food101(food_root, tmp_path / "food", val_fraction=0.34, progress=False)
    rows = {split: _rows(path) for split, path in paths.items()}
    assert [len(rows[split]) for split in ("train", "val", "test")] == [8, 4, 4]
    assert {row["label"] for row in rows["val"]} == set(FOODS)  # stratified
    assert rows["train"][0]["text"].startswith("Best ") and "," in rows["train"][0]["text"]
    assert all(row["image"].endswith(".jpg") for row in rows["test"])
    assert infer_tasks(paths["train"])["label"].class_names() == FOODS
    _train_one_step(paths, tiny_bert_dir, tmp_path)


def test_food101_missing_titles_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"train_titles\.csv not found"):
        convert_food101(tmp_path, tmp_path / "out", progress=False)


def test_fashiongen_converts_and_trains(fashion_files, tiny_bert_dir, tmp_path):
    out = tmp_path / "fashion"
    paths = convert_fashiongen(fashion_files["train"], fashion_files["validation"], out,
                               val_fraction=0.34, progress=False)
    rows = {split: _rows(path) for split, path in paths.items()}
    assert [len(rows[split]) for split in ("train", "val", "test")] == [6, 3, 3]
    first = rows["test"][0]
    assert (first["category"], first["subcategory"]) == CATEGORIES[0]
    assert first["text"] == "A shirts in soft cotton, n\xb00"  # Latin-1 bytes decoded
    with Image.open(out / first["image"]) as image:
        assert image.size == (256, 256) and image.getpixel((5, 5)) == _colour(0)
    _train_one_step(paths, tiny_bert_dir, tmp_path)


def test_fashiongen_cli_limit(fashion_files, tmp_path, capsys):
    code = main(["-q", "data", "fashiongen", "--train", str(fashion_files["train"]),
                 "--val", str(fashion_files["validation"]), "--out", str(tmp_path / "f"),
                 "--limit", "6"])
    assert code == 0 and "test:" in capsys.readouterr().out
    assert len(_rows(tmp_path / "f" / "test.csv")) == 3
    assert sum(len(_rows(tmp_path / "f" / f"{s}.csv")) for s in ("train", "val")) == 6


def test_food101_cli(food_root, tmp_path, capsys):
    assert main(["-q", "data", "food101", "--root", str(food_root),
                 "--out", str(tmp_path / "m")]) == 0
    assert "train:" in capsys.readouterr().out


def test_fashiongen_without_h5py_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(MissingDependencyError, match=r"pip install fusionkit\[fashiongen\]"):
        convert_fashiongen(tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "out",
                           progress=False)
