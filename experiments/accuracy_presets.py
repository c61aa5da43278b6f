"""Does fusion pay off out of the box? Every preset against its own unimodal models.

For each data set, preset and seed this trains, exactly as a new user would:

- ``zero-config``: ``fusionkit train --preset P --train train --val val --tasks T`` (no
  config): its fused model, then the two models below, blended on val
  (``train.unimodal_models``); the sweep trains the fused model alone (folder
  ``zero-config``) and blends it with the text-only and image-only runs, which are the models
  the command trains (the same configs, checked);
- ``text_only`` and ``image_only``: the same preset with ``vision: null`` / ``text: null``;

evaluates each on the test split, and adds ``late_fusion``: the text-only and image-only models'
probabilities blended per task with weights fit on the validation split (the blend of
`fusionkit.training.blend.fit_blend`, over two separately trained models). The zero-config
model is compared sample by sample with the best of the three (McNemar's exact test). Writes
``docs/results/presets.md`` and ``runs/presets/results.json``.

Run from the repository root::

    python -m experiments.accuracy_presets --datasets emoji icons synthetic --presets fast medium

A run whose ``test_report.json`` exists is reused, so an interrupted sweep continues where it
stopped, and a cell is summarised over the seeds asked for and every seed already finished (a
later ``--seeds 2`` adds seed 2 to seeds 0 and 1); ``--report-only`` rewrites the page from
the finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path("runs/presets")
OUT = Path("docs/results/presets.md")
RESULTS = ROOT / "results.json"
#: Data set → its named source and the tasks of the zero-config command.
DATASETS: dict[str, dict[str, Any]] = {
    "emoji": {"source": "emoji", "tasks": ["group"]},
    "icons": {"source": "icons", "tasks": ["context"]},
    "synthetic": {"source": "synthetic", "tasks": None},
}
#: Model → the config given with the preset. ``zero-config`` is the zero-config command's
#: fused model: the command then trains the text-only and image-only models below (the same
#: configs, checked by ``check_members``) and blends the three on val
#: (``train.unimodal_models``), so the sweep trains each model once and blends them as the
#: command does (:func:`zero_config`).
MODELS: dict[str, dict[str, Any] | None] = {
    "zero-config": {"train": {"unimodal_models": False}},
    "text_only": {"vision": None},
    "image_only": {"text": None},
}
#: The runs the zero-config command blends (its fused model first).
MEMBERS = ("zero-config", "text_only", "image_only")
#: Run → its name among a blend's sources, as in a run's ``members.json``.
SOURCE_NAMES = {"zero-config": "fused", "text_only": "text", "image_only": "image"}
BASELINES = ("text_only", "image_only", "late_fusion")
#: Data set → a shipped config written by hand, and the data set it was written and tuned for
#: (``--presets tuned``): trained on train with its own schedule, ``best/`` chosen on val like
#: the presets'.
TUNED: dict[str, tuple[str, str]] = {
    "emoji": ("configs/ablations/cma_clip.yaml", "emoji"),
    "icons": ("configs/ablations/cma_clip.yaml", "emoji"),
    "synthetic": ("configs/quickstart.yaml", "synthetic"),
}
#: What each data set is, for the page.
ABOUT = {
    "emoji": (
        "`emoji:` (`fusionkit data emoji`): 1,313 train / 297 val / 260 test emoji, Noto "
        "Color Emoji images, CLDR names and keywords as texts; task `group` (9 classes). "
        "For comparison, the tuned configs of `configs/ablations/` (fine-tuned MiniLM, fit on "
        "train + val for a schedule chosen on val, mean of 3 seeds; see the emoji results "
        "below): CMA-CLIP 0.951, text only 0.933, image only 0.787."
    ),
    "icons": (
        "`icons:` (`fusionkit data icons`): 2,447 train / 527 val / 523 test icons from the "
        "Papirus, Breeze, Moka and elementary themes, their names as texts; task `context` "
        "(9 freedesktop contexts); no name in two splits."
    ),
    "synthetic": (
        "`synthetic:` (the `make demo` catalogue): 1,200 / 300 / 300 products at 96 px with "
        "titles, 20% of titles and 20% of images spoiled; tasks `color`, `pattern` "
        "(multi-label) and `category`, accuracy averaged over the three; images at the "
        "backbone's 224 px (no config sets 96)."
    ),
}


def run_dir(dataset: str, preset: str, model: str, seed: int) -> Path:
    """The run folder of one data set, preset, model and seed."""
    return ROOT / dataset / preset / f"{model}-s{seed}"


def manifests(dataset: str) -> dict[str, str]:
    """Split → the named source of that split (generated on first use)."""
    source = DATASETS[dataset]["source"]
    return {split: f"{source}:{split}" for split in ("train", "val", "test")}


def _same_run_of_another_preset(
    dataset: str, preset: str, model: str, seed: int, config: dict[str, Any]
) -> Path | None:
    """A finished run of another preset whose resolved config is ``config``: the same
    training (the text-only model under ``medium`` and ``best``, which differ only in the image
    encoder), reused rather than trained again."""
    from fusionkit.training import build_run_config
    from fusionkit.training.presets import PRESETS

    for other in PRESETS:
        run = run_dir(dataset, other, model, seed)
        if (other != preset and (run / "test_report.json").is_file()
                and build_run_config(run / "config.yaml").to_dict() == config):
            return run
    return None


def run_model(dataset: str, preset: str, model: str, seed: int) -> dict[str, Any]:
    """Train one model as the CLI does, evaluate it on test, keep val and test predictions.

    Returns:
        The test report plus ``seed`` and ``train_seconds`` (wall time of ``fit``).
    """
    from fusionkit.training import build_run_config

    run = run_dir(dataset, preset, model, seed)
    done = run / "test_report.json"
    if done.is_file():
        return json.loads(done.read_text())
    paths = manifests(dataset)
    config = build_run_config(
        MODELS[model], train=paths["train"], val=paths["val"],
        tasks=DATASETS[dataset]["tasks"], seed=seed, preset=preset,
    )
    twin = _same_run_of_another_preset(dataset, preset, model, seed, config.to_dict())
    if twin is not None:
        shutil.copytree(twin, run, dirs_exist_ok=True)
        return json.loads(done.read_text())
    return _fit_and_test(config, run, paths, seed, predictions=True)


def _fit_and_test(
    config: Any, run: Path, paths: dict[str, str], seed: int, *, predictions: bool
) -> dict[str, Any]:
    """Train ``config`` into ``run``, evaluate it on test and write ``test_report.json``
    (with ``predictions``, also the val and test predictions, for the late fusion and the
    paired test).

    Returns:
        The test report plus ``seed`` and ``train_seconds`` (wall time of ``fit``).
    """
    from fusionkit.serving import Predictor
    from fusionkit.training import Trainer, evaluate_checkpoint

    start = time.perf_counter()
    Trainer(config, run, progress=False).fit()
    seconds = time.perf_counter() - start
    if predictions:
        predictor = Predictor.from_pretrained(run, device="cpu")
        for split in ("val", "test"):
            predictor.predict_manifest(paths[split], run / f"{split}_predictions.jsonl")
    report = evaluate_checkpoint(run, paths["test"], output=run / "test.json")
    report = {**report, "seed": seed, "train_seconds": round(seconds, 1)}
    (run / "test_report.json").write_text(json.dumps(report, indent=2))
    return report


def _predictions(run: Path, split: str) -> list[dict[str, Any]]:
    lines = (run / f"{split}_predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _labels(dataset: str, split: str, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Sample id → task → label cell, read through the data layer (sources resolved)."""
    from fusionkit.data import ManifestDataset, infer_tasks

    path = manifests(dataset)[split]
    specs = infer_tasks(manifests(dataset)["train"], tasks)
    data = ManifestDataset(path, specs, modalities=("text",))
    names = {t: spec.class_names() for t, spec in specs.items()}
    out = {}
    for record in data.records:
        out[record.id] = {
            t: ([names[t][k] for k in v] if isinstance(v, list) else names[t][v])
            for t, v in record.targets.items() if v is not None
        }
    return out


def _correct(entry: dict[str, Any], label: Any) -> float:
    if isinstance(label, list):
        predicted, truth = set(entry["labels"]), set(label)
        union = predicted | truth
        return len(predicted & truth) / len(union) if union else 1.0
    return float(entry["label"] == label)


def _scores(preds: dict[str, dict[str, Any]], ids: list[str], task: str, classes: list[str]) -> Any:
    import torch

    return torch.tensor([[preds[i][task]["scores"][c] for c in classes] for i in ids])


def late_fusion(
    dataset: str,
    preset: str,
    seed: int,
    tasks: list[str],
    models: tuple[str, ...] = ("text_only", "image_only"),
) -> dict[str, Any]:
    """Blend the finished runs of ``models`` (by default the text-only and image-only models)
    of one seed with weights fit on val.

    Returns:
        ``accuracy`` (task → test accuracy), ``weights`` (task → source → weight) and the
        per-sample ``correct`` flags on test (task → id → 0/1), for the paired comparison.
    """
    import torch

    from fusionkit.data import infer_tasks
    from fusionkit.models.blending import blend_probabilities
    from fusionkit.training.blend import fit_blend

    specs = infer_tasks(manifests(dataset)["train"], tasks)
    # Sources are named as in a run's members.json: "fused", "text", "image".
    runs = {SOURCE_NAMES.get(m, m): run_dir(dataset, preset, m, seed) for m in models}
    labels = {split: _labels(dataset, split, tasks) for split in ("val", "test")}
    preds = {
        split: {m: {p["id"]: p for p in _predictions(run, split)} for m, run in runs.items()}
        for split in ("val", "test")
    }
    result: dict[str, Any] = {"accuracy": {}, "weights": {}, "correct": {}}
    for task, spec in specs.items():
        classes = spec.class_names()
        ids = {s: [i for i in labels[s] if task in labels[s][i]] for s in labels}
        sources = {
            s: {m: _scores(preds[s][m], ids[s], task, classes) for m in runs} for s in labels
        }
        val = [labels["val"][i][task] for i in ids["val"]]
        if spec.multi_label:
            target = torch.tensor([[float(c in label) for c in classes] for label in val])
        else:
            target = torch.tensor([classes.index(label) for label in val])
        fitted = fit_blend(sources["val"], target, spec)
        mixed = blend_probabilities(
            sources["test"], fitted.weights, spec.multi_label, fitted.scale
        )
        flags = {}
        for row, sample in enumerate(ids["test"]):
            if spec.multi_label:
                entry = {"labels": [c for c, p in zip(classes, mixed[row], strict=True)
                                    if p >= 0.5]}
            else:
                entry = {"label": classes[int(mixed[row].argmax())]}
            flags[sample] = _correct(entry, labels["test"][sample][task])
        result["accuracy"][task] = sum(flags.values()) / len(flags)
        result["weights"][task] = {**fitted.weights, "scale": fitted.scale}
        result["correct"][task] = flags
    return result


def zero_config(dataset: str, preset: str, seed: int, tasks: list[str]) -> dict[str, Any]:
    """The zero-config command of one seed: its fused model blended on val with the text-only
    and image-only models it trains beside it (``train.unimodal_models``), as
    :func:`late_fusion` returns it.

    The blend is fit on the runs' saved val predictions (probabilities rounded to 6
    decimals), with the same :func:`~fusionkit.training.blend.fit_blend` the command runs on
    its val outputs.
    """
    check_members(dataset, preset, seed)
    return late_fusion(dataset, preset, seed, tasks, MEMBERS)


#: A config key that changes how data is loaded, not what is trained (augmentation draws are
#: seeded per sample): runs of an earlier default (``0``, now ``auto``) still count.
LOADING_ONLY = "num_workers"


def check_members(dataset: str, preset: str, seed: int) -> None:
    """Check that the text-only and image-only runs are the unimodal models the zero-config
    command trains: their configs are those of
    :func:`~fusionkit.training.members.member_configs` of the command's config, but for
    :data:`LOADING_ONLY`.

    Raises:
        AssertionError: A run's config differs.
    """
    from fusionkit.training import build_run_config
    from fusionkit.training.members import member_configs

    paths = manifests(dataset)
    command = build_run_config(train=paths["train"], val=paths["val"],
                               tasks=DATASETS[dataset]["tasks"], seed=seed, preset=preset)
    members = member_configs(command)
    assert members, f"the {preset} preset trains no unimodal models (train.unimodal_models)"
    for name, config in members.items():
        run = run_dir(dataset, preset, f"{name}_only", seed)
        ours, stored = config.to_dict(), build_run_config(run / "config.yaml").to_dict()
        for raw in (ours, stored):
            raw["data"].pop(LOADING_ONLY)
        assert ours == stored, f"{run}: not the {name}-only model of the command"


def correct_flags(dataset: str, run: Path, tasks: list[str]) -> dict[str, dict[str, float]]:
    labels = _labels(dataset, "test", tasks)
    flags: dict[str, dict[str, float]] = {t: {} for t in tasks}
    for pred in _predictions(run, "test"):
        for task in tasks:
            if task in labels.get(pred["id"], {}):
                flags[task][pred["id"]] = _correct(pred[task], labels[pred["id"]][task])
    return flags


def paired_counts(
    ours: dict[str, dict[str, float]], other: dict[str, dict[str, float]]
) -> tuple[int, int]:
    """Over every task and test sample of ``ours``: how often it is right where ``other`` is
    wrong (won), and the reverse (lost); the flags are task → sample id → 0/1 (or a
    multi-label sample's Jaccard score)."""
    wins = losses = 0
    for task, samples in ours.items():
        for sample, right in samples.items():
            wins += right > other[task][sample]
            losses += other[task][sample] > right
    return wins, losses


def tuned_dir(dataset: str, seed: int) -> Path:
    """The run folder of a data set's tuned config (see :data:`TUNED`) for one seed."""
    return ROOT / dataset / "tuned" / f"{Path(TUNED[dataset][0]).stem}-s{seed}"


def run_tuned(dataset: str, seed: int) -> dict[str, Any]:
    """Train the data set's tuned config on train (val picks ``best/``); evaluate on test.

    Returns:
        The test report plus ``seed`` and ``train_seconds`` (wall time of ``fit``).
    """
    from fusionkit.io import read_yaml
    from fusionkit.training import build_run_config

    run = tuned_dir(dataset, seed)
    done = run / "test_report.json"
    if done.is_file():
        return json.loads(done.read_text())
    raw = read_yaml(TUNED[dataset][0])
    # The config's own splits are replaced by this data set's (its other data keys are kept).
    raw["data"] = {k: v for k, v in raw.get("data", {}).items()
                   if k not in ("train", "val", "test")}
    paths = manifests(dataset)
    config = build_run_config(raw, train=paths["train"], val=paths["val"],
                              tasks=DATASETS[dataset]["tasks"], seed=seed)
    return _fit_and_test(config, run, paths, seed, predictions=False)


def evaluate_tuned(dataset: str, seeds: list[int]) -> dict[str, Any]:
    """Train (or reuse) the data set's tuned config for every seed; summarise over seeds."""
    runs = []
    for seed in seeds:
        report = run_tuned(dataset, seed)
        runs.append({"seed": seed, "accuracy": report["mean"]["accuracy"],
                     "train_seconds": report["train_seconds"]})
    config, tuned_on = TUNED[dataset]
    return {
        "config": config,
        "tuned_on": tuned_on,
        "runs": runs,
        "mean": statistics.fmean(r["accuracy"] for r in runs),
        "sd": statistics.pstdev(r["accuracy"] for r in runs) if len(runs) > 1 else 0.0,
    }


def _seeds_done(folder: Path, name: str) -> set[int]:
    """The seeds of the finished runs ``folder/<name>-s<seed>``."""
    return {int(done.parent.name.rsplit("-s", 1)[1])
            for done in folder.glob(f"{name}-s*/test_report.json")}


def finished_seeds(dataset: str, preset: str) -> set[int]:
    """The seeds of one data set and preset (or ``tuned``) whose every model has a finished
    run."""
    if preset == "tuned":
        return _seeds_done(tuned_dir(dataset, 0).parent, Path(TUNED[dataset][0]).stem)
    return set.intersection(*(_seeds_done(ROOT / dataset / preset, m) for m in MODELS))


def evaluate_cell(dataset: str, preset: str, seeds: list[int]) -> dict[str, Any]:
    """Train (or reuse) every model of one data set and preset; summarise over seeds."""
    from experiments.accuracy_emoji import sign_test

    per_model: dict[str, list[dict[str, Any]]] = {
        m: [] for m in ("zero-config", "fused_model", "text_only", "image_only", "late_fusion")
    }
    wins = losses = 0
    for seed in seeds:
        reports = {m: run_model(dataset, preset, m, seed) for m in MODELS}
        tasks = list(reports["zero-config"]["tasks"])
        for model, report in reports.items():
            per_model["fused_model" if model == "zero-config" else model].append({
                "seed": seed,
                "accuracy": report["mean"]["accuracy"],
                "train_seconds": report["train_seconds"],
                "heads": {t: r.get("sources") for t, r in report["tasks"].items()},
                "blend": {t: r.get("blend") for t, r in report["tasks"].items()},
            })
        blends = {"late_fusion": late_fusion(dataset, preset, seed, tasks),
                  "zero-config": zero_config(dataset, preset, seed, tasks)}
        for name, blend in blends.items():
            per_model[name].append({
                "seed": seed,
                "accuracy": statistics.fmean(blend["accuracy"].values()),
                "weights": blend["weights"],
            })
        per_model["zero-config"][-1]["train_seconds"] = sum(r["train_seconds"]
                                                            for r in reports.values())
        flags = {m: correct_flags(dataset, run_dir(dataset, preset, m, seed), tasks)
                 for m in ("text_only", "image_only")}
        flags["late_fusion"] = blends["late_fusion"]["correct"]
        best = max(BASELINES, key=lambda m: per_model[m][-1]["accuracy"])
        won, lost = paired_counts(blends["zero-config"]["correct"], flags[best])
        wins, losses = wins + won, losses + lost
    summary = {
        model: {
            "runs": runs,
            "mean": statistics.fmean(r["accuracy"] for r in runs),
            "sd": statistics.pstdev(r["accuracy"] for r in runs) if len(runs) > 1 else 0.0,
        }
        for model, runs in per_model.items()
    }
    summary["paired"] = {"wins": wins, "losses": losses, "p": sign_test(wins, losses)}
    return summary


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def write_report(results: dict[str, dict[str, Any]]) -> None:
    """Write ``docs/results/presets.md`` from the summaries."""
    lines = [
        "# Presets: does fusion pay off out of the box?",
        "",
        "For each data set and preset, the zero-config command (`fusionkit train --preset P "
        "--train train --val val --tasks T`, then `fusionkit evaluate` on test) against "
        "fusionkit's text-only and image-only models trained with the same preset "
        "(`vision: null` / `text: null`), and the late fusion of those two blended per task "
        "with weights fit on val. Test accuracy (mean over tasks), mean ± sd over seeds. "
        "The zero-config command trains a fused model, then the very same text-only and "
        "image-only models (`train.unimodal_models`, same configs and seeds: checked), and "
        "blends the three per task with weights fit on val; the sweep trains each model once "
        "and fits that blend on their saved val predictions, so the zero-config model "
        "contains the late fusion it is compared with. `fused model alone` is the command's "
        "fused model without the two unimodal models (what the command gave before "
        "`train.unimodal_models`), and `its heads` that model's own heads on test: the fused "
        "head alone and each modality's head alone (the fused model is their blend, fit on "
        "val). Time is the wall time of training the three models (`fit`), including the "
        "one-off encoding into the feature cache of the first run that needs it, on a shared "
        "2-core x86_64 CPU "
        f"(Python {platform.python_version()}), which ran two or three such jobs at once: "
        "times vary with that load. Paired: over the same test samples "
        "and seeds, the zero-config model right where the best baseline of that seed is wrong "
        "(won) and the reverse (lost); p is McNemar's exact two-sided test. A model whose "
        "resolved config is the same under two presets (the text-only model under `medium` "
        "and `best`, which differ only in the image encoder) is trained once, its run reused.",
        "",
        "Command: `python -m experiments.accuracy_presets`.",
        "",
    ]
    for dataset, by_preset in results.items():
        lines += [f"## {dataset}", "", ABOUT[dataset], ""]
        lines += [
            "| preset | seeds | zero-config | text_only | image_only | late fusion | "
            "verdict | paired (won / lost, p) | fused model alone | its heads (fused / text / "
            "image) | train s per zero-config run |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for preset, summary in by_preset.items():
            if preset == "tuned":
                continue
            ours, alone = summary["zero-config"], summary["fused_model"]
            best = max(BASELINES, key=lambda m: summary[m]["mean"])
            verdict = (
                f"≥ {best}" if ours["mean"] >= summary[best]["mean"] - 1e-9
                else f"**below {best}**"
            )
            heads = []
            for source in ("fused", "text", "image"):
                values = [
                    statistics.fmean(h[source] for h in run["heads"].values() if h)
                    for run in alone["runs"] if all(run["heads"].values())
                ]
                heads.append(_fmt(statistics.fmean(values)) if values else "-")
            seconds = statistics.fmean(r["train_seconds"] for r in ours["runs"])
            paired = summary["paired"]
            cells = [
                f"{_fmt(summary[m]['mean'])} ± {_fmt(summary[m]['sd'])}"
                for m in ("zero-config", *BASELINES)
            ]
            lines.append(
                f"| {preset} | {len(ours['runs'])} | " + " | ".join(cells)
                + f" | {verdict} | {paired['wins']} / {paired['losses']}, "
                f"p = {paired['p']:.2f} | {_fmt(alone['mean'])} ± {_fmt(alone['sd'])} | "
                f"{' / '.join(heads)} | {seconds:.0f} |"
            )
        lines.append("")
        tuned = by_preset.get("tuned")
        if tuned:
            per_seed = ", ".join(_fmt(r["accuracy"]) for r in tuned["runs"])
            seconds = statistics.fmean(r["train_seconds"] for r in tuned["runs"])
            lines += [
                f"The config written by hand for {tuned['tuned_on']} (`{tuned['config']}`; its "
                "own schedule, trained on train with `best/` chosen on val like the presets): "
                f"{_fmt(tuned['mean'])} ± {_fmt(tuned['sd'])} over {len(tuned['runs'])} "
                f"seeds ({per_seed}), {seconds:.0f} s of training per run.",
                "",
            ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Run the sweep and write the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--presets", nargs="+", default=["fast", "medium"],
                        help="presets, and `tuned` for the hand-written configs of TUNED")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the page from runs/presets/results.json")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.report_only:
        for dataset in args.datasets:
            for preset in args.presets:
                seeds = sorted(set(args.seeds) | finished_seeds(dataset, preset))
                summary = (evaluate_tuned(dataset, seeds) if preset == "tuned"
                           else evaluate_cell(dataset, preset, seeds))
                results.setdefault(dataset, {})[preset] = summary
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=2))
                means = (round(summary["mean"], 4) if preset == "tuned" else
                         {m: round(s["mean"], 4) for m, s in summary.items() if m != "paired"})
                print(dataset, preset, means, flush=True)
    write_report(results)


if __name__ == "__main__":
    main()
