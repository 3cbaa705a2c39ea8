"""``vlmpress compress``: compress a model and save it (+ per-layer report)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vlmpress.pipeline.config import ALLOCATIONS, METHODS, CompressionConfig
from vlmpress.errors import ConfigError

HELP = "compress a model with PGSVD / SVD-ALS / SVD-LLM / SVD and save it"
logger = logging.getLogger(__name__)


def _proportion(text: str) -> dict[str, float]:
    """'vision=1.3,text=0.7' -> {'vision': 1.3, 'text': 0.7}"""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs like 'vision=1.3,text=0.7', got '{text}'")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model spec (open_clip:NAME[/PRETRAINED], hf:NAME_OR_DIR) or a compressed dir")
    p.add_argument("--config", help="YAML recipe (keys of CompressionConfig); flags override it")
    p.add_argument("--out", required=True, help="output directory for the compressed checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing vlmpress checkpoint at --out (never other content, never the input model)")
    p.add_argument("--export-dense", metavar="DIR", help="also write a merged, stock checkpoint of the family here")
    g = p.add_argument_group("method and ranks")
    g.add_argument("--method", choices=list(METHODS))
    g.add_argument("--eps", type=float, help="one tolerance for every layer (pgsvd)")
    g.add_argument("--eps-v", type=float, help="vision tower tolerance (pgsvd)")
    g.add_argument("--eps-t", type=float, help="text tower tolerance (pgsvd)")
    g.add_argument("--eps-attn", type=float, help="attention layers tolerance (clustered allocation)")
    g.add_argument("--eps-mlp", type=float, help="MLP layers tolerance (clustered allocation)")
    g.add_argument("--ratio", type=float, help="uniform methods: fraction of each layer's parameters to remove")
    g.add_argument("--target-reduction", type=float, help="fraction of the targeted layers' parameters to remove")
    g.add_argument("--allocation", choices=ALLOCATIONS, help="split of a target reduction between towers")
    g.add_argument("--eps-proportion", type=_proportion, help="fixed eps proportion, e.g. vision=1.3,text=0.7")
    g.add_argument("--als-iters", type=int, help="exactly N ALS rounds (the paper's fixed tau); default: iterate to --als-tol")
    g.add_argument("--als-tol", type=float, help="ALS stops when the activation error changes by at most this (relative; default 2e-5)")
    g.add_argument("--als-max-iters", type=int, help="cap on ALS rounds when iterating to --als-tol (default 100)")
    g.add_argument("--als-path", choices=["auto", "rounds", "limit"],
                   help="tolerance mode: iterate rounds from the SVD start, or compute their limit (the closed-form "
                        "optimum) directly; auto (default) = limit on CPU, rounds on CUDA")
    g.add_argument("--solve-batch-size", type=int,
                   help="same-shape layers factorised together in batched calls (default: 32 on CUDA, 1 on CPU)")
    g.add_argument("--rank-multiple", type=int, help="round ranks to a multiple, e.g. 8 (faster fp16/bf16 GEMMs on GPU)")
    g.add_argument("--latency-aware", action="store_true", default=None,
                   help="time dense vs low-rank for each layer shape on --device at the calibration batch (cached), "
                        "keep layers dense where low-rank runs slower and re-spend a target reduction elsewhere")
    g.add_argument("--quantize", help="quantise the factors after factorisation: none, int8 (per channel), "
                   "int4 (group-wise) or fp8 (CUDA GPUs of compute capability >= 8.9)")
    g.add_argument("--quantize-group-size", type=int, help="int4: input columns per scale, 32, 64 or 128 (default 64)")
    g.add_argument("--targets", nargs="+", help="regexes: only layers whose name matches one")
    g.add_argument("--exclude", nargs="+", help="regexes: skip layers whose name matches one")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-images", help="folder of images (sub-folders = classes) or a registered dataset name")
    c.add_argument("--calib-captions", help="text file, one caption per line")
    c.add_argument("--calib-split-file", help="registered datasets: the test list (calibration uses the rest)")
    c.add_argument("--calib-text", help="LLMs: text file or local Hugging Face dataset")
    c.add_argument("--n-images", type=int)
    c.add_argument("--n-captions", type=int)
    c.add_argument("--n-samples", type=int, help="LLMs: number of calibration windows")
    c.add_argument("--seq-len", type=int, help="LLMs: calibration window length (default: min(2048, model positions))")
    c.add_argument("--calib-windows", choices=["random", "document"],
                   help="LLMs: windows at random offsets of one token stream (default), or one per document "
                        "(blocks separated by blank lines; never crossing a document boundary)")
    c.add_argument("--batch-size", type=int)
    c.add_argument("--data-root", help="root of registered datasets (default $VLMPRESS_DATA)")
    c.add_argument("--seed", type=int)
    e = p.add_argument_group("execution")
    e.add_argument("--device", help="auto (cuda when present), cpu or cuda[:N]")
    e.add_argument("--mode", choices=["whole", "sequential"], help="LLMs: sequential = one block at a time")
    e.add_argument("--torch-dtype", choices=["float32", "bfloat16", "float16", "auto"], help="LLMs: dtype the weights are loaded in")
    e.add_argument("--device-map", help="LLMs: accelerate device_map for from_pretrained, e.g. auto (multi-GPU / offload)")
    e.add_argument("--propagate", choices=["original", "compressed"], help="sequential mode: outputs fed forward")
    e.add_argument("--resume", action="store_true",
                   help="sequential mode: continue an interrupted run from its last finished block (same options)")


_FLAG_FIELDS = (
    "model", "method", "eps", "eps_v", "eps_t", "eps_attn", "eps_mlp", "ratio", "target_reduction", "allocation",
    "eps_proportion", "als_iters", "als_tol", "als_max_iters", "als_path", "solve_batch_size", "rank_multiple", "latency_aware", "quantize", "quantize_group_size", "targets", "exclude", "calib_images", "calib_captions", "calib_split_file", "calib_text", "n_images",
    "n_captions", "n_samples", "seq_len", "calib_windows", "batch_size", "data_root", "seed", "device", "torch_dtype", "device_map", "mode", "propagate",
)


def config_from_args(args: argparse.Namespace) -> CompressionConfig:
    base = CompressionConfig.from_yaml(args.config) if args.config else CompressionConfig()
    config = base.replace(**{name: getattr(args, name, None) for name in _FLAG_FIELDS})
    if not config.model:
        raise ConfigError("no model given: pass --model SPEC or set 'model' in the --config file")
    return config.validate()


def run(args: argparse.Namespace) -> int:
    from vlmpress.api import compress_model
    from vlmpress.pipeline.checkpoint import check_export_dir, check_output_dir, export_dense, save_compressed

    config = config_from_args(args)
    check_output_dir(args.out, config.model, args.overwrite)  # cheap checks before any model loads
    if args.export_dense:
        check_export_dir(args.export_dense, args.out, config.model, args.overwrite)
    resume = getattr(args, "resume", False)
    if resume and config.mode != "sequential":
        raise ConfigError("--resume applies to --mode sequential runs only")
    state_dir = None
    if config.mode == "sequential":
        from vlmpress.pipeline.sequential_state import state_dir_for

        state_dir = state_dir_for(args.out)  # each finished block is kept here until the save
    adapter, report = compress_model(config.model, config, state_dir=state_dir, resume=resume)
    print(report.format_summary() if getattr(args, "quiet", False) else report.format_table(max_rows=60))
    out = save_compressed(adapter, args.out, report, overwrite=args.overwrite)
    if state_dir is not None:
        from vlmpress.pipeline.checkpoint import read_checkpoint_config, verify_checkpoint_files
        from vlmpress.pipeline.sequential_state import remove_state

        verify_checkpoint_files(out, read_checkpoint_config(out))  # re-read from disk: the state goes only after this
        remove_state(state_dir)  # the checkpoint now holds everything
    print(f"\nsaved: {out}  (report: {out / 'compression_report.json'}, {out / 'compression_report.csv'})")
    if args.export_dense:
        dense = export_dense(adapter, args.export_dense, overwrite=args.overwrite)
        print(f"dense export: {dense}")
    return 0
