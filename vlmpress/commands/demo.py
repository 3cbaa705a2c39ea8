"""``vlmpress demo``: the offline main job on the embedded digits reference CLIP."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train (or load) the digits reference CLIP, compress it with 4 methods x 4 levels, evaluate, report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default=None, help="suite YAML (default: eval/suites/digits-demo.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: runs/demo)")
    p.add_argument("--methods", nargs="+", help="subset of svd svd_llm svd_als pgsvd")
    p.add_argument("--reductions", nargs="+", type=float, help="targeted-parameter reductions, e.g. 0.2 0.4")
    p.add_argument("--device", help="auto (cuda when present) or cpu")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny training, 2 methods x 1 level")


def run(args: argparse.Namespace) -> int:
    from vlmpress.io.resources import resource_path
    from vlmpress.evaluation.suite import SuiteConfig, run_suite

    suite = args.suite or resource_path("eval/suites/digits-demo.yaml")
    overrides = {"out": args.out, "methods": args.methods, "reductions": args.reductions, "device": args.device}
    if args.quick:
        overrides.update(
            methods=args.methods or ["svd", "pgsvd"], reductions=args.reductions or [0.4], als_iters=2,
            n_images=32, n_captions=32, limit=60, out=args.out or "runs/demo-quick",
        )
    cfg = SuiteConfig.from_yaml(suite, **overrides)
    result = run_suite(cfg, quick=args.quick)
    print(f"\n## {cfg.name}: zero-shot top-1 / top-5 (%), {len(result.records)} evaluations in {result.seconds:.0f} s\n")
    print(result.table_markdown)
    print(_parameter_table(result.records))
    print("\nfiles:")
    for key, path in result.files.items():
        print(f"  {key:<14} {Path(path)}")
    return 0


def _parameter_table(records) -> str:
    lines = ["", "| model | targeted params | whole-model params | targeted reduction | whole-model reduction |", "|---|---:|---:|---:|---:|"]
    seen = set()
    for r in records:
        c = r.compression or {}
        if r.model in seen:
            continue
        seen.add(r.model)
        if not c:
            continue
        lines.append(
            f"| {r.label} {round(100 * r.reduction)}% | {c['targeted_params_before']:,} -> {c['targeted_params_after']:,} | "
            f"{c['whole_model_params_before']:,} -> {c['whole_model_params_after']:,} | {100 * c['targeted_reduction']:.1f}% | "
            f"{100 * c['whole_model_reduction']:.1f}% |"
        )
    return "\n".join(lines)
