"""Quality against model bytes: the Pareto front of dense, quantised, low-rank and combined variants.

A row is one variant of one model: how it was made (``kind``: dense or low-rank; ``quant``:
fp32, bf16, int8, int4), its targeted reduction, the bytes of the targeted layers (the part that
compression and quantisation act on: weights or factors, scales, biases), the bytes of the whole
state dict (what a checkpoint stores) and one quality figure (zero-shot top-1, higher is better;
perplexity, lower is better). The front is taken over the targeted bytes: the rest of the model
(embeddings, convolutions, norms) is the same in every variant, so it only shifts every row by
one constant. A row is on the front when no other row is at most as large *and* at least as
good, one of the two strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class BytesRow:
    label: str  # e.g. "PGSVD 40 % + int8"
    kind: str  # "dense" | "low-rank"
    quant: str  # "fp32" | "bf16" | "int8" | "int4"
    target: float | None  # targeted parameter reduction of the low-rank part (None: dense)
    targeted_bytes: int  # tensors of the targeted layers (weights or factors, scales, biases)
    model_bytes: int  # every tensor of the state dict, each storage once
    metric: float

    def to_dict(self) -> dict:
        return asdict(self)


def pareto_front(rows: Sequence[BytesRow], higher_is_better: bool) -> list[bool]:
    """For each row, whether it is Pareto-optimal in (fewer bytes, better metric)."""

    def better_or_equal(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    def strictly_better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    on_front = []
    for r in rows:
        dominated = any(
            o is not r
            and o.targeted_bytes <= r.targeted_bytes
            and better_or_equal(o.metric, r.metric)
            and (o.targeted_bytes < r.targeted_bytes or strictly_better(o.metric, r.metric))
            for o in rows
        )
        on_front.append(not dominated)
    return on_front


def bytes_table(rows: Sequence[BytesRow], metric_name: str, higher_is_better: bool) -> str:
    """Markdown: rows sorted by targeted bytes, sizes relative to the dense fp32 row, front membership."""
    front = pareto_front(rows, higher_is_better)
    dense = next((r for r in rows if r.kind == "dense" and r.quant == "fp32"), None)
    order = sorted(range(len(rows)), key=lambda i: (rows[i].targeted_bytes, rows[i].label))
    lines = [
        f"| variant | targeted bytes | vs dense fp32 | whole model bytes | vs dense fp32 | {metric_name} | Pareto front |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i in order:
        r = rows[i]
        rel_t = f"{r.targeted_bytes / dense.targeted_bytes:.3f}" if dense else "-"
        rel_m = f"{r.model_bytes / dense.model_bytes:.3f}" if dense else "-"
        lines.append(
            f"| {r.label} | {r.targeted_bytes:,} | {rel_t} | {r.model_bytes:,} | {rel_m} | {r.metric:.2f} | {'**yes**' if front[i] else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot_bytes_front(rows: Sequence[BytesRow], path: str | Path, metric_name: str, higher_is_better: bool, title: str = "") -> Path:
    """PNG: one marker series per quantisation, low-rank variants joined by target; the front as a step line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = {"fp32": "o", "bf16": "s", "int8": "^", "int4": "v"}
    for quant in sorted({r.quant for r in rows}, key=list(markers).index):
        low = sorted((r for r in rows if r.quant == quant and r.kind == "low-rank"), key=lambda r: r.targeted_bytes)
        if low:
            ax.plot([r.targeted_bytes / 2**20 for r in low], [r.metric for r in low], marker=markers[quant], label=f"low-rank {quant}")
        for r in rows:
            if r.quant == quant and r.kind == "dense":
                ax.scatter([r.targeted_bytes / 2**20], [r.metric], marker=markers[quant], s=80, facecolors="none", edgecolors="black")
                ax.annotate(f"dense {quant}", (r.targeted_bytes / 2**20, r.metric), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = sorted((r for r, f in zip(rows, pareto_front(rows, higher_is_better)) if f), key=lambda r: r.targeted_bytes)
    if front:
        ax.step([r.targeted_bytes / 2**20 for r in front], [r.metric for r in front], where="post", color="grey", linestyle="--", label="Pareto front")
    ax.set_xlabel("bytes of the targeted layers (MiB)")
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(path)
    return path
