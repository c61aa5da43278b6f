"""A model reads only the columns of the inputs it uses.

A text-only model never opens an image (so images of mixed sizes cannot break its batches) and
needs no ``image`` column; an image-only model likewise ignores the ``text`` column. A
two-input model reads an absent column as that input missing from every sample.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers_training import tiny_run_config
from PIL import Image

from fusionkit.data import ManifestDataset, write_manifest
from fusionkit.errors import DataError
from fusionkit.serving import Predictor
from fusionkit.tasks import TaskSpec
from fusionkit.training import Trainer, build_run_config, evaluate_checkpoint

TASKS = {"color": TaskSpec.from_classes(["blue", "red"])}
# Image sizes (width, height) cycled over the rows: no two neighbours alike.
SIZES = [(20, 20), (36, 24), (28, 40), (44, 44)]


def _rows(folder: Path, count: int) -> list[dict[str, str]]:
    """Rows whose images differ in size; the last row has a text but no image, the one before
    an image but no text."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(count):
        color = ("red", "blue")[k % 2]
        name = f"images/{k:03d}.png"
        fill = (200, 0, 0) if color == "red" else (0, 0, 200)
        Image.new("RGB", SIZES[k % len(SIZES)], fill).save(folder / name)
        rows.append({"id": f"s{k}", "image": name, "text": f"a {color} shirt", "color": color})
    rows[-2]["text"] = ""
    rows[-1]["image"] = ""
    return rows


def _write(path: Path, rows: list[dict[str, str]], columns: list[str]) -> Path:
    return write_manifest(path, columns, [[row[c] for c in columns] for row in rows])


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, Path]:
    """``mixed``: every column, images of four sizes; ``no_image`` / ``no_text``: the same rows
    without that column."""
    folder = tmp_path_factory.mktemp("modality-columns")
    rows = _rows(folder, 12)
    return {
        "mixed": _write(folder / "mixed.csv", rows, ["id", "image", "text", "color"]),
        "no_image": _write(folder / "no_image.csv", rows, ["id", "text", "color"]),
        "no_text": _write(folder / "no_text.csv", rows, ["id", "image", "color"]),
    }


def _config(modality: str, frozen: bool, manifests, bert: Path, tmp_path: Path) -> dict:
    unused = "no_image" if modality == "text" else "no_text"
    config = tiny_run_config(
        manifests["mixed"],
        manifests[unused],
        bert if modality == "text" else None,
        tmp_path / "cache",
        frozen=frozen,
        epochs=1,
    )
    if modality == "text":
        config["vision"] = None
    config["data"]["batch_size"] = 4
    return config


def test_text_only_dataset_needs_no_image_column_and_loads_no_image(manifests):
    data = ManifestDataset(manifests["no_image"], TASKS, modalities=("text",))
    assert len(data) == 11  # the row without a text is skipped, the one without image kept
    assert data.skipped == {"no_input": 1}
    assert data.missing_modalities == {"image": 0, "text": 0}
    mixed = ManifestDataset(manifests["mixed"], TASKS, modalities=("text",))
    assert [r.id for r in mixed.records] == [r.id for r in data.records]
    assert all(r.image_path is None for r in mixed.records)
    assert mixed[0] == {"id": "s0", "image": None, "text": "a red shirt", "targets": {"color": 1}}


def test_image_only_dataset_needs_no_text_column(manifests):
    data = ManifestDataset(manifests["no_text"], TASKS, modalities=("image",))
    assert [r.id for r in data.records] == [f"s{k}" for k in range(11)]
    assert data.skipped == {"no_input": 1}
    assert all(r.text is None for r in data.records)
    assert tuple(data[1]["image"].shape) == (3, 24, 36)


def test_unused_image_column_is_not_checked_for_missing_files(tmp_path):
    path = write_manifest(
        tmp_path / "m.csv", ["image", "text", "color"], [["absent.png", "red shirt", "red"]]
    )
    assert len(ManifestDataset(path, TASKS, modalities=("text",), on_error="raise")) == 1
    with pytest.raises(DataError, match="does not exist"):
        ManifestDataset(path, TASKS, on_error="raise")


def test_two_modality_dataset_reads_an_absent_column_as_missing(manifests, caplog):
    with caplog.at_level("WARNING", logger="fusionkit.data"):
        data = ManifestDataset(manifests["no_image"], TASKS)
    assert "no column 'image' (input 'image')" in caplog.text
    assert len(data) == 11 and all(data[k]["image"] is None for k in range(len(data)))
    assert data.missing_inputs == {"image": 11, "text": 0}


def test_two_modality_model_trains_on_a_manifest_without_image(manifests, tiny_bert_dir,
                                                                 tmp_path, caplog):
    config = tiny_run_config(
        manifests["no_image"], manifests["mixed"], tiny_bert_dir, tmp_path / "cache", epochs=1
    )
    config["data"]["batch_size"] = 4
    with caplog.at_level("WARNING", logger="fusionkit.data"):
        result = Trainer(build_run_config(config), tmp_path / "run", progress=False).fit()
    assert "no column 'image'" in caplog.text
    assert [record["epoch"] for record in result.history] == [1]


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "fine-tuned"])
@pytest.mark.parametrize("modality", ["text", "image"])
def test_single_modality_model_trains_evaluates_and_predicts(
    manifests, tiny_bert_dir, tmp_path, modality, frozen
):
    unused = "no_image" if modality == "text" else "no_text"
    config = _config(modality, frozen, manifests, tiny_bert_dir, tmp_path)
    result = Trainer(build_run_config(config), tmp_path / "run", progress=False).fit()
    assert [record["epoch"] for record in result.history] == [1]
    assert result.history[0]["val_accuracy"]["color"] is not None
    assert (result.cache_stats is not None) == frozen

    for name in ("mixed", unused):
        report = evaluate_checkpoint(
            tmp_path / "run", manifests[name], device="cpu", output=tmp_path / f"{name}.json"
        )
        assert report["num_samples"] == 11
        assert report["skipped_rows"] == {"no_input": 1}
        assert list(report["tasks"]["color"]["modality_weights"]) == [modality]

        predictor = Predictor.from_pretrained(tmp_path / "run", device="cpu")
        done = predictor.predict_manifest(manifests[name], tmp_path / f"{name}.csv")
        assert (done.rows, done.errors) == (12, 1)  # the row without any input: an error row
        with done.path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        predicted = [row for row in rows if not row["error"]]
        assert len(rows) == 12 and len(predicted) == 11
        assert {row[f"color_{modality}_weight"] for row in predicted} == {"1.0"}
        jsonl = predictor.predict_manifest(manifests[name], tmp_path / f"{name}.jsonl").path
        first = json.loads(jsonl.read_text().splitlines()[0])
        assert first["color"]["label"] in ("blue", "red")


def test_predict_manifest_answers_every_row(manifests, tiny_bert_dir, tmp_path):
    """A missing image file, a corrupt image and a row without input each get an error row,
    in the manifest's order; nothing is dropped."""
    config = _config("text", True, manifests, tiny_bert_dir, tmp_path)
    config["vision"] = {"name": "timm", "model_name": "test_efficientnet", "pretrained": False}
    Trainer(build_run_config(config), tmp_path / "run", progress=False).fit()
    folder = manifests["mixed"].parent
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = [
        ["a", "images/000.png", "a red shirt", "red"],
        ["b", "images/absent.png", "a blue shirt", "blue"],
        ["c", "images/corrupt.png", "a red shirt", "red"],
        ["d", "", "", "red"],
        ["e", "", "a blue shirt", "blue"],
    ]
    manifest = write_manifest(folder / "bad.csv", ["id", "image", "text", "color"], rows)
    predictor = Predictor.from_pretrained(tmp_path / "run", device="cpu")
    predictor.batch_size = 4
    for suffix in (".csv", ".jsonl"):
        done = predictor.predict_manifest(manifest, tmp_path / f"bad{suffix}")
        assert (done.rows, done.errors) == (5, 3)
        if suffix == ".jsonl":
            out = [json.loads(line) for line in done.path.read_text().splitlines()]
        else:
            with done.path.open(newline="") as handle:
                out = [{k: v for k, v in row.items() if v} for row in csv.DictReader(handle)]
        assert [row["id"] for row in out] == ["a", "b", "c", "d", "e"]
        assert ["error" in row for row in out] == [False, True, True, True, False]
        assert "does not exist" in out[1]["error"] and "cannot read image" in out[2]["error"]
        assert out[4]["color"]
