"""``vlmpress train-reference``: train (or fetch from the cache) a small reference CLIP model."""

from __future__ import annotations

import argparse
import logging

from vlmpress.reference.config import REFERENCES

HELP = "train a small reference CLIP (digits, caltech101) on real images, for compressing trained weights"
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, choices=sorted(REFERENCES), help="which reference model")
    p.add_argument("--epochs", type=int, help="override the recipe's number of epochs")
    p.add_argument("--seed", type=int, help="override the recipe's seed (default 0)")
    p.add_argument("--out", metavar="DIR", help="write model.safetensors + reference.json here instead of the cache")
    p.add_argument("--quick", action="store_true", help="a few steps on a handful of images (smoke test)")
    p.add_argument("--retrain", action="store_true", help="train even when the cache holds this recipe")
    p.add_argument("--threads", type=int, help="torch CPU threads while training (default: torch's)")
    p.add_argument("--data-root", help="directory holding caltech101/ (default $VLMPRESS_DATA, then ../shared/datasets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from vlmpress.reference.config import get_config
    from vlmpress.reference.store import get_reference, save_reference
    from vlmpress.reference.train import train_reference

    progress = not args.no_progress
    if args.out:
        config = get_config(args.name, quick=args.quick, epochs=args.epochs, seed=args.seed)
        result = train_reference(config, progress=progress, threads=args.threads, data_root=args.data_root)
        ref = save_reference(result, args.out)
    else:
        ref = get_reference(
            args.name, retrain=args.retrain, quick=args.quick, epochs=args.epochs, seed=args.seed,
            progress=progress, threads=args.threads, data_root=args.data_root,
        )
    meta = ref.metadata
    print(
        f"{ref.name}: held-out top-1 {100 * meta['heldout_top1']:.2f}% on {meta['n_test']} images, "
        f"final train loss {meta['final_train_loss']:.4f}, {meta['epochs']} epochs, "
        f"{meta['wall_time_s']:.0f} s training wall time\n"
        f"checkpoint: {ref.checkpoint}\nspec:       {ref.spec}"
    )
    return 0
