"""``vlmpress report``: Table 2 (Markdown + CSV) and an accuracy-vs-reduction plot from results.jsonl."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vlmpress.errors import ConfigError

HELP = "build Table 2 (zero-shot) or Table 1 (LLM perplexity/tasks) as Markdown + CSV, and plots, from results.jsonl"
LM_KINDS = ("perplexity", "lm_eval")
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="results.jsonl file(s), per-run .json files or result directories")
    p.add_argument("--out", help="directory for table.md, table.csv and the plot (default: next to the first results file)")
    p.add_argument("--datasets", help="comma-separated columns to show, in order (default: every dataset in the results)")
    p.add_argument("--plot", action="store_true", help="also draw accuracy vs parameter reduction per method (PNG)")
    p.add_argument("--metric", choices=["top1", "top5"], default="top1", help="metric of the plot (default: %(default)s)")


def _lm_records(paths: list[str]) -> list[dict]:
    """LLM result lines (``kind`` perplexity / lm_eval) of the given files; others are left to Table 2."""
    from vlmpress.evaluation.results import RESULTS_JSONL, iter_json_records

    out = []
    for p in map(Path, paths):
        p = p / RESULTS_JSONL if p.is_dir() else p
        if not p.is_file():
            continue
        for _, rec in iter_json_records(p):
            if isinstance(rec, dict) and rec.get("kind") in LM_KINDS:
                out.append(rec)
    return out


def _out_dir(args: argparse.Namespace) -> Path:
    first = Path(args.results[0])
    return Path(args.out) if args.out else (first if first.is_dir() else first.parent)


def _run_lm_table(args: argparse.Namespace, records: list[dict]) -> int:
    from vlmpress.evaluation.lm_table import build_lm_table
    from vlmpress.io import atomic_write_text

    markdown, csv_text = build_lm_table(records)
    out = _out_dir(args)
    md = atomic_write_text(out / "table.md", markdown)
    csv_path = atomic_write_text(out / "table.csv", csv_text)
    print(markdown)
    print(f"wrote {md} and {csv_path}")
    if args.plot:
        logger.warning("--plot draws zero-shot accuracy; LLM results have no plot yet")
    return 0


def run(args: argparse.Namespace) -> int:
    from vlmpress.evaluation.results import ResultsError, read_records
    from vlmpress.evaluation.table import build_table
    from vlmpress.io import atomic_write_text

    lm = _lm_records(args.results)
    if lm:
        return _run_lm_table(args, lm)
    records = read_records(args.results)
    if not records:
        raise ResultsError(f"no readable result records in {', '.join(args.results)}")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    table = build_table(records, datasets=datasets)
    if not table.rows:
        raise ConfigError(f"none of the records covers the requested datasets ({args.datasets})")
    out = _out_dir(args)
    md = atomic_write_text(out / "table.md", table.to_markdown())
    csv_path = atomic_write_text(out / "table.csv", table.to_csv())
    print(table.to_markdown())
    print(f"wrote {md} and {csv_path}")
    if args.plot:
        from vlmpress.evaluation.plots import plot_accuracy_vs_reduction

        png = plot_accuracy_vs_reduction(records, out / f"accuracy_vs_reduction_{args.metric}.png",
                                         metric=args.metric, datasets=datasets)
        print(f"wrote {png}")
    return 0
