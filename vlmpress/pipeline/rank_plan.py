"""Rank planning: per-layer ranks from tolerances or ratios, and solving for a target reduction.

Rank selection is data-agnostic (it uses only each weight's singular values, as in the paper), so
planning is cheap: a target reduction is met by bisection on a tolerance scale without touching
calibration data. Layers whose rank would not save parameters stay dense and count as dense.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from vlmpress.core.rank import align_rank, lowrank_params, ratio_rank, saves_parameters, tolerance_ranks
from vlmpress.errors import ConfigError

logger = logging.getLogger(__name__)

TARGET_TOLERANCE = 0.005  # a target reduction is met when within 0.5 percentage points


@dataclass
class LayerPlan:
    """What rank planning needs to know about one target layer."""

    name: str
    group: str
    kind: str
    out_features: int
    in_features: int
    bias: bool
    singular_values: torch.Tensor | None = None  # float64, descending

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)

    def params_at(self, rank: int | None) -> int:
        """Parameters with a rank-``rank`` factorisation, or dense when it would not save any."""
        if rank is None or not saves_parameters(self.out_features, self.in_features, rank):
            return self.dense_params
        return lowrank_params(self.out_features, self.in_features, rank, self.bias)


#: tolerance key -> the CLI flag that sets it (for error messages)
TOLERANCE_FLAGS = {"*": "--eps", "vision": "--eps-v", "text": "--eps-t", "attn": "--eps-attn", "mlp": "--eps-mlp"}


def tolerance_key(layer: LayerPlan, tolerances: dict[str, float]) -> str:
    """Which tolerance applies to a layer: ``group.kind`` > ``group`` > ``kind`` > ``*``."""
    for key in (f"{layer.group}.{layer.kind}", layer.group, layer.kind, "*"):
        if key in tolerances:
            return key
    given = ", ".join(TOLERANCE_FLAGS.get(k, k) for k in tolerances) or "none"
    covering = [TOLERANCE_FLAGS[k] for k in (layer.group, layer.kind) if k in TOLERANCE_FLAGS]
    fix = f"add {' or '.join(covering)}, or pass --eps for all layers" if covering else "pass --eps for all layers"
    raise ConfigError(
        f"no tolerance applies to layer '{layer.name}' (group '{layer.group}', kind '{layer.kind}'); "
        f"given: {given}. Every targeted layer needs one: {fix}"
    )


def _max_rank(layer: LayerPlan) -> int:
    return min(layer.out_features, layer.in_features)


def ranks_from_tolerances(layers: list[LayerPlan], tolerances: dict[str, float], multiple: int = 1) -> dict[str, int]:
    """Tolerance ranks; with ``multiple > 1`` rounded *up* to a multiple (the error stays <= eps)."""
    ranks = {}
    for layer in layers:
        if layer.singular_values is None:
            raise ValueError(f"layer {layer.name} has no spectrum")
        r = tolerance_ranks(layer.singular_values, [tolerances[tolerance_key(layer, tolerances)]])[0]
        ranks[layer.name] = align_rank(r, multiple, _max_rank(layer), up=True)
    return ranks


def ranks_from_ratio(layers: list[LayerPlan], ratio: float, multiple: int = 1) -> dict[str, int]:
    """Uniform-ratio ranks; with ``multiple > 1`` rounded *down* (the saving stays >= ratio)."""
    return {
        layer.name: align_rank(ratio_rank(layer.out_features, layer.in_features, ratio), multiple, _max_rank(layer), up=False)
        for layer in layers
    }


def reduction_of(layers: list[LayerPlan], ranks: dict[str, int]) -> float:
    """Fraction of the targeted layers' parameters removed by ``ranks`` (dense fallback included)."""
    before = sum(layer.dense_params for layer in layers)
    after = sum(layer.params_at(ranks.get(layer.name)) for layer in layers)
    return 1.0 - after / before if before else 0.0


def _bisect(fn: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 50) -> tuple[float, float]:
    """Closest point to ``target`` of a non-decreasing step function on [lo, hi]: (x, fn(x))."""
    f_lo, f_hi = fn(lo), fn(hi)
    if target <= f_lo:
        return lo, f_lo
    if target >= f_hi:
        return hi, f_hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        f_mid = fn(mid)
        if f_mid < target:
            lo, f_lo = mid, f_mid
        else:
            hi, f_hi = mid, f_mid
    return (lo, f_lo) if abs(f_lo - target) < abs(f_hi - target) else (hi, f_hi)


def tolerances_for_target(
    layers: list[LayerPlan], target: float, weights: dict[str, float], multiple: int = 1
) -> tuple[dict[str, float], float]:
    """Tolerances ``eps_k = min(1, s * weights[k])`` with s chosen so the reduction is closest to ``target``.

    ``weights`` fixes the proportion between groups (``{"*": 1}`` = one shared eps;
    ``{"vision": 1.3, "text": 0.7}`` = a fixed eps_v:eps_t split).
    """
    if not weights:
        raise ConfigError("no tolerance weights given")
    for layer in layers:
        tolerance_key(layer, weights)  # every layer must be covered
    s_max = 1.0 / min(weights.values())

    def tolerances(s: float) -> dict[str, float]:
        return {k: min(1.0, s * w) for k, w in weights.items()}

    reduction = lambda s: reduction_of(layers, ranks_from_tolerances(layers, tolerances(s), multiple))  # noqa: E731
    check_reachable(target, reduction(0.0), reduction(s_max), "tolerance")
    s, achieved = _bisect(reduction, target, 0.0, s_max)
    _warn_if_off(target, achieved, "tolerance")
    return tolerances(s), achieved


def ranks_for_target_ratio(layers: list[LayerPlan], target: float, multiple: int = 1) -> tuple[dict[str, int], float]:
    """Uniform-ratio ranks for a target reduction, with the rounding remainder distributed.

    Every layer gets ``floor((1 - target) * m n / (m + n))`` (the SVD-LLM convention); then, in order
    of the largest fractional parts, single ranks are added back while that moves the reduction
    closer to ``target``. Ranks stay uniform up to +-1, and the target is met to within one rank
    step of one layer even when many layers share a shape. With ``multiple > 1`` ranks start at the
    multiple below and steps are of ``multiple``.
    """
    step = max(1, multiple)
    smallest = {l.name: align_rank(1, step, _max_rank(l), up=True) for l in layers}
    check_reachable(target, 0.0, reduction_of(layers, smallest), "ratio")
    real = {l.name: (1 - target) * l.out_features * l.in_features / (l.out_features + l.in_features) for l in layers}
    ranks = {l.name: align_rank(int(real[l.name]), step, _max_rank(l), up=False) for l in layers}
    current = reduction_of(layers, ranks)
    for layer in sorted(layers, key=lambda l: (real[l.name] - ranks[l.name]) / step, reverse=True):
        old = ranks[layer.name]
        if old >= _max_rank(layer):
            continue
        ranks[layer.name] = min(old + step, _max_rank(layer))
        trial = reduction_of(layers, ranks)
        if abs(trial - target) < abs(current - target):
            current = trial
        else:
            ranks[layer.name] = old
    _warn_if_off(target, current, "ratio")
    return ranks, current


def check_reachable(target: float, lowest: float, highest: float, what: str) -> None:
    """Refuse a target reduction outside what any rank choice of these layers can reach."""
    if target > highest + TARGET_TOLERANCE or target < lowest - TARGET_TOLERANCE:
        raise ConfigError(
            f"target reduction {100 * target:.1f}% is not reachable by a {what} search on these layers: "
            f"reachable range is {100 * lowest:.1f}%-{100 * highest:.1f}% of the targeted parameters "
            "(choose a target in that range, or target more layers)"
        )


def _warn_if_off(target: float, achieved: float, what: str) -> None:
    if abs(achieved - target) > TARGET_TOLERANCE:
        logger.warning(
            "target reduction %.1f%% not reachable within 0.5 points by a %s search (achieved %.2f%%): "
            "the model has too few / too small target layers for finer steps",
            100 * target,
            what,
            100 * achieved,
        )


def keep_dense_where_slower(
    layers: list[LayerPlan],
    ranks: dict[str, int],
    slower: Callable[[LayerPlan, int], bool],
    replan: Callable[[list[LayerPlan], float], dict[str, int]] | None,
    target: float | None,
    fixed_dense: set[str] | None = None,
    max_rounds: int = 4,
) -> tuple[dict[str, int], set[str]]:
    """Deployment-aware ranks: (ranks, layers kept dense because low-rank would run slower).

    ``slower(layer, rank)`` says whether the layer's factorisation runs slower than the dense layer
    on the target device. Such layers stay dense; with a ``target`` reduction (of all ``layers``)
    the rest are re-planned by ``replan(rest, rest_target)`` so the whole still meets it: lower
    ranks elsewhere pay for the layers kept dense. ``fixed_dense`` layers (e.g. below break-even)
    stay dense and are not re-planned. Repeats while re-planning makes more layers slower.
    """
    ranks = dict(ranks)
    fixed = set(fixed_dense or ())
    kept: set[str] = set()
    before_all = sum(layer.dense_params for layer in layers)
    for _ in range(max_rounds):
        new = {
            layer.name for layer in layers
            if layer.name not in kept and layer.name not in fixed and slower(layer, ranks[layer.name])
        }
        if not new:
            break
        kept |= new
        if target is None or replan is None:
            continue
        rest = [layer for layer in layers if layer.name not in kept and layer.name not in fixed]
        if not rest:
            break
        dense_after = sum(layer.params_at(ranks[layer.name]) for layer in layers if layer.name in fixed) + sum(
            layer.dense_params for layer in layers if layer.name in kept
        )
        before_rest = sum(layer.dense_params for layer in rest)
        # whole reduction = 1 - (dense_after + after_rest) / before_all = target
        rest_target = 1.0 - ((1.0 - target) * before_all - dense_after) / before_rest
        if not 0.0 < rest_target < 1.0:
            logger.warning(
                "latency-aware ranks: the %d layers left to factorise cannot make up the %.1f%% target "
                "(would need %.1f%% of their parameters); keeping their ranks", len(rest), 100 * target, 100 * rest_target,
            )
            break
        ranks.update(replan(rest, rest_target))
    return ranks, kept
