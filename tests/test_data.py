"""Tests of ``fusionkit.data``: the synthetic catalogue, manifests, transforms and collate."""

from __future__ import annotations

import csv
import json
import logging
import pickle
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fusionkit.data import (
    CATALOGUE_TASKS,
    CATALOGUE_VOCABULARY,
    Batch,
    ManifestDataset,
    build_image_transform,
    collate_samples,
    generate_catalogue,
    infer_tasks,
    make_collate,
    transform_key,
)
from fusionkit.errors import ConfigError, DataError, FusionkitError, ShapeError
from fusionkit.tasks import MISSING_LABEL, TaskSpec

SMALL = {"train": 40, "val": 8, "test": 8, "image_size": 32, "progress": False}


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def folder_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def has_phrase(title: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", title.lower()) is not None


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_catalogue(tmp_path_factory.mktemp("catalogue"), seed=3, **SMALL)


@pytest.fixture()
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (8, 6), (255, 0, 0)).save(path)
    return path


COLUMNS = ("id", "image", "text", "color", "pattern")
TASKS = {
    "color": TaskSpec.from_classes(["blue", "red"]),
    "pattern": TaskSpec.from_classes(["dotted", "plain", "striped"], multi_label=True),
}


def write_manifest(
    path: Path, rows: list[dict[str, object]], columns: tuple[str, ...] = COLUMNS
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def row(sample_id: str, image: object, text: str = "a red tee", color: str = "red",
        pattern: str = "plain") -> dict[str, object]:
    return {"id": sample_id, "image": str(image), "text": text, "color": color, "pattern": pattern}


# ------------------------------------------------------------------------------------------
# The synthetic catalogue
# ------------------------------------------------------------------------------------------


def test_catalogue_is_byte_identical_for_the_same_arguments(tmp_path: Path) -> None:
    first = generate_catalogue(tmp_path / "a", seed=5, text_noise=0.3, image_noise=0.3, **SMALL)
    generate_catalogue(tmp_path / "b", seed=5, text_noise=0.3, image_noise=0.3, **SMALL)
    a, b = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert len(a) == 40 + 8 + 8 + 3
    assert a == b
    assert first == {split: tmp_path / "a" / f"{split}.csv" for split in ("train", "val", "test")}

    generate_catalogue(tmp_path / "c", seed=6, text_noise=0.3, image_noise=0.3, **SMALL)
    c = folder_bytes(tmp_path / "c")
    assert a["train.csv"] != c["train.csv"]
    assert a["images/train-00000.png"] != c["images/train-00000.png"]


def test_catalogue_split_sizes_and_files(catalogue: dict[str, Path]) -> None:
    for split, size in (("train", 40), ("val", 8), ("test", 8)):
        rows = read_rows(catalogue[split])
        assert len(rows) == size
        assert list(rows[0]) == ["id", "image", "text", "color", "pattern", "category"]
        assert len({r["id"] for r in rows}) == size
        for r in rows:
            with Image.open(catalogue[split].parent / r["image"]) as image:
                assert image.size == (32, 32) and image.mode == "RGB"


def test_catalogue_labels_cover_every_class(catalogue: dict[str, Path]) -> None:
    rows = read_rows(catalogue["train"])
    for task, spec in CATALOGUE_TASKS.items():
        seen = {label for r in rows for label in r[task].split("|") if label}
        assert seen == set(spec.class_names()), task
    counts = Counter(r["color"] for r in rows if r["color"])
    assert max(counts.values()) <= 6


def test_catalogue_has_multi_label_pattern_cells(catalogue: dict[str, Path]) -> None:
    cells = [r["pattern"] for r in read_rows(catalogue["train"]) if r["pattern"]]
    doubles = [cell.split("|") for cell in cells if "|" in cell]
    assert 2 <= len(doubles) <= len(cells) // 2
    for labels in doubles:
        assert len(labels) == 2 and "plain" not in labels and labels == sorted(labels)


def test_missing_label_rate_is_roughly_honoured(tmp_path: Path) -> None:
    paths = generate_catalogue(tmp_path / "m", train=400, val=0, test=0, image_size=16,
                               missing_label_rate=0.3, progress=False)
    rows = read_rows(paths["train"])
    for task in CATALOGUE_TASKS:
        empty = sum(1 for r in rows if not r[task]) / len(rows)
        assert 0.22 <= empty <= 0.38, (task, empty)
    assert read_rows(paths["val"]) == []

    none = generate_catalogue(tmp_path / "n", train=40, val=0, test=0, image_size=16,
                              missing_label_rate=0.0, progress=False)
    assert all(r[task] for r in read_rows(none["train"]) for task in CATALOGUE_TASKS)


def names_any(title: str, task: str, label: str) -> bool:
    return any(has_phrase(title, word) for word in CATALOGUE_VOCABULARY[task][label])


def test_clean_titles_name_their_attributes(catalogue: dict[str, Path]) -> None:
    for r in read_rows(catalogue["train"]):
        title = r["text"]
        assert 3 <= len(title.split()) <= 20, title
        if r["color"]:
            assert names_any(title, "color", r["color"]), title
            others = [c for c in CATALOGUE_VOCABULARY["color"] if c != r["color"]]
            assert not any(names_any(title, "color", c) for c in others), title
        if r["category"]:
            assert names_any(title, "category", r["category"]), title
        for pattern in filter(None, r["pattern"].split("|")):
            if pattern != "plain":
                assert names_any(title, "pattern", pattern), title


def test_text_noise_changes_titles_only(tmp_path: Path) -> None:
    clean = generate_catalogue(tmp_path / "clean", seed=1, **SMALL)
    noisy = generate_catalogue(tmp_path / "noisy", seed=1, text_noise=1.0, **SMALL)
    clean_rows, noisy_rows = read_rows(clean["train"]), read_rows(noisy["train"])
    changed = sum(a["text"] != b["text"] for a, b in zip(clean_rows, noisy_rows, strict=True))
    assert changed == len(clean_rows)
    for a, b in zip(clean_rows, noisy_rows, strict=True):
        assert {k: v for k, v in a.items() if k != "text"} == {
            k: v for k, v in b.items() if k != "text"
        }
        names_true_color = a["color"] and names_any(b["text"], "color", a["color"])
        names_true_category = a["category"] and names_any(b["text"], "category", a["category"])
        assert not (names_true_color and names_true_category), b["text"]
    clean_images = folder_bytes(tmp_path / "clean" / "images")
    assert clean_images == folder_bytes(tmp_path / "noisy" / "images")


def test_image_noise_changes_images_only(tmp_path: Path) -> None:
    clean = generate_catalogue(tmp_path / "clean", seed=2, **SMALL)
    half = generate_catalogue(tmp_path / "half", seed=2, image_noise=0.5, **SMALL)
    generate_catalogue(tmp_path / "noisy", seed=2, image_noise=1.0, **SMALL)
    assert clean["train"].read_bytes() == half["train"].read_bytes()
    images = {name: folder_bytes(tmp_path / name / "images") for name in ("clean", "half", "noisy")}
    changed_all = {k for k in images["clean"] if images["clean"][k] != images["noisy"][k]}
    changed_half = {k for k in images["clean"] if images["clean"][k] != images["half"][k]}
    assert changed_all == set(images["clean"])
    assert changed_half < changed_all
    # Noise is nested: what a rate of 0.5 corrupts, a rate of 1.0 corrupts the same way.
    assert all(images["half"][k] == images["noisy"][k] for k in changed_half)
    assert sum(k.startswith("train-") for k in changed_half) == 20


@pytest.mark.parametrize(
    "arguments",
    [{"train": -1}, {"text_noise": 1.5}, {"image_noise": -0.1}, {"missing_label_rate": "x"},
     {"image_size": 8}, {"seed": 1.5}],
)
def test_catalogue_rejects_bad_arguments(tmp_path: Path, arguments: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        generate_catalogue(tmp_path, progress=False, **arguments)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# infer_tasks and ManifestDataset on the catalogue
# ------------------------------------------------------------------------------------------


def test_infer_tasks_on_the_catalogue(catalogue: dict[str, Path]) -> None:
    assert infer_tasks(catalogue["train"]) == CATALOGUE_TASKS
    only = infer_tasks(catalogue["train"], task_names=["category"], multi_label=["category"])
    assert list(only) == ["category"] and only["category"].multi_label
    with pytest.raises(DataError, match="style"):
        infer_tasks(catalogue["train"], task_names=["style"])
    with pytest.raises(ConfigError):
        infer_tasks(catalogue["train"], multi_label=["style"])
    with pytest.raises(ConfigError):
        infer_tasks(catalogue["train"], task_names="color")


def test_manifest_dataset_on_the_catalogue(catalogue: dict[str, Path]) -> None:
    data = ManifestDataset(catalogue["train"], CATALOGUE_TASKS)
    rows = read_rows(catalogue["train"])
    assert len(data) == 40 and data.skipped == {}
    for k in (0, 7, 39):
        sample = data[k]
        assert sample["id"] == rows[k]["id"] and sample["text"] == rows[k]["text"]
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
        for task, spec in CATALOGUE_TASKS.items():
            cell, target = rows[k][task], sample["targets"][task]
            if not cell:
                assert target is None
            elif spec.multi_label:
                assert [spec.class_names()[i] for i in target] == sorted(cell.split("|"))
            else:
                assert spec.class_names()[target] == cell

    copy = pickle.loads(pickle.dumps(data))
    assert len(copy) == 40 and torch.equal(copy[5]["image"], data[5]["image"])

    transformed = ManifestDataset(
        catalogue["val"], CATALOGUE_TASKS, build_image_transform({"input_size": (3, 24, 24)})
    )
    assert transformed[0]["image"].shape == (3, 24, 24)


def test_collate_catalogue_batch(catalogue: dict[str, Path]) -> None:
    data = ManifestDataset(catalogue["train"], CATALOGUE_TASKS)
    samples = [data[k] for k in range(8)]
    samples[2] = {**samples[2], "image": None, "text": None}
    samples[3] = {**samples[3], "targets": {"color": None, "pattern": None, "category": 1}}
    batch = make_collate(CATALOGUE_TASKS)(samples)
    assert isinstance(batch, Batch) and len(batch) == 8
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.image_present.dtype == torch.bool
    assert batch.image_present.tolist() == [True, True, False, True, True, True, True, True]
    assert torch.equal(batch.images[2], torch.zeros(3, 32, 32))
    assert torch.equal(batch.images[0], samples[0]["image"])
    assert batch.texts[2] is None and batch.text_present.tolist()[2] is False
    color, pattern = batch.targets["color"], batch.targets["pattern"]
    assert color.dtype == torch.long and color.shape == (8,)
    assert color[3].item() == MISSING_LABEL
    assert pattern.dtype == torch.float32 and pattern.shape == (8, 5)
    assert torch.isnan(pattern[3]).all()
    assert batch.targets["category"][3].item() == 1
    for k in range(8):
        if k != 3 and samples[k]["targets"]["pattern"] is not None:
            expected = torch.zeros(5)
            expected[samples[k]["targets"]["pattern"]] = 1.0
            assert torch.equal(pattern[k], expected)
    moved = batch.to("cpu")
    assert torch.equal(moved.targets["color"], color) and moved.ids == batch.ids

    collate = make_collate(CATALOGUE_TASKS)
    loader = torch.utils.data.DataLoader(data, batch_size=16, collate_fn=collate)
    assert [len(b) for b in loader] == [16, 16, 8]


def test_collate_is_picklable_and_handles_all_missing_images() -> None:
    collate = pickle.loads(pickle.dumps(make_collate(TASKS, image_shape=(3, 4, 4))))
    samples = [
        {"id": "a", "image": None, "text": "x", "targets": {"color": 1, "pattern": [0, 2]}},
        {"id": "b", "image": None, "text": None, "targets": {}},
    ]
    batch = collate(samples)
    assert torch.equal(batch.images, torch.zeros(2, 3, 4, 4))
    assert batch.targets["color"].tolist() == [1, MISSING_LABEL]
    assert batch.targets["pattern"][0].tolist() == [1.0, 0.0, 1.0]
    assert torch.isnan(batch.targets["pattern"][1]).all()
    without_shape = collate_samples(samples, TASKS)
    assert without_shape.images is None and not without_shape.image_present.any()


def test_collate_rejects_bad_input() -> None:
    good = {"id": "a", "image": torch.zeros(3, 4, 4), "text": "x", "targets": {}}
    with pytest.raises(DataError):
        collate_samples([], TASKS)
    with pytest.raises(DataError, match="color"):
        collate_samples([{**good, "targets": {"color": 2}}], TASKS)
    with pytest.raises(DataError, match="pattern"):
        collate_samples([{**good, "targets": {"pattern": [3]}}], TASKS)
    with pytest.raises(ShapeError):
        collate_samples([good, {**good, "id": "b", "image": torch.zeros(3, 5, 4)}], TASKS)


# ------------------------------------------------------------------------------------------
# Manifests: formats, paths and bad data
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_csv_and_jsonl_give_the_same_samples(tmp_path: Path, image_file: Path,
                                             suffix: str) -> None:
    rows = [
        row("a", image_file, "Red tee", "red", "plain"),
        row("b", image_file, "Blue dotted tee", "blue", "dotted | striped"),
        row("c", "", "unlabelled", "", ""),
    ]
    path = write_manifest(tmp_path / f"m{suffix}", rows)
    tasks = infer_tasks(path)
    assert tasks == TASKS
    data = ManifestDataset(path, tasks)
    assert [data[k]["targets"] for k in range(3)] == [
        {"color": 1, "pattern": [1]},
        {"color": 0, "pattern": [0, 2]},
        {"color": None, "pattern": None},
    ]
    assert data[2]["image"] is None and data.missing_modalities == {"image": 1, "text": 0}
    assert torch.equal(data[0]["image"][:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_jsonl_accepts_label_lists_and_null(tmp_path: Path, image_file: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"image": str(image_file), "text": "t", "color": "red",
                    "pattern": ["striped", "dotted"]}) + "\n\n"
        + json.dumps({"image": str(image_file), "text": None, "color": None}) + "\n",
        encoding="utf-8",
    )
    data = ManifestDataset(path, TASKS)
    assert data[0]["targets"] == {"color": 1, "pattern": [0, 2]}
    assert data[1]["text"] is None and data[1]["targets"] == {"color": None, "pattern": None}
    assert data[0]["id"] != data[1]["id"]


def test_relative_and_absolute_image_paths(tmp_path: Path, image_file: Path) -> None:
    relative = row("rel", "../red.png")
    absolute = row("abs", image_file.resolve())
    data = ManifestDataset(write_manifest(tmp_path / "sub" / "m.csv", [relative, absolute]), TASKS)
    assert len(data) == 2
    assert torch.equal(data[0]["image"], data[1]["image"])
    assert data.records[0].image_path.resolve() == image_file.resolve()


def test_missing_image_file_skip_and_raise(tmp_path: Path, image_file: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    rows = [row("a", image_file), row("b", tmp_path / "gone.png"), row("c", "nope.png")]
    path = write_manifest(tmp_path / "m.csv", rows)
    with caplog.at_level(logging.WARNING, logger="fusionkit.data"):
        data = ManifestDataset(path, TASKS)
    assert len(data) == 1 and data.skipped == {"missing_image_file": 2}
    message = caplog.text
    assert "skipped 2 of 3" in message and "gone.png" in message and "nope.png" in message
    with pytest.raises(DataError, match=r"row 2 \(line 3\).*gone\.png"):
        ManifestDataset(path, TASKS, on_error="raise")


def test_corrupt_image_becomes_missing(tmp_path: Path, image_file: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image_file.read_bytes()[:40])
    rows = [row("a", broken), row("b", image_file), row("c", truncated)]
    data = ManifestDataset(write_manifest(tmp_path / "m.csv", rows), TASKS)
    with caplog.at_level(logging.WARNING, logger="fusionkit.data"):
        samples = [data[k] for k in range(3)]
    assert samples[0]["image"] is None and samples[2]["image"] is None
    assert samples[1]["image"] is not None and samples[0]["text"] == "a red tee"
    assert data.load_failures == 2
    assert "broken.png" in caplog.text and "2 load failure(s)" in caplog.text
    assert data[0]["image"] is None and data.load_failures == 2
    batch = make_collate(TASKS)(samples)
    assert batch.image_present.tolist() == [False, True, False]


@pytest.mark.parametrize("limit", [50, 100])
def test_decompression_bomb_counts_as_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 limit: int) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (12, 12)).save(big)
    data = ManifestDataset(write_manifest(tmp_path / "m.csv", [row("a", big)]), TASKS)
    assert data[0]["image"] is not None
    # 144 pixels: over twice a limit of 50 Pillow raises, over a limit of 100 it only warns.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    fresh = ManifestDataset(write_manifest(tmp_path / "m.csv", [row("a", big)]), TASKS)
    assert fresh[0]["image"] is None and fresh.load_failures == 1


def test_unknown_class_skip_and_raise(tmp_path: Path, image_file: Path) -> None:
    rows = [row("a", image_file), row("b", image_file, color="green"),
            row("c", image_file, pattern="plain|checked"), row("d", image_file, color="red|blue")]
    path = write_manifest(tmp_path / "labels.csv", rows)
    data = ManifestDataset(path, TASKS)
    assert len(data) == 1 and data.skipped == {"unknown_label": 3}
    with pytest.raises(DataError) as error:
        ManifestDataset(path, TASKS, on_error="raise")
    message = str(error.value)
    for part in ("labels.csv", "row 2 (line 3)", "'color'", "'green'", "['blue', 'red']"):
        assert part in message


def test_empty_text_and_empty_rows(tmp_path: Path, image_file: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    rows = [row("a", image_file, text="   "), row("b", "", text=""), row("c", "", text="ok")]
    with caplog.at_level(logging.WARNING, logger="fusionkit.data"):
        data = ManifestDataset(write_manifest(tmp_path / "m.csv", rows), TASKS, on_error="raise")
    assert len(data) == 2 and data.skipped == {"no_input": 1}
    assert data[0]["text"] is None and data[0]["image"] is not None
    assert data[1]["image"] is None and data[1]["text"] == "ok"
    assert data.missing_modalities == {"image": 1, "text": 1}
    assert "1 of 2 samples have no text" in caplog.text


def test_missing_task_column(tmp_path: Path, image_file: Path) -> None:
    columns = tuple(c for c in COLUMNS if c != "color")
    rows = [{k: v for k, v in row("a", image_file).items() if k != "color"}]
    path = write_manifest(tmp_path / "m.csv", rows, columns)
    with pytest.raises(DataError, match=r"no task column 'color'.*columns found: \[.*'id'"):
        ManifestDataset(path, TASKS)


@pytest.mark.parametrize("missing", ["image", "text"])
def test_an_absent_input_column_is_a_missing_input(
    tmp_path: Path, image_file: Path, missing: str, caplog: pytest.LogCaptureFixture
) -> None:
    columns = tuple(c for c in COLUMNS if c != missing)
    rows = [{k: v for k, v in row("a", image_file).items() if k != missing}]
    path = write_manifest(tmp_path / "m.csv", rows, columns)
    with caplog.at_level(logging.WARNING, logger="fusionkit.data"):
        data = ManifestDataset(path, TASKS)
    assert f"no column '{missing}' (input '{missing}')" in caplog.text
    assert data[0][missing] is None and data.missing_inputs[missing] == 1
    kept = "text" if missing == "image" else "image"
    assert data[0][kept] is not None


def test_a_manifest_without_any_input_column_is_refused(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.csv", [{"id": "a", "color": "red", "pattern": ""}],
                          ("id", "color", "pattern"))
    with pytest.raises(DataError, match=r"no column 'image' or 'text'; columns found"):
        ManifestDataset(path, TASKS)
    with pytest.raises(DataError, match=r"no column 'text'; columns found"):
        ManifestDataset(path, TASKS, modalities=("text",))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_duplicated_id(tmp_path: Path, image_file: Path, suffix: str) -> None:
    path = write_manifest(tmp_path / f"m{suffix}", [row("x", image_file), row("x", image_file)])
    with pytest.raises(DataError, match=r"'x'.*line"):
        ManifestDataset(path, TASKS)


def test_malformed_files(tmp_path: Path, image_file: Path) -> None:
    good = json.dumps(row("a", image_file))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(good + "\n{\"image\": \"x\", \"text\":\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        ManifestDataset(jsonl, TASKS)
    with pytest.raises(DataError, match="line 2"):
        infer_tasks(jsonl)
    jsonl.write_text(good + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2.*JSON object"):
        ManifestDataset(jsonl, TASKS)
    short = tmp_path / "short.csv"
    short.write_text("id,image,text,color,pattern\na,x.png,t,red\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: 4 field"):
        ManifestDataset(short, TASKS)
    for name, content in (("empty.csv", ""), ("bad.txt", "x"), ("dup.csv", "image,text,text\n")):
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(DataError):
            ManifestDataset(tmp_path / name, TASKS)
    with pytest.raises(DataError, match="not found"):
        ManifestDataset(tmp_path / "absent.csv", TASKS)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,text,color,pattern\nx.png,caf\xe9,red,plain\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        ManifestDataset(latin, TASKS)
    with pytest.raises(ConfigError):
        ManifestDataset(short, TASKS, on_error="ignore")  # type: ignore[arg-type]


def test_infer_tasks_needs_two_single_label_classes(tmp_path: Path, image_file: Path) -> None:
    path = write_manifest(tmp_path / "m.csv", [row("a", image_file), row("b", image_file)])
    with pytest.raises(DataError, match="'color' has 1 distinct"):
        infer_tasks(path)
    tasks = infer_tasks(path, task_names=["pattern"], multi_label=["pattern"])
    assert tasks == {"pattern": TaskSpec.from_classes(["plain"], multi_label=True)}


# ------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------


def test_eval_transform_resizes_crops_and_normalises() -> None:
    config = {"input_size": (3, 20, 20), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.5, 1.0),
              "interpolation": "bilinear", "crop_pct": 1.0}
    transform = pickle.loads(pickle.dumps(build_image_transform(config)))
    out = transform(Image.new("RGB", (40, 30), (255, 0, 127)))
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    expected = torch.tensor([(1.0 - 0.5) / 0.25, (0.0 - 0.5) / 0.5, (127 / 255 - 0.5) / 1.0])
    torch.testing.assert_close(out[:, 10, 10], expected, atol=1e-4, rtol=0)


def test_train_transform_is_light_and_keeps_colour() -> None:
    transform = build_image_transform({"input_size": (3, 16, 16)}, train=True)
    names = [type(step).__name__ for step in transform.transforms]
    assert "ColorJitter" not in names and "RandomHorizontalFlip" in names
    crop = transform.transforms[0]
    assert crop.scale[0] >= 0.8
    torch.manual_seed(0)
    outs = [transform(Image.new("RGB", (24, 24), (10, 200, 30))) for _ in range(4)]
    for out in outs:
        assert out.shape == (3, 16, 16)
        torch.testing.assert_close(out, outs[0])


def test_transform_key() -> None:
    config = {"input_size": (3, 32, 32)}
    explicit = {**config, "crop_pct": 0.875, "interpolation": "bicubic",
                "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    assert transform_key(config) == transform_key(explicit)
    keys = {
        transform_key(config),
        transform_key(config, train=True),
        transform_key({"input_size": (3, 64, 64)}),
        transform_key({**config, "crop_pct": 1.0}),
        transform_key({**config, "mean": (0.5, 0.5, 0.5)}),
    }
    assert len(keys) == 5
    assert all("\n" not in key for key in keys)
    for bad in ({}, {"input_size": (1, 32, 32)}, {"input_size": (3, 32, 32), "std": (0, 1, 1)},
                {"input_size": (3, 32, 32), "interpolation": "fancy"}, {"input_size": 32}):
        with pytest.raises(ConfigError):
            build_image_transform(bad)
        with pytest.raises(ConfigError):
            transform_key(bad)


# ------------------------------------------------------------------------------------------
# Property: arbitrary cells only ever raise fusionkit errors
# ------------------------------------------------------------------------------------------

cell = st.text(max_size=12) | st.sampled_from(["", " ", "red", "blue", "red|blue", "|", "plain"])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cells=st.lists(st.tuples(cell, cell, cell), min_size=1, max_size=5),
    suffix=st.sampled_from([".csv", ".jsonl"]),
    on_error=st.sampled_from(["skip", "raise"]),
)
def test_arbitrary_cells_raise_only_fusionkit_errors(
    cells: list[tuple[str, str, str]], suffix: str, on_error: str
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        Image.new("RGB", (4, 4), (0, 0, 255)).save(root / "img.png")
        rows = [
            {"id": f"s{k}", "image": "img.png", "text": text, "color": color, "pattern": pattern}
            for k, (text, color, pattern) in enumerate(cells)
        ]
        path = write_manifest(root / f"m{suffix}", rows)
        for tasks in (None, TASKS):
            try:
                used = infer_tasks(path) if tasks is None else tasks
                data = ManifestDataset(path, used, on_error=on_error)  # type: ignore[arg-type]
                samples = [data[k] for k in range(len(data))]
                if samples:
                    batch = make_collate(used)(samples)
                    assert len(batch) == len(samples)
                    for name, spec in used.items():
                        if spec.multi_label:
                            values = batch.targets[name][~batch.targets[name].isnan()]
                            assert set(values.tolist()) <= {0.0, 1.0}
                        else:
                            target = batch.targets[name]
                            assert ((target == MISSING_LABEL) | (target >= 0)).all()
                texts = {text.strip() for text, _, _ in cells}
                assert all(s["text"] is None or s["text"] in texts for s in samples)
            except FusionkitError:
                pass
