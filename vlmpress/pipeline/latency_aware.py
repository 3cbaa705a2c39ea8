"""``--latency-aware``: keep layers dense where their factorisation would run slower on the device.

Glue between rank planning (:func:`vlmpress.pipeline.rank_plan.keep_dense_where_slower`) and the
timings of :class:`vlmpress.deploy.latency.LatencyTable`. Rows per GEMM are the calibration
batch's (tokens seen by the layer / its calls), else ``batch_size`` rows (one token per sample).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from vlmpress.deploy.latency import LatencyTable
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.pipeline.rank_plan import LayerPlan, keep_dense_where_slower
from vlmpress.pipeline.report import LayerReport

logger = logging.getLogger(__name__)


def gemm_rows(name: str, group: str, collectors: dict | None, config: CompressionConfig) -> int:
    """Input rows of one forward of layer ``name`` at the calibration batch size."""
    collector = (collectors or {}).get(group)
    if collector is not None and collector.call_count(name):
        return max(1, round(collector.token_count(name) / collector.call_count(name)))
    return config.batch_size


def latency_aware_ranks(
    plans: list[LayerPlan],
    ranks: dict[str, int],
    compressible: set[str],
    dtypes: dict[str, torch.dtype],
    collectors: dict | None,
    config: CompressionConfig,
    device: torch.device,
    plan_ranks,
    table: LatencyTable | None = None,
) -> tuple[dict[str, int], dict[str, tuple], dict[str, Any]]:
    """(ranks, {layer: (rank, dense s, low-rank s, rows)} kept dense for latency, re-plan extras).

    ``plan_ranks(plans, config)`` is the pipeline's planner (returns ranks, tolerances, ratio); with
    a target reduction it re-plans the remaining layers for the share they must now remove.
    """
    table = table or LatencyTable(device)
    rows = {p.name: gemm_rows(p.name, p.group, collectors, config) for p in plans}
    timings: dict[str, tuple] = {}

    def slower(plan: LayerPlan, rank: int) -> bool:
        dense_s, lowrank_s = table.compare(plan.out_features, plan.in_features, rank, rows[plan.name], dtypes[plan.name])
        timings[plan.name] = (rank, dense_s, lowrank_s, rows[plan.name])
        return lowrank_s > dense_s

    extras: dict[str, Any] = {}

    def replan(rest: list[LayerPlan], rest_target: float) -> dict[str, int]:
        sub = dataclasses.replace(config, target_reduction=rest_target, ratio=None)
        new_ranks, tolerances, ratio = plan_ranks(rest, sub)
        extras.update(tolerances=tolerances, ratio=ratio)
        return new_ranks

    target = config.target_reduction
    fixed = {p.name for p in plans if p.name not in compressible}
    new_ranks, kept = keep_dense_where_slower(plans, ranks, slower, replan if target is not None else None, target, fixed)
    if table.measured:
        logger.info("latency-aware ranks: timed %d layer shapes on %s (cache %s)", table.measured, table.device_name, table.path)
    return new_ranks, {name: timings[name] for name in kept}, extras


def latency_dense_report(plan: LayerPlan, timing: tuple, tol: float | None, ratio: float | None) -> LayerReport:
    """Report row of a layer kept dense because its factorisation ran slower on the device."""
    rank, dense_s, lowrank_s, rows = timing
    return LayerReport(
        plan.name, plan.group, plan.kind, plan.out_features, plan.in_features, None,
        f"dense (latency: rank {rank} {1e3 * lowrank_s:.3f} ms >= dense {1e3 * dense_s:.3f} ms at {rows} rows)",
        plan.dense_params, plan.dense_params, tol, ratio,
    )
