"""A real image+text data set built offline from Debian icon themes: icons, their names, contexts.

Four Debian packages install freedesktop icon themes under ``/usr/share/icons``:
``papirus-icon-theme`` (``Papirus``), ``breeze-icon-theme`` (``breeze``), ``moka-icon-theme``
(``Moka``) and ``elementary-icon-theme`` (``elementary``); ``cairosvg`` draws their SVG files
with ``libcairo2``. The images are the icons, the texts their names made readable
(``applications-graphics`` → ``applications graphics``), the label their **context**.

Each theme's ``index.theme`` files every folder under a context: ``Applications`` becomes
``apps``, ``MimeTypes`` ``mimetypes``, the others are lower-cased (``actions``, ``categories``,
``devices``, ``emblems``, ``emotes``, ``places``, ``status``, ...). Theme-specific folder names
thus need no mapping: Papirus's ``panel`` and Breeze's small ``applets`` are ``Status``,
elementary's ``mimes`` ``MimeTypes``, Breeze's ``preferences`` and Moka's ``web``
``Applications``. Contexts with fewer than ``min_per_context`` names are dropped.

Per theme and name the file of the size nearest to 48 px is taken (the larger on a tie; sizes
below 22 px, other scales and ``symbolic`` variants are ignored). Themes alias many names to one
file with symbolic links: one name is kept per file (the file's own), so that a picture never
lands in two splits under two names. Papirus's coloured folders (``folder-blue-music``) are one
picture recoloured: the colour leaves the name and one colour is kept. Splits are made over
names across themes: one name has one label (the context most themes give it) and one split,
so Papirus's and Breeze's ``accessories-calculator`` are both in training or both held out.

Examples:
    >>> paths = build_icons_dataset("/tmp/icons", progress=False)  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['test', 'train', 'val']
"""

from __future__ import annotations

import configparser
import hashlib
import io
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from fusionkit.data.manifest import write_manifest
from fusionkit.data.splits import check_int, grouped_split
from fusionkit.errors import ConfigError, DataError, MissingDependencyError

__all__ = [
    "APT_PACKAGES",
    "ICONS_ROOT",
    "ICONS_TASKS",
    "THEMES",
    "IconRecord",
    "build_icons_dataset",
    "icon_text",
    "read_icons",
]

_LOG = logging.getLogger("fusionkit.data")

#: Theme folder under :data:`ICONS_ROOT` → the Debian package that installs it.
THEMES = {
    "Papirus": "papirus-icon-theme",
    "breeze": "breeze-icon-theme",
    "Moka": "moka-icon-theme",
    "elementary": "elementary-icon-theme",
}
#: The Debian packages the builder reads (``libcairo2`` is what ``cairosvg`` draws with).
APT_PACKAGES = (*THEMES.values(), "libcairo2")
#: The label column of the manifests.
ICONS_TASKS = ("context",)
#: Where Debian installs icon themes.
ICONS_ROOT = Path("/usr/share/icons")

_TARGET_SIZE = 48
# Below this an icon is a monochrome glyph drawn for menus, a different picture altogether.
_MIN_SIZE = 22
_SUFFIXES = (".svg", ".png")
_CONTEXT_NAMES = {"applications": "apps"}
# Mid grey: tray icons drawn light for dark panels stay as visible as the dark ones.
_BACKGROUND = (128, 128, 128)
_WORD = re.compile(r"[-_.\s]+")
_UNSAFE = re.compile(r"[^a-z0-9]+")
# The folder colours of Papirus: ``folder-<colour>-<what>`` and ``user-<colour>-<what>``.
_COLOURS = frozenset((
    "adwaita", "black", "blue", "bluegrey", "breeze", "brown", "carmine", "custom", "cyan",
    "darkcyan", "deeporange", "green", "grey", "indigo", "magenta", "nordic", "orange",
    "palebrown", "paleorange", "pink", "red", "teal", "violet", "white", "yaru", "yellow",
))


@dataclass(frozen=True)
class IconRecord:
    """One icon of one theme, as found on disk.

    Args:
        theme: The theme's folder name, e.g. ``"Papirus"``.
        context: The normalised context, e.g. ``"apps"``.
        name: The file name without its suffix, e.g. ``"applications-graphics"``.
        path: The file (SVG or PNG).
        size: The nominal size of its folder in pixels.

    Examples:
        >>> IconRecord("breeze", "apps", "org.kde.kate", Path("kate.svg"), 48).text
        'org kde kate'
    """

    theme: str
    context: str
    name: str
    path: Path
    size: int

    @property
    def text(self) -> str:
        """The readable name (see :func:`icon_text`)."""
        return icon_text(self.name)


def icon_text(name: str) -> str:
    """An icon name made readable: split on ``-``, ``_``, ``.``; ``symbolic`` and colours out.

    Args:
        name: The icon name, e.g. ``"folder-blue-music"``.

    Returns:
        Lower-case words joined by spaces; icons with the same text count as one name.

    Examples:
        >>> icon_text("applications-graphics")
        'applications graphics'
        >>> icon_text("folder-blue-music")
        'folder music'
        >>> icon_text("audio-volume-high-symbolic")
        'audio volume high'
    """
    words = [word for word in _WORD.split(name.lower()) if word and word != "symbolic"]
    if len(words) > 1 and words[0] in ("folder", "user") and words[1] in _COLOURS:
        del words[1]
    return " ".join(words)


def _theme_folders(root: Path, theme: str) -> list[tuple[str, int, Path]]:
    """(context, size, folder) of each usable folder that ``index.theme`` lists."""
    index = root / theme / "index.theme"
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(index.read_text(encoding="utf-8", errors="replace"))
    except (OSError, configparser.Error) as error:
        package = THEMES.get(theme)
        hint = f"; install it with `sudo apt-get install -y {package}`" if package else ""
        raise DataError(f"{root / theme} is not an installed icon theme ({error}){hint}") from None
    if not parser.has_section("Icon Theme"):
        raise DataError(f"{index} has no [Icon Theme] section; is it an icon theme?")
    header = parser["Icon Theme"]
    listed = f"{header.get('Directories', '')},{header.get('ScaledDirectories', '')}"
    folders = []
    for folder in dict.fromkeys(part.strip() for part in listed.split(",") if part.strip()):
        if not parser.has_section(folder) or "symbolic" in folder.split("/"):
            continue
        section = parser[folder]
        context = section.get("Context", "").strip().lower()
        try:
            size, scale = int(section.get("Size", "0")), int(section.get("Scale", "1"))
        except ValueError:
            continue
        if context and scale == 1 and size >= _MIN_SIZE and (root / theme / folder).is_dir():
            folders.append((_CONTEXT_NAMES.get(context, context), size, root / theme / folder))
    return folders


def read_icons(theme: str, icons_root: str | Path = ICONS_ROOT) -> list[IconRecord]:
    """The icons of one theme: one per picture file, at the size nearest to 48 px.

    Args:
        theme: The theme's folder name under ``icons_root``, e.g. ``"Papirus"``.
        icons_root: The folder holding the themes.

    Returns:
        The records: one per file (a link to a file already taken is an alias, left out).

    Raises:
        DataError: The theme is missing or has no ``index.theme``.

    Examples:
        >>> len(read_icons("breeze"))  # doctest: +SKIP
    """
    root = Path(icons_root).resolve()
    best: dict[tuple[str, str], tuple[tuple[int, int], IconRecord]] = {}
    for context, size, folder in _theme_folders(root, theme):
        for entry in sorted(os.listdir(folder)):
            stem, suffix = os.path.splitext(entry)
            if suffix.lower() not in _SUFFIXES or stem.endswith("-symbolic"):
                continue
            rank = (abs(size - _TARGET_SIZE), -size)
            key = (context, stem)
            if key not in best or rank < best[key][0]:
                best[key] = (rank, IconRecord(theme, context, stem, folder / entry, size))
    found = sorted((record.context, record.name, record) for _, record in best.values())
    pairs = [(os.path.realpath(record.path), record) for *_, record in found]
    # Files first, then links (dangling ones left out): a picture is named by its own file.
    pairs.sort(key=lambda pair: pair[0] != os.path.abspath(pair[1].path))
    taken: set[str] = set()
    records: list[IconRecord] = []
    for real, record in pairs:
        if real not in taken and os.path.isfile(real):
            taken.add(real)
            records.append(record)
    return records


def _render(path: Path, size: int) -> Image.Image:
    """The icon on a grey square of side ``size``, aspect ratio kept."""
    if path.suffix.lower() == ".svg":
        import cairosvg

        # At four times the size, then down with Lanczos: thin strokes stay crisp.
        data = cairosvg.svg2png(url=str(path), output_width=4 * size)
        picture = Image.open(io.BytesIO(data))
    else:
        picture = Image.open(path)
    picture = picture.convert("RGBA")
    side = max(picture.size)
    square = Image.new("RGB", (side, side), _BACKGROUND)
    square.paste(picture, ((side - picture.width) // 2, (side - picture.height) // 2), picture)
    return square.resize((size, size), Image.Resampling.LANCZOS)


def _check_renderer() -> None:
    try:
        import cairosvg  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            f"the icons data set renders SVG files with cairosvg ({error}); "
            "install it with `pip install cairosvg`"
        ) from None
    except OSError as error:
        raise DataError(
            f"cairosvg cannot load the cairo library ({error}); "
            "install it with `sudo apt-get install -y libcairo2`"
        ) from None


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _select(
    themes: Sequence[str], icons_root: Path, max_per_context: int, min_per_context: int
) -> list[IconRecord]:
    """The records to draw: one label and one picture per theme for each text, capped."""
    records = [record for theme in themes for record in read_icons(theme, icons_root)]
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        votes[record.text][record.context] += 1
    label = {text: min(c, key=lambda name: (-c[name], name)) for text, c in votes.items()}
    # A text is one name: one label (the majority), one picture per theme.
    seen: set[tuple[str, str]] = set()
    kept = []
    # The shortest name of a picture first: ``folder-music`` before ``folder-blue-music``.
    for record in sorted(records, key=lambda record: (record.theme, len(record.name), record.name)):
        if record.context == label[record.text] and (record.theme, record.text) not in seen:
            seen.add((record.theme, record.text))
            kept.append(record)
    texts: dict[str, list[str]] = defaultdict(list)
    for text in sorted({record.text for record in kept}):
        texts[label[text]].append(text)
    themes_of = Counter(record.text for record in kept)
    chosen: set[str] = set()
    for names in texts.values():
        if len(names) >= min_per_context:
            # Names drawn by several themes first, then by hash, not by seed: the seed changes
            # the split, never which icons are in the set.
            names.sort(key=lambda text: (-themes_of[text], _hash(text)))
            chosen.update(names[:max_per_context])
    kept = [record for record in kept if record.text in chosen]
    kept.sort(key=lambda record: (record.context, _hash(record.text), record.theme))
    return kept


def build_icons_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    max_per_context: int = 400,
    min_per_context: int = 30,
    themes: Sequence[str] | None = None,
    icons_root: str | Path = ICONS_ROOT,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the icons data set: one PNG per icon and a manifest per split.

    The files are ``out_dir/images/<id>.png`` (``id``: theme and name, e.g.
    ``papirus-applications-graphics``) and ``out_dir/{train,val,test}.csv`` with columns
    ``id, image, text, context`` (image paths relative to ``out_dir``). With the defaults, about
    3,500 icons of 9 contexts, split 70/15/15 by name across themes, stratified by context.
    Files already there with the same names are overwritten.

    Args:
        out_dir: Folder to write into; created if needed.
        seed: Seed of the split; same arguments give byte-identical manifests.
        image_size: Side of the square RGB images in pixels (at least 16).
        max_per_context: Keep at most this many names per context: those most themes draw,
            then by a hash of the name (the same for every seed); each name brings one icon
            per theme that has it.
        min_per_context: Drop the contexts with fewer names than this.
        themes: Theme folders to read (default: the four of :data:`THEMES`).
        icons_root: The folder holding the themes.
        limit: Keep only every k-th icon so that about ``limit`` remain (still covering every
            context), for quick tests; ``None`` keeps all.
        progress: Show a tqdm progress bar.

    Returns:
        Split name (``train``, ``val``, ``test``) → path of its CSV manifest.

    Raises:
        DataError: A theme is missing (the message gives the ``apt-get`` line), cairo cannot
            be loaded, or no context keeps enough names.
        MissingDependencyError: ``cairosvg`` is not installed.
        ConfigError: An integer argument is invalid or ``themes`` is empty.

    Examples:
        >>> paths = build_icons_dataset("/tmp/icons", limit=200, progress=False)  # doctest: +SKIP
        >>> paths["train"].name  # doctest: +SKIP
        'train.csv'
    """
    check_int("image_size", image_size, 16)
    check_int("seed", seed, -(2**63))
    check_int("max_per_context", max_per_context, 1)
    check_int("min_per_context", min_per_context, 1)
    if limit is not None:
        check_int("limit", limit, 1)
    themes = list(dict.fromkeys(THEMES if themes is None else themes))
    if not themes:
        raise ConfigError("themes must name at least one icon theme, got none")
    _check_renderer()
    records = _select(themes, Path(icons_root), max_per_context, min_per_context)
    if not records:
        raise DataError(
            f"no context of the themes {themes} under {icons_root} has {min_per_context} or "
            f"more icon names; install them with `sudo apt-get install -y {' '.join(APT_PACKAGES)}`"
        )
    if limit is not None and limit < len(records):
        step = len(records) / limit
        records = [records[int(k * step)] for k in range(limit)]

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ids: dict[IconRecord, str] = {}  # the icons drawn
    taken: set[str] = set()
    failed: list[str] = []
    with tqdm(total=len(records), desc="icons", unit="img", disable=not progress) as bar:
        for record in records:
            slug = _UNSAFE.sub("-", f"{record.theme} {record.text}".lower()).strip("-")
            ident = slug if slug not in taken else f"{slug}-{_hash(record.text)[:8]}"
            taken.add(ident)
            try:
                _render(record.path, image_size).save(out / f"images/{ident}.png", format="PNG")
            except Exception as error:  # one broken file must not stop the build
                failed.append(f"{record.path} ({type(error).__name__}: {error})")
            else:
                ids[record] = ident
            bar.update(1)
    if failed:
        _LOG.warning("icons: %d file(s) could not be drawn, e.g. %s", len(failed), failed[0])
    manifests: dict[str, Path] = {}
    # Whole names per split, stratified by context (one context per name, see _select).
    splits = grouped_split(
        list(ids), lambda record: record.text, lambda record: record.context,
        f"fusionkit-icons:{seed}",
    )
    for split, members in splits.items():
        rows = [
            [ids[record], f"images/{ids[record]}.png", record.text, record.context]
            for record in sorted(members, key=lambda record: ids[record])
        ]
        manifests[split] = write_manifest(
            out / f"{split}.csv", ["id", "image", "text", *ICONS_TASKS], rows
        )
    return manifests
