"""Zero-shot LM tasks (ARC, HellaSwag, PIQA, ...) through EleutherAI's lm-evaluation-harness.

The (compressed) model is evaluated in memory -- ``HFLM(pretrained=model, tokenizer=tok)`` -- so
``LowRankLinear`` layers are used as they are, with no dense export. lm-eval is optional
(``pip install vlmpress[llm]``); without it a clear error says how to install it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from vlmpress.errors import VlmpressError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vlmpress[llm]'  (or: pip install lm-eval)"
#: metrics kept from lm-eval results, best first (acc_norm is the paper's choice where it exists)
METRICS = ("acc", "acc_norm", "exact_match", "f1")


class MissingDependencyError(VlmpressError, ImportError):
    """An optional dependency needed for this feature is not installed."""


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise MissingDependencyError(f"LM task evaluation needs lm-eval, which is not installed ({err}); {INSTALL_HINT}") from None
    return lm_eval, HFLM


def parse_task_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``simple_evaluate`` output -> {task: {metric: value}} (keys like ``acc,none`` -> ``acc``)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        row = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name in METRICS and isinstance(value, (int, float)) and filt in ("", "none"):
                row[name] = float(value)
        if row:
            out[task] = row
    return out


def evaluate_lm_tasks(
    adapter,
    tasks: Sequence[str],
    *,
    batch_size: int | str = 1,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    device: str | None = None,
    include_path: str | None = None,
) -> dict[str, Any]:
    """Run ``lm_eval.simple_evaluate`` on the in-memory model; returns per-task metrics + raw config.

    ``include_path`` is a folder of extra lm-eval task YAMLs (e.g. a task over local files).
    """
    if not tasks:
        raise VlmpressError("no lm-eval tasks given (e.g. --tasks arc_easy,piqa)")
    lm_eval, HFLM = _import_lm_eval()
    if getattr(adapter, "tokenizer", None) is None:
        raise VlmpressError("lm-eval needs the model's tokenizer, and this model has none")
    kwargs: dict[str, Any] = {"pretrained": adapter.model, "tokenizer": adapter.tokenizer, "batch_size": batch_size}
    if device is not None:
        kwargs["device"] = str(device)
    lm = HFLM(**kwargs)
    extra: dict[str, Any] = {}
    if include_path is not None:
        from pathlib import Path

        from lm_eval.tasks import TaskManager

        if not Path(include_path).is_dir():
            raise VlmpressError(f"--task-include {include_path} is not a directory (expected a folder of lm-eval task YAMLs)")
        extra["task_manager"] = TaskManager(include_path=str(include_path))
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, **extra)
    except KeyError as err:  # lm-eval's way of saying "no such task"
        raise VlmpressError(f"lm-eval does not know task {err}; check --tasks (and --task-include for local tasks)") from None
    metrics = parse_task_results(results or {})
    missing = [t for t in tasks if t not in metrics]
    if missing:
        logger.warning("lm-eval returned no accuracy for: %s", ", ".join(missing))
    return {"tasks": metrics, "num_fewshot": num_fewshot, "limit": limit}


def task_accuracy(metrics: dict[str, float]) -> float | None:
    """The accuracy reported in tables: acc_norm when present (as in the paper), else acc."""
    for key in ("acc_norm", "acc", "exact_match"):
        if key in metrics:
            return metrics[key]
    return None


__all__ = [
    "INSTALL_HINT",
    "MissingDependencyError",
    "evaluate_lm_tasks",
    "lm_eval_available",
    "parse_task_results",
    "task_accuracy",
]
