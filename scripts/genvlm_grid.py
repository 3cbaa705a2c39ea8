#!/usr/bin/env python
"""Caltech-101 generative reference VLM: base likelihood zero-shot, then SVD / SVD-LLM / SVD-ALS /
PGSVD (shared and auto split) at 20 / 40 / 60 % of the targeted parameters (vision tower + LM).

    python scripts/genvlm_grid.py --out eval/results/caltech101-llava [--limit 500] [--reductions 0.2 0.4 0.6]

Calibration: 256 image/caption pairs from the Caltech-101 *train* list (``--calib-split-file
test.txt`` keeps the test images out); captions are each image's class in a generic template.
Evaluation: ``vlmpress eval`` on ``test.txt`` with the single template ``a photo of a {}.``
(summed caption log-likelihood), every record appended to OUT/results.jsonl; then
``vlmpress report OUT/results.jsonl`` writes the table. Compressed checkpoints go to OUT/ckpt/
and are deleted after their evaluation unless ``--keep``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench_common import SHARED_CALTECH  # noqa: E402

from vlmpress.api import compress_model  # noqa: E402
from vlmpress.checkpoint import save_compressed  # noqa: E402
from vlmpress.cli import main as cli  # noqa: E402
from vlmpress.config import CompressionConfig  # noqa: E402
from vlmpress.reference.genvlm import get_genvlm_reference  # noqa: E402

RUNS = (("svd", "shared"), ("svd_llm", "shared"), ("svd_als", "shared"), ("pgsvd", "shared"), ("pgsvd", "auto"))
LABELS = {"svd": "SVD", "svd_llm": "SVD-LLM", "svd_als": "SVD-ALS", "pgsvd": "PGSVD"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval/results/caltech101-llava")
    p.add_argument("--data-root", default=str(SHARED_CALTECH.parent))
    p.add_argument("--reductions", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--limit", type=int, help="evaluate a stratified subset of N test images")
    p.add_argument("--n-images", type=int, default=256, help="calibration pairs")
    p.add_argument("--batch-size", type=int, default=16, help="test images per likelihood batch")
    p.add_argument("--keep", action="store_true", help="keep the compressed checkpoints")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    split = str(Path(args.data_root) / "caltech101" / "test.txt")
    spec = f"hf:{get_genvlm_reference(data_root=args.data_root)}"
    eval_args = ["--datasets", "caltech101", "--split-file", split, "--data-root", args.data_root, "--templates", "single",
                 "--out", str(out), "--batch-size", str(args.batch_size), "--device", "cpu", "--no-progress",
                 "--cache-dir", str(out / "cache")]
    if args.limit:
        eval_args += ["--limit", str(args.limit)]
    cli(["eval", "--model", spec, "--label", "Base", *eval_args])
    for reduction in args.reductions:
        for method, allocation in RUNS:
            name = f"{method}-{allocation}-{round(100 * reduction)}"
            cfg = CompressionConfig(
                model=spec, method=method, target_reduction=reduction, allocation=allocation, calib_images="caltech101",
                calib_split_file=split, data_root=args.data_root, n_images=args.n_images, batch_size=32, device="cpu",
            )
            adapter, report = compress_model(spec, cfg)
            ckpt = save_compressed(adapter, out / "ckpt" / name, report, overwrite=True)
            del adapter
            label = LABELS[method] + (f" ({allocation})" if method == "pgsvd" else "")
            cli(["eval", "--model", str(ckpt), "--label", label, *eval_args])
            if not args.keep:
                shutil.rmtree(ckpt)
    cli(["report", str(out / "results.jsonl"), "--out", str(out)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
