"""Batched factorisation: layers of one shape solved together (pure linear algebra).

A transformer tower has a handful of layer shapes (q/k/v/out and the two MLP layers, repeated in
every block). Solving each shape's layers as one batch turns ~100 small problems into a few
batched ``torch.linalg`` calls: one host synchronisation per ALS round for the whole batch, and
memory bounded by the batch size. The rounds themselves (:func:`~vlmpress.core.solvers.als_rounds`)
and the ending (:func:`~vlmpress.core.solvers.finish_factorization`) are the per-layer solver's own
functions -- the per-layer solve is a batch of one -- so every member computes what
:func:`~vlmpress.core.solvers.solve_als` computes; this module only stacks the reduced problems.

Ranks may differ inside a batch (one tolerance gives heterogeneous ranks): a member of rank
``r`` below the batch's largest rank ``R`` carries ``R - r`` zero columns. They stay exactly
zero: its Cholesky-QR Gram is block-diagonal with an identity block on the padding, and its
Householder fallback is masked. :func:`plan_batches` keeps ranks in a batch within a factor so
the padding wastes little work.

Members the batched path does not cover (no activations at all, a tall weight too ill-conditioned
for the implicit SVD basis) are solved by the per-layer solver, so every edge case keeps one
implementation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from vlmpress.core.covariance import gram, sandwich
from vlmpress.core.solvers import (
    _ALS_MAX_ITERS,
    _ALS_TOL,
    _CHOLQR_MIN_PIVOT,
    _SVD_BASIS_MIN_RATIO,
    Factorization,
    _Reduced,
    _top_eigenvectors,
    als_limit,
    als_rounds,
    finish_factorization,
    full_svd,
    gram_eigen,
    inverse_values,
    solve_als,
    solve_svd_llm,
)
from vlmpress.errors import ConfigError

BATCHED_SOLVERS = ("als", "svd_llm")


@dataclass(frozen=True)
class BatchItem:
    """One layer to factorise: its key (e.g. the layer name), weight shape and rank."""

    key: str
    shape: tuple[int, int]
    rank: int


def plan_batches(
    items: Sequence[BatchItem], max_layers: int, *, max_bytes: int = 2**30, rank_spread: float = 1.25
) -> list[list[BatchItem]]:
    """Group items into batches of one weight shape, at most ``max_layers`` layers and ``max_bytes``
    of float64 working memory each, with ranks within ``rank_spread`` of the batch's largest
    (padding smaller ranks up to it costs work). Order inside a shape: rank descending."""
    if max_layers < 1:
        raise ConfigError(f"solve batch size must be >= 1, got {max_layers}")
    by_shape: dict[tuple[int, int], list[BatchItem]] = {}
    for item in items:
        by_shape.setdefault(tuple(item.shape), []).append(item)
    batches: list[list[BatchItem]] = []
    for (n, m), group in by_shape.items():
        d = min(n, m)
        group = sorted(group, key=lambda it: -it.rank)
        current: list[BatchItem] = []
        for item in group:
            per_layer = 8 * (2 * n * m + m * m + d * d + 4 * d * (current[0].rank if current else item.rank))
            full = (
                len(current) >= max_layers
                or (current and item.rank * rank_spread < current[0].rank)
                or (current and per_layer * (len(current) + 1) > max_bytes)
            )
            if full:
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
    return batches


@dataclass
class _BatchProblem:
    """The stacked reduced problems (see :mod:`vlmpress.core.solvers`): W = Z C, K = C M C^T."""

    W: torch.Tensor  # (b, n, m)
    M: torch.Tensor  # (b, m, m)
    C: torch.Tensor  # (b, d, m)
    K: torch.Tensor  # (b, d, d)
    V_over_S: torch.Tensor | None = None  # tall W, SVD basis: Z = W V S^-1 (never formed)
    R: torch.Tensor | None = None  # tall W, Cholesky-QR basis: Z = W R^-1 (upper-triangular R = C)

    @classmethod
    def build(cls, W, M, S=None, vecs=None, G=None) -> tuple["_BatchProblem", list[bool]]:
        """The batch's problem and which members it covers (a tall W needs a well-conditioned basis:
        the SVD one when rank planning gave the spectra, else a Cholesky-QR of ``G`` = W^T W, given
        or formed here, as :func:`_reduce`)."""
        b, n, m = W.shape
        if n <= m:
            return cls(W, M, W, sandwich(W, M)), [True] * b
        if S is not None:
            covered = (S[:, m - 1] > _SVD_BASIS_MIN_RATIO * S[:, 0]).tolist()
            C = S.unsqueeze(-1) * vecs.mT  # S V^T (d x m)
            return cls(W, M, C, sandwich(C, M), V_over_S=vecs * inverse_values(S).unsqueeze(-2)), covered
        G = gram(W) if G is None else G.to(W)
        L, info = torch.linalg.cholesky_ex(G)
        pivots = L.diagonal(dim1=-2, dim2=-1)
        ok = (info == 0) & (pivots.square().amin(-1) > _CHOLQR_MIN_PIVOT * G.diagonal(dim1=-2, dim2=-1).amax(-1))
        R = L.mT
        return cls(W, M, R, sandwich(R, M), R=R), ok.tolist()

    @property
    def basis(self) -> str:
        return "svd" if self.V_over_S is not None else "cholesky-qr" if self.R is not None else "identity"

    def member(self, i: int) -> _Reduced:
        V_over_S = None if self.V_over_S is None else self.V_over_S[i]
        R = None if self.R is None else self.R[i]
        return _Reduced(self.W[i], self.M[i], self.C[i], self.K[i], R=R, V_over_S=V_over_S, basis=self.basis)

    def finish(self, i: int, rank: int, Q: torch.Tensor, sq_error: float, total: float, method: str, seconds: float,
               balance: bool, **extra) -> Factorization:
        """Member i's :class:`Factorization` from its (unpadded) Q, exactly as the per-layer solvers finish."""
        history, best_iter, Q0 = extra.pop("history", None), extra.get("best_iter", 0), extra.pop("Q0", None)
        return finish_factorization(
            self.member(i), rank, Q, sq_error, total, method, seconds, balance, extra,
            history=history, best_iter=best_iter, Q0=None if Q0 is None else Q0[:, :rank],
        )


def _per_layer(method, W, M, rank, S, vecs, **kwargs) -> Factorization:
    svd = full_svd(W, S, vecs) if S is not None else None
    solver = solve_als if method == "als" else solve_svd_llm
    result = solver(W, rank, M, svd=svd, **kwargs)
    result.info["batch"] = 1
    return result


def solve_batched(
    method: str,
    W: torch.Tensor,
    M: torch.Tensor,
    ranks: Sequence[int],
    *,
    spectra: tuple[torch.Tensor, torch.Tensor] | None = None,
    grams: torch.Tensor | None = None,
    iters: int | None = None,
    tol: float = _ALS_TOL,
    max_iters: int = _ALS_MAX_ITERS,
    balance: bool = True,
    exact_finish: bool = True,
    path: str = "rounds",
) -> list[Factorization]:
    """Factorise a batch of same-shape layers: ``W`` (b, n, m), ``M`` (b, m, m), one rank each.

    ``method`` is ``als`` (PGSVD / SVD-ALS rounds, fixed ``iters`` or to ``tol``) or ``svd_llm``
    (closed form). ``spectra`` = :func:`gram_eigen` of W when rank planning already has it (the ALS
    start and the tall basis come from it); else ``grams`` = W^T W of tall weights when rank planning
    formed them (the Cholesky-QR basis). ``path`` as in :func:`solve_als` (``limit``: tolerance
    mode takes the closed form straight away). Computes on W's device in float64; returns one
    :class:`Factorization` per member, as the per-layer solver would (``info['batch']`` = b).
    """
    if method not in BATCHED_SOLVERS:
        raise ConfigError(f"no batched solver for '{method}' (batched: {', '.join(BATCHED_SOLVERS)})")
    if W.dim() != 3 or M.dim() != 3 or M.shape[0] != W.shape[0] or M.shape[-2:] != (W.shape[-1], W.shape[-1]):
        raise ConfigError(f"batched solve needs W (b, n, m) and M (b, m, m), got {tuple(W.shape)} and {tuple(M.shape)}")
    b, n, m = W.shape
    d = min(n, m)
    ranks = [int(r) for r in ranks]
    if len(ranks) != b or not all(1 <= r <= d for r in ranks):
        raise ConfigError(f"batched solve needs {b} ranks in [1, {d}], got {ranks}")
    fixed = iters is not None
    if method == "als" and fixed and int(iters) < 0:
        raise ConfigError(f"als iterations must be >= 0, got {iters}")
    if method == "als" and not fixed and not (tol > 0 and int(max_iters) >= 1):
        raise ConfigError(f"als tolerance must be > 0 and max_iters >= 1, got tol={tol}, max_iters={max_iters}")
    if not bool(torch.isfinite(W).all()):
        raise ConfigError("weight contains NaN or inf; refusing to factorise it")
    if path not in ("rounds", "limit"):
        raise ConfigError(f"als path must be 'rounds' or 'limit', got {path!r}")
    if method == "als" and path == "limit" and not fixed:
        return [als_limit(r) for r in solve_batched("svd_llm", W, M, ranks, spectra=spectra, grams=grams, balance=balance)]
    t0 = time.perf_counter()
    W, M = W.to(torch.float64), M.to(torch.float64)  # M (symmetric) enters via K = C M C^T and tr(R M R^T) only
    if method == "als":
        kwargs = dict(iters=iters, tol=tol, max_iters=max_iters, balance=balance, exact_finish=exact_finish, path=path)
    else:
        kwargs = dict(balance=balance)
    if spectra is None and method == "als":
        spectra = gram_eigen(W)
    S, vecs = (t.to(W) for t in spectra) if spectra is not None else (None, None)

    # tall weights too ill-conditioned for the batch's basis, and layers whose inputs are all zero,
    # go to the per-layer solver (which picks a Householder QR basis / returns the truncated SVD)
    problem, covered = _BatchProblem.build(W, M, S, vecs, grams if S is None else None)
    if not bool(torch.isfinite(problem.K).all()):  # with a finite W, K = C M C^T is finite iff M is
        raise ConfigError("covariance contains NaN or inf (check the calibration data); refusing to factorise it")
    totals = problem.K.diagonal(dim1=-2, dim2=-1).sum(-1).tolist()  # sync: which members see activations
    results: list[Factorization | None] = [None] * b
    idx = []
    for i in range(b):
        if covered[i] and totals[i] > 0:
            idx.append(i)
        else:
            results[i] = _per_layer(method, W[i], M[i], ranks[i], None if S is None else S[i], None if vecs is None else vecs[i], **kwargs)
    if idx:
        if method == "svd_llm":
            _closed_form(problem, idx, ranks, totals, balance, results, t0)
        else:
            _als(problem, idx, ranks, totals, vecs, fixed, iters, tol, max_iters, exact_finish, balance, results, t0)
    return results  # type: ignore[return-value]


def top_eigenvectors_batched(K: torch.Tensor, ranks: Sequence[int], batched: bool | None = None) -> list:
    """(top-r eigenvalues, eigenvectors) of each symmetric K[j], descending. ``batched`` (default: off
    the CPU) uses one batched ``eigh`` call; on CPU each member takes the faster per-matrix route."""
    if batched is None:
        batched = K.device.type != "cpu"
    if not batched:
        return [_top_eigenvectors(K[j], r) for j, r in enumerate(ranks)]
    vals, vecs = torch.linalg.eigh(K)
    vals, vecs = vals.flip(-1), vecs.flip(-1)
    return [(vals[j, :r], vecs[j, :, :r]) for j, r in enumerate(ranks)]


def _closed_form(problem: _BatchProblem, idx, ranks, totals, balance, results, t0) -> None:
    """Top-r eigenvectors of every covered member's K (one batched eigh on GPU, one eigh per member on CPU)."""
    tops = top_eigenvectors_batched(problem.K[idx], [ranks[i] for i in idx])
    tails = torch.stack([top.clamp_min(0).sum() for top, _ in tops]).tolist()
    seconds = (time.perf_counter() - t0) / len(results)
    for (_, Q), i, top_sum in zip(tops, idx, tails):
        results[i] = problem.finish(
            i, ranks[i], Q.to(problem.K), max(totals[i] - top_sum, 0.0), totals[i], "svd_llm", seconds, balance,
            path="smaller-side eigh", batch=len(results),
        )


def _als(problem: _BatchProblem, idx, ranks, totals, vecs, fixed, iters, tol, max_iters, exact_finish, balance, results, t0) -> None:
    """ALS rounds (:func:`~vlmpress.core.solvers.als_rounds`) for the covered members together,
    started from the SVD start in the batch's basis."""
    dev = problem.K.device
    d = problem.K.shape[-1]
    R = max(ranks[i] for i in idx)
    sel = torch.tensor(idx, device=dev)
    K = problem.K[sel]
    if problem.basis == "identity":  # wide: the SVD start's span is W's top-r left singular vectors
        Q0 = vecs[sel][..., :R]
    else:  # tall, SVD basis (C = S V^T): the first r coordinate directions
        Q0 = torch.eye(d, R, dtype=torch.float64, device=dev).expand(len(idx), d, R)
    runs = als_rounds(
        K, Q0, [ranks[i] for i in idx], [totals[i] for i in idx],
        iters=iters if fixed else None, tol=tol, max_iters=max_iters, exact_finish=exact_finish,
    )
    seconds = (time.perf_counter() - t0) / len(results)
    for p, (run, i) in enumerate(zip(runs, idx)):
        info = dict(mode="fixed" if fixed else "tolerance", iters=run.iters, best_iter=run.best_iter,
                    converged=run.converged, batch=len(results))
        if run.finish:
            info["finish"] = run.finish
        results[i] = problem.finish(
            i, ranks[i], run.Q[:, : ranks[i]], run.sq_error, totals[i], "als", seconds, balance,
            history=run.history, Q0=Q0[p], **info,
        )
