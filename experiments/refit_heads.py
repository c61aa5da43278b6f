"""Does refitting the unimodal heads after the epochs (``train.refit_heads``) pay off?

For every zero-config run of the presets sweep (``experiments.accuracy_presets``) this loads
its ``best/``, refits the unimodal heads and the blend exactly as the trainer does with
``train.refit_heads: true`` (`fusionkit.training.refit.refit_model_heads`, then the blend fit
on val), and evaluates the result on the test split beside the run as trained. The training up
to ``best/`` is the same with or without the refit, so this is what a run with the option
would have given. Writes ``docs/results/refit_heads.md`` and ``runs/presets/refit_heads.json``.

Run from the repository root, after the presets sweep::

    python -m experiments.refit_heads --datasets emoji icons synthetic --presets fast medium
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

from experiments.accuracy_presets import DATASETS, RESULTS, ROOT, run_dir

OUT = Path("docs/results/refit_heads.md")
JSON = ROOT / "refit_heads.json"
#: Variant → options of the refit: ``refit`` is what ``train.refit_heads: true`` does;
#: ``continue`` starts from the trained heads; ``frozen`` refits only the heads over frozen
#: encoders.
VARIANTS: dict[str, dict[str, Any]] = {"refit": {}, "continue": {"restart": False},
                                       "frozen": {}}


def refit_run(run: Path, dataset: str) -> dict[str, Any]:
    """The run as trained and with its heads refit: val and test accuracy, each head alone."""
    import torch

    from fusionkit.models import build_model
    from fusionkit.training.distributed import DistContext
    from fusionkit.training.evaluate import compute_report
    from fusionkit.training.refit import refit_model_heads
    from fusionkit.training.run_config import build_run_config
    from fusionkit.training.sharding import load_weights
    from fusionkit.training.sources import build_sources
    from fusionkit.training.validation import gather_outputs, validation_report

    device, ctx = torch.device("cpu"), DistContext(0, 1, 0, torch.device("cpu"))
    config = build_run_config(run / "config.yaml")
    model = build_model(config)
    load_weights(model, run / "best")
    sources = build_sources(model, config.data, config.train, ctx, device)
    test_data = config.data.model_copy(update={"val": f"{DATASETS[dataset]['source']}:test"})
    test = build_sources(model, test_data, config.train, ctx, device).val

    def scores(model: Any, refit_blend: bool) -> dict[str, Any]:
        out = {"val": validation_report(
            model, gather_outputs(model, sources.val, sources.collate, ctx, device,
                                  batch_size=64), refit_blend=refit_blend)}
        out["test"] = compute_report(
            gather_outputs(model, test, sources.collate, ctx, device, batch_size=64),
            model.tasks, model.modalities)
        return {
            split: {"accuracy": report["mean"]["accuracy"],
                    "heads": {t: row["sources"] for t, row in report["tasks"].items()}}
            for split, report in out.items()
        }

    result: dict[str, Any] = {"as_trained": scores(model, refit_blend=False)}
    trained = copy.deepcopy(model.state_dict())
    for variant, options in VARIANTS.items():
        if variant == "frozen":
            options = {"modalities": model.frozen_modalities()}
        model.load_state_dict(trained)
        started = time.perf_counter()
        refits = refit_model_heads(model, copy.deepcopy(model.unimodal), sources, ctx, device,
                                   batch_size=64, seed=config.train.seed, **options)
        seconds = time.perf_counter() - started
        result[variant] = {
            **scores(model, refit_blend=True),
            "seconds": seconds,
            "heads": [{"modality": r.modality, "val_loss_before": r.val_loss_before,
                       "val_loss": r.val_loss, "epochs": r.epochs} for r in refits],
        }
    return result


def _mean(values: list[float]) -> str:
    sd = statistics.pstdev(values)
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _image(runs: dict[str, Any], which: str) -> float:
    """The image head's test accuracy (mean over tasks, then seeds)."""
    return statistics.mean(
        statistics.mean(h["image"] for h in run[which]["test"]["heads"].values())
        for run in runs.values()
    )


def write_page(results: dict[str, Any], presets_results: dict[str, Any]) -> None:
    lines = [
        "# Refitting the unimodal heads after the epochs",
        "",
        "`train.refit_heads: true` trains each unimodal head of the kept model again, from a "
        "fresh start, on that model's pooled encoder features, keeps it where its validation "
        "loss is lower, and fits the blend again (`fusionkit.training.refit`). Below, every "
        "zero-config run of the presets page, as trained and with the refit applied to its "
        "`best/` (the training before is the same), and two variants: the heads refit from "
        "their trained weights instead of a fresh start, and only the heads over frozen "
        "encoders refit. Test accuracy, mean ± sd (population) over seeds; the "
        "late fusion of the separately trained text-only and image-only models is the "
        "presets page's. `image head` is the zero-config model's image head alone on test. The "
        "refit's time (pooling the train and val features, then the heads) was measured on a "
        "2-core CPU that mostly ran a training job beside it: 8 s to 3 min for the same work.",
        "",
        "Command: `python -m experiments.refit_heads` (after `python -m "
        "experiments.accuracy_presets`).",
        "",
        "| data set | preset | seeds | as trained | refit | refit, continued | refit, frozen "
        "encoders' heads only | late fusion | image head as trained / refit | refit s (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        dataset, preset = key.split("/")
        seeds = sorted(runs, key=int)
        means = {v: _mean([runs[s][v]["test"]["accuracy"] for s in seeds])
                 for v in ("as_trained", *VARIANTS)}

        late = presets_results.get(dataset, {}).get(preset, {}).get("late_fusion", {})
        late_runs = [r["accuracy"] for r in late.get("runs", [])]
        late_text = _mean(late_runs) if late_runs else "n/a"
        seconds = statistics.median(runs[s]["refit"]["seconds"] for s in seeds)
        lines.append(
            f"| {dataset} | {preset} | {len(seeds)} | {means['as_trained']} | {means['refit']} | "
            f"{means['continue']} | {means['frozen']} | {late_text} | "
            f"{_image(runs, 'as_trained'):.3f} / {_image(runs, 'refit'):.3f} | "
            f"{seconds:.0f} |"
        )
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--presets", nargs="+", default=["fast", "medium"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    results = json.loads(JSON.read_text()) if JSON.exists() else {}
    for dataset in args.datasets:
        for preset in args.presets:
            for seed in args.seeds:
                run = run_dir(dataset, preset, "zero-config", seed)
                if not (run / "best").exists():
                    continue
                key = f"{dataset}/{preset}"
                if str(seed) in results.get(key, {}):
                    continue
                print(f"{key} seed {seed}", flush=True)
                results.setdefault(key, {})[str(seed)] = refit_run(run, dataset)
                JSON.write_text(json.dumps(results, indent=1))
    presets_results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    write_page(results, presets_results)


if __name__ == "__main__":
    main()
