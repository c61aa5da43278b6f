"""Would a late fusion over separately trained models lift the zero-config model?

The measurement that chose ``train.unimodal_models`` for every preset. For every finished seed
of the presets sweep (``experiments.accuracy_presets``), this blends the zero-config command's
fused model (what the command trained before ``train.unimodal_models``) with the text-only
and / or the image-only model trained with the same preset and seed, per task with weights fit
on val (`fusionkit.training.blend.fit_blend`, as the late fusion of the presets page), and
scores each blend on test beside the fused model alone and the late fusion of the two unimodal
models. Nothing is trained: the runs' val and test predictions are read. Writes
``docs/results/member_blend.md`` and ``runs/presets/member_blend.json``.

Run from the repository root, after the presets sweep::

    python -m experiments.member_blend
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from experiments.accuracy_emoji_report import sign_test
from experiments.accuracy_presets import (
    BASELINES,
    DATASETS,
    RESULTS,
    ROOT,
    correct_flags,
    finished_seeds,
    late_fusion,
    paired_counts,
    run_dir,
)

OUT = Path("docs/results/member_blend.md")
JSON = ROOT / "member_blend.json"
#: Blend name → the runs it blends (late fusion is the presets page's baseline).
BLENDS: dict[str, tuple[str, ...]] = {
    "late_fusion": ("text_only", "image_only"),
    "fused model + text_only": ("zero-config", "text_only"),
    "fused model + image_only": ("zero-config", "image_only"),
    "fused model + both": ("zero-config", "text_only", "image_only"),
}
#: The blend compared sample by sample with the best baseline.
CANDIDATE = "fused model + both"


def blend_cell(dataset: str, preset: str, seeds: list[int]) -> dict[str, Any]:
    """Every blend of one data set and preset on test, per seed, and the paired comparison of
    :data:`CANDIDATE` with the best baseline of each seed (the presets page's baselines)."""
    presets = json.loads(RESULTS.read_text())[dataset][preset]
    rows: dict[str, list[float]] = {"fused model": [], **{b: [] for b in BLENDS}}
    wins = losses = 0
    for seed in seeds:
        tasks = list(presets["fused_model"]["runs"][0]["heads"])
        ours = correct_flags(dataset, run_dir(dataset, preset, "zero-config", seed), tasks)
        rows["fused model"].append(statistics.fmean(
            statistics.fmean(flags.values()) for flags in ours.values()))
        flags: dict[str, dict[str, dict[str, float]]] = {}
        for name, models in BLENDS.items():
            fused = late_fusion(dataset, preset, seed, tasks, models)
            rows[name].append(statistics.fmean(fused["accuracy"].values()))
            flags[name] = fused["correct"]
        for model in ("text_only", "image_only"):
            flags[model] = correct_flags(dataset, run_dir(dataset, preset, model, seed), tasks)
        accuracy = {m: statistics.fmean(statistics.fmean(f.values()) for f in flags[m].values())
                    for m in BASELINES}
        best = max(BASELINES, key=accuracy.__getitem__)
        won, lost = paired_counts(flags[CANDIDATE], flags[best])
        wins, losses = wins + won, losses + lost
    seconds = {m: statistics.fmean(r["train_seconds"] for r in presets[m]["runs"])
               for m in ("fused_model", "text_only", "image_only")}
    return {
        "seeds": seeds,
        "accuracy": {name: {"runs": values, "mean": statistics.fmean(values),
                            "sd": statistics.pstdev(values)} for name, values in rows.items()},
        "best_single": {m: presets[m]["mean"] for m in ("text_only", "image_only")},
        "paired": {"wins": wins, "losses": losses, "p": sign_test(wins, losses)},
        "train_seconds": seconds,
    }


def _cell(summary: dict[str, Any]) -> str:
    return f"{summary['mean']:.3f} ± {summary['sd']:.3f}"


def write_report(results: dict[str, dict[str, Any]]) -> None:
    """Write ``docs/results/member_blend.md``."""
    lines = [
        "# A late fusion over the fused model and separately trained unimodal models",
        "",
        "The measurement that chose `train.unimodal_models` for every preset. For every "
        "finished seed of the presets page, the test probabilities of the zero-config "
        "command's fused model (`fused model`: what the command trained before "
        "`train.unimodal_models`) blended, per task with weights fit on val like the page's "
        "late fusion, with those of the text-only and / or image-only model trained with the "
        "same preset and seed. `fused model + both` is what the zero-config command now "
        "gives. Test accuracy, mean ± sd (population) over seeds; `late fusion` is the "
        "presets page's baseline, the blend of the two unimodal models alone. The blend of all "
        "three contains that baseline (the same runs, the same seeds), so its val log-loss, "
        "which the fit minimises, cannot be worse; the test split says whether that holds out "
        "of sample. `verdict` compares it "
        "with the best of the page's three baselines (text-only, image-only, late fusion); "
        "`paired` counts, over the same test samples and seeds, where it is right and the best "
        "baseline of that seed is wrong (won) and the reverse (lost), with McNemar's exact "
        "two-sided p. `train s` is the mean wall time of training the fused, text-only "
        "and image-only models (the presets page's, on a shared 2-core CPU): what the command "
        "that trains all three costs.",
        "",
        "Command: `python -m experiments.member_blend` (after `python -m "
        "experiments.accuracy_presets`).",
        "",
        "| data set | preset | seeds | fused model | late fusion | fused model + text_only | "
        "fused model + image_only | fused model + both | verdict | paired (won / lost, p) | "
        "train s (fused + text + image) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, by_preset in results.items():
        for preset, cell in by_preset.items():
            acc = cell["accuracy"]
            best = max(acc["late_fusion"]["mean"], *cell["best_single"].values())
            verdict = ("≥ best baseline" if acc[CANDIDATE]["mean"] >= best - 1e-9
                       else "**below best baseline**")
            seconds = cell["train_seconds"]
            paired = cell["paired"]
            lines.append(
                f"| {dataset} | {preset} | {len(cell['seeds'])} | "
                + " | ".join(_cell(acc[n]) for n in ("fused model", *BLENDS))
                + f" | {verdict} | {paired['wins']} / {paired['losses']}, p = {paired['p']:.2f}"
                f" | {seconds['fused_model']:.0f} + {seconds['text_only']:.0f} + "
                f"{seconds['image_only']:.0f} |"
            )
    OUT.write_text("\n".join([*lines, ""]))


def main(argv: list[str] | None = None) -> None:
    """Blend every finished cell of the presets sweep and write the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--presets", nargs="+", default=["fast", "medium", "best"])
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    for dataset in args.datasets:
        for preset in args.presets:
            seeds = sorted(finished_seeds(dataset, preset))
            if seeds:
                results.setdefault(dataset, {})[preset] = blend_cell(dataset, preset, seeds)
                means = {n: round(s["mean"], 4)
                         for n, s in results[dataset][preset]["accuracy"].items()}
                print(dataset, preset, seeds, means, flush=True)
    JSON.write_text(json.dumps(results, indent=2))
    write_report(results)


if __name__ == "__main__":
    main()
