#!/usr/bin/env python
"""Train the small reference Llama on Python-stdlib docstrings (offline, deterministic, CPU minutes).

    python scripts/train_reference_lm.py --out runs/reference_lm        # ~7 min on 2 CPU cores (1.3M-parameter Llama)

Writes OUT/model (an hf:<dir> checkpoint with tokenizer), OUT/train.txt, OUT/test.txt and
OUT/training.json (config, corpus hash, final loss, wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from vlmpress.reference.lm import ReferenceLMConfig, train_reference_lm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/reference_lm")
    for f in dataclasses.fields(ReferenceLMConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ReferenceLMConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ReferenceLMConfig)})
    summary = train_reference_lm(args.out, cfg)
    print(json.dumps({k: summary[k] for k in ("parameters", "train_tokens", "test_tokens", "epochs", "final_train_loss", "wall_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
