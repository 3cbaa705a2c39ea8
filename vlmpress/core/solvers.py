"""Low-rank factorisation solvers (pure linear algebra, no model knowledge).

Every solver approximates a weight ``W`` (out x in, called N x M in the paper) by ``A @ B`` with
``A`` (N x r) and ``B`` (r x M), and returns a :class:`Factorization` with diagnostics.
``M = X X^T`` is the (uncentred) input covariance of the layer, accumulated during calibration.

* ``svd``      -- truncated SVD of W, ``A = U_r S_r^1/2``, ``B = S_r^1/2 V_r^T`` (paper Eq. 1).
* ``svd_llm``  -- SVD-LLM: whiten by the Cholesky factor T of M, truncate ``W T``, undo the whitening
                 (closed-form optimum of Eq. 2/3). A singular M (few samples, dead features) is
                 handled by jitter escalation and then an eigendecomposition fallback.
* ``als``      -- PGSVD / SVD-ALS: start from the truncated SVD of W, then ``iters`` alternating
                 least-squares updates (Eq. 6):  A = W M B^T (B M B^T)^+,  B = (A^T A)^+ A^T W.

All solvers compute in float64 (inputs may be fp16/bf16/fp32) on the requested device.
Activation errors ``||(W - A B) X||_F / ||W X||_F`` are evaluated in trace form from M, so X is never
needed; values below ~1e-7 are at the float64 cancellation floor of that formula.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from vlmpress.errors import ConfigError

DEFAULT_RCOND = 1e-12  # relative eigenvalue cut-off for r x r pseudo-inverse solves
_JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4)  # relative to mean(diag(M)), tried in order


@dataclass
class Factorization:
    """Result of one solver call. ``A``/``B`` are float64 on the compute device."""

    A: torch.Tensor
    B: torch.Tensor
    method: str
    rank: int
    weight_rel_error: float
    act_rel_error: float | None = None  # None when no covariance was given
    act_rel_error_init: float | None = None  # ALS: error of the SVD initialisation
    seconds: float = 0.0  # factorisation time only (diagnostics excluded)
    history: list[float] = field(default_factory=list)  # ALS: activation error per iteration
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def _resolve_device(device, like: torch.Tensor) -> torch.device:
    """``None``: where W already is (pure functions never move data by surprise); ``auto``: CUDA if present."""
    if device is None:
        return like.device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_f64(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float64)


def _symmetrize(M: torch.Tensor) -> torch.Tensor:
    return 0.5 * (M + M.mT)


def _check_inputs(W: torch.Tensor, rank: int, M: torch.Tensor | None) -> None:
    if W.dim() != 2:
        raise ConfigError(f"weight must be a 2-D matrix (out x in), got shape {tuple(W.shape)}")
    n_out, n_in = W.shape
    if not 1 <= int(rank) <= min(n_out, n_in):
        raise ConfigError(f"rank must be in [1, {min(n_out, n_in)}] for a {n_out}x{n_in} weight, got {rank}")
    if not torch.isfinite(W).all():
        raise ConfigError("weight contains NaN or inf; refusing to factorise it")
    if M is not None:
        if M.shape != (n_in, n_in):
            raise ConfigError(f"covariance must be {n_in}x{n_in} for a {n_out}x{n_in} weight, got {tuple(M.shape)}")
        if not torch.isfinite(M).all():
            raise ConfigError("covariance contains NaN or inf (check the calibration data)")


def psd_solve(G: torch.Tensor, R: torch.Tensor, rcond: float = DEFAULT_RCOND) -> torch.Tensor:
    """``G^+ R`` for a symmetric positive semi-definite r x r matrix G.

    Cholesky solve when G is safely positive definite (smallest pivot above ``rcond`` relative to
    the largest diagonal entry); otherwise an eigendecomposition pseudo-inverse that discards
    eigenvalues below ``rcond * lambda_max``. No explicit inverse of a large matrix is formed.
    """
    G = _symmetrize(G)
    scale = G.diagonal().max()
    L, info = torch.linalg.cholesky_ex(G)
    pivots = L.diagonal()
    ok = (info == 0) & (scale > 0) & torch.isfinite(pivots).all() & (pivots.min().square() > rcond * scale)
    if bool(ok):  # a single host sync: this runs in every ALS iteration, on GPU too
        return torch.cholesky_solve(R, L)
    if not bool(scale > 0):
        return torch.zeros(G.shape[1], *R.shape[1:], dtype=R.dtype, device=R.device)
    evals, evecs = torch.linalg.eigh(G)
    cutoff = rcond * evals.max().clamp_min(0)
    inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(torch.finfo(G.dtype).tiny), torch.zeros_like(evals))
    return evecs @ (inv.unsqueeze(-1) * (evecs.mT @ R))


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite ``A @ B`` as ``U S^1/2 @ S^1/2 V^T`` (same product, balanced scales).

    ALS leaves the scale split between A and B arbitrary; balanced factors keep both in a range
    that survives a cast to fp16/bf16. Cost: two thin QRs and an r x r SVD.
    """
    Qa, Ra = torch.linalg.qr(A)
    Qb, Rb = torch.linalg.qr(B.mT)
    U, S, Vh = torch.linalg.svd(Ra @ Rb.mT)
    root = S.sqrt()
    return (Qa @ U) * root, root.unsqueeze(-1) * (Vh @ Qb.mT)


def svd_of(W: torch.Tensor, device=None, driver: str = "gram") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``W = U diag(S) Vh`` in float64 on ``device`` (rank selection, ``svd`` and the ALS start).

    ``driver="gram"`` (default) diagonalises the Gram matrix of the smaller side with ``eigh``
    (2-4x faster than LAPACK's SVD on CPU). It squares W's condition number, which float64 absorbs
    for weight matrices: singular values keep ~1e-8 relative accuracy w.r.t. the largest, far
    below any truncation tolerance, and ``U_r S_r Vh_r`` stays an exact projection of W, so even
    full rank reproduces W to rounding. Columns for (numerically) zero singular values are zero.
    ``driver="lapack"`` uses ``torch.linalg.svd``.
    """
    dev = _resolve_device(device, W)
    W64 = _as_f64(W, dev)
    if driver == "lapack":
        return torch.linalg.svd(W64, full_matrices=False)
    if driver != "gram":
        raise ConfigError(f"unknown SVD driver '{driver}' (use 'gram' or 'lapack')")
    tall = W64.shape[0] >= W64.shape[1]
    G = W64.mT @ W64 if tall else W64 @ W64.mT
    evals, vecs = torch.linalg.eigh(_symmetrize(G))
    evals, vecs = evals.flip(0), vecs.flip(1)  # descending
    S = evals.clamp_min(0).sqrt()
    floor = S[0] * 1e-150 if S.numel() else 0
    inv = torch.where(S > floor, 1.0 / S.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(S))
    if tall:  # W = U S V^T with V from eigh(W^T W), U = W V / S
        return (W64 @ vecs) * inv, S, vecs.mT
    return vecs, S, inv.unsqueeze(-1) * (vecs.mT @ W64)


def _factors_from_svd(U, S, Vh, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = S[:rank].clamp_min(0).sqrt()
    return U[:, :rank] * root, root.unsqueeze(-1) * Vh[:rank]


def weight_relative_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``||W - A B||_F / ||W||_F`` (computed directly, accurate to float64 rounding)."""
    W = W.to(torch.float64)
    denom = torch.linalg.matrix_norm(W)
    if denom == 0:
        return 0.0 if torch.count_nonzero(A @ B) == 0 else float("inf")
    return float(torch.linalg.matrix_norm(W - A.to(W) @ B.to(W)) / denom)


def activation_relative_error(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, M: torch.Tensor, WM: torch.Tensor | None = None
) -> float:
    """``||(W - A B) X||_F / ||W X||_F`` from ``M = X X^T`` in trace form.

    tr((W-AB) M (W-AB)^T) = tr(W M W^T) - 2 <A, (W M) B^T> + <A^T A, B M B^T>.
    Returns 0 when ``W X = 0`` (nothing to approximate).
    """
    W = W.to(torch.float64)
    A, B, M = A.to(W), B.to(W), M.to(W)
    if WM is None:
        WM = W @ M
    total = torch.sum(WM * W)
    if total <= 0:
        return 0.0
    resid = total - 2.0 * torch.sum(A * (WM @ B.mT)) + torch.sum((A.mT @ A) * (B @ M @ B.mT))
    return float(torch.sqrt(resid.clamp_min(0) / total))


# ----------------------------------------------------------------------------- solvers


def solve_svd(
    W: torch.Tensor,
    rank: int,
    M: torch.Tensor | None = None,
    *,
    device=None,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    **_: object,
) -> Factorization:
    """Plain truncated SVD of W (activation-agnostic baseline)."""
    _check_inputs(W, rank, M)
    dev = _resolve_device(device, W)
    t0 = time.perf_counter()
    U, S, Vh = svd if svd is not None else svd_of(W, dev)
    A, B = _factors_from_svd(U.to(dev, torch.float64), S.to(dev, torch.float64), Vh.to(dev, torch.float64), rank)
    seconds = time.perf_counter() - t0
    W64 = _as_f64(W, dev)
    act = activation_relative_error(W64, A, B, _as_f64(M, dev)) if M is not None else None
    return Factorization(A, B, "svd", rank, weight_relative_error(W64, A, B), act, act, seconds)


def _whitened_truncation(W64, S, S_pinv_T, rank):
    """Truncate ``W S`` and map back: ``A = U_r s^1/2``, ``B = s^1/2 V_r^T S^+``."""
    U, s, Vh = torch.linalg.svd(W64 @ S, full_matrices=False)
    A, Bw = _factors_from_svd(U, s, Vh, rank)
    return A, S_pinv_T(Bw)


def activation_optimal_factors(
    W: torch.Tensor, M: torch.Tensor, rank: int, *, device=None, rcond: float = DEFAULT_RCOND
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form minimiser of ``||(W - A B) M^1/2||_F`` via the eigendecomposition of M.

    With ``M = Q diag(l) Q^T``: truncate ``W Q_k diag(l_k)^1/2`` (eigenvalues above ``rcond * l_max``)
    and map back with ``diag(l_k)^-1/2 Q_k^T``. Directions that X never excites get zero weight,
    which is the minimum-norm optimum. Works for any PSD M, singular or not.
    """
    dev = _resolve_device(device, W)
    W64, M64 = _as_f64(W, dev), _symmetrize(_as_f64(M, dev))
    evals, Q = torch.linalg.eigh(M64)
    keep = evals > rcond * evals.max().clamp_min(0)
    if not bool(keep.any()):
        U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
        return _factors_from_svd(U, S, Vh, rank)
    Qk, root = Q[:, keep], evals[keep].sqrt()
    k = int(keep.sum())
    r = min(rank, k, W64.shape[0])
    A, B = _whitened_truncation(W64, Qk * root, lambda Bw: (Bw / root) @ Qk.mT, r)
    if r < rank:  # pad with zero directions so the caller gets the rank it asked for
        A = torch.cat([A, A.new_zeros(A.shape[0], rank - r)], 1)
        B = torch.cat([B, B.new_zeros(rank - r, B.shape[1])], 0)
    return A, B


def solve_svd_llm(
    W: torch.Tensor,
    rank: int,
    M: torch.Tensor,
    *,
    device=None,
    rcond: float = DEFAULT_RCOND,
    balance: bool = True,
    **_: object,
) -> Factorization:
    """SVD-LLM: truncated SVD of ``W T`` with ``M = T T^T`` (Cholesky), then ``B = S^1/2 V^T T^-1``.

    Non-positive-definite M: the Cholesky is retried with jitter ``j * mean(diag M)`` for
    j in 1e-10..1e-4; if that still fails (or yields non-finite factors) the eigendecomposition
    closed form is used. ``info['whitening']`` records which path was taken.
    """
    if M is None:
        raise ConfigError("svd_llm needs the input covariance M of the layer (run calibration first)")
    _check_inputs(W, rank, M)
    dev = _resolve_device(device, W)
    W64, M64 = _as_f64(W, dev), _symmetrize(_as_f64(M, dev))
    t0 = time.perf_counter()
    info: dict = {}
    A = B = None
    scale = float(M64.diagonal().mean())
    if scale > 0:
        eye = torch.eye(M64.shape[0], dtype=torch.float64, device=dev)
        for jitter in _JITTERS:
            T, err = torch.linalg.cholesky_ex(M64 + (jitter * scale) * eye if jitter else M64)
            if int(err.item()) != 0:
                continue
            A, B = _whitened_truncation(
                W64, T, lambda Bw: torch.linalg.solve_triangular(T.mT, Bw.mT, upper=True).mT, rank
            )
            if bool(torch.isfinite(A).all() and torch.isfinite(B).all()):
                info.update(whitening="cholesky", jitter=jitter)
                break
            A = B = None
    if A is None:
        A, B = activation_optimal_factors(W64, M64, rank, device=dev, rcond=rcond)
        info.update(whitening="eigh" if scale > 0 else "zero-covariance")
    if balance:
        A, B = balance_factors(A, B)
    seconds = time.perf_counter() - t0
    act = activation_relative_error(W64, A, B, M64)
    return Factorization(A, B, "svd_llm", rank, weight_relative_error(W64, A, B), act, None, seconds, info=info)


def solve_als(
    W: torch.Tensor,
    rank: int,
    M: torch.Tensor,
    *,
    iters: int = 10,
    device=None,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    rcond: float = DEFAULT_RCOND,
    balance: bool = True,
    track_history: bool = False,
    **_: object,
) -> Factorization:
    """PGSVD / SVD-ALS factor refinement (paper Algorithm 1, Eq. 6).

    Start from the truncated SVD of W (``svd`` may pass a precomputed one) and run ``iters`` rounds
    of ``A = W M B^T (B M B^T)^+`` then ``B = (A^T A)^+ A^T W``.

    Implementation: with ``C = W M B^T`` and ``G = B M B^T`` the A-step gives span(A) = span(C) and
    the B-step can take ``B' = G (C^T C)^+ C^T W`` (then ``A B' = P_C W``, the exact minimiser), so
    every product A B is the one Eq. 6 produces. All quantities are r x r or live in the smaller
    side of W: for a wide W (out <= in) ``B = R W`` and the loop only touches ``K = W M W^T``
    (out x out); for a tall W it only touches ``W^T W`` and M (in x in). One iteration then costs
    O(r d^2) with d = min(out, in), with no N x r solve. The r x r systems go through
    :func:`psd_solve` (Cholesky, eigh pseudo-inverse fallback). Each half-step exactly minimises
    the objective in one factor, so the recorded activation error never increases.

    ``history`` holds the activation error of the SVD start and after the last iteration; with
    ``track_history=True`` also after every iteration (the residual costs about a third of an
    iteration, so it is off by default).
    """
    if M is None:
        raise ConfigError("als needs the input covariance M of the layer (run calibration first)")
    if int(iters) < 0:
        raise ConfigError(f"als iterations must be >= 0, got {iters}")
    _check_inputs(W, rank, M)
    dev = _resolve_device(device, W)
    W64, M64 = _as_f64(W, dev), _symmetrize(_as_f64(M, dev))
    t0 = time.perf_counter()
    U, S, Vh = svd if svd is not None else svd_of(W64, dev)
    U, S, Vh = U[:, :rank].to(dev, torch.float64), S[:rank].to(dev, torch.float64), Vh[:rank].to(dev, torch.float64)
    A, B = _factors_from_svd(U, S, Vh, rank)
    n_out, n_in = W64.shape
    wide = n_out <= n_in
    history: list[float] = []
    SVh = S.unsqueeze(-1) * Vh  # = U_r^T W for an exact SVD
    if wide:
        K = W64 @ M64 @ W64.mT  # out x out
        total = float(K.diagonal().sum())
        e0 = total - float(torch.sum((SVh @ M64) * SVh))
        R = torch.where(S > 0, 1.0 / S.clamp_min(torch.finfo(torch.float64).tiny).sqrt(), torch.zeros_like(S))
        R = R.unsqueeze(-1) * U.mT  # B = R W
    else:
        GW = W64.mT @ W64  # in x in
        total = float(torch.sum(M64 * GW))
        e0 = total - float(torch.sum((SVh @ M64) * SVh))
    if total > 0:
        history.append(max(e0, 0.0) ** 0.5 / total**0.5)
        last = None  # (left factor basis, G) of the last A-step, to build A at the end
        n_iters = int(iters)
        for it in range(n_iters):
            residual = track_history or it == n_iters - 1
            if wide:
                RK = R @ K  # = C^T
                G = RK @ R.mT
                CtC = RK @ RK.mT
                last = (RK, G)
                # one factorisation of CtC serves the update and, when wanted, the residual
                rhs = torch.cat([RK, (RK @ K) @ RK.mT], dim=1) if residual else RK  # [C^T | C^T K C]
                both = psd_solve(CtC, rhs, rcond)
                R = G @ both[:, : RK.shape[1]]
            else:
                BM = B @ M64
                G = BM @ B.mT
                Z = BM @ GW  # = C^T W
                CtC = Z @ BM.mT
                last = (BM, G)
                rhs = torch.cat([Z, (Z @ M64) @ Z.mT], dim=1) if residual else Z
                both = psd_solve(CtC, rhs, rcond)
                B = G @ both[:, : Z.shape[1]]
            if residual:
                resid = total - float(both[:, -CtC.shape[1] :].diagonal().sum())
                history.append(max(resid, 0.0) ** 0.5 / total**0.5)
        if last is not None:
            left, G = last
            C = left.mT if wide else W64 @ left.mT  # C = W M B^T of the last A-step
            A = psd_solve(G, C.mT, rcond).mT
            if wide:
                B = R @ W64
    if balance:
        A, B = balance_factors(A, B)
    seconds = time.perf_counter() - t0
    if not bool(torch.isfinite(A).all() and torch.isfinite(B).all()):  # pragma: no cover - defensive
        raise FloatingPointError("ALS produced non-finite factors; please report this weight/covariance")
    act = history[-1] if history else 0.0
    act0 = history[0] if history else 0.0
    return Factorization(
        A, B, "als", rank, weight_relative_error(W64, A, B), act, act0, seconds, history, {"iters": int(iters)}
    )


SOLVERS: dict[str, Callable[..., Factorization]] = {
    "svd": solve_svd,
    "svd_llm": solve_svd_llm,
    "als": solve_als,
}


def factorize(method: str, W: torch.Tensor, rank: int, M: torch.Tensor | None = None, **kwargs) -> Factorization:
    """Dispatch to a registered solver by name (``svd``, ``svd_llm``, ``als``)."""
    try:
        solver = SOLVERS[method]
    except KeyError:
        raise ConfigError(f"unknown solver '{method}'; known: {', '.join(sorted(SOLVERS))}") from None
    return solver(W, rank, M, **kwargs)
