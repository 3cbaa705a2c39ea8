"""Batched factorisation (vlmpress.core.batched) == the per-layer solvers, member by member."""

from __future__ import annotations

import pytest
import torch

from vlmpress.core.batched import BatchItem, plan_batches, solve_batched, top_eigenvectors_batched
from vlmpress.core.solvers import full_svd, gram_eigen, solve_als, solve_svd_llm
from vlmpress.errors import ConfigError


def _covariance(m: int, n_samples: int, seed: int, dead: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n_samples, generator=g, dtype=torch.float64)
    X = X * torch.logspace(0, -2, m, dtype=torch.float64).unsqueeze(-1)
    X[torch.randperm(m, generator=g)[:5]] *= 30.0  # outlier channels
    if dead:
        X[:dead] = 0.0  # dead features: a singular covariance
    return X @ X.mT


def _batch(shape, b, seed=0, dead=0, n_samples=None):
    n, m = shape
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(b, n, m, generator=g, dtype=torch.float64) / m**0.5
    M = torch.stack([_covariance(m, n_samples or 3 * m, seed + 10 + i, dead) for i in range(b)])
    return W, M


def _assert_same(batched, single, rtol=1e-9):
    """Same factors, errors, rounds and history. An exact fit (error at float64 rounding, e.g. the
    rank exceeds the samples) has many optimal factorisations and may stop a round earlier or later
    on rounding noise: then only the (rounding-level) activation error is compared."""
    assert batched.rank == single.rank
    assert batched.A.shape == single.A.shape and batched.B.shape == single.B.shape
    assert batched.act_rel_error == pytest.approx(single.act_rel_error, rel=rtol, abs=1e-9)
    if single.act_rel_error < 1e-6:
        return
    assert batched.weight_rel_error == pytest.approx(single.weight_rel_error, rel=1e-7, abs=1e-10)
    assert torch.allclose(batched.A @ batched.B, single.A @ single.B, rtol=1e-7, atol=1e-9)
    if single.method == "als":
        assert batched.info["iters"] == single.info["iters"]
        assert batched.info["best_iter"] == single.info["best_iter"]
        assert batched.info.get("finish") == single.info.get("finish")
        assert len(batched.history) == len(single.history)
        assert batched.history == pytest.approx(single.history, rel=1e-8, abs=1e-12)
        assert batched.act_rel_error_init == pytest.approx(single.act_rel_error_init, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("shape", [(48, 48), (96, 40), (40, 96)])
@pytest.mark.parametrize("iters", [None, 3])
def test_batched_als_equals_per_layer(shape, iters):
    W, M = _batch(shape, 4, seed=sum(shape))
    d = min(shape)
    ranks = [d // 3, d // 3 - 2, d // 4, d // 3 - 1]  # heterogeneous: padded members
    results = solve_batched("als", W, M, ranks, iters=iters)
    for i, res in enumerate(results):
        single = solve_als(W[i], ranks[i], M[i], iters=iters)
        _assert_same(res, single)
        assert res.info["batch"] == 4


@pytest.mark.parametrize("shape", [(48, 48), (96, 40), (40, 96)])
@pytest.mark.parametrize("with_spectra", [False, True])
def test_batched_closed_form_equals_per_layer(shape, with_spectra):
    """Tall weights: the SVD basis when rank planning gave the spectra, else a batched Cholesky-QR."""
    W, M = _batch(shape, 3, seed=7 + sum(shape))
    d = min(shape)
    ranks = [d // 2, d // 3, d // 2]
    spectra = gram_eigen(W) if with_spectra else None
    results = solve_batched("svd_llm", W, M, ranks, spectra=spectra)
    for i, res in enumerate(results):
        svd = full_svd(W[i], *[t[i] for t in spectra]) if spectra else None
        single = solve_svd_llm(W[i], ranks[i], M[i], svd=svd)
        _assert_same(res, single)
        assert res.info["basis"] == single.info["basis"] and res.info["batch"] == 3


def test_batched_singular_and_zero_covariances():
    """Dead features (singular M), too few samples (rank-deficient M) and an all-zero M in one batch."""
    W, M = _batch((40, 64), 4, seed=3, dead=10)
    M[1] = _covariance(64, 8, 99)  # 8 samples for 64 features
    M[2] = 0.0  # the layer never saw a non-zero input
    ranks = [12, 10, 12, 11]
    for method, solver in (("als", solve_als), ("svd_llm", solve_svd_llm)):
        results = solve_batched(method, W, M, ranks)
        for i, res in enumerate(results):
            assert torch.isfinite(res.A).all() and torch.isfinite(res.B).all()
            _assert_same(res, solver(W[i], ranks[i], M[i]), rtol=1e-7)
        assert results[2].act_rel_error == 0.0 and results[2].info["batch"] == 1  # per-layer path


def test_ill_conditioned_tall_member_takes_the_per_layer_basis():
    W, M = _batch((80, 32), 3, seed=5)
    U, S, Vh = torch.linalg.svd(W[1], full_matrices=False)
    W[1] = (U * torch.logspace(0, -9, 32, dtype=torch.float64)) @ Vh  # cond 1e9: no SVD basis
    results = solve_batched("als", W, M, [8, 8, 8])
    assert results[1].info["batch"] == 1 and results[1].info["basis"] != "svd"
    assert results[0].info["basis"] == "svd" and results[0].info["batch"] == 3
    for i, res in enumerate(results):
        _assert_same(res, solve_als(W[i], 8, M[i]), rtol=1e-7)


def test_padding_columns_stay_zero_and_factors_have_their_own_rank():
    W, M = _batch((32, 32), 3, seed=11)
    results = solve_batched("als", W, M, [16, 5, 9], iters=4)
    assert [r.A.shape[1] for r in results] == [16, 5, 9]
    assert [r.B.shape[0] for r in results] == [16, 5, 9]
    for i, r in enumerate(results):
        assert torch.linalg.matrix_rank(r.A @ r.B) == [16, 5, 9][i]


def test_plan_batches_groups_shapes_and_bounds_rank_spread_and_size():
    items = [BatchItem(f"a{i}", (8, 8), r) for i, r in enumerate([8, 7, 2, 8, 3])] + [BatchItem("b", (8, 16), 4)]
    batches = plan_batches(items, max_layers=2, rank_spread=1.5)
    assert sorted(it.key for batch in batches for it in batch) == sorted(it.key for it in items)
    for batch in batches:
        assert len(batch) <= 2
        assert len({it.shape for it in batch}) == 1
        assert max(it.rank for it in batch) <= 1.5 * min(it.rank for it in batch)
    tiny = plan_batches(items[:4], max_layers=10, max_bytes=1)  # memory bound: one layer per batch
    assert all(len(b) == 1 for b in tiny)
    with pytest.raises(ConfigError):
        plan_batches(items, max_layers=0)


def test_bad_batches_are_refused():
    W, M = _batch((8, 8), 2)
    with pytest.raises(ConfigError):
        solve_batched("svd", W, M, [2, 2])
    with pytest.raises(ConfigError):
        solve_batched("als", W, M, [2])
    with pytest.raises(ConfigError):
        solve_batched("als", W, M[:, :4, :4], [2, 2])
    M[0, 0, 0] = float("nan")
    with pytest.raises(ConfigError):
        solve_batched("als", W, M, [2, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_batched_on_cuda_matches_cpu():
    W, M = _batch((64, 48), 4, seed=2)
    ranks = [16, 14, 12, 16]
    cpu = solve_batched("als", W, M, ranks)
    gpu = solve_batched("als", W.cuda(), M.cuda(), ranks)
    for a, b in zip(cpu, gpu):
        assert a.act_rel_error == pytest.approx(b.act_rel_error, rel=1e-7)
        assert a.info["iters"] == b.info["iters"]


@pytest.mark.parametrize("method, extra", [("pgsvd", dict(eps_v=0.5, eps_t=0.6)), ("svd_als", dict(ratio=0.4, als_iters=3)), ("svd_llm", dict(ratio=0.4))])
def test_pipeline_batched_equals_per_layer(method, extra):
    """compress() with --solve-batch-size > 1 gives the per-layer run's ranks, errors, iterations and outputs."""
    import copy

    from toy_adapter import ToyAdapter, toy_calibration
    from vlmpress.pipeline.compress import calibrate, compress, select_layers
    from vlmpress.pipeline.config import CompressionConfig

    calib = toy_calibration()
    base = ToyAdapter.load("toy:3")
    runs = {}
    for size in (1, 8):
        adapter = copy.deepcopy(base)
        cfg = CompressionConfig(method=method, device="cpu", solve_batch_size=size, **extra)
        collectors = calibrate(adapter, select_layers(adapter, cfg), calib, cfg)
        runs[size] = (adapter, compress(adapter, cfg, calib, collectors=collectors))
    (a1, r1), (a8, r8) = runs[1], runs[8]
    assert r1.rank_map == r8.rank_map and any(r1.rank_map.values())
    for l1, l8 in zip(r1.layers, r8.layers):
        assert l1.name == l8.name and l1.als_iters == l8.als_iters
        if l1.act_error is not None:
            assert l8.act_error == pytest.approx(l1.act_error, rel=1e-7, abs=1e-10)
    images = torch.stack(list(calib.images[:4]))
    with torch.no_grad():
        torch.testing.assert_close(a8.encode_image(images), a1.encode_image(images), rtol=1e-5, atol=1e-5)
        tokens = a1.tokenize(calib.captions[:4])
        torch.testing.assert_close(a8.encode_text(tokens), a1.encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_batched_eigh_route_equals_per_matrix_route():
    """The route taken on GPUs (one batched eigh) gives the per-matrix route's eigenpairs (CPU check)."""
    W, M = _batch((40, 40), 3, seed=4)
    K = W @ M @ W.mT
    K = 0.5 * (K + K.mT)
    ranks = [10, 7, 12]
    for (v1, Q1), (v2, Q2), r in zip(top_eigenvectors_batched(K, ranks, batched=True), top_eigenvectors_batched(K, ranks, batched=False), ranks):
        assert Q1.shape == Q2.shape == (40, r)
        torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(Q1 @ Q1.mT, Q2 @ Q2.mT, rtol=1e-8, atol=1e-8)  # same subspace


def test_batched_spectra_equal_per_layer_spectra():
    """The batched spectra route (taken off the CPU) gives every layer the values and singular
    subspaces of the per-layer route (checked on CPU)."""
    from toy_adapter import ToyAdapter
    from vlmpress.pipeline.compress import _spectra

    layers = ToyAdapter.load("toy:5").target_layers()
    cpu = torch.device("cpu")
    v1, c1, _ = _spectra(layers, cpu, "vectors", 1)
    v8, c8, _ = _spectra(layers, cpu, "vectors", 8, batched=True)
    assert v1.keys() == v8.keys() == c1.keys() == c8.keys()
    for name in v1:
        torch.testing.assert_close(v8[name], v1[name], rtol=1e-10, atol=1e-12)
        (S1, U1), (S8, U8) = c1[name], c8[name]
        k = int((S1 > 1e-8 * S1[0]).sum())  # subspaces of distinct, non-zero singular values
        torch.testing.assert_close(U8[:, :k].abs(), U1[:, :k].abs(), rtol=1e-6, atol=1e-8)


def test_block_triangular_gram_on_batches_and_wide_weights():
    """The block-triangular Gram (used from 1024 wide) keeps batch dims and equals the plain product;
    a 16 x 1100 weight (its Gram takes the block path) solves alike batched and per layer."""
    from vlmpress.core.covariance import gram

    X = torch.randn(2, 30, 1100, dtype=torch.float64)
    torch.testing.assert_close(gram(X), X.mT @ X, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(gram(X, min_width=8), X.mT @ X, rtol=1e-12, atol=1e-10)
    W, M = _batch((16, 1100), 2, seed=9, n_samples=200)
    for i, res in enumerate(solve_batched("als", W, M, [5, 4])):
        _assert_same(res, solve_als(W[i], [5, 4][i], M[i]))


@pytest.mark.parametrize("shape", [(48, 48), (96, 40), (40, 96)])
def test_als_limit_path_is_the_converged_rounds_result(shape):
    """path='limit' returns the rounds' limit straight away: the closed-form optimum, labelled ALS,
    no rounds; the rounds path to a tight tolerance reaches the same error; fixed tau ignores it."""
    W, M = _batch(shape, 3, seed=3 + sum(shape))
    d = min(shape)
    ranks = [d // 3, d // 4, d // 3]
    batched = solve_batched("als", W, M, ranks, path="limit")
    for i, res in enumerate(batched):
        single = solve_als(W[i], ranks[i], M[i], path="limit")
        closed = solve_svd_llm(W[i], ranks[i], M[i])
        for got in (res, single):
            assert got.method == "als" and got.info["iters"] == 0 and got.info["finish"] == "limit"
            assert got.history == [] and got.act_rel_error_init is None
            assert got.act_rel_error == pytest.approx(closed.act_rel_error, rel=1e-12)
            assert torch.allclose(got.A @ got.B, closed.A @ closed.B, rtol=1e-9, atol=1e-12)
        rounds = solve_als(W[i], ranks[i], M[i], tol=1e-12, max_iters=2000, exact_finish=False)
        assert single.act_rel_error <= rounds.act_rel_error * (1 + 1e-9)
        assert rounds.act_rel_error == pytest.approx(single.act_rel_error, rel=1e-6)
        fixed = solve_als(W[i], ranks[i], M[i], iters=2, path="limit")
        assert fixed.info["iters"] == 2 and fixed.info.get("finish") is None and len(fixed.history) == 3
    with pytest.raises(ConfigError, match="als path"):
        solve_als(W[0], ranks[0], M[0], path="fast")
    with pytest.raises(ConfigError, match="als path"):
        solve_batched("als", W, M, ranks, path="fast")


def test_gram_singular_values_match_svdvals():
    from vlmpress.core.solvers import gram_singular_values

    g = torch.Generator().manual_seed(5)
    for shape in [(30, 70), (70, 30), (64, 64)]:
        W = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(0, -3, shape[1], dtype=torch.float64)
        S = gram_singular_values(W)
        ref = torch.linalg.svdvals(W)
        assert S.shape == ref.shape and bool((S[:-1] >= S[1:]).all())
        # the Gram squares the condition number: values keep ~1e-8 accuracy relative to the largest
        assert torch.allclose(S, ref, rtol=0, atol=1e-7 * float(ref[0]))
        assert torch.allclose(S, gram_eigen(W)[0], rtol=0, atol=1e-9 * float(ref[0]))


@pytest.mark.parametrize("path", ["limit", "rounds"])
def test_pipeline_als_path(path):
    """The CPU default takes the limit with values-only spectra; 'rounds' iterates from the SVD
    start. Both land within the tolerance of each other at the same ranks."""
    import copy

    from toy_adapter import ToyAdapter, toy_calibration
    from vlmpress.pipeline.compress import calibrate, compress, needs_singular_vectors, select_layers
    from vlmpress.pipeline.config import CompressionConfig

    calib = toy_calibration()
    base = ToyAdapter.load("toy:3")
    reports = {}
    for choice in ("auto", path):
        adapter = copy.deepcopy(base)
        cfg = CompressionConfig(method="pgsvd", device="cpu", eps_v=0.5, eps_t=0.6, als_path=choice)
        collectors = calibrate(adapter, select_layers(adapter, cfg), calib, cfg)
        reports[choice] = compress(adapter, cfg, calib, collectors=collectors)
    auto, other = reports["auto"], reports[path]
    assert not needs_singular_vectors(CompressionConfig(method="pgsvd"), torch.device("cpu"))
    assert needs_singular_vectors(CompressionConfig(method="pgsvd", als_iters=3), torch.device("cpu"))
    assert needs_singular_vectors(CompressionConfig(method="pgsvd"), torch.device("cuda"))
    assert auto.rank_map == other.rank_map and any(auto.rank_map.values())
    factored = [(a, b) for a, b in zip(auto.layers, other.layers) if a.act_error is not None]
    assert factored
    for a, b in factored:
        assert a.als_iters == 0 and a.act_error_init is None  # CPU default: straight to the limit
        if path == "rounds":
            assert b.act_error_init is not None and b.als_iters >= 1
            assert a.act_error <= b.act_error * (1 + 1e-9) and b.act_error <= a.act_error * (1 + 1e-3)
        else:
            assert b.act_error == pytest.approx(a.act_error, rel=1e-12)
    with pytest.raises(ConfigError, match="als_path"):
        CompressionConfig(method="pgsvd", als_path="fast").validate()


def test_tall_weight_grams_from_rank_planning_are_reused_by_the_closed_form():
    """keep='gram': values bit-identical to the values-only route, tall weights keep W^T W, and the
    closed form (per layer and batched) built on it equals the one that forms it itself."""
    from toy_adapter import ToyAdapter
    from vlmpress.pipeline.compress import WeightGram, _spectra

    layers = ToyAdapter.load("toy:5").target_layers()
    cpu = torch.device("cpu")
    values, cache, _ = _spectra(layers, cpu, "gram")
    plain, nothing, _ = _spectra(layers, cpu, None)
    assert not nothing
    tall = [layer for layer in layers if layer.weight_matrix.shape[0] > layer.weight_matrix.shape[1]]
    assert tall and set(cache) == {layer.name for layer in tall}
    for layer in layers:
        assert torch.equal(values[layer.name], plain[layer.name])
    for layer in tall:
        W = layer.weight_matrix.detach().double()
        entry = cache[layer.name]
        assert isinstance(entry, WeightGram)
        torch.testing.assert_close(entry.matrix, W.mT @ W, rtol=1e-12, atol=1e-12)
        M = _covariance(W.shape[1], 4 * W.shape[1], seed=1)
        r = W.shape[1] // 3
        mine, own = solve_svd_llm(W, r, M, gram=entry.matrix), solve_svd_llm(W, r, M)
        assert mine.info["basis"] == own.info["basis"] == "cholesky-qr"
        assert mine.act_rel_error == pytest.approx(own.act_rel_error, rel=1e-10)
        batched = solve_batched("als", W[None], M[None], [r], grams=entry.matrix[None], path="limit")[0]
        assert batched.act_rel_error == pytest.approx(own.act_rel_error, rel=1e-10)
        torch.testing.assert_close(batched.A @ batched.B, own.A @ own.B, rtol=1e-9, atol=1e-12)
