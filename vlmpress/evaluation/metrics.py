"""Classification metrics with explicit, tested rules for ties, small class counts and NaNs.

Rules (all deterministic):

* **Rank of the true class** = number of classes scoring strictly higher than it, plus the number
  of classes with an *equal* score and a *lower* class index. Ties are thus broken in favour of the
  lowest class index, like a stable argmax. ``torch.topk`` gives no such guarantee, so it is not
  used.
* **Top-k** counts a sample correct when its rank is below ``k' = min(k, n_classes)``; with fewer
  than 5 classes "top-5" is top-``n_classes`` (always 1.0). ``k'`` is reported (``top5_k``).
* **Mean per-class recall** averages the per-class top-1 recall over the classes that have at
  least one sample (absent classes have no defined recall and are not counted as zero).
* **Non-finite logits** (a broken compressed model can emit NaN): such a sample counts as wrong at
  every k (rank = n_classes) and is reported in ``n_nonfinite``, never silently right.
* **Standard error** of top-1 is the binomial ``sqrt(p (1 - p) / n)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch


def true_class_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of each sample's true class under the tie rule above; ``n_classes`` for NaN rows."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (n, n_classes), got shape {tuple(logits.shape)}")
    labels = labels.to(device=logits.device, dtype=torch.long).view(-1)
    if labels.numel() != logits.shape[0]:
        raise ValueError("logits and labels differ in batch size")
    n_classes = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
    logits = logits.float()
    true = logits.gather(1, labels[:, None])
    idx = torch.arange(n_classes, device=logits.device)[None, :]
    higher = (logits > true).sum(1)
    tied_before = ((logits == true) & (idx < labels[:, None])).sum(1)
    rank = higher + tied_before
    bad = ~torch.isfinite(logits).all(1)
    return torch.where(bad, torch.full_like(rank, n_classes), rank)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose true class ranks within ``min(k, n_classes)``."""
    ranks = true_class_rank(logits, labels)
    return float((ranks < min(k, logits.shape[1])).double().mean()) if ranks.numel() else float("nan")


@dataclass
class ClassificationMetrics:
    """Metrics of one evaluation; accuracies are fractions in [0, 1]."""

    top1: float
    top5: float
    mean_per_class_recall: float
    n_images: int
    n_classes: int
    n_classes_present: int
    top1_stderr: float
    top5_k: int
    n_nonfinite: int = 0
    per_class_recall: dict[int, float] = field(default_factory=dict)

    def as_dict(self, per_class: bool = False) -> dict:
        out = asdict(self)
        if not per_class:
            out.pop("per_class_recall")
        return out


def metrics_from_ranks(
    ranks: torch.Tensor, labels: torch.Tensor, n_classes: int, *, n_nonfinite: int = 0
) -> ClassificationMetrics:
    """Top-1/top-5/mean per-class recall from true-class ranks (see module rules)."""
    ranks = ranks.view(-1).cpu()
    labels = labels.view(-1).cpu().long()
    n = int(ranks.numel())
    if n == 0:
        raise ValueError("no samples to compute metrics from")
    k5 = min(5, n_classes)
    hit1 = (ranks < 1).double()
    top1 = float(hit1.mean())
    top5 = float((ranks < k5).double().mean())
    per_class: dict[int, float] = {}
    counts = torch.bincount(labels, minlength=n_classes)
    hits = torch.bincount(labels, weights=hit1, minlength=n_classes)
    for c in torch.nonzero(counts).view(-1).tolist():
        per_class[c] = float(hits[c] / counts[c])
    mpcr = sum(per_class.values()) / len(per_class)
    return ClassificationMetrics(
        top1=top1,
        top5=top5,
        mean_per_class_recall=mpcr,
        n_images=n,
        n_classes=n_classes,
        n_classes_present=len(per_class),
        top1_stderr=binomial_stderr(top1, n),
        top5_k=k5,
        n_nonfinite=n_nonfinite,
        per_class_recall=per_class,
    )


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> ClassificationMetrics:
    """All metrics from a full (n, n_classes) logit matrix."""
    labels = torch.as_tensor(labels)
    ranks = true_class_rank(logits, labels)
    nonfinite = int((~torch.isfinite(logits.float()).all(1)).sum())
    return metrics_from_ranks(ranks, labels, logits.shape[1], n_nonfinite=nonfinite)


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else float("nan")


class MetricAccumulator:
    """Feeds batches of logits; keeps only one rank per sample (no (n x classes) matrix in memory)."""

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self._ranks: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.n_nonfinite = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.shape[1] != self.n_classes:
            raise ValueError(f"expected {self.n_classes} classes, got logits of shape {tuple(logits.shape)}")
        self._ranks.append(true_class_rank(logits, labels).cpu())
        self._labels.append(torch.as_tensor(labels).view(-1).cpu().long())
        self.n_nonfinite += int((~torch.isfinite(logits.float()).all(1)).sum())

    def __len__(self) -> int:
        return sum(r.numel() for r in self._ranks)

    def compute(self) -> ClassificationMetrics:
        if not self._ranks:
            raise ValueError("no batches were added")
        return metrics_from_ranks(
            torch.cat(self._ranks), torch.cat(self._labels), self.n_classes, n_nonfinite=self.n_nonfinite
        )
