"""Multi-task heads and losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from fusionkit import MultiTaskHead, TaskSpec
from fusionkit.errors import ConfigError, ShapeError
from fusionkit.heads import task_loss
from fusionkit.tasks import parse_tasks

TASKS = {
    "color": {"classes": ["black", "blue", "red"]},
    "pattern": {"num_classes": 4, "multi_label": True},
}


def test_logit_shapes_shared_and_per_task_features():
    head = MultiTaskHead(16, TASKS)
    shared = head(torch.randn(5, 16))
    assert {k: tuple(v.shape) for k, v in shared.items()} == {"color": (5, 3), "pattern": (5, 4)}
    per_task = head({"color": torch.randn(5, 16), "pattern": torch.randn(5, 16)})
    assert per_task["pattern"].shape == (5, 4)


def test_single_label_loss_ignores_missing_labels():
    spec = TaskSpec(3)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    target = torch.tensor([0, -100, 2])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2)) + -math.log(1 / 3)) / 2
    assert task_loss(logits, target, spec).item() == pytest.approx(expected, rel=1e-6)


def test_multi_label_loss_ignores_nan_rows():
    spec = TaskSpec(2, multi_label=True)
    logits = torch.tensor([[0.0, 1.0], [3.0, -3.0]])
    target = torch.tensor([[1.0, 0.0], [float("nan")] * 2])
    expected = F.binary_cross_entropy_with_logits(logits[:1], target[:1])
    assert_close(task_loss(logits, target, spec), expected)


def test_all_missing_gives_zero_loss_with_gradient():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = task_loss(logits, torch.tensor([-100, -100]), TaskSpec(3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_total_loss_is_weighted_sum_and_class_weights_apply():
    head = MultiTaskHead(8, {"a": {"num_classes": 2, "weight": 2.0}, "b": {"num_classes": 3}})
    logits = head(torch.randn(4, 8))
    targets = {"a": torch.tensor([0, 1, 1, -100]), "b": torch.tensor([2, 0, -100, 1])}
    parts = head.task_losses(logits, targets)
    assert_close(head.loss(logits, targets), 2.0 * parts["a"] + parts["b"])
    head.set_class_weight("b", torch.tensor([1.0, 0.0, 0.0]))
    weighted = head.task_losses(logits, {"b": torch.tensor([1, 2, 0, 1])})["b"]
    expected = F.cross_entropy(
        logits["b"], torch.tensor([1, 2, 0, 1]), weight=torch.tensor([1.0, 0, 0])
    )
    assert_close(weighted, expected)


def test_label_smoothing_matches_the_smoothed_targets_by_hand():
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 2, -100, 1])
    eps = 0.2
    keep = target != -100
    soft = torch.full((4, 3), eps / 3) + (1 - eps) * F.one_hot(target.clamp(min=0), 3)
    by_hand = -(soft[keep] * logits[keep].log_softmax(1)).sum(1).mean()
    assert_close(task_loss(logits, target, TaskSpec(3), label_smoothing=eps), by_hand)
    multi = torch.tensor([[1.0, 0.0, 1.0], [float("nan")] * 3, [0.0, 0.0, 1.0], [1.0] * 3])
    kept = ~multi.isnan().any(1)
    expected = F.binary_cross_entropy_with_logits(logits[kept], multi[kept] * 0.8 + 0.1)
    assert_close(task_loss(logits, multi, TaskSpec(3, multi_label=True), label_smoothing=eps),
                 expected)
    assert_close(task_loss(logits, target, TaskSpec(3), label_smoothing=0.0),
                 task_loss(logits, target, TaskSpec(3)))


def test_head_label_smoothing_applies_to_every_task_and_with_class_weights():
    head = MultiTaskHead(8, TASKS)
    logits = head(torch.randn(4, 8))
    targets = {"color": torch.tensor([0, 1, 2, 1]),
               "pattern": torch.tensor([[1.0, 0, 0, 1]] * 4)}
    head.set_class_weight("color", torch.tensor([1.0, 2.0, 0.5]))
    head.set_label_smoothing(0.1)
    parts = head.task_losses(logits, targets)
    assert_close(parts["color"], F.cross_entropy(
        logits["color"], targets["color"], weight=torch.tensor([1.0, 2.0, 0.5]),
        label_smoothing=0.1))
    assert_close(parts["pattern"], F.binary_cross_entropy_with_logits(
        logits["pattern"], targets["pattern"] * 0.9 + 0.05))
    head.set_label_smoothing(0.0)
    assert_close(head.task_losses(logits, targets)["pattern"],
                 F.binary_cross_entropy_with_logits(logits["pattern"], targets["pattern"]))


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_bad_label_smoothing_is_refused(value):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MultiTaskHead(8, TASKS).set_label_smoothing(value)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        task_loss(torch.zeros(1, 2), torch.tensor([0]), TaskSpec(2), label_smoothing=value)


def test_bad_targets():
    head = MultiTaskHead(8, TASKS)
    logits = head(torch.randn(2, 8))
    with pytest.raises(ShapeError, match=r"in \[0, 3\)"):
        head.loss(logits, {"color": torch.tensor([0, 3])})
    with pytest.raises(ShapeError, match="integer"):
        head.loss(logits, {"color": torch.tensor([0.0, 1.0])})
    with pytest.raises(ShapeError, match="multi-hot"):
        head.loss(logits, {"pattern": torch.tensor([0, 1])})
    with pytest.raises(ShapeError, match="unknown tasks"):
        head.loss(logits, {"size": torch.tensor([0, 1])})
    with pytest.raises(ShapeError, match=r"\(B, 8\)"):
        head(torch.randn(2, 9))
    with pytest.raises(ShapeError, match="missing for tasks"):
        head({"color": torch.randn(2, 8)})


@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        ({}, "non-empty"),
        ({"a": {"num_classes": 1}}, "num_classes >= 2"),
        ({"a": {"classes": ["x", "x"]}}, "duplicates"),
        ({"a": {"classes": ["x", "y"], "num_classes": 3}}, "num_classes 3 != len"),
        ({"a": {"clases": ["x", "y"]}}, r"tasks\.a: unknown key"),
        ({"a": {"num_classes": 2, "multi_label": "yes"}}, r"tasks\.a\.multi_label"),
        ({"a b": {"num_classes": 2}}, "identifiers"),
        ({"a": 3}, "expected a mapping"),
    ],
)
def test_bad_task_configs_name_the_key(tasks, match):
    with pytest.raises(ConfigError, match=match):
        parse_tasks(tasks)


def test_task_spec_round_trip():
    parsed = parse_tasks(TASKS)
    assert parse_tasks({k: v.to_dict() for k, v in parsed.items()}) == parsed
    assert parsed["color"].class_names() == ("black", "blue", "red")
    assert parsed["pattern"].class_names() == ("0", "1", "2", "3")
