#!/usr/bin/env python
"""Reproduce the paper's CLIP table (Table 2): OpenAI ViT-B/16, six datasets, 20 % / 40 %, SVD / SVD-ALS / PGSVD.

Needs what these machines do not have: the pretrained weights (open_clip downloads them on first
use) and the six datasets in torchvision's layout under --data-root (see docs/evaluation.md, "Datasets and on-disk layout").

    python scripts/reproduce_paper_clip.py --data-root ~/data [--out runs/paper-clip-vitb16] [--eps-v 0.3 --eps-t 0.5]
"""

import argparse
import logging
import sys
from pathlib import Path

from vlmpress.evaluation.suite import SuiteConfig, run_suite

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "suites" / "paper-clip-vitb16.yaml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out")
    p.add_argument("--device")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = SuiteConfig.from_yaml(RECIPE, out=args.out, device=args.device, data_root=args.data_root)
    result = run_suite(cfg)
    print(result.table_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
