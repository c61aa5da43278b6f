"""The icons data set: contexts as labels, names as texts, leak-free and deterministic splits."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from fusionkit.cli import main
from fusionkit.data import ManifestDataset, infer_tasks
from fusionkit.data.icons import APT_PACKAGES, ICONS_ROOT, build_icons_dataset, icon_text
from fusionkit.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _rows(out: Path) -> dict[str, list[dict[str, str]]]:
    rows = {}
    for split in SPLITS:
        with (out / f"{split}.csv").open(newline="", encoding="utf-8") as handle:
            rows[split] = list(csv.DictReader(handle))
    return rows


def _svg(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="48" height="48">'
        f'<rect x="4" y="4" width="40" height="40" fill="rgb{rgb}"/></svg>'
    )


def _png(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), rgb).save(path)


def _index(theme: Path, folders: dict[str, tuple[str, int]]) -> None:
    sections = [f"[Icon Theme]\nName={theme.name}\nDirectories={','.join(folders)}\n"]
    for folder, (context, size) in folders.items():
        sections.append(f"[{folder}]\nContext={context}\nSize={size}\nType=Fixed\n")
    theme.mkdir(parents=True, exist_ok=True)
    (theme / "index.theme").write_text("\n".join(sections), encoding="utf-8")


APPS = [f"app-{number}" for number in range(10)]
DEVICES = [f"drive-{colour}" for colour in ("red", "green", "blue", "cyan", "pink", "gold", "grey")]


@pytest.fixture
def themes(tmp_path: Path) -> Path:
    """Two themes with overlapping names: Papirus-like ``alpha``, Breeze-like ``beta``."""
    root = tmp_path / "icons"
    alpha, beta = root / "alpha", root / "beta"
    _index(alpha, {
        "48x48/apps": ("Applications", 48), "22x22/apps": ("Applications", 22),
        "16x16/apps": ("Applications", 16), "48x48/devices": ("Devices", 48),
        "48x48/emotes": ("Emotes", 48),
    })
    for name in APPS[:8]:
        _svg(alpha / "48x48/apps" / f"{name}.svg", RED)
        _svg(alpha / "22x22/apps" / f"{name}.svg", BLUE)  # a farther size: never taken
    _svg(alpha / "16x16/apps/app-tiny.svg", RED)  # too small to be taken at all
    _svg(alpha / "48x48/apps/app-0-symbolic.svg", RED)
    (alpha / "48x48/apps/org.example.One.svg").symlink_to("app-0.svg")  # an alias
    for name in DEVICES[:6]:
        _svg(alpha / "48x48/devices" / f"{name}.svg", RED)
    _svg(alpha / "48x48/emotes/face-smile.svg", RED)  # a context too small to keep
    _index(beta, {"apps/48": ("Applications", 48), "devices/64": ("Devices", 64),
                  "mimes/48": ("MimeTypes", 48)})
    for name in APPS[4:]:
        _svg(beta / "apps/48" / f"{name}.svg", BLUE)
    for name in DEVICES[3:]:
        _png(beta / "devices/64" / f"{name}.png", BLUE)
    for name in ("text-x-python", "image-png", "audio-x-flac", "video-x-generic"):
        _png(beta / "mimes/48" / f"{name}.png", BLUE)
    return root


def _build(out: Path, root: Path, **options) -> dict[str, Path]:
    options = {"image_size": 16, "min_per_context": 3, "progress": False, **options}
    return build_icons_dataset(out, themes=["alpha", "beta"], icons_root=root, **options)


def test_icon_text_makes_names_readable():
    assert icon_text("applications-graphics") == "applications graphics"
    assert icon_text("org.gnome.Calculator") == "org gnome calculator"
    assert icon_text("audio-volume-high-symbolic") == "audio volume high"
    assert icon_text("folder-blue-music") == icon_text("folder_music") == "folder music"
    assert icon_text("drive-red") == "drive red"  # a colour only counts inside folder names


def test_contexts_are_labels_and_names_are_texts(themes, tmp_path):
    out = tmp_path / "out"
    paths = _build(out, themes)
    assert sorted(paths) == sorted(SPLITS)
    rows = [row for split in _rows(out).values() for row in split]
    assert {row["context"] for row in rows} == {"apps", "devices", "mimetypes"}  # emotes: 1 name
    texts = {row["text"] for row in rows}
    assert {"app 0", "drive grey", "text x python"} <= texts
    assert not texts & {"org example one", "app tiny", "face smile"}  # alias, 16 px, too few
    assert len(rows) == (8 + 6) + (6 + 4) + 4  # one picture per theme and name
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        with Image.open(out / row["image"]) as image:
            assert image.mode == "RGB" and image.size == (16, 16)
    # The 48 px picture (red) is taken over the 22 px one (blue).
    with Image.open(out / "images/alpha-app-0.png") as image:
        red, _, blue = image.getpixel((8, 8))
        assert red > 200 and blue < 50


def test_no_name_in_two_splits_and_splits_are_stratified(themes, tmp_path):
    _build(tmp_path / "out", themes)
    rows = _rows(tmp_path / "out")
    owner: dict[str, str] = {}
    for split, members in rows.items():
        for row in members:
            assert owner.setdefault(row["text"], split) == split, f"{row['text']} straddles"
    train = {row["context"] for row in rows["train"]}
    assert train == {"apps", "devices", "mimetypes"}  # every context is known in training
    assert len(rows["train"]) > len(rows["val"]) and len(rows["train"]) > len(rows["test"])


def test_same_seed_gives_byte_identical_manifests(themes, tmp_path):
    first = _build(tmp_path / "a", themes, seed=3)
    second = _build(tmp_path / "b", themes, seed=3)
    for split in SPLITS:
        assert first[split].read_bytes() == second[split].read_bytes()
    others = [_build(tmp_path / f"s{seed}", themes, seed=seed) for seed in range(4)]
    assert len({paths["train"].read_bytes() for paths in others}) > 1


def test_max_per_context_caps_names(themes, tmp_path):
    _build(tmp_path / "out", themes, max_per_context=3)
    names: dict[str, set[str]] = {}
    for members in _rows(tmp_path / "out").values():
        for row in members:
            names.setdefault(row["context"], set()).add(row["text"])
    assert {context: len(texts) for context, texts in names.items()} == {
        "apps": 3, "devices": 3, "mimetypes": 3
    }
    # Names two themes draw come first.
    assert names["apps"] <= {icon_text(name) for name in APPS[4:8]}
    assert names["devices"] <= {icon_text(name) for name in DEVICES[3:6]}


def test_limit_keeps_about_that_many(themes, tmp_path):
    _build(tmp_path / "out", themes, limit=7)
    assert sum(len(members) for members in _rows(tmp_path / "out").values()) == 7


def test_missing_theme_and_empty_result_raise_clear_errors(themes, tmp_path):
    with pytest.raises(DataError, match="papirus-icon-theme"):
        build_icons_dataset(tmp_path / "out", themes=["Papirus"], icons_root=themes)
    with pytest.raises(DataError, match="no context"):
        _build(tmp_path / "out", themes, min_per_context=50)
    with pytest.raises(ConfigError, match="image_size"):
        _build(tmp_path / "out", themes, image_size=8)
    with pytest.raises(ConfigError, match="themes"):
        build_icons_dataset(tmp_path / "out", themes=[], icons_root=themes)


@pytest.mark.skipif(
    not (ICONS_ROOT / "Papirus").is_dir(),
    reason=f"the icons set needs `apt-get install -y {' '.join(APT_PACKAGES)}` (CI installs them)",
)
def test_real_themes_build_through_the_cli_and_load(tmp_path):
    out = tmp_path / "icons"
    argv = ["-q", "data", "icons", "--out", str(out), "--image-size", "32"]
    assert main([*argv, "--max-per-context", "4"]) == 0
    tasks = infer_tasks(out / "train.csv")
    assert list(tasks) == ["context"]
    assert {"apps", "devices", "mimetypes", "places", "status"} <= set(tasks["context"].classes)
    dataset = ManifestDataset(out / "test.csv", tasks)
    sample = dataset[0]
    assert sample["text"] and tuple(sample["image"].shape) == (3, 32, 32)
