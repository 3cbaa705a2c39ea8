"""Metrics against hand-computed values: ties, top-5 with < 5 classes, absent classes, NaN logits."""

import math

import pytest
import torch

from vlmpress.evaluation.metrics import (
    MetricAccumulator,
    binomial_stderr,
    compute_metrics,
    topk_accuracy,
    true_class_rank,
)

# 4 samples, 3 classes; hand-worked ranks: [0, 1 (tie with class 0 wins), 0 (tie, lowest index), 2]
LOGITS = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.5, 0.1], [0.5, 0.5, 0.1], [0.2, 0.3, 0.1]])
LABELS = torch.tensor([0, 1, 0, 2])


def test_ranks_break_ties_by_lowest_class_index():
    assert true_class_rank(LOGITS, LABELS).tolist() == [0, 1, 0, 2]
    # all classes tied: rank = label index
    flat = torch.zeros(3, 4)
    assert true_class_rank(flat, torch.tensor([0, 2, 3])).tolist() == [0, 2, 3]


def test_hand_computed_metrics():
    m = compute_metrics(LOGITS, LABELS)
    assert m.top1 == 0.5
    assert m.top5 == 1.0 and m.top5_k == 3  # fewer than 5 classes: top-5 = top-3
    assert topk_accuracy(LOGITS, LABELS, 2) == 0.75
    # per-class recall: class 0 -> 2/2, class 1 -> 0/1, class 2 -> 0/1
    assert m.per_class_recall == {0: 1.0, 1: 0.0, 2: 0.0}
    assert m.mean_per_class_recall == pytest.approx(1 / 3)
    assert m.top1_stderr == pytest.approx(math.sqrt(0.5 * 0.5 / 4))
    assert (m.n_images, m.n_classes, m.n_classes_present, m.n_nonfinite) == (4, 3, 3, 0)


def test_absent_classes_do_not_count_in_mean_recall():
    logits = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0]])
    m = compute_metrics(logits, [0, 2, 0])  # classes 1, 3, 4, 5 have no images
    assert m.n_classes == 6 and m.n_classes_present == 2 and m.top5_k == 5
    assert m.per_class_recall == {0: 0.5, 2: 1.0}
    assert m.mean_per_class_recall == pytest.approx(0.75)
    assert m.top1 == pytest.approx(2 / 3)


def test_nonfinite_logits_are_counted_wrong():
    logits = torch.tensor([[float("nan"), 0.0, 0.0], [1.0, 0.0, 0.0], [float("inf"), 1.0, 0.0]])
    m = compute_metrics(logits, [0, 0, 0])
    assert m.n_nonfinite == 2 and m.top1 == pytest.approx(1 / 3) and m.top5 == pytest.approx(1 / 3)


def test_matches_topk_reference_without_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=g)
    labels = torch.randint(0, 10, (200,), generator=g)
    top5 = logits.topk(5, dim=1).indices
    ref5 = (top5 == labels[:, None]).any(1).double().mean().item()
    ref1 = (logits.argmax(1) == labels).double().mean().item()
    m = compute_metrics(logits, labels)
    assert m.top1 == pytest.approx(ref1) and m.top5 == pytest.approx(ref5)


def test_accumulator_over_batches_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 7, generator=g)
    labels = torch.randint(0, 7, (37,), generator=g)
    acc = MetricAccumulator(7)
    for start in range(0, 37, 8):
        acc.update(logits[start : start + 8], labels[start : start + 8])
    assert len(acc) == 37
    assert acc.compute().as_dict() == compute_metrics(logits, labels).as_dict()
    with pytest.raises(ValueError, match="expected 7 classes"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_bad_labels_and_stderr_edge_cases():
    with pytest.raises(ValueError, match="labels must lie"):
        true_class_rank(torch.zeros(2, 3), torch.tensor([0, 3]))
    assert binomial_stderr(1.0, 10) == 0.0 and binomial_stderr(0.0, 10) == 0.0
    assert math.isnan(binomial_stderr(0.5, 0))
