#!/usr/bin/env python
"""Quality against model bytes: dense fp32/bf16/int8/int4 vs PGSVD low-rank (fp32/bf16/int8/int4).

    python scripts/equal_bytes.py --reference digits                      # the embedded digits CLIP
    python scripts/equal_bytes.py --reference caltech101 --data-root DIR  # DIR/caltech101/ (trains the reference once)
    python scripts/train_reference_lm.py --out runs/reference_lm
    python scripts/equal_bytes.py --reference lm --lm-dir runs/reference_lm

Every variant starts from the same trained reference and the same calibration covariances
(train split only); quality is measured on the held-out split (zero-shot top-1 %, or perplexity
on the held-out text). Bytes are given for the targeted layers (what compression and quantisation
act on; the Pareto front is taken over these) and for the whole state dict (every tensor once,
embeddings, convolutions and norms included: what a checkpoint stores). Quantisation (vlmpress's own
int8 per-channel / int4 group-64 weight-only codes) applies to the targeted linear layers (dense)
or to their factors (low-rank); everything else stays fp32. bf16 rows store every float tensor
in bf16 (computed in fp32 after rounding, so the figure is the storage format's effect).

Writes OUT/<reference>/{rows.json, table.md, front.png}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench_common import machine  # noqa: E402

from vlmpress.deploy.footprint import tensor_bytes_by_dtype  # noqa: E402
from vlmpress.evaluation.bytes_front import BytesRow, bytes_table, plot_bytes_front  # noqa: E402
from vlmpress.io import atomic_write_json, atomic_write_text  # noqa: E402
from vlmpress.pipeline.compress import calibrate, compress, select_layers  # noqa: E402
from vlmpress.pipeline.config import CompressionConfig  # noqa: E402
from vlmpress.pipeline.quantize import quantize_compressed, quantize_dense_layers  # noqa: E402

QUANTS = ("fp32", "bf16", "int8", "int4")


@dataclasses.dataclass
class Subject:
    """One reference model: how to load it, calibrate it and score a variant."""

    name: str
    base: object  # the adapter
    calibration: object
    config: CompressionConfig  # method-independent fields (calibration sizes, device)
    score: object  # adapter -> float
    metric_name: str
    higher_is_better: bool


def clip_subject(name: str, data_root: str | None) -> Subject:
    from vlmpress.evaluation.suite import SuiteConfig, load_eval_images, load_suite_calibration, load_suite_model, resolve_suite_paths
    from vlmpress.evaluation.zeroshot import evaluate_zeroshot
    from vlmpress.io.resources import resource_path

    suite_file = {"digits": "eval/suites/digits-demo.yaml", "caltech101": "eval/suites/caltech101-grid.yaml"}[name]
    overrides = {"data_root": data_root} if data_root else {}
    cfg = resolve_suite_paths(SuiteConfig.from_yaml(resource_path(suite_file), **overrides))
    base = load_suite_model(cfg)
    images = load_eval_images(cfg, base, cfg.datasets[0])
    calib = load_suite_calibration(cfg)

    def score(adapter) -> float:
        return 100.0 * evaluate_zeroshot(adapter, images, batch_size=cfg.eval_batch_size, device="cpu", show_progress=False).metrics.top1

    ccfg = CompressionConfig(method="pgsvd", als_iters=cfg.als_iters, batch_size=cfg.batch_size, device="cpu", seed=cfg.seed)
    return Subject(name, base, calib, ccfg, score, "zero-shot top-1 %", True)


def lm_subject(lm_dir: str, seq_len: int) -> Subject:
    from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
    from vlmpress.evaluation.perplexity import evaluate_perplexity

    root = Path(lm_dir).resolve()
    spec = f"hf:{root / 'model'}"
    ccfg = CompressionConfig(
        model=spec, method="pgsvd", calib_text=str(root / "train.txt"), n_samples=64, seq_len=seq_len, batch_size=8, als_iters=10, device="cpu"
    )
    base = HFCausalLMAdapter.load(spec)

    def score(adapter) -> float:
        return float(evaluate_perplexity(adapter, str(root / "test.txt"), seq_len, None, show_progress=False)["perplexity"])

    return Subject("lm", base, HFCausalLMAdapter.load_calibration(ccfg), ccfg, score, "perplexity", False)


def model_bytes(adapter, names: list[str] | None = None) -> int:
    """Bytes of the whole state dict, or of the named (targeted) submodules only."""
    if names is None:
        return sum(tensor_bytes_by_dtype(adapter.model).values())
    return sum(sum(tensor_bytes_by_dtype(adapter.model.get_submodule(n)).values()) for n in names)


def bf16_variant(adapter, names: list[str]) -> tuple[object, int, int]:
    """A copy whose float tensors are rounded to bf16; bytes (targeted, whole) counted in bf16,
    computed in fp32 (so the figure is the storage format's effect, not CPU bf16 kernels)."""
    rounded = copy.deepcopy(adapter)
    with torch.no_grad():
        for tensor in list(rounded.model.parameters()) + list(rounded.model.buffers()):
            if tensor.dtype == torch.float32:
                tensor.copy_(tensor.to(torch.bfloat16).to(torch.float32))
    stored = copy.deepcopy(rounded)
    stored.model.to(torch.bfloat16)
    return rounded, model_bytes(stored, names), model_bytes(stored)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", choices=["digits", "caltech101", "lm"], default="digits")
    p.add_argument("--data-root", default=None, help="datasets root (caltech101)")
    p.add_argument("--lm-dir", default="runs/reference_lm", help="scripts/train_reference_lm.py's --out")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--targets", default="0.2,0.4,0.6,0.8", help="PGSVD targeted reductions")
    p.add_argument("--out", default="eval/results/equal-bytes")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("vlmpress.pipeline", "vlmpress.adapters"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    subject = lm_subject(args.lm_dir, args.seq_len) if args.reference == "lm" else clip_subject(args.reference, args.data_root)
    out = Path(args.out) / subject.name
    base = subject.base
    base.prepare_for_compression()
    layers = select_layers(base, subject.config)
    collectors = calibrate(base, layers, subject.calibration, subject.config)  # once, on the dense model
    rows: list[BytesRow] = []
    details: dict[str, dict] = {}

    names = [layer.name for layer in layers]

    def add(label, kind, quant, target, adapter, nbytes=None, extra=None):
        metric = subject.score(adapter)
        targeted, whole = nbytes if nbytes is not None else (model_bytes(adapter, names), model_bytes(adapter))
        rows.append(BytesRow(label, kind, quant, target, targeted, whole, metric))
        details[label] = extra or {}
        logging.info("%-24s %12s targeted bytes  %s %.3f", label, f"{targeted:,}", subject.metric_name, metric)
        write()

    def write():
        atomic_write_json(out / "rows.json", {
            "reference": subject.name, "metric": subject.metric_name, "higher_is_better": subject.higher_is_better,
            "machine": machine(), "command": "python scripts/equal_bytes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(time.perf_counter() - t_start, 1), "rows": [r.to_dict() for r in rows], "details": details,
        })

    add("dense fp32", "dense", "fp32", None, base)
    rounded, targeted, whole = bf16_variant(base, names)
    add("dense bf16", "dense", "bf16", None, rounded, (targeted, whole))
    for scheme in ("int8", "int4"):
        variant = copy.deepcopy(base)
        variant_layers = select_layers(variant, subject.config)
        q = quantize_dense_layers(variant, variant_layers, scheme, 64, collectors)
        add(f"dense {scheme}", "dense", scheme, None, variant, extra={"mean_act_error": _mean(q, "act_error")})
    spectra: dict = {}
    for target in [float(t) for t in args.targets.split(",")]:
        cfg = dataclasses.replace(subject.config, method="pgsvd", target_reduction=target)
        low = copy.deepcopy(base)
        report = compress(low, cfg, subject.calibration, collectors=collectors, spectra_cache=spectra)
        pct = round(100 * target)
        add(f"PGSVD {pct} %", "low-rank", "fp32", target, low, extra={"mean_act_error": _mean_rows(report.layers, "act_error")})
        rounded, targeted, whole = bf16_variant(low, names)
        add(f"PGSVD {pct} % + bf16", "low-rank", "bf16", target, rounded, (targeted, whole))
        for scheme in ("int8", "int4"):
            variant = copy.deepcopy(low)
            rows_q = copy.deepcopy(report.layers)
            quantize_compressed(variant, layers, rows_q, dataclasses.replace(cfg, quantize=scheme, quantize_group_size=64), collectors)
            add(f"PGSVD {pct} % + {scheme}", "low-rank", scheme, target, variant,
                extra={"mean_act_error": _mean_rows(rows_q, "quant_act_error")})
    table = bytes_table(rows, subject.metric_name, subject.higher_is_better)
    atomic_write_text(out / "table.md", table)
    plot_bytes_front(rows, out / "front.png", subject.metric_name, subject.higher_is_better, f"{subject.name}: {subject.metric_name} vs bytes")
    write()
    print(table)
    print(f"# {machine()} | {time.perf_counter() - t_start:.0f} s")
    return 0


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _mean_rows(rows, key: str) -> float | None:
    values = [getattr(r, key) for r in rows if getattr(r, key, None) is not None]
    return sum(values) / len(values) if values else None


if __name__ == "__main__":
    raise SystemExit(main())
