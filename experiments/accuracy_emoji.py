"""Accuracy of CMA-CLIP and its ablations on the emoji set (real images, real texts).

Builds the emoji set (``fusionkit data emoji``) with and without the ``flag:`` prefix in the
texts of flags (which names their group outright), trains every config of
``configs/ablations/`` on each (frozen EfficientNet-Lite0 read from the feature cache,
all-MiniLM-L6-v2 fine-tuned, fusion and heads trained) and evaluates it on the test split.
Protocol: the configs' schedule (10 epochs, learning rates) was chosen on the validation split;
the benchmarked models are then fit on train + val for that fixed schedule and their final
weights (``last/``) are evaluated. The validation split is inside their training data, so the
validation numbers of their training logs only show fitting. Reported per model: group and
subgroup accuracy, macro-F1, recall at 90 % precision and the mean modality weights, as means
over training seeds, and the full model compared sample by sample with text_only, concat and
sequence_concat (McNemar's exact test over the same test emoji and seeds). Writes
``docs/results/emoji.md``, ``docs/results/emoji_accuracy.png`` and the raw reports to
``runs/emoji/results.json`` (the robustness benchmark and ``fusionkit explain`` reuse the
seed-0 runs).

Run from the repository root: ``python -m experiments.accuracy_emoji``. On 2 shared CPU cores,
encoding a variant's images once takes a few minutes; each model then trains in a few minutes.
``--models cma_clip concat``, ``--variants flag`` or ``--seeds 0 1 2`` run a subset (a run
whose report exists is reused, so an interrupted benchmark continues where it stopped);
``--explain-only`` only redraws ``docs/results/explain_example.png``, ``--no-explain`` skips it.

The means over seeds, the sign test, the Markdown page and its chart are in
:mod:`experiments.accuracy_emoji_report`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from experiments.accuracy_emoji_report import plot_accuracy, report_text, sign_test, summarise

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
#: The evaluated checkpoint of every run: the final weights of the fixed schedule.
CHECKPOINT = "last"
MODELS = (
    "cma_clip",
    "image_only",
    "text_only",
    "concat",
    "sequence_concat",
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
        Split → manifest path, with ``trainval`` (the train rows, then the val rows).
    """
    import csv

    from fusionkit.data import write_manifest
    from fusionkit.data.emoji import build_emoji_dataset

    folder = ROOT / f"data-{variant}"
    paths = {split: folder / f"{split}.csv" for split in ("train", "val", "test")}
    if not all(path.is_file() for path in paths.values()):
        paths = dict(build_emoji_dataset(folder, drop_flag_prefix=VARIANTS[variant],
                                         progress=False))
    trainval = folder / "trainval.csv"
    if not trainval.is_file():
        rows = []
        for split in ("train", "val"):
            with paths[split].open(newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                columns = next(reader)
                rows += list(reader)
        write_manifest(trainval, columns, rows)
    return {**paths, "trainval": trainval}


def run_dir(variant: str, name: str, seed: int) -> Path:
    """The run folder of one model, data variant and seed."""
    return ROOT / f"{variant}-{name}-s{seed}"


def run_model(name: str, variant: str, paths: dict[str, Path], seed: int) -> dict[str, Any]:
    """Fit one ablation config on train + val of one data variant; evaluate it on test.

    A run whose ``report.json`` exists is not trained again: its report is returned.

    Args:
        name: A config of ``configs/ablations`` (without ``.yaml``).
        variant: The data variant.
        paths: Split → manifest of that variant (see :func:`build_data`).
        seed: ``train.seed`` (model init, shuffling, dropout).

    Returns:
        The evaluation report plus ``seed`` and ``train_seconds``.
    """
    from fusionkit.io import read_yaml
    from fusionkit.training import Trainer, build_run_config, evaluate_checkpoint

    run = run_dir(variant, name, seed)
    done = run / "report.json"
    if done.is_file():
        return json.loads(done.read_text())
    config = read_yaml(CONFIGS / f"{name}.yaml")
    config["data"] = {**config["data"], "train": str(paths["trainval"]),
                      "val": str(paths["val"]), "test": str(paths["test"])}
    config["train"] = {**config["train"], "seed": seed}
    # Predictions kept from an earlier training of this folder would not be this run's.
    (run / "test_predictions.json").unlink(missing_ok=True)
    start = time.perf_counter()
    Trainer(build_run_config(config), run, progress=False).fit()
    seconds = time.perf_counter() - start
    # report.json marks a finished run, so it is written once, whole, with the seed in it.
    report = evaluate_checkpoint(run / CHECKPOINT, paths["test"], output=run / "test.json")
    report = {**report, "seed": seed, "train_seconds": round(seconds, 1)}
    done.write_text(json.dumps(report, indent=2))
    return report


def late_fusion(variant: str, seed: int, test: Path) -> dict[str, float] | None:
    """Accuracy of multiplying the text-only and image-only models' test probabilities.

    A reference for what the two modalities hold together when each is learned on its own:
    no fusion is trained and nothing is tuned (the plain product of the two softmaxes).

    Args:
        variant: The data variant.
        seed: The seed of both unimodal runs.
        test: The test manifest.

    Returns:
        Task → accuracy, or None when either run is missing.
    """
    runs = [run_dir(variant, name, seed) for name in ("text_only", "image_only")]
    if not all((run / CHECKPOINT).is_dir() for run in runs):
        return None
    rows = _rows(test)
    outputs = [predictions_on_test(run, test) for run in runs]
    accuracy = {}
    for task in TASKS:
        correct = 0
        for row, text_out, image_out in zip(rows, *outputs, strict=True):
            scores = text_out[task]["scores"]
            product = {c: scores[c] * image_out[task]["scores"][c] for c in scores}
            correct += max(product, key=product.__getitem__) == row[task]
        accuracy[task] = correct / len(rows)
    return accuracy


def _rows(manifest: Path) -> list[dict[str, str]]:
    import csv

    with manifest.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def predictions_on_test(run: Path, test: Path) -> list[dict[str, Any]]:
    """The predictions of a run's evaluated checkpoint for every test sample, in manifest order.

    Computed once and kept in the run folder (``test_predictions.json``).

    Args:
        run: A run folder of :func:`run_dir`.
        test: The test manifest.

    Returns:
        Per sample, task → ``{"label", "score", "scores"}`` (see ``Predictor.predict``).
    """
    from fusionkit.serving import Predictor

    cache = run / "test_predictions.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    rows = _rows(test)
    predictor = Predictor.from_pretrained(run / CHECKPOINT, device="cpu")
    modalities = predictor.model.modalities
    outputs = predictor.predict(
        images=[test.parent / row["image"] for row in rows] if "image" in modalities else None,
        texts=[row["text"] for row in rows] if "text" in modalities else None,
    )
    cache.write_text(json.dumps(outputs))
    return outputs


def paired_comparison(
    variant: str, first: str, second: str, seeds: list[int], test: Path, task: str = "group"
) -> dict[str, Any]:
    """Compare two models sample by sample, pooled over seeds (McNemar's exact test).

    Args:
        variant: The data variant.
        first: The model compared (a name of :data:`MODELS`).
        second: The model it is compared with.
        seeds: Seeds both models were trained with.
        test: The test manifest.
        task: The task whose predictions are compared.

    Returns:
        ``seeds``, ``wins`` (first right, second wrong, summed over seeds), ``losses`` (the
        reverse) and ``p`` (:func:`sign_test`).
    """
    rows = _rows(test)
    wins = losses = 0
    for seed in seeds:
        ours, theirs = (predictions_on_test(run_dir(variant, name, seed), test)
                        for name in (first, second))
        for row, mine, other in zip(rows, ours, theirs, strict=True):
            right, other_right = mine[task]["label"] == row[task], other[task]["label"] == row[task]
            wins += right and not other_right
            losses += other_right and not right
    return {"seeds": seeds, "wins": wins, "losses": losses, "p": sign_test(wins, losses)}


#: What the full model is compared with, sample by sample, in the report.
PAIRED = ("text_only", "concat", "sequence_concat")


def write_report(
    results: dict[str, dict[str, dict[str, Any]]],
    counts: dict[str, int],
    late_fusions: dict[str, dict[str, dict[str, float]]] | None = None,
    comparisons: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> None:
    """Write the Markdown table and the bar chart.

    Args:
        results: Variant → model → :func:`summarise` of its seeds.
        counts: Split → number of emoji.
        late_fusions: Variant → seed → :func:`late_fusion` accuracies (optional).
        comparisons: Variant → compared model → :func:`paired_comparison` of the full model
            with it (optional).
    """
    from fusionkit.io import atomic_write_text

    atomic_write_text(OUT, report_text(results, counts, late_fusions, comparisons))
    plot_accuracy(results, CHART)


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

    from fusionkit.serving import Predictor, explain

    data = ROOT / "data-flag"
    with (data / "test.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    predictor = Predictor.from_pretrained(run_dir("flag", "cma_clip", 0) / CHECKPOINT, device="cpu")
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
    """Build the data, train and evaluate every model and seed, write the report.

    Args:
        argv: Command-line arguments (``--models``, ``--variants``, ``--seeds``).

    Examples:
        >>> main(["--models", "cma_clip", "--variants", "flag", "--seeds", "0"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--explain-only", action="store_true", help="only redraw the explanation example"
    )
    parser.add_argument(
        "--no-explain", action="store_true", help="do not redraw the explanation example"
    )
    args = parser.parse_args(argv)
    if args.explain_only:
        print(json.dumps(explain_example(), indent=2))
        return

    # Results of earlier runs are kept, so a subset can be rerun without losing the others.
    results: dict[str, dict[str, dict[str, dict[str, Any]]]] = (
        json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    )
    counts: dict[str, int] = {}
    for variant in args.variants:
        paths = build_data(variant)
        counts = {split: sum(1 for _ in path.open()) - 1 for split, path in paths.items()}
        for seed in args.seeds:
            for name in args.models:
                report = run_model(name, variant, paths, seed)
                results.setdefault(variant, {}).setdefault(name, {})[str(seed)] = report
                print(
                    f"{variant} {name} seed {seed}: group "
                    f"{report['tasks']['group']['accuracy']:.3f} subgroup "
                    f"{report['tasks']['subgroup']['accuracy']:.3f} "
                    f"({report['train_seconds']:.0f} s)",
                    flush=True,
                )
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=2))
    summaries = {
        variant: {
            name: summarise([results[variant][name][seed]
                             for seed in sorted(results[variant][name], key=int)])
            for name in MODELS
            if name in results[variant]
        }
        for variant in VARIANTS
        if variant in results
    }
    late_fusions: dict[str, dict[str, dict[str, float]]] = {}
    for variant in summaries:
        for seed in sorted(results[variant].get("text_only", {}), key=int):
            accuracy = late_fusion(variant, int(seed), ROOT / f"data-{variant}" / "test.csv")
            if accuracy is not None:
                late_fusions.setdefault(variant, {})[seed] = accuracy
    comparisons: dict[str, dict[str, dict[str, Any]]] = {}
    for variant in summaries:
        test = ROOT / f"data-{variant}" / "test.csv"
        for name in PAIRED:
            if "cma_clip" in summaries[variant] and name in summaries[variant]:
                seeds = sorted(set(summaries[variant]["cma_clip"]["seeds"])
                               & set(summaries[variant][name]["seeds"]))
                if seeds:
                    comparisons.setdefault(variant, {})[name] = paired_comparison(
                        variant, "cma_clip", name, seeds, test
                    )
    write_report(summaries, counts, late_fusions, comparisons)
    if "0" in results.get("flag", {}).get("cma_clip", {}) and not args.no_explain:
        print(json.dumps(explain_example(), indent=2))


if __name__ == "__main__":
    main()
