#!/usr/bin/env python
"""docs/generative-vlms.md table and split check for a generative-VLM grid (``scripts/genvlm_grid.py`` results).

    python scripts/genvlm_table.py eval/results/caltech101-llava

Reads OUT/results.jsonl and writes OUT/summary.md: one row per (reduction, method) with top-1 and
its binomial standard error, top-5, mean per-class recall, caption perplexity and the tolerances
used; then, per reduction, whether PGSVD's auto split keeps >= 97 % of base top-1 and is at most
one standard error below the best fixed split (shared, or a fixed eps_v / eps_t proportion).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _eps(record: dict) -> str:
    tol = (record.get("compression") or {}).get("tolerances") or {}
    if not tol:
        return "–"
    if "*" in tol:
        return f"{tol['*']:.3f} / {tol['*']:.3f}"
    return f"{tol.get('vision', float('nan')):.3f} / {tol.get('text', float('nan')):.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="grid output directory (holds results.jsonl)")
    args = p.parse_args(argv)
    out = Path(args.out)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    base = next(r for r in records if r["label"] == "Base")
    rows = ["| Reduction | Method | Top-1 (%) ± s.e. | Top-5 (%) | Mean per-class recall (%) | Caption PPL | eps (vision / text) |",
            "|---|---|---|---|---|---|---|"]

    def row(level: str, r: dict) -> str:
        m = r["metrics"]
        return (f"| {level} | {r['label']} | {100 * m['top1']:.2f} ± {100 * r['top1_stderr']:.2f} | {100 * m['top5']:.2f} | "
                f"{100 * m['mean_per_class_recall']:.2f} | {m['caption_perplexity']:.3f} | {_eps(r)} |")

    rows.append(row("–", base))
    by_level: dict[int, list[dict]] = {}
    for r in records:
        if r["label"] != "Base":
            by_level.setdefault(round(100 * r["compression"]["target_reduction"]), []).append(r)
    checks = []
    for level in sorted(by_level):
        for r in by_level[level]:
            rows.append(row(f"{level} %", r))
        auto = [r for r in by_level[level] if r["label"] == "PGSVD (auto)"]
        fixed = [r for r in by_level[level] if r["label"] == "PGSVD (shared)" or "fixed split" in r["label"]]
        if auto and fixed:
            a = auto[-1]
            best = max(fixed, key=lambda r: r["metrics"]["top1"])
            keep = a["metrics"]["top1"] / base["metrics"]["top1"]
            gap = best["metrics"]["top1"] - a["metrics"]["top1"]
            checks.append(
                f"- {level} %: auto {100 * a['metrics']['top1']:.2f} % = {100 * keep:.1f} % of base top-1; best fixed split "
                f"{best['label']} {100 * best['metrics']['top1']:.2f} % ± {100 * best['top1_stderr']:.2f}; auto - best = "
                f"{-100 * gap:+.2f} pp ({'not more than' if gap <= best['top1_stderr'] else 'MORE than'} one s.e. below)"
            )
    text = "\n".join(rows) + "\n\nAuto split vs fixed splits:\n\n" + "\n".join(checks) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
