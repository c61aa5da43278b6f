"""Robustness on the emoji set: corrupted test texts or images, CMA-CLIP vs ``concat`` fusion.

Takes the models that ``benchmarks/accuracy_emoji.py`` trained on clean data (texts with the
``flag:`` prefix) and evaluates them on copies of the test split where a fraction p of the
samples is corrupted in one modality:

- text: the text is replaced by the text of another test sample of a different group (a
  misleading title, not an empty one);
- image: the image is heavily blurred (Gaussian, radius 12 % of the side) or mostly hidden behind
  a grey square (60-80 % of each side), one or the other at random.

The corrupted samples at p = 0.25 are among those at 0.5, and so on (nested subsets), so the
curves differ only by the added corruption. Reported: group and subgroup accuracy and
CMA-CLIP's mean modality weights (text / image) per p. Writes
``docs/results/robustness_emoji.md`` and ``docs/results/robustness_emoji.png``.

Run from the repository root after ``benchmarks/accuracy_emoji.py``:
``python benchmarks/robustness_emoji.py`` (a minute or two on 2 CPU cores).
"""

from __future__ import annotations

import csv
import os
import random
import shutil
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path("runs/emoji")
DATA = ROOT / "data-flag"
WORK = ROOT / "robustness"
OUT = Path("docs/results/robustness_emoji.md")
CHART = Path("docs/results/robustness_emoji.png")
MODELS = ("cma_clip", "concat")
KINDS = ("text", "image")
RATES = (0.0, 0.25, 0.5, 0.75)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _corrupt_image(source: Path, target: Path, rng: random.Random) -> None:
    from PIL import Image, ImageDraw, ImageFilter

    with Image.open(source) as raw:
        image = raw.convert("RGB")
    side = image.width
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=0.12 * side))
    else:
        width, height = side * rng.uniform(0.6, 0.8), image.height * rng.uniform(0.6, 0.8)
        left, top = rng.uniform(0, side - width), rng.uniform(0, image.height - height)
        ImageDraw.Draw(image).rectangle([left, top, left + width, top + height], fill=(128,) * 3)
    image.save(target, format="PNG")


def corrupted_manifest(kind: str, rate: float, seed: int = 0) -> Path:
    """Write a copy of the test manifest with a fraction ``rate`` of one modality corrupted.

    Args:
        kind: ``"text"`` or ``"image"``.
        rate: Fraction of test samples to corrupt.
        seed: Seed of which samples, and how.

    Returns:
        The manifest path (image paths absolute, corrupted images beside it).
    """
    rows = _read(DATA / "test.csv")
    order = list(range(len(rows)))
    random.Random(f"emoji-robustness:{seed}").shuffle(order)
    chosen = set(order[: round(rate * len(rows))])
    folder = WORK / f"{kind}-{rate}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    out_rows = []
    for index, row in enumerate(rows):
        row = {**row, "image": str((DATA / row["image"]).absolute())}
        rng = random.Random(f"emoji-robustness:{seed}:{kind}:{index}")
        if index in chosen and kind == "text":
            others = [other for other in rows if other["group"] != row["group"]]
            row["text"] = rng.choice(others)["text"]
        elif index in chosen:
            target = (folder / "images" / Path(row["image"]).name).absolute()
            _corrupt_image(Path(row["image"]), target, rng)
            row["image"] = str(target)
        out_rows.append(row)
    path = folder / "test.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(out_rows)
    return path


def _plot(results: dict[str, dict[str, dict[float, dict[str, Any]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(KINDS), figsize=(10, 7), sharex=True)
    for column, kind in enumerate(KINDS):
        top, bottom = axes[0][column], axes[1][column]
        for model in MODELS:
            for task, style in (("group", "-o"), ("subgroup", "--s")):
                values = [results[model][kind][rate]["tasks"][task]["accuracy"] for rate in RATES]
                top.plot(RATES, values, style, label=f"{model} {task}")
        top.set_title(f"corrupted test {kind}s: accuracy")
        top.set_ylim(0, 1.02)
        top.grid(alpha=0.3)
        top.legend(fontsize=7)
        for modality in ("text", "image"):
            values = [
                results["cma_clip"][kind][rate]["tasks"]["group"]["modality_weights"][modality]
                for rate in RATES
            ]
            bottom.plot(RATES, values, "-o", label=f"{modality} weight (group)")
        bottom.set_title(f"corrupted test {kind}s: CMA-CLIP modality weights")
        bottom.set_xlabel("fraction of test samples corrupted")
        bottom.set_ylim(0, 1)
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=7)
    figure.tight_layout()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(CHART, dpi=110)
    plt.close(figure)


def main() -> None:
    """Corrupt, evaluate both models at every rate, write the table and the chart.

    Example:
        >>> main()  # doctest: +SKIP
    """
    from fusionkit.io import atomic_write_text
    from fusionkit.training import evaluate_checkpoint

    results: dict[str, dict[str, dict[float, dict[str, Any]]]] = {m: {} for m in MODELS}
    for kind in KINDS:
        for rate in RATES:
            manifest = corrupted_manifest(kind, rate)
            for model in MODELS:
                run = ROOT / f"flag-{model}"
                results[model].setdefault(kind, {})[rate] = evaluate_checkpoint(
                    run / "best", manifest, output=manifest.parent / f"report-{model}.json"
                )
    lines = [
        "# Emoji: robustness to a corrupted modality",
        "",
        "The models of the emoji accuracy table (texts with the `flag:` prefix, trained on "
        "clean data) evaluated on copies of the test split where a fraction p of the samples "
        "has a misleading text (another test sample's text, of a different group) or a "
        "destroyed image (heavy blur or a grey square over most of it). Command: "
        "`python benchmarks/robustness_emoji.py`.",
        "",
        "| corrupted | p | CMA-CLIP group | concat group | CMA-CLIP subgroup | "
        "concat subgroup | CMA-CLIP weights group (text / image) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        for rate in RATES:
            full, concat = results["cma_clip"][kind][rate], results["concat"][kind][rate]
            weights = full["tasks"]["group"]["modality_weights"]
            lines.append(
                f"| {kind} | {rate:.2f} | {full['tasks']['group']['accuracy']:.3f} | "
                f"{concat['tasks']['group']['accuracy']:.3f} | "
                f"{full['tasks']['subgroup']['accuracy']:.3f} | "
                f"{concat['tasks']['subgroup']['accuracy']:.3f} | "
                f"{weights['text']:.2f} / {weights['image']:.2f} |"
            )
    lines += ["", "![Accuracy and modality weights vs p](robustness_emoji.png)", ""]
    atomic_write_text(OUT, "\n".join(lines))
    _plot(results)


if __name__ == "__main__":
    main()
