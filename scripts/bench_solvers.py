#!/usr/bin/env python
"""Solver speed and accuracy against the peers' own recipes, side by side in one run (not a test).

For each shape (out x in): W (decaying spectrum), activations X (in x 4*in, decaying, a few
outlier channels x50) and M = X X^T; rank = the uniform-ratio rank for --ratio (0.4 = 40% of the
layer's parameters removed). Timed on the same inputs, alternating, best of --repeats:

* ``ref_svdllm``  -- SVD-LLM as its authors ship it: float64 Cholesky of M (eigenvalue shift when
                     not positive definite), float32 inverse, float32 SVD of W L, truncate, undo the
                     whitening;
* ``ref_asvd``    -- ASVD: scale input channels by sqrt(diag M)^alpha (alpha 0.5), float32 SVD,
                     truncate, unscale (cheaper, less accurate);
* ``svd_llm``     -- vlmpress's closed form (float64, smaller-side eigh);
* ``als(tol)``    -- vlmpress's ALS to its default tolerance, and ``als(N)`` for each --iters N
                     (paper's fixed tau); both include the SVD of W that starts them.

Errors are activation errors ``||(W - A B) X|| / ||W X||`` evaluated in float64 outside the timing;
``vs opt`` is the relative gap to the float64 closed form. ``ratio`` = time / ref_svdllm's time.

    python scripts/bench_solvers.py                                  # default shapes, 1 and 2 threads
    python scripts/bench_solvers.py --shapes 768x768 3072x768 --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench_common import machine  # noqa: E402

from vlmpress.core.rank import ratio_rank  # noqa: E402
from vlmpress.core.solvers import activation_relative_error, solve_als, solve_svd_llm  # noqa: E402

DEFAULT_SHAPES = ["768x768", "3072x768", "768x3072", "4096x4096", "11008x4096"]


def synthetic_problem(n_out: int, n_in: int, device: torch.device, seed: int = 0):
    """W with a decaying spectrum and M = X X^T for 4*in tokens with outlier channels (x50)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in**0.5
    W = W * (torch.exp(-torch.arange(n_in, dtype=torch.float64) / (0.3 * n_in)) + 0.05)  # column decay
    scales = torch.exp(-torch.arange(n_in, dtype=torch.float64) / (0.1 * n_in)) + 1e-3
    scales[torch.randperm(n_in, generator=g)[: max(1, n_in // 256)]] *= 50.0
    X = torch.randn(n_in, 4 * n_in, generator=g, dtype=torch.float64) * scales[:, None]
    mix = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))[0]
    X = mix @ X
    return W.float().to(device), (X @ X.T).to(device)


def ref_svdllm(W: torch.Tensor, M: torch.Tensor, r: int):
    """SVD-LLM's whitening recipe (as in the authors' code: Cholesky in float64, the rest in float32)."""
    raw = M.double()
    L, info = torch.linalg.cholesky_ex(raw)
    if int(info) != 0:  # the authors' fallback: shift by the most negative eigenvalue
        evals = torch.linalg.eigvalsh(raw)
        raw = raw + (-evals[0] + 1e-6) * torch.eye(raw.shape[0], dtype=raw.dtype, device=raw.device)
        L = torch.linalg.cholesky(raw)
    L = L.float()
    L_inv = torch.linalg.inv(L)
    U, S, Vh = torch.linalg.svd(W.float() @ L, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * (Vh[:r] @ L_inv)


def ref_asvd(W: torch.Tensor, M: torch.Tensor, r: int, alpha: float = 0.5):
    """ASVD: per-channel activation scaling S = rms(x)^alpha, SVD of W S, truncate, undo S."""
    s = M.diagonal().clamp_min(0).sqrt().float().pow(alpha).clamp_min(1e-6)
    U, S, Vh = torch.linalg.svd(W.float() * s, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r] / s


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
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to run")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--iters", type=int, nargs="*", default=[10], help="fixed-tau ALS runs")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats (best kept)")
    parser.add_argument("--large-repeats", type=int, default=1, help="repeats for shapes whose smaller side is >= 4096")
    parser.add_argument("--no-als", action="store_true")
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"# machine: {machine()}")
    print(f"# ratio {args.ratio}; times: best of {args.repeats} alternating runs ({args.large_repeats} for min side >= 4096)")
    header = f"{'dev':<4} {'thr':>3} {'shape':>11} {'rank':>5} {'method':<11} {'seconds':>8} {'ratio':>6} {'act.err':>10} {'vs opt':>10} {'iters':>5}"
    print(header)
    print("-" * len(header))
    for device_name in devices:
        device = torch.device(device_name)
        for shape in args.shapes:
            n_out, n_in = (int(v) for v in shape.lower().split("x"))
            W, M = synthetic_problem(n_out, n_in, device)
            rank = ratio_rank(n_out, n_in, args.ratio)
            W64 = W.double()
            methods = {
                "ref_svdllm": lambda: ref_svdllm(W, M, rank),
                "svd_llm": lambda: solve_svd_llm(W, rank, M, device=device),
                "ref_asvd": lambda: ref_asvd(W, M, rank),
            }
            if not args.no_als:
                methods["als(tol)"] = lambda: solve_als(W, rank, M, device=device)
                for it in args.iters:
                    methods[f"als({it})"] = lambda it=it: solve_als(W, rank, M, iters=it, device=device)
            threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
            repeats = args.large_repeats if min(n_out, n_in) >= 4096 else args.repeats
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                solve_svd_llm(W[:64, :64], 8, M[:64, :64], device=device)  # warm-up
                best, outs = {}, {}
                for _ in range(repeats):
                    for name, fn in methods.items():  # alternate the methods within each repeat
                        t, out = timed(fn, device)
                        best[name] = min(best.get(name, float("inf")), t)
                        outs[name] = out
                errors, iters = {}, {}
                for name, out in outs.items():
                    A, B = (out.A, out.B) if hasattr(out, "A") else out
                    errors[name] = activation_relative_error(W64, A.double(), B.double(), M)
                    iters[name] = out.info.get("iters") if hasattr(out, "info") else None
                opt = errors["svd_llm"]
                for name in methods:
                    it = "-" if iters[name] is None else str(iters[name])
                    print(
                        f"{device_name:<4} {n_threads:>3} {shape:>11} {rank:>5} {name:<11} {best[name]:>8.3f} "
                        f"{best[name] / best['ref_svdllm']:>6.2f} {errors[name]:>10.7f} {errors[name] / opt - 1:>+10.2e} {it:>5}",
                        flush=True,
                    )
            del W, M, W64
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
