"""Paper Table 1 layout for LLM results: Base, then every method at every compression level.

Pure function of result records (``results.jsonl`` lines written by ``run_lm``): rows are
``Base`` and (reduction level x method); columns are perplexity per (text, seq_len, stride) --
the context length is part of the column name because it moves published numbers the most --
then each task's accuracy and their average.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlmpress.pipeline.config import METHOD_LABELS

METHOD_ORDER = ("base", "svd", "svd_llm", "svd_als", "pgsvd")


def _ppl_column(record: dict[str, Any]) -> str:
    dataset = str(record.get("dataset", "?"))
    if "/" in dataset and Path(dataset).suffix:  # a text file: its name is enough in a table
        dataset = Path(dataset).name
    return f"PPL {dataset} (L={record.get('seq_len')}, s={record.get('stride')})"


def _level(record: dict[str, Any]) -> int:
    return 0 if record.get("method", "base") == "base" else int(round(100 * float(record.get("reduction") or 0.0)))


def _row_label(record: dict[str, Any]) -> str:
    """The row's name: ``--label`` when given, else the method plus a non-default mode/propagation."""
    if record.get("label"):
        return str(record["label"])
    method = record.get("method") or "base"
    name = METHOD_LABELS.get(method, method)
    if record.get("mode") == "sequential":
        name += f" (sequential, {record.get('propagation') or 'compressed'})"
    return name


def build_lm_table(records: Iterable[dict[str, Any]]) -> tuple[str, str]:
    """(markdown, csv) of the records; later records win when a cell is given twice."""
    from vlmpress.evaluation.lm_tasks import task_accuracy

    rows: dict[tuple, dict[str, Any]] = {}
    ppl_cols: list[str] = []
    task_cols: list[str] = []
    for rec in records:
        method = rec.get("method") or "base"
        # distinct runs (another label, mode, propagation or checkpoint) never share a row;
        # a re-evaluation of the same checkpoint replaces its earlier cells
        key = (_level(rec), method, rec.get("label") or "", rec.get("mode") or "", rec.get("propagation") or "",
               "" if method == "base" else str(rec.get("model", "")))
        row = rows.setdefault(key, {"reduction": rec.get("reduction") or 0.0, "cells": {}, "tasks": {}, "record": rec})
        metrics = rec.get("metrics") or {}
        if "perplexity" in metrics:
            col = _ppl_column(rec)
            if col not in ppl_cols:
                ppl_cols.append(col)
            row["cells"][col] = metrics["perplexity"]
        for task, values in (metrics.get("tasks") or {}).items():
            acc = task_accuracy(values) if isinstance(values, dict) else values
            if acc is None:
                continue
            if task not in task_cols:
                task_cols.append(task)
            row["tasks"][task] = acc
    header = ["Reduction", "Method", *ppl_cols, *task_cols] + (["Avg"] if task_cols else [])

    def order(item):
        (level, method, *rest), _ = item
        return (level, METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method, *rest)

    labels = {key: _row_label(row["record"]) for key, row in rows.items()}
    per_level = [(key[0], name) for key, name in labels.items()]
    clashes = {item for item in per_level if per_level.count(item) > 1}
    table: list[list[str]] = []
    for key, row in sorted(rows.items(), key=order):
        level, method = key[0], key[1]
        label = labels[key]
        if (level, label) in clashes and method != "base":  # same description, different checkpoints: name them
            label += f" [{Path(str(row['record'].get('model', ''))).name}]"
        cells = ["-" if method == "base" else f"{100 * row['reduction']:.1f}%", label]
        cells += [f"{row['cells'][c]:.2f}" if c in row["cells"] else "" for c in ppl_cols]
        accs = [row["tasks"].get(t) for t in task_cols]
        cells += [f"{100 * a:.1f}" if a is not None else "" for a in accs]
        if task_cols:
            have = [a for a in accs if a is not None]
            cells.append(f"{100 * sum(have) / len(have):.1f}" if len(have) == len(task_cols) else "")
        table.append(cells)
    md = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in table]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(table)
    return "\n".join(md) + "\n", buf.getvalue()


__all__ = ["build_lm_table"]
