"""The emoji data set built from Debian packages: counts, labels, leak-free splits, images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusionkit.cli import main
from fusionkit.data import ManifestDataset, infer_tasks
from fusionkit.data import emoji as emoji_module
from fusionkit.data.emoji import APT_PACKAGES, base_key, build_emoji_dataset, read_emoji
from fusionkit.errors import DataError

INSTALLED = all(
    path.is_file()
    for path in (emoji_module.EMOJI_TEST, emoji_module.FONT, emoji_module.CLDR_ANNOTATIONS)
)
needs_packages = pytest.mark.skipif(
    not INSTALLED,
    reason=f"the emoji set needs `apt-get install -y {' '.join(APT_PACKAGES)}` (CI installs them)",
)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def emoji_set(tmp_path_factory):
    """The full set (about 10 s on 2 cores), built once through the CLI."""
    if not INSTALLED:
        pytest.skip("emoji packages not installed")
    out = tmp_path_factory.mktemp("emoji")
    assert main(["-q", "data", "emoji", "--out", str(out), "--image-size", "64"]) == 0
    return {split: _rows(out / f"{split}.csv") for split in ("train", "val", "test")}, out


def test_base_key_merges_variants_and_keeps_distinct_emoji_apart():
    technologist = (0x1F9D1, 0x200D, 0x1F4BB)
    assert base_key((0x1F469, 0x1F3FD, 0x200D, 0x1F4BB)) == technologist  # woman, medium skin
    assert base_key((0x1F3C3, 0x200D, 0x2642, 0xFE0F)) == (0x1F3C3,)  # man running
    assert base_key((0x1F468, 0x200D, 0x1F9B0)) == (0x1F9D1,)  # man: red hair
    assert base_key((0x1F600,)) != base_key((0x1F603,))


@needs_packages
def test_read_emoji_counts():
    records = read_emoji()
    assert 1800 <= len(records) <= 1950
    assert len({record.group for record in records}) == 9
    assert 90 <= len({record.subgroup for record in records}) <= 110
    assert not any(record.has_skin_tone for record in records)
    assert len(read_emoji(skin_tones=True)) > 3000


@needs_packages
def test_splits_are_stratified_and_never_split_a_base(emoji_set):
    splits, _ = emoji_set
    sizes = {split: len(rows) for split, rows in splits.items()}
    total = sum(sizes.values())
    assert total == len(read_emoji())
    assert abs(sizes["train"] / total - 0.70) < 0.03
    owner: dict[tuple[int, ...], str] = {}
    for split, rows in splits.items():
        for row in rows:
            key = base_key(tuple(int(cell, 16) for cell in row["id"].split("_")))
            assert owner.setdefault(key, split) == split, f"{row['id']} straddles splits"
    train_groups = {row["group"] for row in splits["train"]}
    train_subgroups = {row["subgroup"] for row in splits["train"]}
    assert len(train_groups) == 9
    for split in ("val", "test"):
        assert {row["group"] for row in splits[split]} == train_groups
        assert {row["subgroup"] for row in splits[split]} <= train_subgroups


@needs_packages
def test_texts_name_the_emoji_and_images_are_drawn(emoji_set):
    splits, out = emoji_set
    rows = [row for rows in splits.values() for row in rows]
    by_id = {row["id"]: row for row in rows}
    assert by_id["1f600"]["text"].startswith("grinning face; ")
    assert by_id["1f1e9_1f1ea"]["text"].startswith("flag: Germany")
    for row in rows[:: len(rows) // 25]:
        with Image.open(out / row["image"]) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape == (64, 64, 3)
        # A drawn glyph: well away from an all-white (blank) square, with some colour.
        assert (pixels.min(axis=2) < 200).mean() > 0.05, row["id"]


@needs_packages
def test_manifests_load_with_two_tasks(emoji_set):
    _, out = emoji_set
    tasks = infer_tasks(out / "train.csv")
    assert list(tasks) == ["group", "subgroup"] and tasks["group"].num_classes == 9
    data = ManifestDataset(out / "test.csv", tasks, on_error="raise")
    assert data[0]["image"] is not None and data[0]["text"]


@needs_packages
def test_subset_is_deterministic_and_flag_prefix_can_be_dropped(tmp_path):
    first = build_emoji_dataset(tmp_path / "a", limit=80, image_size=32, progress=False)
    second = build_emoji_dataset(
        tmp_path / "b", limit=80, image_size=32, drop_flag_prefix=True, progress=False
    )
    third = build_emoji_dataset(tmp_path / "c", limit=80, image_size=32, progress=False)
    assert first["train"].read_bytes() == third["train"].read_bytes()
    image = _rows(first["train"])[0]["image"]
    assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "c" / image).read_bytes()
    flags = [row for split in second.values() for row in _rows(split) if row["group"] == "Flags"]
    assert flags and not any(row["text"].startswith("flag:") for row in flags)
    assert sum(len(_rows(path)) for path in first.values()) == 80


def test_missing_packages_name_the_apt_line(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji_module, "FONT", tmp_path / "absent.ttf")
    with pytest.raises(DataError, match="apt-get install -y fonts-noto-color-emoji unicode-data"):
        build_emoji_dataset(tmp_path / "out", progress=False)
