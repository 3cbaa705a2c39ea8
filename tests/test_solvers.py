import pytest
import torch

from vlmpress.core.solvers import (
    activation_optimal_factors,
    activation_relative_error,
    factorize,
    psd_solve,
    solve_als,
    solve_svd,
    solve_svd_llm,
    weight_relative_error,
)
from vlmpress.errors import ConfigError


def correlated_covariance(m, n_samples, seed, decay=0.15):
    """M = X X^T for activations with a decaying spectrum (well-conditioned when n_samples >> m)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    scales = torch.exp(-decay * torch.arange(m, dtype=torch.float64)) + 0.05
    X = (Q * scales) @ torch.randn(m, n_samples, generator=g, dtype=torch.float64)
    return X @ X.T, X


def closed_form_error(W, M, r):
    """Optimal activation error: tail of the spectrum of W M^1/2."""
    evals, Q = torch.linalg.eigh(M)
    root = (Q * evals.clamp_min(0).sqrt()) @ Q.T
    s = torch.linalg.svdvals(W @ root)
    return float(torch.sqrt((s[r:] ** 2).sum() / (s**2).sum()))


def direct_activation_error(W, A, B, X):
    return float(torch.linalg.matrix_norm((W - A @ B) @ X) / torch.linalg.matrix_norm(W @ X))


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 32, generator=g, dtype=torch.float64)
    M, X = correlated_covariance(32, 400, seed=1)
    return W, M, X


def test_trace_form_activation_error_matches_direct(problem):
    W, M, X = problem
    f = solve_svd(W, 8, M)
    assert f.act_rel_error == pytest.approx(direct_activation_error(W, f.A, f.B, X), rel=1e-9)
    assert f.weight_rel_error == pytest.approx(
        float(torch.linalg.matrix_norm(W - f.A @ f.B) / torch.linalg.matrix_norm(W)), rel=1e-12
    )


def test_svd_is_the_weight_space_optimum(problem):
    W, M, _ = problem
    s = torch.linalg.svdvals(W)
    f = solve_svd(W, 10, M)
    assert f.weight_rel_error == pytest.approx(float(torch.sqrt((s[10:] ** 2).sum() / (s**2).sum())), rel=1e-10)
    assert f.A.shape == (40, 10) and f.B.shape == (10, 32)


@pytest.mark.parametrize("rank", [1, 4, 12, 24])
def test_als_objective_never_increases(problem, rank):
    W, M, X = problem  # condition number of M ~ 300: slow convergence, still monotone
    f = solve_als(W, rank, M, iters=10, track_history=True)
    h = f.history
    assert len(h) == 11
    assert all(b <= a + 1e-10 for a, b in zip(h, h[1:])), h
    assert f.act_rel_error >= closed_form_error(W, M, rank) - 1e-9  # cannot beat the optimum


@pytest.mark.parametrize("rank", [1, 4, 12, 24])
def test_als_reaches_closed_form_on_well_conditioned_covariance(rank):
    g = torch.Generator().manual_seed(11)
    W = torch.randn(40, 32, generator=g, dtype=torch.float64)
    M, X = correlated_covariance(32, 4000, seed=12, decay=0.01)  # condition number ~ 2
    f = solve_als(W, rank, M, iters=10)
    optimum = closed_form_error(W, M, rank)
    assert f.act_rel_error <= optimum * (1 + 1e-3) + 1e-12
    assert f.act_rel_error == pytest.approx(direct_activation_error(W, f.A, f.B, X), rel=1e-6)
    assert f.act_rel_error_init == pytest.approx(f.history[0])
    assert f.act_rel_error < f.act_rel_error_init  # ALS improves on the SVD initialisation


def test_als_with_identity_covariance_is_truncated_svd():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(30, 20, generator=g, dtype=torch.float64)
    eye = torch.eye(20, dtype=torch.float64)
    f_als = solve_als(W, 7, eye, iters=10)
    f_svd = solve_svd(W, 7)
    torch.testing.assert_close(f_als.A @ f_als.B, f_svd.A @ f_svd.B, rtol=1e-9, atol=1e-9)
    assert f_als.history[0] == pytest.approx(f_als.history[-1], rel=1e-9)


def test_svd_llm_equals_closed_form_on_spd(problem):
    W, M, X = problem
    for rank in [3, 10, 20]:
        f = solve_svd_llm(W, rank, M)
        assert f.info["path"] == "smaller-side eigh"
        A, B = activation_optimal_factors(W, M, rank)
        torch.testing.assert_close(f.A @ f.B, A @ B, rtol=1e-7, atol=1e-7)
        assert f.act_rel_error == pytest.approx(closed_form_error(W, M, rank), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    "case",
    ["rank_deficient", "zero_features", "single_sample", "zero_covariance"],
)
def test_svd_llm_and_als_stay_finite_on_singular_covariance(case):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    if case == "rank_deficient":
        X = torch.randn(16, 5, generator=g, dtype=torch.float64)  # 5 samples < 16 features
    elif case == "zero_features":
        X = torch.randn(16, 200, generator=g, dtype=torch.float64)
        X[[2, 5, 11]] = 0.0  # dead features
    elif case == "single_sample":
        X = torch.randn(16, 1, generator=g, dtype=torch.float64)
    else:
        X = torch.zeros(16, 10, dtype=torch.float64)
    M = X @ X.T
    for rank in [1, 4, 12]:
        llm, als = solve_svd_llm(W, rank, M), solve_als(W, rank, M, iters=10)
        for f in (llm, als):
            assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all(), (case, f.method)
            assert f.A.shape == (24, rank) and f.B.shape == (rank, 16)
        if case == "zero_covariance":
            continue
        # svd_llm is the closed form; ALS is monotone from the SVD start and bounded by the optimum
        assert llm.act_rel_error == pytest.approx(closed_form_error(W, M, rank), abs=1e-6), (case, rank)
        assert closed_form_error(W, M, rank) - 1e-6 <= als.act_rel_error <= als.act_rel_error_init + 1e-12
        for f in (llm, als):
            assert f.act_rel_error == pytest.approx(direct_activation_error(W, f.A, f.B, X), abs=1e-6)


def test_low_precision_inputs_are_promoted(problem):
    W, M, _ = problem
    f = solve_als(W.to(torch.bfloat16), 6, M.float(), iters=3)
    assert f.A.dtype == torch.float64 and f.B.dtype == torch.float64


def test_psd_solve_handles_singular_matrices():
    G = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    R = torch.ones(3, 2, dtype=torch.float64)
    X = psd_solve(G, R)
    torch.testing.assert_close(X, torch.tensor([[0.25, 0.25], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    G = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(psd_solve(G, R[:2]), torch.linalg.solve(G, R[:2]))


def test_input_validation(problem):
    W, M, _ = problem
    with pytest.raises(ConfigError, match="rank"):
        solve_svd(W, 0)
    with pytest.raises(ConfigError, match="rank"):
        solve_svd(W, 33)
    with pytest.raises(ConfigError, match="covariance"):
        solve_als(W, 4, M[:10, :10])
    with pytest.raises(ConfigError, match="covariance"):
        solve_svd_llm(W, 4, None)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        solve_svd(bad, 4)
    with pytest.raises(ConfigError, match="unknown solver"):
        factorize("qr", W, 4, M)


def test_factorize_dispatch_and_weight_error(problem):
    W, M, _ = problem
    f = factorize("als", W, 5, M, iters=2)
    assert f.method == "als" and f.info["iters"] == 2 and len(f.history) == 3  # start and every round
    assert f.info["mode"] == "fixed" and f.act_rel_error == pytest.approx(min(f.history), rel=1e-9)
    assert weight_relative_error(W, f.A, f.B) == pytest.approx(f.weight_rel_error)
    assert activation_relative_error(W, f.A, f.B, M) == pytest.approx(f.act_rel_error, rel=1e-6)


@pytest.mark.parametrize("shape", [(50, 30), (30, 50), (40, 40)])
@pytest.mark.parametrize("iters", [1, 4, 10])
def test_fast_als_equals_literal_equation_6(shape, iters):
    """The small-side implementation produces the same A B as the paper's Eq. 6 with pseudo-inverses."""
    g = torch.Generator().manual_seed(sum(shape) + iters)
    n, m = shape
    W = torch.randn(n, m, generator=g, dtype=torch.float64)
    X = torch.randn(m, 200, generator=g, dtype=torch.float64) * torch.linspace(2, 0.1, m, dtype=torch.float64)[:, None]
    M = X @ X.T
    r = 7
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    A, B = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]
    for _ in range(iters):
        A = W @ M @ B.T @ torch.linalg.pinv(B @ M @ B.T)
        B = torch.linalg.pinv(A.T @ A) @ A.T @ W
    f = solve_als(W, r, M, iters=iters)
    torch.testing.assert_close(f.A @ f.B, A @ B, rtol=1e-10, atol=1e-10)
    assert f.act_rel_error == pytest.approx(direct_activation_error(W, A, B, X), rel=1e-8)


def test_als_tolerance_mode_converges_to_the_closed_form():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(60, 48, generator=g, dtype=torch.float64)
    M, X = correlated_covariance(48, 500, seed=6, decay=0.05)
    optimum = closed_form_error(W, M, 12)
    f = solve_als(W, 12, M, tol=1e-6, max_iters=500)
    assert f.info["mode"] == "tolerance" and f.info["converged"] and 1 <= f.info["iters"] < 500
    assert len(f.history) == f.info["iters"] + 1 + ("finish" in f.info)
    assert optimum <= f.act_rel_error <= optimum * (1 + 5e-4)
    plain = solve_als(W, 12, M, tol=1e-6, max_iters=500, exact_finish=False)
    assert "finish" not in plain.info and optimum <= plain.act_rel_error <= optimum * (1 + 5e-4)


def test_als_tolerance_mode_finishes_a_slow_layer_at_its_limit():
    """Flat spectrum around r: rounds crawl; the solver jumps to the limit (the closed form)."""
    g = torch.Generator().manual_seed(8)
    W = torch.randn(200, 200, generator=g, dtype=torch.float64)
    M, X = correlated_covariance(200, 2000, seed=4, decay=0.001)
    f = solve_als(W, 60, M, tol=1e-9)
    assert f.info["finish"] == "limit" and f.info["iters"] < 100 and f.info["best_iter"] == len(f.history) - 1
    assert f.act_rel_error == pytest.approx(closed_form_error(W, M, 60), rel=1e-6)
    assert f.act_rel_error == pytest.approx(direct_activation_error(W, f.A, f.B, X), rel=1e-6)
    capped = solve_als(W, 12, M, tol=1e-12, max_iters=3)
    assert capped.info["iters"] == 3 and not capped.info["converged"]


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_small_errors_are_not_lost_to_cancellation(shape):
    """A tail of 1e-10: the expanded trace form cancels to ~1e-8 noise (or 0); reported errors stay exact."""
    g = torch.Generator().manual_seed(2)
    n, m = shape
    U, _ = torch.linalg.qr(torch.randn(n, min(shape), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, min(shape), generator=g, dtype=torch.float64))
    s = torch.tensor([1.0] * 8 + [1e-10] * (min(shape) - 8), dtype=torch.float64)
    W = (U * s) @ V.T * 1e6
    M, X = correlated_covariance(m, 200, seed=3, decay=0.02)
    opt = closed_form_error(W, M, 8)
    assert 1e-12 < opt < 1e-9
    for f in (solve_svd_llm(W, 8, M), solve_als(W, 8, M, iters=2), solve_als(W, 8, M)):
        assert f.act_rel_error == pytest.approx(direct_activation_error(W, f.A, f.B, X), rel=1e-3)
        assert opt * (1 - 1e-3) <= f.act_rel_error <= (opt if f.method == "svd_llm" else f.history[0]) * (1 + 1e-3)
        assert f.info["explicit_error"]
    f = solve_svd(W, 8, M)
    assert activation_relative_error(W, f.A, f.B, M) == pytest.approx(direct_activation_error(W, f.A, f.B, X), rel=1e-3)


def test_svd_llm_on_singular_covariance_is_the_exact_optimum():
    """No jitter: a covariance of rank 3 gives the closed-form optimum to 1e-6 (relative)."""
    g = torch.Generator().manual_seed(9)
    for shape in [(40, 16), (16, 40)]:
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        X = torch.randn(shape[1], 3, generator=g, dtype=torch.float64) * torch.tensor([1e3] + [1.0] * (shape[1] - 1), dtype=torch.float64)[:, None]
        M = X @ X.T
        for rank in (1, 2):
            f = solve_svd_llm(W, rank, M)
            opt = closed_form_error(W, M, rank)
            assert direct_activation_error(W, f.A, f.B, X) == pytest.approx(opt, rel=1e-6)
            assert f.act_rel_error == pytest.approx(opt, rel=1e-6)


def test_symmetric_eigh_cpu_route_matches_torch_and_solves_stay_optimal():
    """From d = 512 on CPU the eigensolver is SciPy's divide-and-conquer driver: same spectrum as
    torch's, orthonormal vectors that rebuild the matrix, and the closed form on such a size still
    reaches the optimum of the whitened truncation."""
    from vlmpress.core.solvers import _SCIPY_EIGH_MIN_DIM, symmetric_eigh

    d = _SCIPY_EIGH_MIN_DIM + 8
    g = torch.Generator().manual_seed(11)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    G = A @ A.T
    vals, vecs = symmetric_eigh(G)
    ref = torch.linalg.eigvalsh(G)
    assert bool((vals[1:] >= vals[:-1]).all())
    torch.testing.assert_close(vals, ref, rtol=1e-10, atol=1e-9 * float(ref[-1]))
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close((vecs * vals) @ vecs.T, G, rtol=1e-10, atol=1e-9 * float(ref[-1]))
    W = torch.randn(d, d + 40, generator=g, dtype=torch.float64)
    M, _ = correlated_covariance(d + 40, 3 * (d + 40), seed=12, decay=0.01)
    f = solve_svd_llm(W, d // 3, M)
    assert f.act_rel_error == pytest.approx(closed_form_error(W, M, d // 3), rel=1e-8)
