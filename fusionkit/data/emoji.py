"""A real image+text data set built offline from Debian packages: every emoji, drawn and named.

Three packages hold everything needed, so the set is built on any Debian or Ubuntu machine
without a download:

- ``unicode-data``: ``/usr/share/unicode/emoji/emoji-test.txt`` lists every emoji with its
  group (9 classes) and subgroup (about 100 classes): the labels;
- ``fonts-noto-color-emoji``: ``NotoColorEmoji.ttf``, a bitmap colour font that Pillow draws at
  its one native size (109) with ``embedded_color=True``: the images;
- ``unicode-cldr-core``: the CLDR English annotations, each emoji's name and keywords: the
  texts.

Variants of one emoji (skin tones, man/woman/person, hair styles) look and read alike, so a
split that put one variant in training and another in test would leak the answer. Splits are
therefore made over *base* emoji (the code points with those modifiers taken out), stratified
by subgroup so that every split covers the groups in proportion and the training split holds
every subgroup.

Examples:
    >>> paths = build_emoji_dataset("/tmp/emoji", progress=False)  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['test', 'train', 'val']
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features
from tqdm.auto import tqdm

from fusionkit.data.manifest import write_manifest
from fusionkit.data.splits import check_int, grouped_split
from fusionkit.errors import DataError

__all__ = [
    "APT_PACKAGES",
    "EMOJI_TASKS",
    "EmojiRecord",
    "base_key",
    "build_emoji_dataset",
    "read_emoji",
]

#: The Debian packages the builder reads.
APT_PACKAGES = ("fonts-noto-color-emoji", "unicode-data", "unicode-cldr-core")
#: The label columns of the manifests.
EMOJI_TASKS = ("group", "subgroup")

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLDR_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
# Names and keywords of sequences (flags, ZWJ sequences, skin-tone variants) live here.
CLDR_DERIVED = Path("/usr/share/unicode/cldr/common/annotationsDerived/en.xml")

# The only size at which the bitmap font has glyphs; any other size fails to load.
_FONT_SIZE = 109
_FLAG_PREFIX = "flag: "
_LINE = re.compile(
    r"^(?P<points>[0-9A-F ]+?)\s*;\s*(?P<status>[a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(?P<name>.+)$"
)
_SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
_HAIR = frozenset(range(0x1F9B0, 0x1F9B4))
_GENDER_SIGNS = frozenset((0x2640, 0x2642))
_ZWJ, _VS16 = 0x200D, 0xFE0F
# Gendered people and their neutral form: "man technologist" is a variant of "technologist".
_NEUTRAL = {
    0x1F468: 0x1F9D1,  # man -> person
    0x1F469: 0x1F9D1,  # woman -> person
    0x1F466: 0x1F9D2,  # boy -> child
    0x1F467: 0x1F9D2,  # girl -> child
    0x1F474: 0x1F9D3,  # old man -> older person
    0x1F475: 0x1F9D3,  # old woman -> older person
}


@dataclass(frozen=True)
class EmojiRecord:
    """One fully-qualified emoji of ``emoji-test.txt``.

    Args:
        points: Its code points.
        name: Its CLDR short name, e.g. ``"grinning face"``.
        group: Its group, e.g. ``"Smileys & Emotion"``.
        subgroup: Its subgroup, e.g. ``"face-smiling"``.

    Examples:
        >>> EmojiRecord((0x1F600,), "grinning face", "Smileys & Emotion", "face-smiling").text
        '😀'
    """

    points: tuple[int, ...]
    name: str
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        """The emoji as a string."""
        return "".join(map(chr, self.points))

    @property
    def id(self) -> str:
        """A unique file-name-safe name: the code points in hex, joined by ``_``."""
        return "_".join(f"{point:04x}" for point in self.points)

    @property
    def has_skin_tone(self) -> bool:
        """Whether a skin-tone modifier is one of its code points."""
        return any(point in _SKIN_TONES for point in self.points)


def base_key(points: Sequence[int]) -> tuple[int, ...]:
    """The base emoji of a variant: skin tones, gender, hair and presentation taken out.

    Args:
        points: The emoji's code points.

    Returns:
        The code points of its base: variants of one emoji share it.

    Examples:
        >>> base_key((0x1F469, 0x1F3FD, 0x200D, 0x1F4BB)) == base_key((0x1F9D1, 0x200D, 0x1F4BB))
        True
    """
    kept: list[int] = []
    for point in points:
        if point in _SKIN_TONES or point == _VS16:
            continue
        if point in _GENDER_SIGNS or point in _HAIR:
            # A sign or hair style joined by ZWJ: drop the joiner too.
            if kept and kept[-1] == _ZWJ:
                kept.pop()
            continue
        kept.append(_NEUTRAL.get(point, point))
    return tuple(kept) or tuple(points)


def _check_packages() -> None:
    missing = [
        path for path in (EMOJI_TEST, FONT, CLDR_ANNOTATIONS, CLDR_DERIVED) if not path.is_file()
    ]
    if missing:
        raise DataError(
            f"the emoji data set needs files that are not installed: "
            f"{', '.join(map(str, missing))}; install them with "
            f"`sudo apt-get install -y {' '.join(APT_PACKAGES)}`"
        )
    if not features.check("raqm"):
        # Without text shaping a flag or ZWJ sequence is drawn as several glyphs side by side.
        raise DataError(
            "Pillow lacks the raqm layout engine, needed to draw emoji sequences as one glyph; "
            "install it with `sudo apt-get install -y libraqm0`"
        )


def read_emoji(path: str | Path = EMOJI_TEST, *, skin_tones: bool = False) -> list[EmojiRecord]:
    """Read the fully-qualified emoji of ``emoji-test.txt``, in the file's order.

    The ``Component`` group (bare skin tones and hair styles) has no fully-qualified entry,
    so 9 groups remain.

    Args:
        path: The ``emoji-test.txt`` file.
        skin_tones: Keep the skin-tone variants (about 1,800 more emoji).

    Returns:
        The emoji records.

    Raises:
        DataError: The file cannot be read or holds no emoji.

    Examples:
        >>> records = read_emoji()  # doctest: +SKIP
        >>> len({record.group for record in records})  # doctest: +SKIP
        9
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}") from None
    records: list[EmojiRecord] = []
    group = subgroup = ""
    for line in lines:
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif (match := _LINE.match(line)) and match["status"] == "fully-qualified":
            points = tuple(int(cell, 16) for cell in match["points"].split())
            record = EmojiRecord(points, match["name"].strip(), group, subgroup)
            if skin_tones or not record.has_skin_tone:
                records.append(record)
    if not records:
        raise DataError(f"{path}: no fully-qualified emoji found; is it an emoji-test.txt file?")
    return records


def _read_annotations(*paths: Path) -> dict[str, tuple[str | None, list[str]]]:
    """Emoji (without U+FE0F) → (CLDR name or None, keywords) from CLDR annotation files."""
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for path in paths:
        try:
            root = ElementTree.parse(path).getroot()
        except (OSError, ElementTree.ParseError) as error:
            raise DataError(f"cannot read the CLDR annotations {path}: {error}") from None
        for node in root.iter("annotation"):
            key = node.get("cp", "").replace(chr(_VS16), "")
            cells = [cell.strip() for cell in (node.text or "").split("|") if cell.strip()]
            if node.get("type") == "tts":
                names.setdefault(key, cells[0] if cells else "")
            else:
                keywords.setdefault(key, cells)
    return {key: (names.get(key), keywords.get(key, [])) for key in {*names, *keywords}}


def _describe(
    record: EmojiRecord,
    annotations: dict[str, tuple[str | None, list[str]]],
    drop_flag_prefix: bool,
) -> str:
    """The text of one emoji: its CLDR name, then its keywords that do not repeat the name."""
    name, words = annotations.get(record.text.replace(chr(_VS16), ""), (None, []))
    name = name or record.name
    if drop_flag_prefix and name.startswith(_FLAG_PREFIX):
        # "flag: Germany" names the group outright; keep only what the flag stands for.
        name = name[len(_FLAG_PREFIX):]
        words = [word for word in words if word != "flag"]
    extra = [word for word in words if word.lower() != name.lower()]
    return f"{name}; {', '.join(extra)}" if extra else name


def _render(record: EmojiRecord, font: ImageFont.FreeTypeFont, size: int) -> Image.Image:
    """The emoji's glyph, centred on a white square of side ``size``."""
    left, top, right, bottom = font.getbbox(record.text)
    canvas = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((-left, -top), record.text, font=font, embedded_color=True)
    side = max(canvas.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(canvas, ((side - canvas.width) // 2, (side - canvas.height) // 2), canvas)
    return square.resize((size, size), Image.Resampling.LANCZOS)


def build_emoji_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    skin_tones: bool = False,
    drop_flag_prefix: bool = False,
    image_size: int = 128,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the emoji data set: one PNG per emoji and a manifest per split.

    The files are ``out_dir/images/<id>.png`` (``id``: the code points in hex) and
    ``out_dir/{train,val,test}.csv`` with columns ``id, image, text, group, subgroup`` (image
    paths relative to ``out_dir``). About 1,870 emoji without skin tones (3,650 with), split
    70/15/15 by base emoji (see :func:`base_key`), stratified by subgroup. Files already there
    with the same names are overwritten.

    Args:
        out_dir: Folder to write into; created if needed.
        seed: Seed of the split; same arguments give byte-identical files.
        skin_tones: Include the skin-tone variants (they follow their base into its split).
        drop_flag_prefix: Remove the ``flag:`` prefix and the ``flag`` keyword from the
            texts of flags, which otherwise name their group outright.
        image_size: Side of the square images in pixels (at least 16).
        limit: Keep only every k-th emoji so that about ``limit`` remain (still covering every
            group), for quick tests; ``None`` keeps all.
        progress: Show a tqdm progress bar.

    Returns:
        Split name (``train``, ``val``, ``test``) → path of its CSV manifest.

    Raises:
        DataError: A Debian package is missing (the message gives the ``apt-get`` line) or its
            files cannot be read.
        ConfigError: ``image_size``, ``seed`` or ``limit`` is invalid.

    Examples:
        >>> paths = build_emoji_dataset("/tmp/emoji", limit=100, progress=False)  # doctest: +SKIP
        >>> paths["train"].name  # doctest: +SKIP
        'train.csv'
    """
    check_int("image_size", image_size, 16)
    check_int("seed", seed, -(2**63))
    if limit is not None:
        check_int("limit", limit, 1)
    _check_packages()
    records = read_emoji(EMOJI_TEST, skin_tones=skin_tones)
    if limit is not None and limit < len(records):
        step = len(records) / limit
        records = [records[int(k * step)] for k in range(limit)]
    annotations = _read_annotations(CLDR_ANNOTATIONS, CLDR_DERIVED)
    font = ImageFont.truetype(str(FONT), _FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Path] = {}
    # Whole bases per split, stratified by subgroup: a base's variants never leak across.
    splits = grouped_split(
        records, lambda record: base_key(record.points), lambda record: record.subgroup,
        f"fusionkit-emoji:{seed}",
    )
    with tqdm(total=len(records), desc="emoji", unit="img", disable=not progress) as bar:
        for split, members in splits.items():
            rows = []
            for record in members:
                relative = f"images/{record.id}.png"
                _render(record, font, image_size).save(out / relative, format="PNG")
                text = _describe(record, annotations, drop_flag_prefix)
                rows.append([record.id, relative, text, record.group, record.subgroup])
                bar.update(1)
            manifests[split] = write_manifest(
                out / f"{split}.csv", ["id", "image", "text", *EMOJI_TASKS], rows
            )
    return manifests
