"""Robustness on the emoji set: corrupted test texts or images, CMA-CLIP vs concat fusion.

Evaluates six models on copies of the test split where a fraction p of the samples is
corrupted in one modality:

- ``cma_clip``, ``concat`` (the concat fusion baseline: pooled features, no attention) and
  ``sequence_concat`` (CMA-CLIP with concatenation in place of the modality-wise attention):
  the seed-0 models of ``experiments/accuracy_emoji.py`` (texts with the ``flag:`` prefix),
  trained on clean data;
- ``cma_clip+swap``, ``concat+swap`` and ``sequence_concat+swap``: the same configs fit here
  (on train + val, final weights evaluated, as in the accuracy benchmark) with
  ``train.modality_swap: 0.2`` (20 % of training samples get another sample's text, labels
  kept), so the models have met misleading texts before the test.

Corruptions:

- text: the text is replaced by the text of another test sample of a different group (a
  misleading title, not an empty one);
- image: the image is heavily blurred (Gaussian, radius 12 % of the side) or mostly hidden behind
  a grey square (60-80 % of each side), one or the other at random.

The corrupted samples at p = 0.25 are among those at 0.5, and so on (nested subsets), so the
curves differ only by the added corruption. Reported: group and subgroup accuracy and the mean
modality weights (text / image) of the CMA-CLIP models per p, and their text weight on the
corrupted and on the clean samples of each corrupted test set (does the weight react to the
sample?). Writes
``docs/results/robustness_emoji.md`` and ``docs/results/robustness_emoji.png``.

Run from the repository root after ``experiments/accuracy_emoji.py``:
``python -m experiments.robustness_emoji`` (about 30 minutes on 2 CPU cores: three trainings,
48 evaluations and 12 prediction passes).
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
#: The evaluated checkpoint, as in ``accuracy_emoji.py``: the final weights of the fixed
#: schedule fit on train + val.
CHECKPOINT = "last"
OUT = Path("docs/results/robustness_emoji.md")
CHART = Path("docs/results/robustness_emoji.png")
MODELS = (
    "cma_clip",
    "concat",
    "sequence_concat",
    "cma_clip+swap",
    "concat+swap",
    "sequence_concat+swap",
)
#: ``train.modality_swap`` of the ``+swap`` models.
SWAP = 0.2
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


def corrupted_rows(rows: list[dict[str, str]]) -> list[bool]:
    """Which rows of a :func:`corrupted_manifest` were corrupted, in manifest order."""
    clean = _read(DATA / "test.csv")
    return [
        row["text"] != original["text"]
        or Path(row["image"]) != (DATA / original["image"]).absolute()
        for row, original in zip(rows, clean, strict=True)
    ]


def weights_by_corruption(predictor: Any, manifest: Path) -> dict[str, float]:
    """Mean group-task text weight of a model on the corrupted and on the clean samples.

    Args:
        predictor: A ``fusionkit.serving.Predictor`` of the model.
        manifest: A :func:`corrupted_manifest` with some samples corrupted and some not.

    Returns:
        ``{"corrupted": ..., "clean": ...}``.
    """
    rows = _read(manifest)
    outputs = predictor.predict(images=[row["image"] for row in rows],
                                texts=[row["text"] for row in rows])
    split: dict[str, list[float]] = {"corrupted": [], "clean": []}
    for output, corrupted in zip(outputs, corrupted_rows(rows), strict=True):
        split["corrupted" if corrupted else "clean"].append(
            output["group"]["modality_weights"]["text"]
        )
    return {name: sum(values) / len(values) for name, values in split.items()}


def model_run(model: str) -> Path:
    """The run folder of ``model``; the ``+swap`` models are trained on first use.

    Args:
        model: A name of :data:`MODELS`.

    Returns:
        The run folder (its :data:`CHECKPOINT` is evaluated).
    """
    from fusionkit.io import read_yaml
    from fusionkit.training import Trainer, build_run_config

    base, _, swap = model.partition("+")
    if not swap:
        return ROOT / f"flag-{base}-s0"
    run = ROOT / f"flag-{base}-swap-s0"
    config = read_yaml(Path("configs/ablations") / f"{base}.yaml")
    config["data"] = {**config["data"], "train": str(DATA / "trainval.csv"),
                      **{split: str(DATA / f"{split}.csv") for split in ("val", "test")}}
    config["train"] = {**config["train"], "seed": 0, "modality_swap": SWAP,
                       "swap_modality": "text"}
    # A finished run resumes at its last epoch and returns at once; an interrupted one continues.
    Trainer(build_run_config(config), run, resume=True, progress=False).fit()
    return run


def _plot(results: dict[str, dict[str, dict[float, dict[str, Any]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(KINDS), figsize=(11, 8), sharex=True)
    configs = [model for model in MODELS if "+" not in model]
    for column, kind in enumerate(KINDS):
        top, bottom = axes[0][column], axes[1][column]
        for model in MODELS:
            values = [results[model][kind][rate]["tasks"]["group"]["accuracy"] for rate in RATES]
            # One colour per config; solid lines for the +swap models.
            colour = f"C{configs.index(model.partition('+')[0])}"
            top.plot(RATES, values, "-o" if "swap" in model else "--s", color=colour,
                     label=model)
        top.set_title(f"corrupted test {kind}s: group accuracy")
        top.set_ylim(0, 1.02)
        top.grid(alpha=0.3)
        top.legend(fontsize=7)
        for model in ("cma_clip", "cma_clip+swap"):
            values = [
                results[model][kind][rate]["tasks"]["group"]["modality_weights"]["text"]
                for rate in RATES
            ]
            bottom.plot(RATES, values, "-o" if "swap" in model else "--s", color="C0",
                        label=f"{model}: text weight (group)")
        bottom.set_title(f"corrupted test {kind}s: CMA-CLIP text weight (image = 1 - text)")
        bottom.set_xlabel("fraction of test samples corrupted")
        bottom.set_ylim(0, 1)
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=7)
    figure.tight_layout()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(CHART, dpi=110)
    plt.close(figure)


def main() -> None:
    """Corrupt, evaluate every model at every rate, write the table and the chart.

    Examples:
        >>> main()  # doctest: +SKIP
    """
    from fusionkit.io import atomic_write_text
    from fusionkit.serving import Predictor
    from fusionkit.training import evaluate_checkpoint

    results: dict[str, dict[str, dict[float, dict[str, Any]]]] = {m: {} for m in MODELS}
    runs = {model: model_run(model) for model in MODELS}
    for kind in KINDS:
        for rate in RATES:
            manifest = corrupted_manifest(kind, rate)
            for model, run in runs.items():
                results[model].setdefault(kind, {})[rate] = evaluate_checkpoint(
                    run / CHECKPOINT, manifest, output=manifest.parent / f"report-{model}.json"
                )
    lines = [
        "# Emoji: robustness to a corrupted modality",
        "",
        "Models of the emoji accuracy table (texts with the `flag:` prefix, seed 0) evaluated "
        "on copies of the test split where a fraction p of the samples has a misleading text "
        "(another test sample's text, of a different group) or a destroyed image (heavy blur "
        "or a grey square over most of it). `concat` is the concat fusion baseline (pooled "
        "features, no attention), `sequence_concat` CMA-CLIP with concatenation in place of "
        "the modality-wise attention. The first three were trained on clean data; `+swap` is "
        f"the same config trained with `train.modality_swap: {SWAP}` (that "
        "share of training samples gets another sample's text, labels kept). Group accuracy "
        "per model; weights are the mean group-task modality weights (text / image) of the "
        "CMA-CLIP models. Command: `python -m experiments.robustness_emoji`.",
        "",
        "| corrupted | p | " + " | ".join(MODELS) + " | cma_clip weights | "
        "cma_clip+swap weights |",
        "|---|---|" + "---|" * (len(MODELS) + 2),
    ]
    for kind in KINDS:
        for rate in RATES:
            accuracies = " | ".join(
                f"{results[model][kind][rate]['tasks']['group']['accuracy']:.3f}"
                for model in MODELS
            )
            weights = " | ".join(
                "{text:.2f} / {image:.2f}".format(
                    **results[model][kind][rate]["tasks"]["group"]["modality_weights"]
                )
                for model in ("cma_clip", "cma_clip+swap")
            )
            lines.append(f"| {kind} | {rate:.2f} | {accuracies} | {weights} |")
    lines += [
        "",
        "Does the modality-wise attention react to the sample in front of it? The mean "
        "group-task text weight of the CMA-CLIP models on the corrupted samples and on the "
        "clean samples of the same corrupted test set:",
        "",
        "| corrupted | p | cma_clip: corrupted / clean | cma_clip+swap: corrupted / clean |",
        "|---|---|---|---|",
    ]
    predictors = {model: Predictor.from_pretrained(runs[model] / CHECKPOINT, device="cpu")
                  for model in ("cma_clip", "cma_clip+swap")}
    for kind in KINDS:
        for rate in RATES[1:]:
            manifest = WORK / f"{kind}-{rate}" / "test.csv"
            cells = " | ".join(
                "{corrupted:.3f} / {clean:.3f}".format(**weights_by_corruption(predictor,
                                                                              manifest))
                for predictor in predictors.values()
            )
            lines.append(f"| {kind} | {rate:.2f} | {cells} |")
    lines += ["", "![Accuracy and modality weights vs p](robustness_emoji.png)", ""]
    atomic_write_text(OUT, "\n".join(lines))
    _plot(results)


if __name__ == "__main__":
    main()
