"""Metrics against hand-computed values (and scikit-learn where it defines the same thing)."""

from __future__ import annotations

import math

import pytest
import torch

from fusionkit.training.metrics import accuracy, macro_f1, majority_rate, recall_at_precision

NAN = float("nan")


def test_accuracy_single_label_ignores_missing():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    targets = torch.tensor([0, 0, -100, 1])
    # Rows 0 (right), 1 (wrong), 3 (argmax of a tie is class 0: wrong); row 2 is unlabelled.
    assert accuracy(scores, targets) == pytest.approx(1 / 3)


def test_accuracy_multi_label_is_example_based():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.9, 0.1, 0.1], [0.1, 0.1, 0.1], [0.9, 0.9, 0.9]])
    targets = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [NAN, NAN, NAN]]
    )
    # Jaccard per row: {0,1} vs {0} = 1/2; {0} vs {0,2} = 1/2; {} vs {} = 1; row 3 missing.
    assert accuracy(scores, targets, multi_label=True) == pytest.approx(2 / 3)


def test_macro_f1_hand_computed_and_sklearn():
    scores = torch.eye(3)[torch.tensor([0, 0, 1, 2, 2, 2])]
    targets = torch.tensor([0, 1, 1, 1, 2, -100])
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp1 fp0 fn2 -> 1/2; class 2: tp1 fp1 fn0 -> 2/3
    assert macro_f1(scores, targets) == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    sklearn = pytest.importorskip("sklearn.metrics")
    expected = sklearn.f1_score([0, 1, 1, 1, 2], [0, 0, 1, 2, 2], average="macro")
    assert macro_f1(scores, targets) == pytest.approx(expected)


def test_macro_f1_multi_label_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    truth = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    scores = torch.tensor([[0.8, 0.2, 0.4], [0.1, 0.7, 0.6], [0.9, 0.3, 0.1], [0.2, 0.1, 0.9]])
    expected = sklearn.f1_score(truth.int().numpy(), (scores >= 0.5).int().numpy(),
                                average="macro")
    assert macro_f1(scores, truth, multi_label=True) == pytest.approx(expected)


def test_recall_at_precision_hand_computed():
    # Class 1 scores, descending: 0.9 (pos), 0.8 (pos), 0.7 (neg), 0.6 (pos), 0.1 (neg).
    # Precision/recall at each cut: 1/1 & 1/3, 2/2 & 2/3, 2/3, 3/4 & 1, 3/5.
    positive = torch.tensor([1, 1, 0, 1, 0])
    s1 = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1])
    scores = torch.stack([1 - s1, s1], dim=1)
    macro, per_class = recall_at_precision(scores, positive, 0.9)
    assert per_class[1] == pytest.approx(2 / 3)
    # At precision 0.75 the cut after 0.6 counts: recall 1.
    assert recall_at_precision(scores, positive, 0.75)[1][1] == pytest.approx(1.0)
    # Class 0 (negatives 2 and 4), scores 0.1 0.2 0.3 0.4 0.9: top score 0.9 is a positive.
    assert per_class[0] == pytest.approx(1 / 2)
    assert macro == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_recall_at_precision_ties_are_not_split():
    # The two top scores tie; one is a negative, so no threshold reaches precision 0.9.
    scores = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.9, 0.1]])
    targets = torch.tensor([1, 0, 1])
    assert recall_at_precision(scores, targets, 0.9)[1][1] == 0.0
    # Split, the positive listed first would give precision 1 at recall 1/2. Whole, the tie
    # gives precision 1/2 (recall 1/2), and all three rows 2/3 (recall 1).
    assert recall_at_precision(scores, targets, 0.7)[1][1] == 0.0
    assert recall_at_precision(scores, targets, 0.5)[1][1] == pytest.approx(1.0)


def test_recall_at_precision_never_reached_and_missing_labels():
    scores = torch.tensor([[0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.9, 0.1]])
    targets = torch.tensor([0, 0, 1, -100])
    macro, per_class = recall_at_precision(scores, targets, 0.9)
    # Class 1: its only positive ranks below two negatives: precision 1/3 at best -> 0.
    assert per_class[1] == 0.0
    assert per_class[0] == pytest.approx(0.0)
    assert macro == 0.0


def test_recall_at_precision_class_without_positives_is_excluded():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    macro, per_class = recall_at_precision(scores, torch.tensor([0, 1]), 0.9)
    assert per_class == [1.0, 1.0, None]
    assert macro == 1.0


def test_undefined_metrics_are_nan_and_majority_rate():
    empty = torch.tensor([-100, -100])
    assert math.isnan(accuracy(torch.rand(2, 3), empty))
    assert majority_rate(torch.tensor([2, 2, 1, -100])) == pytest.approx(2 / 3)
    hot = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert majority_rate(hot, multi_label=True) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        recall_at_precision(torch.rand(2, 2), torch.tensor([0, 1]), 0.0)
