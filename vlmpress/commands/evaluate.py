"""``vlmpress eval``: zero-shot accuracy of one or more models on the benchmark datasets.

Every (model, dataset) run is written as soon as it finishes -- ``<out>/<model>__<dataset>.json``
(atomic) and one line appended to ``<out>/results.jsonl`` -- so an interrupted suite keeps the
runs already done. ``vlmpress report <out>/results.jsonl`` turns the JSONL into Table 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from vlmpress.data.datasets import DATASETS, IMAGEFOLDER_PREFIX, TEMPLATE_MODES, build_dataset
from vlmpress.data.splits import DEFAULT_TEST_FRACTION
from vlmpress.errors import ConfigError, DatasetError

HELP = "zero-shot accuracy (Caltech101, Food101, Pets, Cars, EuroSAT, DTD) or LLM perplexity / lm-eval tasks"
logger = logging.getLogger(__name__)


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, nargs="+", action="extend", metavar="SPEC_OR_DIR",
        help="model spec (open_clip:NAME[/PRETRAINED], hf:NAME_OR_DIR) or a compressed checkpoint directory; "
        "several models are evaluated one after the other",
    )
    p.add_argument(
        "--datasets",
        help=f"CLIP models: comma-separated: {', '.join(DATASETS)}, 'all', or imagefolder:<path> for a folder of class sub-folders",
    )
    p.add_argument("--data-root", help="directory holding the datasets (default: $VLMPRESS_DATA)")
    p.add_argument("--download", action="store_true", help="let torchvision download missing datasets (needs internet)")
    p.add_argument("--out", default="eval/results", help="output directory for JSON results + results.jsonl (default: %(default)s)")
    p.add_argument("--limit", type=int, help="evaluate a stratified, deterministic subset of N images per dataset")
    p.add_argument("--batch-size", type=int, help="images per batch (default 64) or LM sequences per batch (default 1)")
    p.add_argument("--num-workers", type=int, default=_default_workers(), help="data loader processes (default: %(default)s)")
    p.add_argument("--templates", choices=TEMPLATE_MODES, default="ensemble",
                   help="prompt ensemble published with CLIP, or the single 'a photo of a {}.' (ablation)")
    p.add_argument(
        "--split-file", action="append", metavar="[DATASET=]FILE",
        help="test list for a dataset without an official split (one '<class>/<file>' per line, e.g. "
        "caltech101/test.txt); DATASET= is needed when several datasets are evaluated",
    )
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help="test share of the deterministic hash split (Caltech101, EuroSAT, folders; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hash split and of --limit (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="autocast precision for the model (fp16/bf16 on GPU; default: %(default)s)")
    p.add_argument("--length-norm", action="store_true",
                   help="generative VLMs: rank classes by mean per-token caption log-likelihood (default: sum over tokens)")
    p.add_argument("--label", help="row label in reports, e.g. 'PGSVD auto' (default: the method name)")
    p.add_argument("--cache-dir", help="keep preprocessed test images here (float32) and reuse them for every "
                   "model with the same preprocessing (suites of compressed variants)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--save-predictions", nargs="?", type=int, const=5, metavar="K",
                   help="also write every image's top-K classes and scores (default K=5) to OUT/predictions/*.jsonl")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of compressed checkpoints' files (saves reading huge files twice)")
    from vlmpress.commands.evaluate_lm import add_lm_arguments

    add_lm_arguments(p)  # --perplexity / --tasks route a run to the LLM evaluation


def _parse_datasets(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(DATASETS)
    bad = [n for n in names if n not in DATASETS and not n.startswith(IMAGEFOLDER_PREFIX)]
    if bad or not names:
        raise DatasetError(
            f"unknown dataset(s): {', '.join(bad) or '(none given)'}; known: {', '.join(DATASETS)}, all, imagefolder:<path>"
        )
    return list(dict.fromkeys(names))


def _parse_split_files(values: list[str] | None, datasets: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if sep and (name in DATASETS or name.startswith(IMAGEFOLDER_PREFIX)):
            if name not in datasets:
                raise ConfigError(f"--split-file names {name}, which is not in --datasets")
            out[name] = path
        elif len(datasets) == 1:
            out[datasets[0]] = value
        else:
            raise ConfigError("with several --datasets, give split files as DATASET=FILE (e.g. caltech101=test.txt)")
    return out


def _content_key(ds) -> str:
    """Identity of the images' content: every file's path, size and modification time (no image is
    read), so images changed in place get a new cache instead of stale pixels."""
    import hashlib
    import os

    digest = hashlib.sha256()
    for sample in ds.samples:
        st = os.stat(sample.path)
        digest.update(f"{sample.path}\0{sample.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _cache_path(cache_dir: Path, ds, fingerprint: str) -> Path:
    from vlmpress.evaluation.results import _slug

    return cache_dir / f"{_slug(ds.name)}__{_slug(ds.split_id)}__{fingerprint}__{_content_key(ds)}.pt"


def _images_for(ds, adapter, args):
    """The dataset itself, or its preprocessed pixels from/into ``--cache-dir``."""
    if not args.cache_dir:
        return ds
    from vlmpress.evaluation.zeroshot import PreprocessedImages, preprocess_fingerprint, preprocess_images

    fingerprint = preprocess_fingerprint(adapter.preprocess)
    path = _cache_path(Path(args.cache_dir), ds, fingerprint)
    if path.exists() and not path.is_file():
        raise ConfigError(f"--cache-dir entry {path} is not a file; remove it or choose another --cache-dir")
    cached = None
    if path.is_file():
        try:
            cached = PreprocessedImages.load(path)
        except DatasetError as err:
            logger.warning("%s; rebuilding it", err)
    if cached is not None:
        labels_match = [int(x) for x in cached.labels.tolist()] == [s.label for s in ds.samples]
        if (len(cached) == len(ds) and cached.split_id == ds.split_id and labels_match and cached.preprocess_id == fingerprint
                and cached.classnames == list(ds.classnames)):
            logger.info("using preprocessed images %s", path)
            cached.templates = list(ds.templates)
            return cached
        logger.warning("cache %s does not match %s (%d images); rebuilding it", path, ds.split_id, len(ds))
    images = preprocess_images(
        ds, adapter.preprocess, batch_size=args.batch_size, num_workers=args.num_workers, show_progress=not args.no_progress
    )
    images.save(path)
    logger.info("saved preprocessed images to %s", path)
    return images


def _fmt(rec) -> str:
    m = rec.metrics
    return (
        f"{rec.model:<40} {rec.dataset:<16} {rec.n_images:>6} "  # long names widen the line, never cut
        f"{100 * m['top1']:>6.2f} ±{100 * rec.top1_stderr:<5.2f} {100 * m['top5']:>6.2f} "
        f"{100 * m['mean_per_class_recall']:>6.2f} {rec.seconds:>7.1f}  {rec.split}"
    )


HEADER = f"{'model':<40} {'dataset':<16} {'images':>6} {'top1':>6} {'±se':<6} {'top5':>6} {'mpcr':>6} {'sec':>7}  split"


def run(args: argparse.Namespace) -> int:
    lm_requested = bool(getattr(args, "perplexity", None) or getattr(args, "tasks", None))
    if lm_requested and args.datasets:
        raise ConfigError("--datasets (zero-shot, CLIP) and --perplexity/--tasks (LLMs) are separate runs; give one kind")
    if lm_requested:
        from vlmpress.commands.evaluate_lm import run_lm

        args.batch_size = 1 if args.batch_size is None else args.batch_size  # 0 is refused, not replaced
        return run_lm(args)
    if not args.datasets:
        raise ConfigError("nothing to evaluate: pass --datasets (CLIP zero-shot) or --perplexity/--tasks (LLMs)")
    args.batch_size = 64 if args.batch_size is None else args.batch_size  # 0 is refused, not replaced
    return _run_zeroshot(args)


def _run_zeroshot(args: argparse.Namespace) -> int:
    from vlmpress.adapters import VisionLanguageAdapter
    from vlmpress.pipeline.loading import load_model
    from vlmpress.evaluation.likelihood import evaluate_likelihood, supports_likelihood
    from vlmpress.evaluation.results import make_record, write_record
    from vlmpress.evaluation.zeroshot import autocast_context, evaluate_zeroshot, resolve_device

    if not 1 <= args.batch_size <= 1 << 16:
        raise ConfigError(f"--batch-size must be in [1, {1 << 16}], got {args.batch_size}")
    if not 0 <= args.num_workers <= 256:
        raise ConfigError(f"--num-workers must be in [0, 256], got {args.num_workers}")
    if not (args.test_fraction == args.test_fraction and 0 < args.test_fraction < 1):
        raise ConfigError(f"--test-fraction must be strictly between 0 and 1, got {args.test_fraction}")
    if args.save_predictions is not None and args.save_predictions < 1:
        raise ConfigError(f"--save-predictions K must be a positive number of classes, got {args.save_predictions}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be a positive number of images, got {args.limit}")
    device = resolve_device(args.device)
    autocast_context(device, args.precision)  # reject fp16 on CPU before loading anything
    names = _parse_datasets(args.datasets)
    split_files = _parse_split_files(args.split_file, names)

    # build every dataset first: a missing one fails the run before any model is loaded
    datasets = [
        build_dataset(
            name, "test", args.data_root, download=args.download, split_file=split_files.get(name),
            test_fraction=args.test_fraction, seed=args.seed, templates=args.templates, limit=args.limit,
        )
        for name in names
    ]
    out = Path(args.out)
    records = []
    print(HEADER)
    for spec in args.model:
        adapter = load_model(spec, device=str(device), verify=not getattr(args, "no_verify", False))
        generative = supports_likelihood(adapter)
        if not isinstance(adapter, VisionLanguageAdapter) and not generative:
            raise ConfigError(f"'{spec}' is not a vision-language model; zero-shot classification needs image and text towers")
        for ds in datasets:
            if generative:  # rank class captions by their log-likelihood given the image
                result = evaluate_likelihood(
                    adapter, _images_for(ds, adapter, args), batch_size=args.batch_size, num_workers=args.num_workers,
                    device=device, precision=args.precision, length_normalize=args.length_norm,
                    show_progress=not args.no_progress, top_k_predictions=args.save_predictions or 0,
                )
            else:
                result = evaluate_zeroshot(
                    adapter, _images_for(ds, adapter, args), batch_size=args.batch_size, num_workers=args.num_workers,
                    device=device, precision=args.precision, show_progress=not args.no_progress,
                    top_k_predictions=args.save_predictions or 0,
                )
            record = make_record(result, model=spec, adapter=adapter, label=args.label, templates=args.templates)
            if generative:
                record.metrics["caption_perplexity"] = result.caption_perplexity
                record.metrics["length_normalized"] = float(result.length_normalize)
            if args.save_predictions:
                from vlmpress.evaluation.results import _slug
                from vlmpress.evaluation.zeroshot import write_predictions

                name = f"{_slug(Path(spec).name or spec)}__{_slug(ds.name)}__{_slug(ds.split_id)}.jsonl"
                pred_path = write_predictions(out / "predictions" / name, result, ds.classnames, ds.relpaths)
                record.predictions_file = str(pred_path)
                logger.info("wrote per-image predictions to %s", pred_path)
            path = write_record(record, out)
            records.append(record)
            print(_fmt(record), flush=True)
            logger.info("wrote %s", path)
        del adapter
    print(f"\n{len(records)} result(s) appended to {out / 'results.jsonl'}", file=sys.stdout)
    return 0
