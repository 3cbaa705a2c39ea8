#!/usr/bin/env python
"""LLM grid: Base, SVD, SVD-LLM, SVD-ALS and PGSVD at 20 % / 40 % reduction of the reference LM.

    python scripts/train_reference_lm.py --out runs/reference_lm
    python scripts/llm_grid.py --model runs/reference_lm/model --train-text runs/reference_lm/train.txt \
        --test-text runs/reference_lm/test.txt --out eval/results/llm

    # the MoE variant: also per-expert ranks and how routing changed (OUT/moe.json, a second table)
    python scripts/train_reference_lm.py --config configs/reference/lm-moe.json --out runs/reference_moe_lm
    python scripts/llm_grid.py --model runs/reference_moe_lm/model --train-text runs/reference_moe_lm/train.txt \
        --test-text runs/reference_moe_lm/test.txt --seq-len 64 --out eval/results/llm_moe --fresh

Calibration windows come from the TRAIN text only; perplexity is measured on the held-out test text
(sequence length and stride are stated in every record). Writes OUT/results.jsonl (one record per
run, appended), OUT/table.md and OUT/table.csv (paper Table 1 layout). For a model with MoE experts,
every compressed run also records its per-expert ranks and the fraction of test tokens whose top-k
expert set changed (OUT/moe.json, appended to OUT/table.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
from vlmpress.adapters.routed_experts import EXPERT_KINDS
from vlmpress.commands.evaluate_lm import evaluate_lm_model, write_records
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.evaluation.lm_table import build_lm_table
from vlmpress.evaluation.routing import routing_change, routing_decisions
from vlmpress.io import atomic_write_text

METHODS = ("svd", "svd_llm", "svd_als", "pgsvd")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/reference_lm/model")
    p.add_argument("--train-text", default="runs/reference_lm/train.txt")
    p.add_argument("--test-text", default="runs/reference_lm/test.txt")
    p.add_argument("--out", default="eval/results/llm")
    p.add_argument("--levels", default="0.2,0.4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--als-iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model on a shared CPU)")
    p.add_argument("--fresh", action="store_true", help="delete OUT/results.jsonl first")
    p.add_argument("--routing-windows", type=int, default=64, help="test windows whose routing is compared (MoE models)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.fresh and (out / "results.jsonl").exists():
        (out / "results.jsonl").unlink()
    spec = f"hf:{Path(args.model).resolve()}"
    eval_args = argparse.Namespace(
        model=spec, perplexity=str(Path(args.test_text).resolve()), seq_len=args.seq_len, stride=args.stride,
        max_tokens=None, tasks=None, device="cpu", batch_size=1,
    )
    t_start = time.perf_counter()
    routing_batches = _test_windows(spec, args.test_text, args.seq_len, args.routing_windows)
    base_routing, moe = None, {}
    runs = [("base", None)] + [(m, float(l)) for l in args.levels.split(",") for m in args.methods.split(",")]
    for method, level in runs:
        t0 = time.perf_counter()
        adapter = HFCausalLMAdapter.load(spec)
        summary = None
        if method != "base":
            cfg = CompressionConfig(
                model=spec, method=method, target_reduction=level, calib_text=str(Path(args.train_text).resolve()),
                n_samples=args.n_samples, seq_len=args.seq_len, batch_size=8, als_iters=args.als_iters, device="cpu",
            )
            report = compress(adapter, cfg, HFCausalLMAdapter.load_calibration(cfg))
            summary = report.summary()
        adapter.prepare_for_compression()  # base model: split experts (same outputs) so routing can be read
        routing = _routing(adapter, routing_batches)
        if method == "base":
            base_routing = routing
        elif routing is not None:
            moe[f"{method}@{level}"] = {
                "method": method, "target": level, "routing": routing_change(base_routing, routing),
                "experts": summary["experts"],
                "expert_ranks": {r.name: r.rank for r in report.layers if r.kind in EXPERT_KINDS},
                "expert_tokens": {r.name: r.tokens for r in report.layers if r.kind in EXPERT_KINDS},
                "attn_ranks": {r.name: r.rank for r in report.layers if r.kind == "attn"},
            }
        records = evaluate_lm_model(adapter, eval_args, [])
        for rec in records:
            rec["grid"] = {"target": level, "n_samples": args.n_samples, "calib_seq_len": args.seq_len,
                           "calib_text": str(args.train_text), "als_iters": args.als_iters,
                           "compression_seconds": summary["seconds"] if summary else None}
        write_records(out, records)
        logging.info("%s @ %s: ppl %.3f (%.1fs)", method, level, records[0]["metrics"]["perplexity"], time.perf_counter() - t0)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    md, csv_text = build_lm_table(records)
    if moe:
        atomic_write_text(out / "moe.json", json.dumps(moe, indent=1) + "\n")
        md += "\n" + _moe_table(moe, records)
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.csv", csv_text)
    print(md)
    print(f"wall time {time.perf_counter() - t_start:.1f}s")
    return 0


def _test_windows(spec: str, test_text: str, seq_len: int, count: int) -> list[torch.Tensor]:
    """The first ``count`` windows of the test text, in batches of 8 (the routing comparison's tokens)."""
    from vlmpress.data.text_calibration import tokenize_text

    tokenizer = HFCausalLMAdapter._load_tokenizer(spec[3:])
    ids = tokenize_text(tokenizer, Path(test_text).read_text(encoding="utf-8"))
    n = min(count, ids.numel() // seq_len)
    windows = ids[: n * seq_len].view(n, seq_len)
    return list(windows.split(8))


def _routing(adapter, batches):
    try:
        return routing_decisions(adapter.model, batches)
    except ValueError:  # no MoE experts: a dense model
        return None


def _spread(values) -> str:
    values = sorted(v for v in values if v is not None)
    return f"{values[0]}-{values[-1]} (median {values[len(values) // 2]})" if values else "dense"


def _moe_table(moe: dict, records: list[dict]) -> str:
    """Routing change and per-expert rank spread of every compressed run."""
    ppl = {(r.get("method"), (r.get("grid") or {}).get("target")): r["metrics"]["perplexity"] for r in records}
    lines = [
        "| Reduction | Method | PPL | top-k set changed | expert gate_up ranks | expert down ranks | weight-only experts |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in moe.values():
        ranks = run["expert_ranks"]
        p = ppl.get((run["method"], run["target"]))
        lines.append(
            f"| {100 * run['target']:.0f}% | {run['method']} | {'-' if p is None else f'{p:.2f}'} | "
            f"{100 * run['routing']['changed_fraction']:.1f}% | {_spread(r for n, r in ranks.items() if '.gate_up.' in n)} | "
            f"{_spread(r for n, r in ranks.items() if '.down.' in n)} | {run['experts']['weight_only']} of {run['experts']['layers']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
