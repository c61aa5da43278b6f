"""Accuracy of CMA-CLIP and its ablations on the emoji set (real images, real texts).

Builds the emoji set (``fusionkit data emoji``) with and without the ``flag:`` prefix in the
texts of flags (which names their group outright), trains every config of
``configs/ablations/`` on each (frozen offline backbones and the feature cache: only the fusion
and the heads train) and evaluates the best checkpoint on the test split. Reported per model:
group and subgroup accuracy, macro-F1, recall at 90 % precision and the mean modality weights.
Writes ``docs/results/emoji.md``, ``docs/results/emoji_accuracy.png`` and the raw reports to
``runs/emoji/results.json`` (the robustness benchmark and ``fusionkit explain`` reuse the runs).

Run from the repository root: ``python benchmarks/accuracy_emoji.py``. On 2 shared CPU cores,
encoding a variant's images once takes a few minutes; each model then trains in well under two
minutes from the feature cache. ``--models cma_clip concat`` or ``--variants flag`` run a subset;
``--explain-only`` only redraws ``docs/results/explain_example.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path("runs/emoji")
CONFIGS = Path("configs/ablations")
OUT = Path("docs/results/emoji.md")
CHART = Path("docs/results/emoji_accuracy.png")
EXPLAIN = Path("docs/results/explain_example.png")
#: The test emoji drawn by ``fusionkit explain``: a full-body cat on a mostly white square, so
#: attention on the glyph and attention on the background are easy to tell apart.
EXPLAIN_ID = "1f408"
RESULTS = ROOT / "results.json"
MODELS = (
    "cma_clip",
    "image_only",
    "text_only",
    "concat",
    "no_modality_attention",
    "no_sequence_attention",
)
#: Data variant → whether the ``flag:`` prefix is dropped from the texts of flags.
VARIANTS = {"flag": False, "noflag": True}
TASKS = ("group", "subgroup")


def build_data(variant: str) -> dict[str, Path]:
    """Build one variant of the emoji set, or reuse it when it is already there.

    Reuse matters: the feature cache is keyed by the manifests' modification times, so
    rewriting identical files would re-encode every image.

    Args:
        variant: A key of :data:`VARIANTS`.

    Returns:
        Split → manifest path.
    """
    from fusionkit.data.emoji import build_emoji_dataset

    folder = ROOT / f"data-{variant}"
    existing = {split: folder / f"{split}.csv" for split in ("train", "val", "test")}
    if all(path.is_file() for path in existing.values()):
        return existing
    return build_emoji_dataset(folder, drop_flag_prefix=VARIANTS[variant], progress=False)


def run_model(name: str, variant: str, paths: dict[str, Path]) -> dict[str, Any]:
    """Train one ablation config on one data variant and evaluate it on the test split.

    Args:
        name: A config of ``configs/ablations`` (without ``.yaml``).
        variant: The data variant.
        paths: Split → manifest of that variant.

    Returns:
        The evaluation report plus ``train_seconds`` and ``best_val``.
    """
    from fusionkit.io import read_yaml
    from fusionkit.training import Trainer, build_run_config, evaluate_checkpoint

    config = read_yaml(CONFIGS / f"{name}.yaml")
    config["data"] = {**config["data"], **{split: str(path) for split, path in paths.items()}}
    run = ROOT / f"{variant}-{name}"
    start = time.perf_counter()
    result = Trainer(build_run_config(config), run, progress=False).fit()
    seconds = time.perf_counter() - start
    report = evaluate_checkpoint(run / "best", paths["test"], output=run / "report.json")
    return {**report, "train_seconds": round(seconds, 1), "best_val": result.best_score}


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _weights(report: dict[str, Any], task: str) -> str:
    weights = report["tasks"][task]["modality_weights"]
    return " / ".join(f"{weights.get(m, 0.0):.2f}" for m in ("text", "image"))


def _verdict(reports: dict[str, dict[str, Any]]) -> str:
    """One sentence per data variant: the full model against the best single modality, concat."""
    accuracy = {name: report["tasks"]["group"]["accuracy"] for name, report in reports.items()}
    if not {"cma_clip", "image_only", "text_only", "concat"} <= set(accuracy):
        return ""
    single = max(("image_only", "text_only"), key=lambda name: accuracy[name])
    full = accuracy["cma_clip"]
    beats = full > accuracy[single] and full > accuracy["concat"]
    return (
        f"Group accuracy: full CMA-CLIP {full:.3f}, best single modality ({single}) "
        f"{accuracy[single]:.3f}, concat {accuracy['concat']:.3f}: the full model "
        f"{'beats both' if beats else 'does not beat both'}; the target of 0.95 is "
        f"{'reached' if full >= 0.95 else 'not reached'}."
    )


def write_report(results: dict[str, dict[str, dict[str, Any]]], counts: dict[str, int]) -> None:
    """Write the Markdown table and the bar chart.

    Args:
        results: Variant → model → report.
        counts: Split → number of emoji.
    """
    from fusionkit.io import atomic_write_text

    lines = [
        "# Emoji: CMA-CLIP and its ablations",
        "",
        "Real images and texts built offline from Debian packages "
        "(`fusionkit data emoji`): one Noto Color Emoji image per fully-qualified emoji, its "
        "CLDR name and keywords as text; tasks `group` (9 classes) and `subgroup` "
        f"(~99). Splits by base emoji: train {counts['train']}, val {counts['val']}, "
        f"test {counts['test']}. Backbones: frozen EfficientNet-Lite0 (ImageNet, 224 px: 7x7 "
        "image tokens) and all-MiniLM-L6-v2; only fusion and heads train "
        "(`configs/ablations/*.yaml`, 8 epochs, seed 0, best epoch by validation accuracy). "
        "Test-split metrics; R@P90 is the mean over classes of recall at 90 % precision; "
        "weights are the mean modality weights (text / image) of the task; train s is the "
        "wall time of training, including the one-off feature encoding of the first model "
        "that needs a given set of features (2 CPU cores shared with other jobs).",
        "",
        "`noflag`: the `flag:` prefix and the `flag` keyword removed from the texts of flags, "
        "which otherwise name their group outright. `concat` replaces the modality-wise "
        "attention by concatenation; `no_modality_attention` by a fixed equal-weight mean.",
        "",
        f"Command: `python benchmarks/accuracy_emoji.py` on {platform.machine()} CPU "
        f"({os.cpu_count()} cores).",
        "",
    ]
    for variant, reports in results.items():
        lines += [
            f"## Texts: {variant}",
            "",
            "| model | group acc | group macro-F1 | group R@P90 | subgroup acc | "
            "subgroup macro-F1 | subgroup R@P90 | weights group (text / image) | train s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, report in reports.items():
            group, subgroup = report["tasks"]["group"], report["tasks"]["subgroup"]
            lines.append(
                f"| {name} | {_cell(group['accuracy'])} | {_cell(group['macro_f1'])} | "
                f"{_cell(group['recall_at_precision']['0.9'])} | {_cell(subgroup['accuracy'])} | "
                f"{_cell(subgroup['macro_f1'])} | "
                f"{_cell(subgroup['recall_at_precision']['0.9'])} | {_weights(report, 'group')} "
                f"| {report['train_seconds']:.0f} |"
            )
        verdict = _verdict(reports)
        lines += ["", verdict, ""] if verdict else [""]
    lines += ["![Accuracy per model](emoji_accuracy.png)", ""]
    atomic_write_text(OUT, "\n".join(lines))
    _plot(results)


def _plot(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(
        1, len(results), figsize=(6 * len(results), 4), sharey=True, squeeze=False
    )
    for axis, (variant, reports) in zip(axes[0], results.items(), strict=True):
        names = list(reports)
        positions = np.arange(len(names))
        for offset, task in ((-0.2, "group"), (0.2, "subgroup")):
            values = [reports[name]["tasks"][task]["accuracy"] or 0.0 for name in names]
            bars = axis.bar(positions + offset, values, width=0.4, label=task)
            axis.bar_label(bars, fmt="%.2f", fontsize=7)
        axis.set_xticks(positions, names, rotation=30, ha="right")
        axis.set_title(f"emoji test accuracy (texts: {variant})")
        axis.set_ylim(0, 1.05)
        axis.legend(loc="lower right")
    figure.tight_layout()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(CHART, dpi=110)
    plt.close(figure)


def _glyph_cells(result: Any) -> Any:
    """Grid cells whose patch of the model's input holds any non-white pixel (the glyph)."""
    rows, cols = result.grid
    height, width = result.image.shape[:2]
    gray = result.image[: height // rows * rows, : width // cols * cols].min(axis=2)
    return (gray.reshape(rows, height // rows, cols, width // cols) < 0.94).any(axis=(1, 3))


def explain_example() -> dict[str, Any]:
    """Draw ``fusionkit explain`` for one test emoji, and measure it over the whole test split.

    The measure: the share of the chosen word's image attention that falls on grid cells
    covering the glyph, against the share of cells that cover it (what uniform attention
    would give), averaged over the test emoji.

    Returns:
        The example's token and predictions, and both shares (example and test mean).
    """
    import csv

    from fusionkit.explain import explain
    from fusionkit.training import Predictor

    data = ROOT / "data-flag"
    with (data / "test.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    predictor = Predictor.from_pretrained(ROOT / "flag-cma_clip", device="cpu")
    on_glyph, area = [], []
    for row in rows:
        result = explain(predictor, data / row["image"], row["text"])
        covered = _glyph_cells(result)
        on_glyph.append(float(result.heatmap[covered].sum() / result.heatmap.sum()))
        area.append(float(covered.mean()))
    row = next(r for r in rows if r["id"] == EXPLAIN_ID)
    result = explain(predictor, data / row["image"], row["text"], EXPLAIN)
    covered = _glyph_cells(result)
    return {
        "id": EXPLAIN_ID,
        "text": row["text"],
        "token": result.token,
        "grid": result.grid,
        "attention_on_glyph_cells": round(float(result.heatmap[covered].sum()
                                                / result.heatmap.sum()), 3),
        "glyph_cells_fraction": round(float(covered.mean()), 3),
        "test_mean_attention_on_glyph_cells": round(sum(on_glyph) / len(on_glyph), 3),
        "test_mean_glyph_cells_fraction": round(sum(area) / len(area), 3),
        "test_samples": len(rows),
        "predictions": result.predictions,
    }


def main(argv: list[str] | None = None) -> None:
    """Build the data, train and evaluate every model, write the report.

    Args:
        argv: Command-line arguments (``--models``, ``--variants``).

    Example:
        >>> main(["--models", "cma_clip", "--variants", "flag"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--explain-only", action="store_true", help="only redraw the explanation example"
    )
    args = parser.parse_args(argv)
    if args.explain_only:
        print(json.dumps(explain_example(), indent=2))
        return

    # Results of earlier runs are kept, so a subset can be rerun without losing the others.
    results: dict[str, dict[str, dict[str, Any]]] = (
        json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    )
    counts: dict[str, int] = {}
    for variant in args.variants:
        paths = build_data(variant)
        counts = {split: sum(1 for _ in path.open()) - 1 for split, path in paths.items()}
        for name in args.models:
            report = run_model(name, variant, paths)
            results.setdefault(variant, {})[name] = report
            print(
                f"{variant} {name}: group {report['tasks']['group']['accuracy']:.3f} "
                f"subgroup {report['tasks']['subgroup']['accuracy']:.3f} "
                f"({report['train_seconds']:.0f} s)",
                flush=True,
            )
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2))
    ordered = {
        variant: {name: results[variant][name] for name in MODELS if name in results[variant]}
        for variant in VARIANTS
        if variant in results
    }
    write_report(ordered, counts)
    if "cma_clip" in results.get("flag", {}):
        print(json.dumps(explain_example(), indent=2))


if __name__ == "__main__":
    main()
