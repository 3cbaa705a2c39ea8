"""LLM evaluation: perplexity (seq_len and stride in every result) and optional lm-eval tasks.

Designed to be wired into ``vlmpress eval``: :func:`add_lm_arguments` adds the LLM flags and
:func:`run_lm` reads ``args.model``, ``args.out``, ``args.device`` and ``args.batch_size`` plus
those flags. Each run writes one JSON file and appends the same record to ``results.jsonl`` in
``args.out`` (``build_lm_table`` turns those lines into the paper's Table 1 layout).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from vlmpress.errors import ConfigError

HELP = "evaluate a (compressed) causal LM: perplexity and lm-eval tasks"
logger = logging.getLogger(__name__)


def add_lm_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("language models")
    g.add_argument("--perplexity", metavar="FILE_OR_DATASET", help="text file, or a cached dataset such as wikitext2")
    g.add_argument("--seq-len", type=int, help="perplexity context length (default: 2048, or the model's maximum when shorter)")
    g.add_argument("--stride", type=int, help="perplexity window stride (default: seq-len, disjoint windows)")
    g.add_argument("--max-tokens", type=int, help="truncate the perplexity text to this many tokens")
    g.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. arc_easy,piqa (needs vlmpress[llm])")
    g.add_argument("--task-include", metavar="DIR", help="folder of extra lm-eval task YAMLs (e.g. tasks over local files)")
    g.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples (default: task default)")
    g.add_argument("--task-limit", type=float, help="lm-eval: examples per task (>= 1) or fraction (< 1), for debugging")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Stand-alone use: the common flags ``vlmpress eval`` provides, plus the LLM ones."""
    p.add_argument("--model", required=True, help="hf:NAME_OR_DIR or a compressed checkpoint directory")
    p.add_argument("--out", required=True, help="results directory (JSON per run + results.jsonl)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=1)
    add_lm_arguments(p)


def _describe_model(adapter) -> dict[str, Any]:
    """method / reduction of a compressed checkpoint (base when uncompressed)."""
    ckpt = getattr(adapter, "checkpoint_config", None)
    report = getattr(adapter, "compression_report", None)
    if not ckpt and report is not None:  # compressed in this process, not saved yet
        ckpt = {"method": report.method, "compression": report.summary(), "model_spec": report.model, "recipe": report.config}
    if not ckpt:
        return {"method": "base", "reduction": 0.0, "compression": None, "mode": None, "propagation": None}
    summary = ckpt.get("compression") or {}
    recipe = ckpt.get("recipe") or {}
    mode = recipe.get("mode") or "whole"
    return {
        "method": ckpt.get("method", "unknown"),
        "mode": mode,
        "propagation": recipe.get("propagate") if mode == "sequential" else None,
        "reduction": summary.get("targeted_reduction"),
        "compression": {
            k: summary.get(k)
            for k in ("tolerances", "ratio", "target_reduction", "targeted_reduction", "whole_model_reduction", "calibration")
        },
        "original_model": ckpt.get("model_spec"),
    }


def _check_args(args: argparse.Namespace) -> list[str]:
    tasks = [t.strip() for t in (getattr(args, "tasks", None) or "").split(",") if t.strip()]
    if not getattr(args, "perplexity", None) and not tasks:
        raise ConfigError("nothing to evaluate: pass --perplexity FILE_OR_DATASET and/or --tasks a,b")
    if args.seq_len is not None and not 2 <= args.seq_len <= 1 << 20:
        raise ConfigError(f"--seq-len must be in [2, {1 << 20}], got {args.seq_len}")
    for flag, value, low, high in (("--max-tokens", getattr(args, "max_tokens", None), 1, 1 << 40),
                                   ("--batch-size", getattr(args, "batch_size", None), 1, 1 << 16),
                                   ("--num-fewshot", getattr(args, "num_fewshot", None), 0, 1000)):
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{flag} must be in [{low}, {high}], got {value}")
    limit = getattr(args, "task_limit", None)
    if limit is not None and not (limit == limit and 0 < limit < 1e9):
        raise ConfigError(f"--task-limit must be a positive count or fraction, got {limit}")
    if args.stride is not None and args.seq_len is not None and not 1 <= args.stride <= args.seq_len:
        raise ConfigError(f"--stride must be in [1, seq-len={args.seq_len}], got {args.stride}")
    if tasks:
        from vlmpress.evaluation.lm_tasks import _import_lm_eval

        _import_lm_eval()  # fail before loading the model
    return tasks


def evaluate_lm_model(adapter, args: argparse.Namespace, tasks: list[str]) -> list[dict[str, Any]]:
    """One record per evaluation (perplexity, tasks) for an already loaded adapter."""
    from vlmpress.pipeline.compress import resolve_device
    from vlmpress.io import library_versions

    device = resolve_device(getattr(args, "device", None))
    if not getattr(adapter.model, "hf_device_map", None):
        adapter.model.to(device)
    base = {"model": args.model, "label": getattr(args, "label", None), **_describe_model(adapter), "versions": library_versions()}
    records = []
    if getattr(args, "perplexity", None):
        from vlmpress.evaluation.perplexity import evaluate_perplexity

        t0 = time.perf_counter()
        res = evaluate_perplexity(
            adapter, args.perplexity, args.seq_len, args.stride, max_tokens=getattr(args, "max_tokens", None),
            show_progress=not getattr(args, "no_progress", False),
        )
        records.append(
            {
                **base,
                "kind": "perplexity",
                "dataset": res["source"],
                "seq_len": res["seq_len"],
                "stride": res["stride"],
                "metrics": {k: res[k] for k in ("perplexity", "nll", "n_tokens")},
                "details": {k: res[k] for k in ("text_tokens", "n_windows", "truncated_to")},
                "seconds": time.perf_counter() - t0,
            }
        )
    if tasks:
        from vlmpress.evaluation.lm_tasks import evaluate_lm_tasks

        t0 = time.perf_counter()
        limit = getattr(args, "task_limit", None)
        res = evaluate_lm_tasks(
            adapter, tasks, batch_size=getattr(args, "batch_size", 1) or 1,
            num_fewshot=getattr(args, "num_fewshot", None), limit=int(limit) if limit and limit >= 1 else limit,
            include_path=getattr(args, "task_include", None),
        )
        records.append(
            {
                **base,
                "kind": "lm_eval",
                "dataset": ",".join(tasks),
                "seq_len": None,
                "stride": None,
                "metrics": {"tasks": res["tasks"]},
                "details": {"num_fewshot": res["num_fewshot"], "limit": res["limit"]},
                "seconds": time.perf_counter() - t0,
            }
        )
    return records


def write_records(out_dir: str | Path, records: list[dict[str, Any]]) -> list[Path]:
    """JSON file per record + one line each in ``results.jsonl`` (atomic / fsynced writes)."""
    from vlmpress.io import append_jsonl, atomic_write_json

    out = Path(out_dir)
    paths = []
    for rec in records:
        # in-memory variants of one base model share its spec: method and reduction keep their files apart
        key = (
            f"{rec['model']}|{rec['method']}|{rec['reduction']}|{rec['kind']}|{rec['dataset']}|{rec['seq_len']}|{rec['stride']}"
            f"|{rec.get('label')}|{rec.get('mode')}|{rec.get('propagation')}"
        )
        level = f"{rec['method']}" + (f"-{round(100 * rec['reduction'])}" if rec.get("reduction") else "")
        stem = f"{Path(str(rec['model'])).name or 'model'}-{level}-{rec['kind']}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        paths.append(atomic_write_json(out / f"{stem}.json", rec))
        append_jsonl(out / "results.jsonl", rec)
    return paths


def run_lm(args: argparse.Namespace) -> int:
    """Load each of ``args.model`` (a spec or a list), evaluate, write results; one line per metric."""
    from vlmpress.pipeline.loading import load_model
    from vlmpress.pipeline.compress import resolve_device

    tasks = _check_args(args)
    if not getattr(args, "out", None):
        raise ConfigError("no results directory given (--out)")
    specs = [args.model] if isinstance(args.model, str) else list(args.model)
    records = []
    for spec in specs:
        adapter = load_model(spec, device=resolve_device(getattr(args, "device", None)), verify=not getattr(args, "no_verify", False))
        if not hasattr(adapter, "decoder_blocks"):
            raise ConfigError(f"'{spec}' is not a causal language model; perplexity and --tasks need one")
        one = evaluate_lm_model(adapter, argparse.Namespace(**{**vars(args), "model": spec}), tasks)
        write_records(args.out, one)  # written per model: a later failure keeps these
        records += one
        del adapter
    for rec in records:
        if rec["kind"] == "perplexity":
            m = rec["metrics"]
            print(
                f"{rec['model']} [{rec['method']}]: perplexity {m['perplexity']:.3f} on {rec['dataset']} "
                f"(seq_len {rec['seq_len']}, stride {rec['stride']}, {m['n_tokens']} tokens)"
            )
        else:
            for task, metrics in rec["metrics"]["tasks"].items():
                print(f"{rec['model']} [{rec['method']}]: {task} " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"results: {Path(args.out) / 'results.jsonl'}")
    return 0


run = run_lm

__all__ = ["add_arguments", "add_lm_arguments", "evaluate_lm_model", "run", "run_lm", "write_records"]
