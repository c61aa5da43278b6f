"""Classification metrics in plain torch: accuracy, macro-F1 and recall at a fixed precision.

Conventions, for single-label tasks (``targets`` long ``(N,)``, ``-100`` = missing) and
multi-label tasks (``targets`` float multi-hot ``(N, C)``, a NaN row = missing). Samples with a
missing label are left out of every metric.

- **accuracy**: single-label, top-1 accuracy. Multi-label, *example-based* accuracy (Godbole &
  Sarawagi 2004): the mean over samples of ``|P ∩ T| / |P ∪ T|`` where ``P`` is the set of
  classes with probability >= 0.5 and ``T`` the true set (1 when both are empty).
- **macro-F1**: the unweighted mean of per-class F1 over the classes that occur in the
  targets or the predictions (as scikit-learn's ``average="macro"`` without ``labels``).
- **recall at precision p** (the CMA-CLIP paper's retail metric): per class, one-vs-rest on
  the class scores; among all thresholds ``t`` (predict positive when ``score >= t``; equal
  scores are never split) whose precision is >= p, the highest recall; 0 if none reaches p.
  Macro-averaged over the classes that have at least one positive sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusionkit.tasks import MISSING_LABEL, MULTI_LABEL_THRESHOLD

__all__ = [
    "accuracy",
    "log_loss",
    "macro_f1",
    "majority_rate",
    "one_hot_targets",
    "recall_at_precision",
    "valid_rows",
]



def valid_rows(targets: Tensor) -> Tensor:
    """Bool ``(N,)``: True where the sample has a label.

    Args:
        targets: Long ``(N,)`` (``-100`` = missing) or float ``(N, C)`` (NaN row = missing).

    Returns:
        The mask of labelled samples.

    Examples:
        >>> valid_rows(torch.tensor([1, -100, 0])).tolist()
        [True, False, True]
    """
    if targets.dim() == 1:
        return targets != MISSING_LABEL
    return ~targets.isnan().any(dim=1)


def one_hot_targets(targets: Tensor, num_classes: int) -> Tensor:
    """Labelled targets as a bool ``(N, C)`` indicator matrix (missing rows dropped).

    Args:
        targets: Single-label ``(N,)`` or multi-hot ``(N, C)``.
        num_classes: ``C``.

    Returns:
        Bool ``(N_labelled, C)``.

    Examples:
        >>> one_hot_targets(torch.tensor([1, -100]), 3).tolist()
        [[False, True, False]]
    """
    keep = valid_rows(targets)
    if targets.dim() == 1:
        return torch.nn.functional.one_hot(targets[keep].long(), num_classes).bool()
    return targets[keep] > 0.5


def _predicted(scores: Tensor, multi_label: bool) -> Tensor:
    if multi_label:
        return scores >= MULTI_LABEL_THRESHOLD
    return torch.nn.functional.one_hot(scores.argmax(dim=1), scores.shape[1]).bool()


def accuracy(scores: Tensor, targets: Tensor, multi_label: bool = False) -> float:
    """Top-1 accuracy, or example-based accuracy for multi-label tasks.

    Args:
        scores: ``(N, C)`` probabilities (or logits for single-label: only the argmax counts).
        targets: ``(N,)`` class indices or ``(N, C)`` multi-hot; missing labels are skipped.
        multi_label: Use the multi-label definition (scores are probabilities).

    Returns:
        A number in [0, 1]; NaN when no sample is labelled.

    Examples:
        >>> accuracy(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
        0.5
    """
    keep = valid_rows(targets)
    if not bool(keep.any()):
        return float("nan")
    if not multi_label:
        return (scores[keep].argmax(dim=1) == targets[keep]).double().mean().item()
    predicted = _predicted(scores[keep], True)
    truth = targets[keep] > 0.5
    union = (predicted | truth).sum(dim=1).double()
    inter = (predicted & truth).sum(dim=1).double()
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return jaccard.mean().item()


def log_loss(scores: Tensor, targets: Tensor, multi_label: bool = False) -> float:
    """Mean negative log-likelihood of the labels under the predicted probabilities.

    Single-label: ``-log p[target]``; multi-label: the binary cross-entropy averaged over
    classes. Probabilities are clipped to ``[1e-7, 1 - 1e-7]``.

    Args:
        scores: ``(N, C)`` probabilities (softmax, or sigmoid for multi-label).
        targets: ``(N,)`` class indices or ``(N, C)`` multi-hot; missing labels are skipped.
        multi_label: Multi-label task.

    Returns:
        The mean log-loss; NaN when no sample is labelled.

    Examples:
        >>> round(log_loss(torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([0, 0])), 4)
        0.3993
    """
    keep = valid_rows(targets)
    if not bool(keep.any()):
        return float("nan")
    p = scores[keep].double().clamp(1e-7, 1 - 1e-7)
    if multi_label:
        truth = targets[keep].double()
        return (-(truth * p.log() + (1 - truth) * (1 - p).log())).mean().item()
    return (-p.gather(1, targets[keep].long()[:, None]).log()).mean().item()


def macro_f1(scores: Tensor, targets: Tensor, multi_label: bool = False) -> float:
    """Macro-averaged F1 over the classes that occur in the targets or the predictions.

    Args:
        scores: ``(N, C)`` scores (argmax for single-label, >= 0.5 for multi-label).
        targets: ``(N,)`` class indices or ``(N, C)`` multi-hot; missing labels are skipped.
        multi_label: Multi-label task.

    Returns:
        A number in [0, 1]; NaN when no sample is labelled.

    Examples:
        >>> macro_f1(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
        0.3333333333333333
    """
    keep = valid_rows(targets)
    if not bool(keep.any()):
        return float("nan")
    predicted = _predicted(scores[keep], multi_label)
    truth = one_hot_targets(targets, scores.shape[1])
    tp = (predicted & truth).sum(dim=0).double()
    fp = (predicted & ~truth).sum(dim=0).double()
    fn = (~predicted & truth).sum(dim=0).double()
    occurs = (predicted | truth).any(dim=0)
    if not bool(occurs.any()):
        return float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return f1[occurs].mean().item()


def _class_recall_at_precision(scores: Tensor, positive: Tensor, precision: float) -> float:
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order]
    hits = positive[order].double()
    tp = torch.cumsum(hits, 0)
    predicted = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # A threshold can only sit after the last of a group of equal scores: ties are never split.
    last_of_group = torch.ones_like(positive)
    last_of_group[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    reached = (tp / predicted >= precision - 1e-12) & last_of_group
    if not bool(reached.any()):
        return 0.0
    return (tp[reached].max() / hits.sum()).item()


def recall_at_precision(
    scores: Tensor, targets: Tensor, precision: float = 0.9
) -> tuple[float, list[float | None]]:
    """Recall at ``precision`` per class (one-vs-rest) and its macro average.

    Args:
        scores: ``(N, C)`` class scores (probabilities or logits: only their order counts).
        targets: ``(N,)`` class indices or ``(N, C)`` multi-hot; missing labels are skipped.
        precision: The precision the threshold must reach, in (0, 1].

    Returns:
        ``(macro, per_class)``: the mean over classes with a positive sample (NaN when there
        is none), and per class the recall or ``None`` for a class without positives.

    Raises:
        ValueError: ``precision`` is not in (0, 1].

    Examples:
        >>> scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
        >>> recall_at_precision(scores, torch.tensor([0, 1, 1]), 0.9)[1]
        [1.0, 0.5]
    """
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision must be in (0, 1], got {precision}")
    keep = valid_rows(targets)
    truth = one_hot_targets(targets, scores.shape[1])
    kept = scores[keep].double()
    per_class: list[float | None] = []
    for c in range(scores.shape[1]):
        positive = truth[:, c]
        per_class.append(
            None
            if not bool(positive.any())
            else _class_recall_at_precision(kept[:, c], positive, precision)
        )
    defined = [r for r in per_class if r is not None]
    macro = sum(defined) / len(defined) if defined else float("nan")
    return macro, per_class


def majority_rate(targets: Tensor, multi_label: bool = False) -> float:
    """Accuracy of always predicting the most frequent class (or label set, multi-label).

    Args:
        targets: ``(N,)`` class indices or ``(N, C)`` multi-hot; missing labels are skipped.
        multi_label: Score the constant prediction with example-based accuracy.

    Returns:
        A number in [0, 1]; NaN when no sample is labelled.

    Examples:
        >>> majority_rate(torch.tensor([2, 2, 1, -100]))
        0.6666666666666666
    """
    keep = valid_rows(targets)
    if not bool(keep.any()):
        return float("nan")
    labelled = targets[keep]
    if not multi_label:
        return torch.bincount(labelled.long()).max().item() / len(labelled)
    sets, counts = torch.unique(labelled > 0.5, dim=0, return_counts=True)
    constant = sets[counts.argmax()].double().expand_as(labelled)
    return accuracy(constant, labelled, multi_label=True)
