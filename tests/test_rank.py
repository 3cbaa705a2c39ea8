import math

import pytest
import torch

from vlmpress.core.rank import (
    break_even_rank,
    ratio_rank,
    relative_truncation_errors,
    saves_parameters,
    tolerance_rank,
    tolerance_ranks,
)
from vlmpress.errors import ConfigError


def brute_force_tolerance_rank(W: torch.Tensor, eps: float) -> int:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    norm = torch.linalg.matrix_norm(W.double())
    for r in range(1, S.numel() + 1):
        Wr = (U[:, :r] * S[:r]) @ Vh[:r]
        if torch.linalg.matrix_norm(W.double() - Wr) / norm <= eps + 1e-12:
            return r
    return S.numel()


@pytest.mark.parametrize("seed", range(6))
def test_tolerance_rank_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, m = 24 + seed, 17 + 2 * seed
    # random spectrum: decaying singular values with random rate
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    k = min(n, m)
    s = torch.exp(-torch.rand(1, generator=g).item() * 0.5 * torch.arange(k, dtype=torch.float64))
    s = s * (1 + 0.1 * torch.rand(k, generator=g, dtype=torch.float64)).sort(descending=True).values
    W = (U[:, :k] * s) @ V[:, :k].T
    S = torch.linalg.svdvals(W)
    for eps in [0.01, 0.05, 0.1, 0.2, 0.37, 0.5, 0.8, 0.99]:
        assert tolerance_rank(S, eps) == brute_force_tolerance_rank(W, eps), eps


def test_tolerance_rank_edge_cases():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert tolerance_rank(S, 0.0) == 4  # eps = 0 -> full rank even with a zero singular value
    assert tolerance_rank(S, 1.0) == 1  # eps = 1 -> 0, clamped to 1
    # error of rank r: sqrt(sum_{i>r} s_i^2 / sum s_i^2); sum = 14
    assert tolerance_rank(S, math.sqrt(1 / 14)) == 2  # exactly on the boundary counts as meeting it
    assert tolerance_rank(S, math.sqrt(1 / 14) - 1e-9) == 3
    assert tolerance_rank(torch.zeros(5), 0.3) == 1  # zero matrix: rank 1
    assert tolerance_ranks(S, [0.0, 0.3, 1.0]) == [4, tolerance_rank(S, 0.3), 1]
    for bad in [-0.1, 1.5, float("nan")]:
        with pytest.raises(ConfigError):
            tolerance_rank(S, bad)


def test_relative_truncation_errors_shape_and_monotone():
    e = relative_truncation_errors(torch.tensor([4.0, 2.0, 1.0]))
    assert e.shape == (4,)
    assert e[0] == pytest.approx(1.0)
    assert e[-1] == 0.0
    assert torch.all(e[1:] <= e[:-1])
    assert e[1].item() == pytest.approx(math.sqrt(5 / 21))


@pytest.mark.parametrize("m,n,ratio", [(768, 768, 0.2), (3072, 768, 0.4), (768, 3072, 0.6), (11008, 4096, 0.8), (5, 7, 0.5)])
def test_ratio_rank_formula(m, n, ratio):
    r = ratio_rank(m, n, ratio)
    assert r == max(1, math.floor((1 - ratio) * m * n / (m + n)))
    # the kept parameters never exceed the budget
    assert r * (m + n) <= (1 - ratio) * m * n or r == 1


def test_ratio_rank_rejects_bad_ratio():
    for bad in [0.0, 1.0, -0.2, 1.2]:
        with pytest.raises(ConfigError):
            ratio_rank(10, 10, bad)


def test_break_even():
    assert break_even_rank(768, 768) == 384
    assert not saves_parameters(768, 768, 384)
    assert saves_parameters(768, 768, 383)
    assert break_even_rank(3072, 768) == pytest.approx(614.4)
    assert saves_parameters(3072, 768, 614) and not saves_parameters(3072, 768, 615)
