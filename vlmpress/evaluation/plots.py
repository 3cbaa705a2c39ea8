"""Accuracy vs parameter reduction per method (PNG, matplotlib's Agg canvas; no display needed).

One panel per dataset plus an "Average" panel (rows with every dataset only). Each method is a
line through its compression levels, starting from the base model at 0% reduction.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from vlmpress.data.datasets import dataset_title
from vlmpress.errors import ConfigError
from vlmpress.evaluation.results import EvalRecord
from vlmpress.evaluation.table import _method_rank, build_table

logger = logging.getLogger(__name__)


def plot_accuracy_vs_reduction(
    records: Iterable[EvalRecord],
    path: str | Path,
    *,
    metric: str = "top1",
    datasets: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of ``metric`` (top1 | top5, in %) against targeted parameter reduction (%)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric not in ("top1", "top5"):
        raise ConfigError(f"metric must be 'top1' or 'top5', got '{metric}'")
    table = build_table(records, datasets=datasets)
    if not table.rows:
        raise ConfigError("no records to plot")
    which = 0 if metric == "top1" else 1
    panels = list(table.datasets) + (["__average__"] if len(table.datasets) > 1 else [])

    def value(row, panel):
        if panel == "__average__":
            avg = row.average(table.datasets)
            return None if avg is None else avg[which]
        cell = row.cells.get(panel)
        return None if cell is None else cell[which]

    n = len(panels)
    cols = min(n, 4)
    rows_n = (n + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows_n), layout="constrained")
    FigureCanvasAgg(fig)
    multi_base = table.show_model
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        bases = {r.base_model: r for r in table.rows if r.is_base}
        series: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        method_rank = {(r.base_model, r.display_label): _method_rank(r.method) for r in table.rows}
        for row in table.rows:
            v = value(row, panel)
            if v is None or row.is_base:
                continue
            series[(row.base_model, row.display_label)].append((100 * row.reduction, 100 * v))
        ordered = sorted(series.items(), key=lambda kv: (kv[0][0], method_rank.get(kv[0], 99), kv[0][1]))
        for (base, label), pts in ordered:
            base_row = bases.get(base)
            bv = value(base_row, panel) if base_row is not None else None
            if bv is not None:
                pts = [(0.0, 100 * bv)] + pts
            pts.sort()
            name = f"{label} [{base}]" if multi_base else label
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for base, base_row in bases.items():
            bv = value(base_row, panel)
            if bv is not None:
                ax.axhline(100 * bv, color="gray", linestyle="--", linewidth=0.8)
                ax.plot([0.0], [100 * bv], marker="*", color="black", markersize=9,
                        label=f"Base [{base}]" if multi_base else "Base")
        ax.set_title("Average" if panel == "__average__" else dataset_title(panel))
        ax.set_xlabel("parameter reduction of targeted layers (%)")
        ax.set_ylabel(f"{'Top-1' if which == 0 else 'Top-5'} accuracy (%)")
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    logger.info("wrote %s", path)
    return path
