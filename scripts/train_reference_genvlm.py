#!/usr/bin/env python
"""Train (or find cached) the small generative reference VLM on Caltech-101 (LLaVA layout).

    python scripts/train_reference_genvlm.py            # prints the hf:<dir> spec of the cached/trained model
    python scripts/train_reference_genvlm.py --quick    # a few steps on a handful of images (smoke test)

Needs the Caltech-101 reference CLIP (``vlmpress train-reference --name caltech101``; trained
first when not cached). Recipe: :data:`vlmpress.reference.genvlm.CALTECH101_LLAVA`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from vlmpress.reference.genvlm import GENVLM_REFERENCES, get_genvlm_reference


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="caltech101-llava", choices=sorted(GENVLM_REFERENCES), help="which recipe")
    p.add_argument("--quick", action="store_true", help="a few steps on a handful of images")
    p.add_argument("--retrain", action="store_true", help="train even when the cache holds this recipe")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--out", help="write the model here instead of the cache")
    p.add_argument("--data-root", help="directory holding caltech101/ (default $VLMPRESS_DATA, then ../shared/datasets)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = GENVLM_REFERENCES[args.name].replace(epochs=args.epochs, seed=args.seed)
    directory = get_genvlm_reference(
        cfg, retrain=args.retrain, quick=args.quick, data_root=args.data_root, progress=not args.no_progress, out=args.out
    )
    meta = json.loads((Path(directory) / "reference.json").read_text())
    print(json.dumps({"spec": f"hf:{directory}", "epoch_loss": meta["epoch_loss"], "seconds": meta["seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
