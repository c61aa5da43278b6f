"""The zero-config command against a logistic regression on frozen features of one modality.

A practitioner's first baseline: embed every sample with a frozen encoder and fit a logistic
regression. For each data set of ``experiments.accuracy_presets`` this fits, per task and per
modality, scikit-learn's ``LogisticRegression`` on

- text: the frozen all-MiniLM-L6-v2 sentence embeddings (sentence-transformers' own pooling);
- image: the frozen EfficientNet-Lite0 features at 224 px, averaged over the feature map;

standardised, with the inverse regularisation ``C`` chosen on the validation split from a
grid and the model refit on the training split; a multi-label task gets one regression per
class. Test accuracy uses fusionkit's definitions (top-1; example-based Jaccard for multi-label).
The better modality's probe is compared with the zero-config models of
``runs/presets/results.json`` (mean over their seeds). Writes
``docs/results/linear_probe.md``; features are kept in ``runs/linear_probe/``.

Run from the repository root, after ``python -m experiments.accuracy_presets``::

    python -m experiments.linear_probe
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from experiments.accuracy_presets import DATASETS, RESULTS, manifests

ROOT = Path("runs/linear_probe")
OUT = Path("docs/results/linear_probe.md")
#: Inverse regularisation strengths tried on the validation split.
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
SPLITS = ("train", "val", "test")


def _specs(dataset: str) -> dict[str, Any]:
    from fusionkit.data import infer_tasks

    return infer_tasks(manifests(dataset)["train"], DATASETS[dataset]["tasks"])


@torch.no_grad()
def features(dataset: str, modality: str, batch_size: int = 64) -> dict[str, dict[str, Any]]:
    """Split → ``{"x": (N, C) array, "targets": list of target dicts}``, cached on disk."""
    from tqdm.auto import tqdm

    from fusionkit.data import ManifestDataset, build_image_transform, image_data_config
    from fusionkit.encoders import SentenceTransformersTextEncoder, TimmVisionEncoder
    from fusionkit.models.unimodal import masked_mean

    path = ROOT / f"{dataset}-{modality}.npz"
    specs = _specs(dataset)
    if modality == "text":
        encoder = SentenceTransformersTextEncoder("all-MiniLM-L6-v2", freeze=True)
        transform = None
    else:
        encoder = TimmVisionEncoder(
            "tf_efficientnet_lite0", pretrained="efficientnet_lite0", freeze=True
        )
        transform = build_image_transform(image_data_config(encoder.data_config))
    encoder.eval()
    out: dict[str, dict[str, Any]] = {}
    cached = dict(np.load(path, allow_pickle=False)) if path.is_file() else {}
    for split in SPLITS:
        data = ManifestDataset(manifests(dataset)[split], specs, transform, modalities=(modality,))
        targets = [record.targets for record in data.records]
        if f"{split}_x" in cached:
            out[split] = {"x": cached[f"{split}_x"], "targets": targets}
            continue
        rows = []
        for start in tqdm(range(0, len(data), batch_size), desc=f"{dataset} {modality} {split}"):
            batch = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            if modality == "text":
                texts = [sample["text"] or "" for sample in batch]
                rows.append(encoder.sentence_embedding(texts).float())
            else:
                images = torch.stack([sample["image"] for sample in batch])
                encoded = encoder(images)
                rows.append(masked_mean(encoded.tokens, encoded.mask).float())
        out[split] = {"x": torch.cat(rows).numpy(), "targets": targets}
    ROOT.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{split}_x": out[split]["x"] for split in SPLITS})
    return out


def _matrix(targets: list[dict[str, Any]], task: str, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labelled rows of one task and their labels (class index, or multi-hot rows)."""
    keep = np.array([t.get(task) is not None for t in targets])
    if not spec.multi_label:
        return keep, np.array([t[task] for t in targets if t.get(task) is not None])
    rows = np.zeros((int(keep.sum()), spec.num_classes))
    for i, t in enumerate(t for t in targets if t.get(task) is not None):
        rows[i, t[task]] = 1.0
    return keep, rows


def _fit(x: np.ndarray, y: np.ndarray, c: float, multi_label: bool) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    regression = LogisticRegression(C=c, max_iter=2000)
    model = OneVsRestClassifier(regression) if multi_label else regression
    return make_pipeline(StandardScaler(), model).fit(x, y)


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray, multi_label: bool) -> float:
    from fusionkit.training.metrics import accuracy

    scores = torch.from_numpy(np.asarray(model.predict_proba(x), dtype=np.float64))
    if not multi_label:
        # predict_proba's columns are the classes seen in training, in sorted order.
        classes = model.classes_
        full = torch.zeros(len(x), int(max(classes.max(), y.max())) + 1, dtype=torch.float64)
        full[:, torch.from_numpy(classes)] = scores
        return accuracy(full, torch.from_numpy(y))
    return accuracy(scores, torch.from_numpy(y), multi_label=True)


def probe(dataset: str, modality: str) -> dict[str, Any]:
    """Per task: the ``C`` chosen on val, and val and test accuracy of the refit probe."""
    feats = features(dataset, modality)
    result: dict[str, Any] = {}
    for task, spec in _specs(dataset).items():
        data = {}
        for split in SPLITS:
            keep, y = _matrix(feats[split]["targets"], task, spec)
            data[split] = (feats[split]["x"][keep], y)
        best = None
        for c in C_GRID:
            model = _fit(*data["train"], c, spec.multi_label)
            score = _accuracy(model, *data["val"], spec.multi_label)
            if best is None or score > best[1]:
                best = (c, score, model)
        assert best is not None
        c, val, model = best
        test = _accuracy(model, *data["test"], spec.multi_label)
        result[task] = {"C": c, "val": round(val, 4), "test": round(test, 4)}
    return result


def _zero_config(dataset: str) -> dict[str, float]:
    """Preset → mean test accuracy of its zero-config runs (over tasks, then seeds)."""
    if not RESULTS.is_file():
        return {}
    results = json.loads(RESULTS.read_text()).get(dataset, {})
    out = {}
    for preset, models in results.items():
        runs = models.get("zero-config", {}).get("runs", [])
        if runs:
            out[preset] = (statistics.mean(r["accuracy"] for r in runs), len(runs))
    return out


def write_page(rows: dict[str, dict[str, Any]]) -> None:
    lines = [
        "# Frozen features and a logistic regression",
        "",
        "The baseline a practitioner fits first: a logistic regression on the frozen features "
        "of one modality (all-MiniLM-L6-v2 sentence embeddings for text; EfficientNet-Lite0 "
        "features at 224 px, averaged over the feature map, for images), standardised, `C` "
        f"chosen on val from {list(C_GRID)} and refit on train; one regression per class for a "
        "multi-label task. Test accuracy, mean over tasks (fusionkit's definitions). The "
        "zero-config models are those of the presets page (mean over their seeds).",
        "",
        f"Command: `python -m experiments.linear_probe` ({platform.machine()} CPU; the features "
        "are extracted once and kept in `runs/linear_probe/`).",
        "",
        "| data set | text probe | image probe | better probe | zero-config `fast` | "
        "zero-config `medium` | zero-config against the better probe |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, row in rows.items():
        text, image = row["text"]["mean"], row["image"]["mean"]
        better = max(text, image)
        zero = row["zero_config"]
        cells = []
        verdicts = []
        for preset in ("fast", "medium"):
            if preset in zero:
                mean, seeds = zero[preset]
                cells.append(f"{mean:.3f} ({seeds} seed{'s' if seeds > 1 else ''})")
                verdicts.append(f"{preset} {mean - better:+.3f}")
            else:
                cells.append("not run")
        lines.append(
            f"| {dataset} | {text:.3f} | {image:.3f} | {better:.3f} | {cells[0]} | {cells[1]} | "
            f"{', '.join(verdicts) or '–'} |"
        )
    lines += ["", "Per task (`C` chosen on val; val / test accuracy):", ""]
    lines += ["| data set | task | text | image |", "|---|---|---|---|"]
    for dataset, row in rows.items():
        for task in row["text"]["tasks"]:
            t, i = row["text"]["tasks"][task], row["image"]["tasks"][task]
            lines.append(
                f"| {dataset} | {task} | C={t['C']}: {t['val']:.3f} / {t['test']:.3f} | "
                f"C={i['C']}: {i['val']:.3f} / {i['test']:.3f} |"
            )
    OUT.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = {}
    for dataset in args.datasets:
        row: dict[str, Any] = {}
        for modality in ("text", "image"):
            tasks = probe(dataset, modality)
            row[modality] = {
                "tasks": tasks,
                "mean": statistics.mean(t["test"] for t in tasks.values()),
            }
        row["zero_config"] = _zero_config(dataset)
        rows[dataset] = row
        print(dataset, {m: round(row[m]["mean"], 4) for m in ("text", "image")},
              row["zero_config"])
    ROOT.mkdir(parents=True, exist_ok=True)
    (ROOT / "results.json").write_text(json.dumps(rows, indent=2))
    write_page(rows)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
