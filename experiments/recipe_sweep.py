"""How the default recipe was chosen: candidate recipes on the real sets, val and test.

Each candidate is a preset plus a few changed keys (a partial run config). Every candidate is
trained as ``fusionkit train --preset P`` would train it, with the data set's zero-config
tasks, and evaluated on val (what the choice was made on) and test. Reported per candidate:
the model's accuracy (its blend of heads, or its fused head when it has none), and the fused
head's and each modality head's accuracy on test. Writes ``docs/results/recipe.md`` and
``runs/recipe/results.json``.

Run from the repository root::

    python -m experiments.recipe_sweep --datasets emoji synthetic icons --seeds 0

A run whose ``test_report.json`` exists is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from experiments.accuracy_presets import DATASETS, manifests

ROOT = Path("runs/recipe")
OUT = Path("docs/results/recipe.md")
RESULTS = ROOT / "results.json"
#: Candidate → (preset, changes): a preset with one change. The first, with no preset and an
#: empty config, is what ``fusionkit train`` did before presets (frozen encoders, no unimodal
#: heads, learned summaries, best/ by val accuracy, every epoch trained). The presets keep the
#: epoch of best blended val accuracy; the candidates marked "by log-loss" keep the epoch of
#: lowest blended val log-loss instead, as the presets first did; those marked "EMA" validate
#: and keep a moving average of the weights with that decay (``train.ema_decay``).
BY_LOSS = {"best_metric": "loss"}
CANDIDATES: dict[str, tuple[str | None, dict[str, Any]]] = {
    "before presets": (None, {}),
    "fast": ("fast", {}),
    "fast, best/ by val log-loss": ("fast", {"train": BY_LOSS}),
    "fast by log-loss, no unimodal heads": (
        "fast", {"unimodal_heads": None, "train": BY_LOSS}),
    "fast by log-loss, unimodal loss 0.5": (
        "fast", {"unimodal_heads": {"loss_weight": 0.5}, "train": BY_LOSS}),
    "fast by log-loss, modality dropout 0.3": (
        "fast", {"train": {**BY_LOSS, "modality_dropout": 0.3}}),
    "fast by log-loss, dropout 0.3": ("fast", {
        "head": {"dropout": 0.3},
        "fusion": {"dim": 256, "sequence": {"name": "transformer", "dropout": 0.3}},
        "train": BY_LOSS,
    }),
    "fast, no unimodal heads": ("fast", {"unimodal_heads": None}),
    "medium": ("medium", {}),
    "medium, best/ by val log-loss": ("medium", {"train": BY_LOSS}),
    "medium, no unimodal heads": ("medium", {"unimodal_heads": None}),
    "medium, EMA of weights 0.99": ("medium", {"train": {"ema_decay": 0.99}}),
    "medium, EMA of weights 0.97": ("medium", {"train": {"ema_decay": 0.97}}),
    "medium, EMA of weights 0.9": ("medium", {"train": {"ema_decay": 0.9}}),
    "medium, label smoothing 0.1": ("medium", {"train": {"label_smoothing": 0.1}}),
}


def run_candidate(dataset: str, name: str, seed: int) -> dict[str, Any]:
    """Train one candidate; its val report (after the blend fit) and test report."""
    from fusionkit.training import Trainer, build_run_config, evaluate_checkpoint

    slug = name.replace(" ", "_").replace(",", "").replace("/", "").replace("(", "").replace(
        ")", "")
    run = ROOT / dataset / f"{slug}-s{seed}"
    done = run / "test_report.json"
    if done.is_file():
        return json.loads(done.read_text())
    preset, changes = CANDIDATES[name]
    paths = manifests(dataset)
    config = build_run_config(
        changes, train=paths["train"], val=paths["val"], tasks=DATASETS[dataset]["tasks"],
        seed=seed, preset=preset,
    )
    start = time.perf_counter()
    trainer = Trainer(config, run, progress=False)
    result = trainer.fit()
    seconds = time.perf_counter() - start
    test = evaluate_checkpoint(run, paths["test"], output=run / "test.json")
    record = {
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "epochs": len(result.history),
        "val": trainer.val_report["mean"]["accuracy"] if trainer.val_report else None,
        "test": test["mean"]["accuracy"],
        "test_heads": {t: r.get("sources") for t, r in test["tasks"].items()},
    }
    done.write_text(json.dumps(record, indent=2))
    return record


def _head(records: list[dict[str, Any]], source: str) -> str:
    values = [
        statistics.fmean(h[source] for h in r["test_heads"].values())
        for r in records if all(r["test_heads"].values())
    ]
    return f"{statistics.fmean(values):.3f}" if values else "-"


def write_report(results: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """Write ``docs/results/recipe.md``."""
    lines = [
        "# Choosing the default recipe",
        "",
        "Candidate recipes, each a preset with one change, trained as `fusionkit train "
        "--preset P --train train --val val --tasks T` would train them. `val` is the model's "
        "mean validation accuracy (the choice was made on it), `test` its test accuracy; the "
        "`heads` columns give, on test, the fused head alone and each modality's own head "
        "(models with unimodal heads only). Means over the seeds listed; `epochs` is how many "
        "ran before early stopping. Time is the wall time of training on a 2-core CPU that "
        "ran up to three such jobs at once, so it varies by 2-3x with the load and does not "
        "compare rows; the first run of a data set also encodes the frozen features once.",
        "",
        "Command: `python -m experiments.recipe_sweep`.",
        "",
    ]
    for dataset, by_name in results.items():
        lines += [f"## {dataset}", "",
                  "| candidate | seeds | val | test | fused head | text head | image head | "
                  "epochs | train s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, records in by_name.items():
            val = statistics.fmean(r["val"] for r in records)
            test = statistics.fmean(r["test"] for r in records)
            epochs = statistics.fmean(r["epochs"] for r in records)
            seconds = statistics.fmean(r["train_seconds"] for r in records)
            heads = " | ".join(_head(records, s) for s in ("fused", "text", "image"))
            lines.append(f"| {name} | {len(records)} | {val:.3f} | {test:.3f} | {heads} | "
                         f"{epochs:.1f} | {seconds:.0f} |")
        lines.append("")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Run the sweep and write the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["emoji", "synthetic", "icons"],
                        choices=list(DATASETS))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES),
                        choices=list(CANDIDATES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.report_only:
        for dataset in args.datasets:
            for name in args.candidates:
                records = [run_candidate(dataset, name, seed) for seed in args.seeds]
                results.setdefault(dataset, {})[name] = records
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=2))
                print(dataset, name, [(r["val"], r["test"]) for r in records], flush=True)
    write_report(results)


if __name__ == "__main__":
    main()
