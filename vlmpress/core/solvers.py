"""Low-rank factorisation solvers (pure linear algebra, no model knowledge).

Every solver approximates a weight ``W`` (out x in, called N x M in the paper) by ``A @ B`` with
``A`` (N x r) and ``B`` (r x M), and returns a :class:`Factorization` with diagnostics.
``M = X X^T`` is the (uncentred) input covariance of the layer, accumulated during calibration.

* ``svd``      -- truncated SVD of W, ``A = U_r S_r^1/2``, ``B = S_r^1/2 V_r^T`` (paper Eq. 1).
* ``svd_llm``  -- SVD-LLM's closed-form optimum of Eq. 2/3 (whitened truncation), computed as one
                 float64 eigendecomposition on W's smaller side (no Cholesky or inverse of M, so
                 singular covariances need no jitter).
* ``als``      -- PGSVD / SVD-ALS: start from the truncated SVD of W, then alternating least-squares
                 updates (Eq. 6):  A = W M B^T (B M B^T)^+,  B = (A^T A)^+ A^T W, either a fixed
                 number of rounds (the paper's tau) or until the error stops changing.

All solvers compute in float64 (inputs may be fp16/bf16/fp32) on the requested device.
Activation errors ``||(W - A B) X||_F / ||W X||_F`` come from M, so X is never needed; every
reported error is the error of the returned factors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from vlmpress.core.covariance import gram, sandwich
from vlmpress.core.cpu_blas import scipy_linalg
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


_SCIPY_EIGH_MIN_DIM = 1024  # CPU: SciPy's divide-and-conquer eigh from this size (measured faster than torch's)


def symmetric_eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending, eigenvectors) of a symmetric matrix (torch.linalg.eigh's convention).

    On CPU from d = 1024 (2-D), SciPy's divide-and-conquer driver: on the solvers' K matrices it
    measured 1.1-1.5x faster than torch's ``eigh`` (4096: 8.3 vs 10.9 s at two threads, 13.7 vs
    21.3 s at one; 2048 inside a solve: 1.46 vs 1.62 s) and faster than computing only the wanted
    vectors with MRRR (4096, two threads: 12.1 s). Below 1024, inside a solve (right after torch's
    products, whose thread pool then competes with SciPy's), torch's is as fast or faster (3072x768:
    0.18 vs 0.21 s), so GPU, batches and small d use ``torch.linalg.eigh``.
    """
    if G.device.type == "cpu" and G.dim() == 2 and G.shape[-1] >= _SCIPY_EIGH_MIN_DIM:
        with scipy_linalg() as linalg:
            if linalg is not None:
                try:
                    vals, vecs = linalg.eigh(G.numpy(), driver="evd", check_finite=False)
                except (linalg.LinAlgError, ValueError):  # pragma: no cover - rare non-convergence
                    pass
                else:
                    return torch.from_numpy(vals), torch.from_numpy(vecs)
    return torch.linalg.eigh(G)


def gram_eigen(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and the singular vectors of W's smaller side, from one float64
    ``eigh`` of that side's Gram matrix (U for a wide or square W, V for a tall one; the same
    convention as :func:`svd_of`). Works on a batch."""
    W = W.to(torch.float64)
    wide = W.shape[-2] <= W.shape[-1]
    evals, vecs = symmetric_eigh(gram(W.mT if wide else W))  # block-triangular product from 1024 wide
    return evals.flip(-1).clamp_min(0).sqrt(), vecs.flip(-1)


_SCIPY_VALUES_DIMS = (768, 2048)  # CPU: SciPy's values-only eigh in this range (768: 0.033 vs 0.040 s); torch's outside


def symmetric_eigenvalues(G: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of a symmetric float64 matrix, no vectors (about 0.4x the cost of
    ``eigh`` with vectors). On CPU from 768 to 2048 wide, SciPy's LAPACK driver (measured faster
    than torch's ``eigvalsh`` there; below, its thread pool's hand-over from torch's costs more than
    it saves); elsewhere ``torch.linalg.eigvalsh``."""
    d = G.shape[-1]
    if G.device.type == "cpu" and G.dim() == 2 and _SCIPY_VALUES_DIMS[0] <= d <= _SCIPY_VALUES_DIMS[1]:
        with scipy_linalg() as linalg:
            if linalg is not None:
                return torch.from_numpy(linalg.eigh(G.numpy(), eigvals_only=True, check_finite=False)).to(G.dtype)
    return torch.linalg.eigvalsh(G)


def gram_singular_values(W: torch.Tensor, G: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values (descending) of W from its smaller-side Gram matrix ``G`` (formed here unless
    the caller has it), without vectors."""
    if G is None:
        W = W.to(torch.float64)
        G = gram(W.mT if W.shape[-2] <= W.shape[-1] else W)
    return symmetric_eigenvalues(G).flip(-1).clamp_min(0).sqrt()


def inverse_values(S: torch.Tensor) -> torch.Tensor:
    """1 / S, with 0 for (numerically) zero singular values."""
    floor = S[..., :1] * 1e-150
    return torch.where(S > floor, 1.0 / S.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(S))


def full_svd(W: torch.Tensor, S: torch.Tensor, vecs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` of one W from :func:`gram_eigen`'s output (the other side's vectors by one product)."""
    W = W.to(vecs)
    inv = inverse_values(S)
    if W.shape[0] > W.shape[1]:
        return (W @ vecs) * inv, S, vecs.mT
    return vecs, S, inv.unsqueeze(-1) * (vecs.mT @ W)


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
    return full_svd(W64, *gram_eigen(W64))


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
    """``||(W - A B) X||_F / ||W X||_F`` from ``M = X X^T``, evaluated on the explicit residual.

    ``tr(R M R^T)`` with ``R = W - A B`` formed first: its rounding error scales with ``||R||``, not
    with ``||W||``, so small errors stay accurate (the expanded trace form
    ``tr(W M W^T) - 2<A, W M B^T> + ...`` cancels to ~1e-8 and reported 0 for exact factors).
    Returns 0 when ``W X = 0`` (nothing to approximate).
    """
    W = W.to(torch.float64)
    A, B, M = A.to(W), B.to(W), M.to(W)
    if WM is None:
        WM = W @ M
    total = torch.sum(WM * W)
    if total <= 0:
        return 0.0
    R = W - A @ B
    return float(torch.sqrt(torch.sum((R @ M) * R).clamp_min(0) / total))


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


# ----------------------------------------------------------------------------- reduced problem
#
# Every activation-aware solve here works on the smaller side of W. Write W = Z C with Z (n x d)
# having orthonormal columns and C (d x m), d = min(n, m):  wide W (n <= m): Z = I, C = W;  tall W:
# Z from a QR/SVD of W. Then for any d x r orthonormal Q the factors A = Z Q, B = Q^T C give
# A B = Z Q Q^T C, and with K = C M C^T (d x d)
#
#     ||(W - A B) X||_F^2 = tr((I - Q Q^T) K) = tr K - tr(Q^T K Q).
#
# * the closed form (SVD-LLM's optimum) is Q = top-r eigenvectors of K, error^2 = sum of K's tail
#   eigenvalues (a sum of non-negative terms: no cancellation);
# * ALS (paper Eq. 6) is exactly subspace iteration Q <- orth(K Q) from the SVD start: the A-step
#   gives span(A) = span(W M B^T) = Z span(K Q) and the B-step B = A^+ W projects W onto it.
# No inverse or Cholesky of M is ever needed, so singular, rank-deficient or zero covariances take
# the same path as well-conditioned ones.

_ALS_TOL = 2e-5  # default ALS stop: relative change of the activation error between iterations
_ALS_MAX_ITERS = 100  # default cap in tolerance mode
_ROUNDS_PER_EIGH = 8.0  # an eigendecomposition of K costs about this many (2 d^2 r + 4 d r^2)-flop rounds at r ~ d/3
_CHOLQR_MIN_PIVOT = 1e-8  # Cholesky-QR of a tall W only when pivot^2 > this * max diag (cond(W) < ~1e4)
_EXPLICIT_BELOW = 1e6  # recompute an error explicitly when error^2 < this * d * eps (trace form unreliable)


@dataclass
class _Reduced:
    """``W = Z C`` and ``K = C M C^T`` (see above). ``Z`` is None for a wide W (identity)."""

    W: torch.Tensor
    M: torch.Tensor
    C: torch.Tensor
    K: torch.Tensor
    Z: torch.Tensor | None = None  # explicit orthonormal factor (from an SVD of W)
    R: torch.Tensor | None = None  # or: upper-triangular R with Z = W R^-1 (Cholesky-QR)
    V_over_S: torch.Tensor | None = None  # or: Z = W V S^-1 from the SVD, never formed (batched solves)
    basis: str = "identity"

    @property
    def total(self) -> float:
        return float(self.K.diagonal().sum())

    def lift(self, Q: torch.Tensor) -> torch.Tensor:
        """``A = Z Q`` (n x r)."""
        if self.Z is not None:
            return self.Z @ Q
        if self.R is not None:
            return self.W @ torch.linalg.solve_triangular(self.R, Q, upper=True)
        if self.V_over_S is not None:
            return self.W @ (self.V_over_S @ Q)
        return Q

    def factors(self, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lift(Q), Q.mT @ self.C

    def explicit_sq_error(self, Q: torch.Tensor) -> float:
        """``||(C - Q Q^T C) X||^2`` summed from the explicit residual (scale-aware, no cancellation)."""
        Rc = self.C - Q @ (Q.mT @ self.C)
        return float(torch.sum((Rc @ self.M) * Rc).clamp_min(0))


_SVD_BASIS_MIN_RATIO = 1e-5  # an eigh-Gram SVD basis is orthonormal to ~eps*cond^2: trusted up to cond 1e5


def _reduce(W64: torch.Tensor, M64: torch.Tensor, svd=None, weight_gram: torch.Tensor | None = None) -> _Reduced:
    """The d x d problem. Tall W: the SVD basis when given and well-conditioned (ALS gets it from
    rank planning), else a Cholesky-QR (cheap, well-conditioned W; ``weight_gram`` = W^T W when
    rank planning already formed it), else a Householder QR (exact)."""
    n, m = W64.shape
    if n <= m:
        return _Reduced(W64, M64, W64, sandwich(W64, M64))
    if svd is not None:
        U, S, Vh = (t.to(W64) for t in svd)
        if bool(S[m - 1] > _SVD_BASIS_MIN_RATIO * S[0]):
            C = S[:m].unsqueeze(-1) * Vh[:m]
            return _Reduced(W64, M64, C, sandwich(C, M64), Z=U[:, :m], basis="svd")
    else:
        G = gram(W64) if weight_gram is None else weight_gram.to(W64)
        L, err = torch.linalg.cholesky_ex(G)
        if int(err) == 0 and bool(L.diagonal().min().square() > _CHOLQR_MIN_PIVOT * G.diagonal().max()):
            R = L.mT
            return _Reduced(W64, M64, R, sandwich(R, M64), R=R, basis="cholesky-qr")
    Z, R = torch.linalg.qr(W64)
    return _Reduced(W64, M64, R, sandwich(R, M64), Z=Z, basis="qr")


def _rel_error(reduced: _Reduced, Q: torch.Tensor, sq_error: float, total: float) -> tuple[float, bool]:
    """Relative activation error of the factors built from Q. The cheap value (trace form or
    spectrum tail) is used when float64 rounding cannot matter; near rounding it is recomputed from
    the explicit residual (exact in the reduced space for wide W and QR bases; on W itself for
    a Cholesky-QR or SVD basis, which are orthonormal only to ~eps*cond(W)^2). Returns (error, explicit?)."""
    d = reduced.K.shape[0]
    if sq_error >= _EXPLICIT_BELOW * d * torch.finfo(torch.float64).eps * total:
        return (sq_error / total) ** 0.5, False
    if reduced.basis in ("identity", "qr"):
        return (reduced.explicit_sq_error(Q) / total) ** 0.5, True
    A, B = reduced.factors(Q)
    R = reduced.W - A @ B
    full_total = float(torch.sum((reduced.W @ reduced.M) * reduced.W))
    return (float(torch.sum((R @ reduced.M) * R).clamp_min(0)) / full_total) ** 0.5, True


def _top_eigenvectors(K: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-r eigenvalues, their eigenvectors), both descending, of a symmetric d x d K (float64),
    from one full eigendecomposition (:func:`symmetric_eigh`)."""
    vals, vecs = symmetric_eigh(K)
    return vals.flip(0)[:r], vecs.flip(1)[:, :r]


def _orthonormal_batched(Y: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of span(Y[j]): Cholesky-QR twice on the batch (GEMM-speed, stable for
    cond(Y) < ~1e7; padding columns get an identity Gram block and stay zero). Returns (Q, ok):
    members with ``ok`` False are too ill-conditioned or rank-deficient for it and need the
    Householder fallback (checked by the caller at its one sync per round, so this never syncs)."""
    X = Y
    ok = torch.ones(Y.shape[0], dtype=torch.bool, device=Y.device)
    eye_pad = torch.diag_embed(pad)
    for _ in range(2):
        G = X.mT @ X
        diag_max = G.diagonal(dim1=-2, dim2=-1).amax(-1)
        L, info = torch.linalg.cholesky_ex(G + eye_pad)
        pivots = L.diagonal(dim1=-2, dim2=-1)
        real = pivots.square().masked_fill(pad > 0, math.inf).amin(-1)
        ok &= (info == 0) & (real > 1e-14 * diag_max)
        X = torch.linalg.solve_triangular(L.mT, X, upper=True, left=False)
    return X, ok


def _householder(Y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Fallback of :func:`_orthonormal_batched` for one member (QR is column-sequential, so the
    first r columns equal those of the unpadded QR; the padding's completion vectors are masked)."""
    return torch.linalg.qr(Y).Q * keep


def finish_at_limit(history: list[float], it: int, budget: int, tol: float) -> bool:
    """Tolerance-mode ALS: stop iterating and take the rounds' limit (the top-r eigenspace of K)?

    Yes once the rounds run cost about one eigendecomposition (``it >= budget``), or earlier when
    the last three errors, extrapolated geometrically (subspace iteration converges linearly), say
    the tolerance would only be met after the budget: then the remaining rounds are wasted work.
    """
    if it >= budget:
        return True
    if len(history) < 3:
        return False
    d1, d2 = history[-3] - history[-2], history[-2] - history[-1]
    need = tol * max(history[-1], 1e-300)
    if d2 <= need or d1 <= 0 or d2 <= 0:
        return False
    rho = d2 / d1
    if rho >= 1.0:  # not (yet) a geometric decrease: no evidence either way
        return False
    return it + math.log(need / d2) / math.log(rho) > budget


@dataclass
class AlsRounds:
    """One member's outcome of :func:`als_rounds`: the best iterate (padded to the batch's R columns)."""

    Q: torch.Tensor
    sq_error: float
    history: list[float]
    iters: int
    best_iter: int
    converged: bool
    finish: str | None = None


def als_rounds(
    K: torch.Tensor,
    Q0: torch.Tensor,
    ranks: Sequence[int],
    totals: Sequence[float],
    *,
    iters: int | None = None,
    tol: float = _ALS_TOL,
    max_iters: int = _ALS_MAX_ITERS,
    exact_finish: bool = True,
) -> list[AlsRounds]:
    """The ALS rounds of Eq. 6 for a batch of reduced problems; the only implementation of them.

    ``K`` (b, d, d) holds each member's ``C M C^T``, ``Q0`` (b, d, R) its orthonormal start (rank
    ``ranks[j]`` <= R; columns past it zero), ``totals[j]`` = tr K[j] > 0. One round is one step
    of subspace iteration ``Q <- orth(K Q)`` for every member still iterating, with one host
    synchronisation per round; a member leaves when it stops. ``iters=N`` runs exactly N rounds
    (the paper's tau); ``iters=None`` stops at a relative change <= ``tol`` (at most ``max_iters``),
    and with ``exact_finish`` a slowly converging member jumps to the rounds' limit, the top-r
    eigenspace of K, once the rounds cost about one eigendecomposition (:func:`finish_at_limit`).
    The per-layer solver is a batch of one.
    """
    b, d, R = Q0.shape
    dev = K.device
    fixed = iters is not None
    keep = (torch.arange(R, device=dev) < torch.tensor(list(ranks), device=dev).unsqueeze(-1)).to(torch.float64)
    total = torch.tensor(list(totals), dtype=torch.float64, device=dev)
    Q0 = Q0 * keep.unsqueeze(-2)
    KQ = K @ Q0
    start = (total - (Q0 * KQ).sum((-2, -1))).clamp_min(0).tolist()
    histories = [[(s / totals[p]) ** 0.5] for p, s in enumerate(start)]
    best_sq, best_iter, best_Q = list(start), [0] * b, list(Q0.unbind(0))
    n_rounds = int(iters) if fixed else int(max_iters)
    budgets = [
        max(3, int(_ROUNDS_PER_EIGH * d / (2 * r + 4 * r * r / d))) if exact_finish and not fixed else n_rounds
        for r in ranks
    ]
    done, converged, finish = [0] * b, [fixed] * b, [None] * b
    active = list(range(b))  # members still iterating; K_a / keep_a / total_a / KQ hold only these
    K_a, keep_a, total_a = K, keep, total
    for it in range(1, n_rounds + 1):
        if not active:
            break
        Q, ok = _orthonormal_batched(KQ, 1.0 - keep_a)
        KQ_next = K_a @ Q
        cur = (total_a - (Q * KQ_next).sum((-2, -1))).clamp_min(0)
        host = torch.cat([cur, ok.to(torch.float64)]).tolist()  # the round's one host sync
        cur_h, ok_h = host[: len(active)], host[len(active):]
        for j, good in enumerate(ok_h):
            if not good:  # ill-conditioned K Q: Householder QR for this member
                Q[j] = _householder(KQ[j], keep_a[j])
                KQ_next[j] = K_a[j] @ Q[j]
                cur_h[j] = max(totals[active[j]] - float((Q[j] * KQ_next[j]).sum()), 0.0)
        still: list[int] = []
        for j, p in enumerate(active):
            done[p] = it
            h = histories[p]
            h.append((cur_h[j] / totals[p]) ** 0.5)
            if cur_h[j] < best_sq[p]:
                best_sq[p], best_iter[p], best_Q[p] = cur_h[j], it, Q[j]
            if not fixed and abs(h[-2] - h[-1]) <= tol * max(h[-1], 1e-300):
                converged[p] = True
            elif not fixed and exact_finish and it < n_rounds and finish_at_limit(h, it, budgets[p], tol):
                # slow convergence: jump to the rounds' limit, the top-r eigenspace of K
                top, Qe = _top_eigenvectors(K_a[j], ranks[p])
                sq = max(totals[p] - float(top.clamp_min(0).sum()), 0.0)
                h.append((sq / totals[p]) ** 0.5)
                if sq <= best_sq[p]:
                    padded = torch.zeros(d, R, dtype=torch.float64, device=dev)
                    padded[:, : ranks[p]] = Qe.to(padded)
                    best_sq[p], best_iter[p], best_Q[p] = sq, len(h) - 1, padded
                converged[p], finish[p] = True, "limit"
            else:
                still.append(j)
        if len(still) != len(active):
            keep_idx = torch.tensor(still, dtype=torch.long, device=dev)
            K_a, keep_a, total_a, KQ = K_a[keep_idx], keep_a[keep_idx], total_a[keep_idx], KQ_next[keep_idx]
            active = [active[j] for j in still]
        else:
            KQ = KQ_next
    return [
        AlsRounds(best_Q[p], best_sq[p], histories[p], done[p], best_iter[p], converged[p], finish[p]) for p in range(b)
    ]



def _weight_error(reduced: _Reduced, B_unbalanced: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``||W - A B|| / ||W||`` as ``1 - ||Q^T C||^2 / ||C||^2`` (A B = Z Q Q^T C); explicit near rounding."""
    w2 = float(reduced.C.square().sum())
    if not w2 > 0:
        return weight_relative_error(reduced.W, A, B)
    e2 = 1.0 - float(B_unbalanced.square().sum()) / w2
    if e2 < _EXPLICIT_BELOW * reduced.K.shape[0] * torch.finfo(torch.float64).eps:
        return weight_relative_error(reduced.W, A, B)
    return max(e2, 0.0) ** 0.5


def _balance_columns(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each rank-one term ``a_i b_i`` equal norms in A and B (same product, safe for fp16/bf16)."""
    na, nb = torch.linalg.vector_norm(A, dim=0), torch.linalg.vector_norm(B, dim=1)
    ok = (na > 0) & (nb > 0)
    s = torch.where(ok, (nb / torch.where(ok, na, 1.0)).sqrt(), torch.ones_like(na))
    return A * s, B / s.unsqueeze(-1)


def finish_factorization(
    reduced: _Reduced, rank: int, Q: torch.Tensor, sq_error: float, total: float, method: str, seconds: float,
    balance: bool, info: dict, *, history: list[float] | None = None, best_iter: int = 0, Q0: torch.Tensor | None = None,
) -> Factorization:
    """The :class:`Factorization` of the factors built from Q (``A = Z Q``, ``B = Q^T C``): one
    ending shared by the closed form and ALS, per layer and batched. ``sq_error`` is the cheap
    squared error (spectrum tail or trace form), replaced by the explicit residual near float64
    rounding; for ALS, ``history[best_iter]`` becomes the returned iterate's exact error and
    ``history[0]`` the start's (``Q0``)."""
    A, B0 = reduced.factors(Q)
    A, B = _balance_columns(A, B0) if balance else (A, B0)
    if not bool(torch.isfinite(A).all() and torch.isfinite(B).all()):  # pragma: no cover - defensive
        raise FloatingPointError(f"{method} produced non-finite factors; please report this weight/covariance")
    act, explicit = _rel_error(reduced, Q, sq_error, total)
    act0 = None
    if history is not None:
        history[best_iter] = act  # the returned iterate's entry holds its exact value
        if explicit and best_iter != 0:
            history[0] = _rel_error(reduced, Q0, 0.0, total)[0]
        act0 = history[0]
    info.update(basis=reduced.basis, explicit_error=explicit)
    return Factorization(A, B, method, rank, _weight_error(reduced, B0, A, B), act, act0, seconds, history or [], info)


def _svd_start(W64: torch.Tensor, rank: int, svd) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = svd if svd is not None else svd_of(W64)
    return U.to(W64), S.to(W64), Vh.to(W64)


def _zero_activation_result(W64, rank, svd, method, t0, info) -> Factorization:
    """W X = 0: every factorisation is optimal; return the truncated SVD (closest in weight space)."""
    U, S, Vh = _svd_start(W64, rank, svd)
    A, B = _factors_from_svd(U, S, Vh, rank)
    info.update(path="zero-activations")
    seconds = time.perf_counter() - t0
    return Factorization(A, B, method, rank, weight_relative_error(W64, A, B), 0.0, 0.0, seconds, [0.0], info)


def solve_svd_llm(
    W: torch.Tensor,
    rank: int,
    M: torch.Tensor,
    *,
    device=None,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    balance: bool = True,
    gram: torch.Tensor | None = None,
    **_: object,
) -> Factorization:
    """SVD-LLM's closed-form optimum of ``||(W - A B) X||_F`` at rank r, solved on W's smaller side.

    SVD-LLM whitens with the Cholesky factor of M and truncates the SVD of ``W T``; the left
    singular vectors of ``W T`` are the eigenvectors of ``K = W M W^T`` (wide W) or, for a tall
    ``W = Z C``, ``Z`` times those of ``C M C^T``. So one float64 ``eigh`` of a d x d matrix
    (d = min(out, in)) gives the same optimum with no Cholesky, inverse or jitter on M, for
    singular covariances too. ``A = Z E_r``, ``B = E_r^T C``: B is W's rows projected on the kept
    activation directions (directions X never excites keep W's own values instead of zero).
    The reported error is the tail of K's spectrum (a sum, no cancellation), recomputed from the
    explicit residual when it is near float64 rounding. ``gram``: a tall W's ``W^T W`` if the
    caller already has it (rank planning), for the Cholesky-QR basis.
    """
    if M is None:
        raise ConfigError("svd_llm needs the input covariance M of the layer (run calibration first)")
    _check_inputs(W, rank, M)
    dev = _resolve_device(device, W)
    W64, M64 = _as_f64(W, dev), _as_f64(M, dev)  # M (symmetric) enters via K = C M C^T and tr(R M R^T) only
    t0 = time.perf_counter()
    info: dict = {}
    reduced = _reduce(W64, M64, svd, gram)
    total = reduced.total
    if not total > 0:
        return _zero_activation_result(W64, rank, svd, "svd_llm", t0, info)
    top, Q = _top_eigenvectors(reduced.K, rank)
    Q = Q.to(W64)
    seconds = time.perf_counter() - t0
    info.update(path="smaller-side eigh")
    return finish_factorization(
        reduced, rank, Q, max(total - float(top.clamp_min(0).sum()), 0.0), total, "svd_llm", seconds, balance, info
    )


def solve_als(
    W: torch.Tensor,
    rank: int,
    M: torch.Tensor,
    *,
    iters: int | None = None,
    tol: float = _ALS_TOL,
    max_iters: int = _ALS_MAX_ITERS,
    device=None,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    balance: bool = True,
    exact_finish: bool = True,
    path: str = "rounds",
    gram: torch.Tensor | None = None,
    **_: object,
) -> Factorization:
    """PGSVD / SVD-ALS factor refinement (paper Algorithm 1, Eq. 6), started from the truncated SVD.

    ``iters=N`` runs exactly N rounds of ``A = W M B^T (B M B^T)^+``, ``B = (A^T A)^+ A^T W`` (the
    paper's fixed tau, for reproductions). ``iters=None`` (default) iterates until the relative
    change of the activation error between rounds is at most ``tol``, at most ``max_iters`` rounds.

    Implementation: on the smaller side (see the comment above :func:`_reduce`) one round is one
    step of subspace iteration ``Q <- orth(K Q)`` (a d x d by d x r product and a thin QR), which
    yields the same product A B as Eq. 6. The activation error of every iterate falls out of that
    product, so ``history[i]`` is the error of the factors after i rounds (``history[0]``: the SVD
    start). The solver returns the best iterate, so the result is never worse than its start; its
    ``act_rel_error`` is the error of the returned factors (recomputed from the explicit residual
    when it is near float64 rounding). ``info``: rounds run, best round, converged flag.

    Tolerance mode converges to the top-r eigenspace of K (the closed-form optimum). When the rounds
    run so far cost about as much as one eigendecomposition of K and the tolerance is not met yet
    (a flat spectrum around r converges slowly), ``exact_finish`` computes that limit directly and
    appends its error to ``history`` (``info['finish'] = 'limit'``); fixed-tau runs never do.
    ``path="limit"`` (tolerance mode only) computes that limit straight away: no SVD start and no
    rounds (``iters`` 0, ``history`` empty); where an eigendecomposition is cheap next to the start's
    singular vectors plus a few probing rounds (CPU), this is the fast way to a converged result.
    """
    if M is None:
        raise ConfigError("als needs the input covariance M of the layer (run calibration first)")
    fixed = iters is not None
    if fixed and int(iters) < 0:
        raise ConfigError(f"als iterations must be >= 0, got {iters}")
    if not fixed and not (tol > 0 and int(max_iters) >= 1):
        raise ConfigError(f"als tolerance must be > 0 and max_iters >= 1, got tol={tol}, max_iters={max_iters}")
    if path not in ("rounds", "limit"):
        raise ConfigError(f"als path must be 'rounds' or 'limit', got {path!r}")
    if path == "limit" and not fixed:
        return als_limit(solve_svd_llm(W, rank, M, device=device, svd=svd, balance=balance, gram=gram))
    _check_inputs(W, rank, M)
    dev = _resolve_device(device, W)
    W64, M64 = _as_f64(W, dev), _as_f64(M, dev)  # M (symmetric) enters via K = C M C^T and tr(R M R^T) only
    t0 = time.perf_counter()
    info: dict = {"mode": "fixed" if fixed else "tolerance"}
    U, S, Vh = _svd_start(W64, rank, svd)
    reduced = _reduce(W64, M64, (U, S, Vh))
    K = reduced.K
    total = reduced.total
    if not total > 0:
        info.update(iters=0, best_iter=0, converged=True)
        return _zero_activation_result(W64, rank, (U, S, Vh), "als", t0, info)
    d = K.shape[0]
    if reduced.Z is None:  # wide: start = top-r left singular vectors of W
        Q = U[:, :rank]
    elif reduced.basis == "svd":  # tall: C = S V^T, so the start is the first r coordinate directions
        Q = torch.eye(d, rank, dtype=torch.float64, device=dev)
    else:  # tall, QR basis: the start's left singular vectors in that basis
        Q = torch.linalg.qr(reduced.Z.mT @ U[:, :rank]).Q
    Q0 = Q
    run = als_rounds(K.unsqueeze(0), Q0.unsqueeze(0), [rank], [total], iters=iters, tol=tol, max_iters=max_iters,
                     exact_finish=exact_finish)[0]
    seconds = time.perf_counter() - t0
    info.update(iters=run.iters, best_iter=run.best_iter, converged=run.converged)
    if run.finish:
        info["finish"] = run.finish
    return finish_factorization(
        reduced, rank, run.Q, run.sq_error, total, "als", seconds, balance, info,
        history=run.history, best_iter=run.best_iter, Q0=Q0,
    )


def als_limit(closed_form: Factorization) -> Factorization:
    """A closed-form result relabelled as what it is: the limit tolerance-mode ALS converges to."""
    closed_form.method = "als"
    closed_form.info.update(mode="tolerance", iters=0, best_iter=0, converged=True)
    if closed_form.info.get("path") != "zero-activations":  # there every factorisation is optimal
        closed_form.info["finish"] = "limit"
    return closed_form


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
