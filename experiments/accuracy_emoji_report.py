"""The report of the emoji accuracy experiment (``python -m experiments.accuracy_emoji``): means
over seeds, the exact sign test of paired comparisons, the Markdown page and its bar chart."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["plot_accuracy", "report_text", "sign_test", "summarise"]


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: how likely so lopsided a split of the discordant samples is
    when neither model is better (each discordant sample a fair coin).

    Args:
        wins: Samples the first model gets right and the second wrong.
        losses: The reverse.

    Returns:
        The p-value (1.0 when there is no discordant sample).

    Examples:
        >>> sign_test(5, 0)
        0.0625
    """
    total = wins + losses
    tail = sum(math.comb(total, k) for k in range(min(wins, losses) + 1)) / 2**total
    return min(1.0, 2 * tail)


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarise(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of every reported metric, plus the per-seed group accuracies.

    Args:
        reports: One evaluation report per seed.

    Returns:
        ``tasks`` (as in one report, values averaged), ``seeds``, ``group_accuracies``,
        ``group_accuracy_sd`` (sample standard deviation; 0 for one seed) and the summed
        ``train_seconds``.
    """
    tasks: dict[str, Any] = {}
    for task in reports[0]["tasks"]:
        rows = [r["tasks"][task] for r in reports]
        weights = {m: _mean([r["modality_weights"].get(m) for r in rows])
                   for m in rows[0]["modality_weights"]}
        tasks[task] = {
            "accuracy": _mean([r["accuracy"] for r in rows]),
            "macro_f1": _mean([r["macro_f1"] for r in rows]),
            "recall_at_precision": {"0.9": _mean([r["recall_at_precision"]["0.9"]
                                                  for r in rows])},
            "modality_weights": weights,
        }
    group = [r["tasks"]["group"]["accuracy"] for r in reports]
    mean = sum(group) / len(group)
    sd = (sum((g - mean) ** 2 for g in group) / (len(group) - 1)) ** 0.5 if len(group) > 1 else 0.0
    return {
        "tasks": tasks,
        "seeds": [r["seed"] for r in reports],
        "group_accuracies": group,
        "group_accuracy_sd": sd,
        "train_seconds": sum(r["train_seconds"] for r in reports),
    }


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _weights(report: dict[str, Any], task: str) -> str:
    weights = report["tasks"][task]["modality_weights"]
    return " / ".join(f"{weights.get(m, 0.0):.2f}" for m in ("text", "image"))


def _compare(full: float, other: float) -> str:
    # Means over the same seeds and test set: equal numbers of correct samples tie exactly, so
    # only float rounding is tolerated.
    if abs(full - other) < 1e-9:
        return "ties"
    return "beats" if full > other else "falls below"


def _verdict(reports: dict[str, dict[str, Any]]) -> str:
    """The verdict of one data variant: the full model against the best single modality and
    concat, and (when it ran) against sequence_concat."""
    accuracy = {name: report["tasks"]["group"]["accuracy"] for name, report in reports.items()}
    if not {"cma_clip", "image_only", "text_only", "concat"} <= set(accuracy):
        return ""
    single = max(("image_only", "text_only"), key=lambda name: accuracy[name])
    full = accuracy["cma_clip"]
    against_single = _compare(full, accuracy[single])
    against_concat = _compare(full, accuracy["concat"])
    if against_single == against_concat:
        outcome = f"{against_single} both"
    else:
        outcome = f"{against_single} {single} and {against_concat} concat"
    verdict = (
        f"Mean group accuracy: full CMA-CLIP {full:.3f}, best single modality ({single}) "
        f"{accuracy[single]:.3f}, concat {accuracy['concat']:.3f}: the full model "
        f"{outcome}; the target of 0.95 is {'reached' if full >= 0.95 else 'not reached'}."
    )
    if "sequence_concat" in accuracy:
        # The ablation that isolates the modality-wise attention: everything else is shared.
        verdict += (
            f" Against sequence_concat ({accuracy['sequence_concat']:.3f}: the same model "
            "with concatenation in place of the modality-wise attention) the full model "
            f"{_compare(full, accuracy['sequence_concat'])} it."
        )
    return verdict


def report_text(
    results: dict[str, dict[str, dict[str, Any]]],
    counts: dict[str, int],
    late_fusions: dict[str, dict[str, dict[str, float]]] | None = None,
    comparisons: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> str:
    """The Markdown page: one table per data variant, its verdict and paired comparisons.

    Args:
        results: Variant → model → :func:`summarise` of its seeds.
        counts: Split → number of emoji.
        late_fusions: Variant → seed → late-fusion accuracies (optional).
        comparisons: Variant → compared model → paired comparison of the full model with it
            (``seeds``, ``wins``, ``losses``, ``p``; optional).

    Returns:
        The page's text; its chart is ``emoji_accuracy.png`` beside it (:func:`plot_accuracy`).
    """
    late_fusions = late_fusions or {}
    comparisons = comparisons or {}
    lines = [
        "# Emoji: CMA-CLIP and its ablations",
        "",
        "Real images and texts built offline from Debian packages "
        "(`fusionkit data emoji`): one Noto Color Emoji image per fully-qualified emoji, its "
        "CLDR name and keywords as text; tasks `group` (9 classes) and `subgroup` "
        f"(~99). Splits by base emoji: train {counts['train']}, val {counts['val']}, "
        f"test {counts['test']}. Backbones: EfficientNet-Lite0 (ImageNet, 224 px: 7x7 image "
        "tokens), frozen and read from the feature cache, and all-MiniLM-L6-v2, fine-tuned "
        "(lr 5e-5); fusion and heads train at lr 1e-3; each modality's summary token starts "
        "from the mean of its tokens (`configs/ablations/*.yaml`). The schedule (10 epochs, "
        "learning rates) was chosen on the validation split; every model is then fit on "
        "train + val for that fixed schedule and its final weights are evaluated (no epoch is "
        "picked on data the model is scored on). Test-split metrics, means over the training seeds "
        "listed (seeds change the fusion's init, the shuffling and dropout); R@P90 is the mean "
        "over classes of recall at 90 % precision; weights are the mean modality weights "
        "(text / image) of the task; train s is the wall time of training summed over seeds, "
        "including the one-off image encoding of the first model that needs it (2 CPU cores "
        "shared with other jobs). With 260 test emoji one sample is 0.4 points of accuracy.",
        "",
        "`noflag`: the `flag:` prefix and the `flag` keyword removed from the texts of flags, "
        "which otherwise name their group outright. `concat` is the concat fusion baseline: "
        "each modality pooled on its own, the two concatenated, no attention across them. "
        "`sequence_concat` keeps the sequence-wise attention and replaces the modality-wise "
        "attention by concatenation; `no_modality_attention` by a fixed equal-weight mean.",
        "",
        f"Command: `python -m experiments.accuracy_emoji` on {platform.machine()} CPU "
        f"({os.cpu_count()} cores).",
        "",
    ]
    for variant, reports in results.items():
        lines += [
            f"## Texts: {variant}",
            "",
            "| model | seeds | group acc (mean ± sd) | group acc per seed | group macro-F1 | "
            "group R@P90 | subgroup acc | subgroup macro-F1 | subgroup R@P90 | "
            "weights group (text / image) | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, report in reports.items():
            group, subgroup = report["tasks"]["group"], report["tasks"]["subgroup"]
            per_seed = ", ".join(f"{value:.3f}" for value in report["group_accuracies"])
            lines.append(
                f"| {name} | {len(report['seeds'])} | {_cell(group['accuracy'])} ± "
                f"{report['group_accuracy_sd']:.3f} | {per_seed} | {_cell(group['macro_f1'])} | "
                f"{_cell(group['recall_at_precision']['0.9'])} | {_cell(subgroup['accuracy'])} | "
                f"{_cell(subgroup['macro_f1'])} | "
                f"{_cell(subgroup['recall_at_precision']['0.9'])} | {_weights(report, 'group')} "
                f"| {report['train_seconds']:.0f} |"
            )
        verdict = _verdict(reports)
        lines += ["", verdict, ""] if verdict else [""]
        paired = comparisons.get(variant, {})
        if paired:
            parts = [
                f"against {name} ({len(c['seeds'])} seed{'s' if len(c['seeds']) > 1 else ''}) "
                f"it is right where {name} is wrong on {c['wins']} test predictions and wrong "
                f"where {name} is right on {c['losses']} (p = {c['p']:.2f})"
                for name, c in paired.items()
            ]
            lines += [
                "Paired over the same test emoji and seeds (group task), the full model: "
                + "; ".join(parts) + ". p is McNemar's exact two-sided test on those counts: "
                "below 0.05 the difference is unlikely to be seed and sampling noise. The seeds "
                "share their test emoji, so pooled over seeds the counts are not independent "
                "and p is, if anything, too small.",
                "",
            ]
        late = late_fusions.get(variant, {})
        if late:
            groups = [late[seed]["group"] for seed in sorted(late, key=int)]
            lines += [
                "Reference (not a trained fusion): multiplying the test probabilities of "
                "text_only and image_only of the same seed (late fusion, nothing tuned) gives "
                f"group accuracy {sum(groups) / len(groups):.3f} (per seed: "
                f"{', '.join(f'{g:.3f}' for g in groups)}), the measure of what the two "
                "modalities, each learned alone, hold together on this split.",
                "",
            ]
    lines += ["![Accuracy per model](emoji_accuracy.png)", ""]
    return "\n".join(lines)


def plot_accuracy(results: dict[str, dict[str, dict[str, Any]]], chart: Path) -> None:
    """Draw the group and subgroup test accuracy of every model, one panel per data variant.

    Args:
        results: Variant → model → :func:`summarise` of its seeds.
        chart: The PNG written.
    """
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
    chart.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(chart, dpi=110)
    plt.close(figure)
