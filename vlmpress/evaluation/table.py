"""The paper's Table 2 layout from result records: a pure function (records -> rows).

Rows are Base and each compressed model, grouped by compression level (targeted-layer parameter
reduction rounded to a whole percent) and ordered SVD, SVD-LLM, SVD-ALS, PGSVD within a level;
columns are ``top1/top5`` per dataset and their average. Usage::

    from vlmpress.evaluation.results import read_records
    from vlmpress.evaluation.table import build_table
    table = build_table(read_records("results/results.jsonl"))
    print(table.to_markdown()); Path("table.csv").write_text(table.to_csv())

Rules: a row is one (base model, model, label, templates); when a cell was evaluated more than
once the latest record wins (noted). The average is taken over the table's datasets only when the
row has all of them -- otherwise it is left empty rather than averaging a different set.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vlmpress.data.datasets import DATASETS, dataset_title
from vlmpress.evaluation.results import EvalRecord, method_display

#: row order of methods within a compression level
METHOD_ORDER = ("base", "svd", "svd_llm", "svd_als", "pgsvd")


@dataclass
class TableRow:
    """One table row; accuracies are fractions in [0, 1]."""

    base_model: str
    model: str
    method: str
    label: str
    templates: str
    reduction: float  # mean targeted reduction over the row's records (0 for base)
    cells: dict[str, tuple[float, float]]  # dataset -> (top1, top5)
    stderr: dict[str, float] = field(default_factory=dict)  # dataset -> top1 standard error
    n_images: dict[str, int] = field(default_factory=dict)

    @property
    def is_base(self) -> bool:
        return self.method == "base"

    @property
    def level(self) -> str:
        """Compression column: '' for base, else the reduction as a whole percent ('20%')."""
        return "" if self.is_base else f"{round(100 * self.reduction):d}%"

    @property
    def display_label(self) -> str:
        label = "Base" if self.is_base and self.label in ("", "Base", "base") else self.label
        return label if self.templates == "ensemble" else f"{label} ({self.templates} template)"

    def average(self, datasets: Sequence[str]) -> tuple[float, float] | None:
        if not datasets or any(d not in self.cells for d in datasets):
            return None
        return (
            sum(self.cells[d][0] for d in datasets) / len(datasets),
            sum(self.cells[d][1] for d in datasets) / len(datasets),
        )


@dataclass
class Table:
    """Rows + columns of the zero-shot table, with Markdown/CSV renderers."""

    datasets: list[str]
    rows: list[TableRow]
    notes: list[str] = field(default_factory=list)

    @property
    def show_model(self) -> bool:
        return len({r.base_model for r in self.rows}) > 1

    def to_markdown(self, digits: int = 2) -> str:
        def pair(v: tuple[float, float] | None) -> str:
            return "—" if v is None else f"{100 * v[0]:.{digits}f}/{100 * v[1]:.{digits}f}"

        head = (["Model"] if self.show_model else []) + ["Compression", "Method"]
        head += [dataset_title(d) for d in self.datasets] + ["Average"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        prev: tuple[str, str] | None = None
        for row in self.rows:
            group = (row.base_model, row.level)
            level = row.level if group != prev else ""
            model = row.base_model if (prev is None or prev[0] != row.base_model) else ""
            prev = group
            cells = ([model] if self.show_model else []) + [level, row.display_label]
            cells += [pair(row.cells.get(d)) for d in self.datasets] + [pair(row.average(self.datasets))]
            lines.append("| " + " | ".join(cells) + " |")
        text = "Top-1/Top-5 zero-shot accuracy (%).\n\n" + "\n".join(lines) + "\n"
        if self.notes:
            text += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return text

    def to_csv(self) -> str:
        """One line per row; accuracies in percent (4 decimals), standard errors of top-1 too."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = ["base_model", "model", "compression", "method", "label", "templates", "reduction"]
        for d in self.datasets:
            header += [f"{d}_top1", f"{d}_top5", f"{d}_top1_stderr", f"{d}_n_images"]
        header += ["avg_top1", "avg_top5"]
        writer.writerow(header)

        def pct(x: float | None) -> str:
            return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.4f}"

        for row in self.rows:
            line = [row.base_model, row.model, row.level or "base", row.method, row.display_label, row.templates,
                    f"{row.reduction:.6f}"]
            for d in self.datasets:
                cell = row.cells.get(d)
                line += [pct(cell[0] if cell else None), pct(cell[1] if cell else None),
                         pct(row.stderr.get(d)), str(row.n_images.get(d, ""))]
            avg = row.average(self.datasets)
            line += [pct(avg[0] if avg else None), pct(avg[1] if avg else None)]
            writer.writerow(line)
        return buf.getvalue()


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _row_label(rec: EvalRecord) -> str:
    if rec.label:
        return rec.label
    return "Base" if rec.is_base else method_display(rec.method)


def build_table(records: Iterable[EvalRecord], *, datasets: Sequence[str] | None = None) -> Table:
    """Table 2 rows from records (pure: no I/O). ``datasets`` picks and orders the columns."""
    records = list(records)
    if datasets is None:
        seen = list(dict.fromkeys(r.dataset for r in records))
        datasets = [d for d in DATASETS if d in seen] + [d for d in seen if d not in DATASETS]
    datasets = list(datasets)
    wanted = set(datasets)
    notes: list[str] = []

    rows: dict[tuple, TableRow] = {}
    reductions: dict[tuple, list[float]] = {}
    chosen: dict[tuple, EvalRecord] = {}
    base_order: dict[str, int] = {}
    for rec in records:
        if rec.dataset not in wanted:
            continue
        base = rec.base_model or rec.model
        base_order.setdefault(base, len(base_order))
        key = (base, rec.model, _row_label(rec), rec.templates)
        row = rows.get(key)
        if row is None:
            row = rows[key] = TableRow(base, rec.model, rec.method, _row_label(rec), rec.templates, 0.0, {})
            reductions[key] = []
        if (key, rec.dataset) in chosen:
            notes.append(
                f"{row.display_label} ({rec.model}) was evaluated on {rec.dataset} more than once; the latest record is used"
            )
        chosen[(key, rec.dataset)] = rec
        hits = (rec.compression or {}).get("bound_hits") or []
        if hits and not row.label.endswith(" †"):
            row.label += " †"  # what ran is not what the label says: see the note
            notes.append(f"† {row.label[:-2]} ({rec.model}): {'; '.join(hits)}")
        row.cells[rec.dataset] = (rec.top1, rec.top5)
        row.stderr[rec.dataset] = rec.top1_stderr
        row.n_images[rec.dataset] = rec.n_images
        reductions[key].append(float(rec.reduction or 0.0))
    for key, row in rows.items():
        row.reduction = sum(reductions[key]) / len(reductions[key]) if reductions[key] else 0.0

    ordered = sorted(
        rows.values(),
        key=lambda r: (
            base_order[r.base_model],
            not r.is_base,
            round(100 * r.reduction) if not r.is_base else -1,
            _method_rank(r.method),
            r.label,
            r.templates,
            r.model,
        ),
    )
    # which split / how many images each column used (a table mixing splits is flagged)
    for d in datasets:
        recs = [rec for (k, ds), rec in chosen.items() if ds == d]
        splits = sorted({r.split for r in recs})
        sizes = sorted({r.n_images for r in recs})
        errs = [r.top1_stderr for r in recs if r.top1_stderr is not None]
        se = f"; top-1 standard error {100 * min(errs):.2f}-{100 * max(errs):.2f} pp (binomial)" if errs else ""
        if len(splits) == 1 and len(sizes) == 1:
            notes.append(f"{dataset_title(d)}: split {splits[0]}, {sizes[0]} images{se}")
        elif recs:
            notes.append(f"{dataset_title(d)}: MIXED splits/sizes across rows: {', '.join(splits)}; n = {sizes}")
    incomplete = [r.display_label for r in ordered if r.average(datasets) is None]
    if incomplete and len(datasets) > 1:
        notes.append(f"Average left empty for rows missing a dataset: {', '.join(incomplete)}")
    return Table(datasets=datasets, rows=ordered, notes=list(dict.fromkeys(notes)))
