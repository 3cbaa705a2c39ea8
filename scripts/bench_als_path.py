#!/usr/bin/env python
"""Tolerance-mode ALS on a trained model: the `rounds` path (SVD start, rounds to --als-tol) vs the
`limit` path (the rounds' limit, the closed-form optimum, computed directly), same ranks.

Per target reduction: the rounds each layer ran, spectra + solve seconds of both paths, and how
many layers' rounds reached the optimum (activation error within 1e-9 relative of the limit's).
Needs the caltech101 reference (trained on first use) and Caltech-101 under the data root.

    python scripts/bench_als_path.py --data-root DIR [--targets 0.2 0.4 0.6]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench_common import machine  # noqa: E402

from vlmpress.api import compress_model  # noqa: E402
from vlmpress.reference import get_reference  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("VLMPRESS_DATA"), help="directory holding caltech101/")
    p.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--n-images", type=int, default=256)
    args = p.parse_args()
    if not args.data_root:
        p.error("pass --data-root DIR (the directory holding caltech101/) or set VLMPRESS_DATA")
    spec = get_reference("caltech101").spec
    print(f"# machine: {machine()}")
    print(f"# model: the caltech101 reference CLIP; calibration: {args.n_images} train images")
    for target in args.targets:
        runs = {}
        for path in ("rounds", "limit"):
            _, report = compress_model(
                spec, method="pgsvd", target_reduction=target, device="cpu", calib_images="caltech101",
                n_images=args.n_images, n_captions=256, data_root=args.data_root, als_path=path,
            )
            runs[path] = report
        rounds, limit = runs["rounds"], runs["limit"]
        pairs = [(a, b) for a, b in zip(rounds.layers, limit.layers) if a.act_error is not None]
        iters = collections.Counter(a.als_iters for a, _ in pairs)
        above = max((a.act_error / b.act_error - 1) for a, b in pairs if b.act_error > 0)
        optimal = sum(1 for a, b in pairs if abs(a.act_error - b.act_error) <= 1e-9 * max(b.act_error, 1e-300))
        seconds = {k: r.seconds["spectra"] + r.seconds["factorisation"] for k, r in runs.items()}
        print(f"target {target}: {len(pairs)} layers; rounds ran {dict(sorted(iters.items()))}; "
              f"spectra+solves: rounds {seconds['rounds']:.2f} s, limit {seconds['limit']:.2f} s; "
              f"same ranks {rounds.rank_map == limit.rank_map}; rounds reached the optimum in {optimal} layers, "
              f"at most {above:.2e} (relative) above it", flush=True)


if __name__ == "__main__":
    main()
