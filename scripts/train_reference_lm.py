#!/usr/bin/env python
"""Train the small reference LM on Python-stdlib docstrings (offline, deterministic, CPU minutes).

    python scripts/train_reference_lm.py --out runs/reference_lm        # ~7 min on 2 CPU cores (1.3M-parameter Llama)
    python scripts/train_reference_lm.py --config configs/reference/lm-moe.json --out runs/reference_moe_lm
                                                                        # the MoE variant (Mixtral, 4 experts, top-2)

Writes OUT/model (an hf:<dir> checkpoint with tokenizer), OUT/train.txt, OUT/test.txt and
OUT/training.json (config, corpus hash, final loss, wall time). Flags override the ``--config`` file.
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
    p.add_argument("--config", default=None, help="JSON file of ReferenceLMConfig fields (e.g. configs/reference/lm-moe.json)")
    for f in dataclasses.fields(ReferenceLMConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, help=f"default {f.default}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ReferenceLMConfig.from_json(args.config) if args.config else ReferenceLMConfig()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ReferenceLMConfig) if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(cfg, **given)
    summary = train_reference_lm(args.out, cfg)
    keys = ("parameters", "train_tokens", "test_tokens", "epochs", "first_train_loss", "final_train_loss", "wall_seconds")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
