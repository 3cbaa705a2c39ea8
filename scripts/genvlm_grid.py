#!/usr/bin/env python
"""A generative reference VLM: base likelihood zero-shot, then SVD / SVD-LLM / SVD-ALS / PGSVD
(shared, auto and fixed eps_v / eps_t splits) at 20 / 40 / 60 % of the targeted parameters
(vision tower + LM).

    python scripts/genvlm_grid.py --reference caltech101-llava --out eval/results/caltech101-llava
    python scripts/genvlm_grid.py --reference digits-llava --out eval/results/digits-llava

Calibration: 256 image/caption pairs from the *train* split only (Caltech-101: the images not in
``test.txt``; digits: the reference's fixed train split), captions = each image's class in a
generic template. Evaluation: ``vlmpress eval`` on the test split (Caltech-101 ``test.txt``;
digits: its held-out split written as an image folder) with the single template
``a photo of a {}.`` (summed caption log-likelihood); records go to OUT/results.jsonl, then
``vlmpress report`` writes OUT/table.md. Compressed checkpoints go to WORK/ckpt/ and are deleted
after their evaluation unless ``--keep``.
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
from vlmpress.pipeline.checkpoint import save_compressed  # noqa: E402
from vlmpress.cli import main as cli  # noqa: E402
from vlmpress.pipeline.config import CompressionConfig  # noqa: E402
from vlmpress.reference.genvlm import GENVLM_REFERENCES, get_genvlm_reference  # noqa: E402

RUNS = (("svd", "shared"), ("svd_llm", "shared"), ("svd_als", "shared"), ("pgsvd", "shared"), ("pgsvd", "auto"))
LABELS = {"svd": "SVD", "svd_llm": "SVD-LLM", "svd_als": "SVD-ALS", "pgsvd": "PGSVD"}


def write_reference_folder(name: str, root: Path) -> Path:
    """A reference data set's fixed train / test splits as ``root/{train,test}/<class>/<i>.png`` (once)."""
    from vlmpress.reference.data import reference_dataset

    if (root / "test").is_dir() and (root / "train").is_dir():
        return root
    for split in ("train", "test"):
        images, labels, classnames = reference_dataset(name, split)
        for i, label in enumerate(labels):
            folder = root / split / classnames[label].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            images.image(i).save(folder / f"{i:05d}.png")
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", default="caltech101-llava", choices=sorted(GENVLM_REFERENCES))
    p.add_argument("--out", default=None, help="default: eval/results/<reference>")
    p.add_argument("--work", default=None, help="checkpoints, image caches, exported data (default: runs/<reference>)")
    p.add_argument("--data-root", default=str(SHARED_CALTECH.parent))
    p.add_argument("--reductions", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--limit", type=int, help="evaluate a stratified subset of N test images")
    p.add_argument("--n-images", type=int, default=256, help="calibration pairs")
    p.add_argument("--batch-size", type=int, default=16, help="test images per likelihood batch")
    p.add_argument("--keep", action="store_true", help="keep the compressed checkpoints")
    p.add_argument("--fixed-splits", type=float, nargs="*", default=[0.5, 2.0],
                   help="PGSVD with these fixed eps_v / eps_t proportions too (besides shared = 1), to compare the auto split with")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out or f"eval/results/{args.reference}")
    work = Path(args.work or f"runs/{args.reference}")
    recipe = GENVLM_REFERENCES[args.reference]
    spec = f"hf:{get_genvlm_reference(recipe, data_root=args.data_root)}"
    if recipe.clip_reference == "caltech101":
        split = str(Path(args.data_root) / "caltech101" / "test.txt")
        data = ["--datasets", "caltech101", "--split-file", split, "--data-root", args.data_root]
        calib = dict(calib_images="caltech101", calib_split_file=split, data_root=args.data_root)
    else:
        folder = write_reference_folder(recipe.clip_reference, work / "data")
        data = ["--datasets", f"imagefolder:{folder}"]
        calib = dict(calib_images=str(folder / "train"))
    eval_args = [*data, "--templates", "single", "--out", str(out), "--batch-size", str(args.batch_size),
                 "--device", "cpu", "--no-progress", "--cache-dir", str(work / "cache")]
    if args.limit:
        eval_args += ["--limit", str(args.limit)]
    cli(["eval", "--model", spec, "--label", "Base", *eval_args])
    for reduction in args.reductions:
        runs = [(m, a, None) for m, a in RUNS] + [("pgsvd", "proportion", rho) for rho in args.fixed_splits]
        for method, allocation, rho in runs:
            name = f"{method}-{allocation}-{round(100 * reduction)}" + (f"-rho{rho:g}" if rho is not None else "")
            split = dict(eps_proportion={"vision": rho, "text": 1.0}) if rho is not None else {}
            cfg = CompressionConfig(
                model=spec, method=method, target_reduction=reduction, allocation=allocation, n_images=args.n_images,
                batch_size=32, device="cpu", **split, **calib,
            )
            adapter, report = compress_model(spec, cfg)
            ckpt = save_compressed(adapter, work / "ckpt" / name, report, overwrite=True)
            del adapter
            label = LABELS[method] + (f" ({allocation})" if method == "pgsvd" and rho is None else "")
            label += f" (fixed split eps_v/eps_t = {rho:g})" if rho is not None else ""
            cli(["eval", "--model", str(ckpt), "--label", label, *eval_args])
            if not args.keep:
                shutil.rmtree(ckpt)
    cli(["report", str(out / "results.jsonl"), "--out", str(out)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
