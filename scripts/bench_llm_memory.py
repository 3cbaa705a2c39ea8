#!/usr/bin/env python
"""Peak memory and time of whole-model vs sequential compression on a Llama-shaped random model.

    python scripts/bench_llm_memory.py --layers 2 --out eval/results/llm/bench_memory.json

Builds a random-init Llama (hidden 2048, MLP 5632, 32 heads / 4 kv heads, vocab 32000: the
TinyLlama-1.1B shape; ``--layers 22`` is the full 1.1B model), saves it once, then runs each mode in
its own child process and reads the child's RSS high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``
taken inside the child: torch allocations are invisible to tracemalloc). ``from_pretrained`` itself
peaks at about twice the checkpoint size (also with disk offload, which reads every tensor before
writing it out), so the peak is also reported for the compression phase alone: the child resets its
high-water mark after loading (``/proc/self/clear_refs``) and reads ``VmHWM`` at the end. Modes:

* ``whole``       -- ``compress()``: all covariances at once (+ the SVD cache);
* ``sequential``  -- ``compress_sequential()``, model resident in RAM;
* ``sequential_offload`` -- ``compress_sequential()`` on a model loaded with accelerate disk offload
  (``device_map``: decoder blocks on "disk"), so only one dense block is resident at a time.

All modes use pgsvd with the same eps, the same calibration windows (random token ids, seeded) and
``propagate=original``, so the compressed models must be identical: ranks and logits are compared.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("whole", "sequential", "sequential_offload")


def build(args, directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # cheap random init (std 0.02 as Llama's initializer_range), norms = 1
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    # rotary inv_freq is a non-persistent buffer that to_empty left uninitialised: rebuild it
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.to(getattr(torch, args.dtype))  # stored (and loaded) in this dtype; covariances stay float64
    model.save_pretrained(directory, safe_serialization=True)


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _vm_kib(field: str) -> int:
    """A /proc/self/status memory field (kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args) -> None:
    from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
    from vlmpress.pipeline.compress import compress
    from vlmpress.pipeline.config import CompressionConfig
    from vlmpress.data.text_calibration import TokenCalibration
    from vlmpress.pipeline.sequential import compress_sequential

    torch.set_num_threads(args.threads)
    spec = f"hf:{args.model_dir}"
    t0 = time.perf_counter()
    if args.mode == "sequential_offload":
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        device_map.update({f"model.layers.{i}": "disk" for i in range(args.layers)})
        adapter = HFCausalLMAdapter.load(
            spec, device_map=device_map, offload_folder=str(Path(args.tmp) / "offload"), torch_dtype=getattr(torch, args.dtype)
        )
    else:
        adapter = HFCausalLMAdapter.load(spec, torch_dtype=getattr(torch, args.dtype))
    t_load = time.perf_counter() - t0
    load_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gc.collect()
    resident_kib = _vm_kib("VmRSS")
    reset = _reset_peak()  # from here VmHWM is the compression phase's own high-water mark
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, args.vocab, (args.seq_len,), generator=g) for _ in range(args.n_samples)]
    calib = TokenCalibration(windows, "random token ids", args.seq_len)
    cfg = CompressionConfig(
        model=spec, method="pgsvd", eps=args.eps, als_iters=args.als_iters, batch_size=args.batch_size,
        n_samples=args.n_samples, seq_len=args.seq_len, device="cpu", propagate="original",
        mode="whole" if args.mode == "whole" else "sequential",
    )
    t0 = time.perf_counter()
    report = compress(adapter, cfg, calib) if args.mode == "whole" else compress_sequential(adapter, cfg, calib)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    phase_peak_kib = _vm_kib("VmHWM") if reset else None
    ids = torch.randint(0, args.vocab, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = adapter.model(input_ids=ids).logits
    torch.save(logits, Path(args.tmp) / f"logits_{args.mode}.pt")
    out = {
        "mode": args.mode, "peak_rss_gib": peak_kib / 2**20, "load_peak_rss_gib": load_peak_kib / 2**20,
        "rss_before_compress_gib": resident_kib / 2**20,
        "compress_phase_peak_rss_gib": phase_peak_kib / 2**20 if phase_peak_kib else None,
        "load_seconds": t_load, "compress_seconds": seconds, "report_seconds": report.seconds,
        "ranks": report.rank_map, "targeted_reduction": report.targeted_reduction,
        "whole_model_params_before": report.whole_model_params_before,
    }
    Path(args.tmp, f"result_{args.mode}.json").write_text(json.dumps(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eps", type=float, default=0.4)
    p.add_argument("--als-iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights' dtype on disk and in memory (LLMs are usually loaded in bf16/fp16)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="eval/results/llm/bench_memory.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="vlmpress-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        t0 = time.perf_counter()
        build(args, model_dir)
        print(f"built and saved a {args.layers}-layer Llama-shaped model in {time.perf_counter() - t0:.1f}s", flush=True)
        results = {}
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--model-dir", str(model_dir), "--tmp", tmp]
            for key in ("layers", "vocab", "n_samples", "seq_len", "batch_size", "eps", "als_iters", "threads", "dtype"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
            res = json.loads(Path(tmp, f"result_{mode}.json").read_text())
            res["wall_seconds"] = time.perf_counter() - t0
            results[mode] = res
            print(f"{mode}: peak RSS {res['peak_rss_gib']:.2f} GiB, compress {res['compress_seconds']:.1f}s", flush=True)
        ref = results.get("whole")
        summary = {}
        for mode, res in results.items():
            logits = torch.load(Path(tmp, f"logits_{mode}.pt"))
            summary[mode] = {
                "peak_rss_gib": round(res["peak_rss_gib"], 3),
                "load_peak_rss_gib": round(res["load_peak_rss_gib"], 3),
                "rss_before_compress_gib": round(res["rss_before_compress_gib"], 3),
                "compress_phase_peak_rss_gib": res["compress_phase_peak_rss_gib"] and round(res["compress_phase_peak_rss_gib"], 3),
                "compress_seconds": round(res["compress_seconds"], 1),
                "load_seconds": round(res["load_seconds"], 1),
                "targeted_reduction": round(res["targeted_reduction"], 4),
                "n_compressed_layers": len(res["ranks"]),
            }
            if ref is not None:
                ref_logits = torch.load(Path(tmp, "logits_whole.pt"))
                summary[mode]["ranks_identical_to_whole"] = res["ranks"] == ref["ranks"]
                summary[mode]["max_abs_logit_diff_vs_whole"] = float((logits - ref_logits).abs().max())
                summary[mode]["peak_ratio_whole_over_mode"] = round(ref["peak_rss_gib"] / res["peak_rss_gib"], 2)
                if res["compress_phase_peak_rss_gib"] and ref["compress_phase_peak_rss_gib"]:
                    summary[mode]["compress_phase_peak_ratio_whole_over_mode"] = round(
                        ref["compress_phase_peak_rss_gib"] / res["compress_phase_peak_rss_gib"], 2
                    )
    record = {
        "model": {"shape": "llama", "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "vocab": args.vocab, "heads": 32, "kv_heads": 4,
                  "parameters": next(iter(results.values()))["whole_model_params_before"]},
        "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len, "batch_size": args.batch_size},
        "method": {"name": "pgsvd", "eps": args.eps, "als_iters": args.als_iters, "propagate": "original"},
        "threads": args.threads, "dtype": args.dtype, "device": "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_mem_total_gib():.0f} GiB RAM", "results": summary,
    }
    from vlmpress.io import atomic_write_json, library_versions

    record["versions"] = library_versions()
    atomic_write_json(args.out, record)
    print(json.dumps(record["results"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
