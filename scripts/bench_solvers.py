#!/usr/bin/env python
"""Time the factorisation solvers on realistic layer shapes (prints a table; not a test).

For each shape (out x in) a random W and a covariance M = X X^T of correlated activations
(decaying spectrum, as real activations have) are built; svd, svd_llm and als at tau = 1, 5, 10 are
timed on the same inputs, in one run, and the ratio als(10) / svd_llm is printed per shape.
The rank is the uniform-ratio rank for --ratio (default 0.4 = 40% of the layer's parameters removed).

    python scripts/bench_solvers.py                          # default shapes on CPU (+ CUDA if present)
    python scripts/bench_solvers.py --shapes 768x768 1024x4096 --devices cpu
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from vlmpress.core.rank import ratio_rank
from vlmpress.core.solvers import solve_als, solve_svd, solve_svd_llm

DEFAULT_SHAPES = ["768x768", "3072x768", "768x3072", "4096x4096", "11008x4096"]


def correlated_covariance(m: int, device: torch.device, seed: int) -> torch.Tensor:
    """M = X X^T for 4m tokens whose features are mixed and decay like real activations."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_tokens = 4 * m
    mix = torch.randn(m, m, generator=g, dtype=torch.float64) / m**0.5
    scales = torch.exp(-torch.arange(m, dtype=torch.float64) / (0.1 * m)) + 1e-3
    Z = torch.randn(m, n_tokens, generator=g, dtype=torch.float64) * scales[:, None]
    X = (mix @ Z).to(device)
    return X @ X.T


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="OUTxIN shapes")
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, + cuda if present)")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5, 10])
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"# machine: {platform.node()} | {platform.processor() or platform.machine()} | torch {torch.__version__} "
          f"| threads {torch.get_num_threads()}" + (f" | {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    header = f"{'device':<6} {'shape':>11} {'rank':>5} {'method':<9} {'seconds':>9} {'act.err':>9}"
    print(header)
    print("-" * len(header))
    for device_name in devices:
        device = torch.device(device_name)
        for shape in args.shapes:
            n_out, n_in = (int(v) for v in shape.lower().split("x"))
            g = torch.Generator().manual_seed(0)
            W = (torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in**0.5).to(device)
            M = correlated_covariance(n_in, device, seed=1)
            rank = ratio_rank(n_out, n_in, args.ratio)
            # warm-up (kernel selection, allocator) on a small problem
            solve_als(W[:64, :64], 8, M[:64, :64], iters=1, device=device)
            rows = []
            t, f = timed(lambda: solve_svd(W, rank, M, device=device), device)
            rows.append(("svd", t, f.act_rel_error))
            t, f = timed(lambda: solve_svd_llm(W, rank, M, device=device), device)
            rows.append(("svd_llm", t, f.act_rel_error))
            t_llm = t
            t_als = {}
            for it in args.iters:
                t, f = timed(lambda: solve_als(W, rank, M, iters=it, device=device), device)
                rows.append((f"als({it})", t, f.act_rel_error))
                t_als[it] = t
            for name, t, err in rows:
                print(f"{device_name:<6} {shape:>11} {rank:>5} {name:<9} {t:>9.3f} {err:>9.5f}")
            if 10 in t_als:
                print(f"{device_name:<6} {shape:>11} {'':>5} {'ratio':<9} {t_als[10] / t_llm:>9.2f}   als(10)/svd_llm")
            del W, M
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
