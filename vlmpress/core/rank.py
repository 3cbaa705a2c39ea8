"""Rank selection rules (pure functions on shapes and singular values).

* :func:`tolerance_rank` -- PGSVD (paper Sec. 3): the smallest r whose truncated SVD has relative
  Frobenius error ``||W - W_r||_F / ||W||_F <= eps``. One eps for a whole tower gives
  heterogeneous, surrogate Pareto-optimal ranks.
* :func:`ratio_rank` -- SVD-LLM / SVD-ALS convention: keep a fraction ``1 - ratio`` of a layer's
  parameters, ``r = floor((1 - ratio) * m * n / (m + n))``.
* :func:`break_even_rank` -- above ``m*n/(m+n)`` a factorised layer is no smaller than the dense one.
"""

from __future__ import annotations

import math

import torch

from vlmpress.errors import ConfigError


def check_tolerance(eps: float, name: str = "eps") -> float:
    eps = float(eps)
    if not math.isfinite(eps) or not 0.0 <= eps <= 1.0:
        raise ConfigError(f"{name} must be a relative error in [0, 1], got {eps}")
    return eps


def check_ratio(ratio: float, name: str = "ratio") -> float:
    ratio = float(ratio)
    if not math.isfinite(ratio) or not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"{name} must be the fraction of a layer's parameters to remove, strictly between 0 and 1, got {ratio}"
        )
    return ratio


def relative_truncation_errors(singular_values: torch.Tensor) -> torch.Tensor:
    """``e[r] = ||W - W_r||_F / ||W||_F`` for r = 0..k (length k+1, non-increasing, e[k] = 0).

    Computed from the singular values in float64 with a reversed cumulative sum, so the tail sums
    are accurate even when the leading singular values dominate.
    """
    s2 = singular_values.detach().to(torch.float64).flatten().square()
    k = s2.numel()
    tail = torch.zeros(k + 1, dtype=torch.float64, device=s2.device)
    if k:
        tail[:k] = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])
    total = tail[0]
    if total <= 0:
        return torch.zeros(k + 1, dtype=torch.float64, device=s2.device)
    return torch.sqrt(tail / total)


def tolerance_rank(singular_values: torch.Tensor, eps: float) -> int:
    """Smallest rank r >= 1 with relative truncation error <= eps.

    ``eps = 0`` returns the full rank ``k = len(singular_values)`` (exact reconstruction even for
    rank-deficient W); ``eps = 1`` would give r = 0 and is clamped to 1.
    """
    eps = check_tolerance(eps)
    k = singular_values.numel()
    if k == 0:
        raise ConfigError("cannot select a rank for an empty weight matrix")
    if eps == 0.0:
        return k
    errors = relative_truncation_errors(singular_values)
    # errors is non-increasing: the number of ranks whose error still exceeds eps is the answer.
    r = int((errors > eps).sum().item())
    return max(1, min(r, k))


def tolerance_ranks(singular_values: torch.Tensor, eps_values) -> list[int]:
    """Vectorised :func:`tolerance_rank` for many tolerances on one spectrum."""
    errors = relative_truncation_errors(singular_values)
    k = singular_values.numel()
    out = []
    for eps in eps_values:
        eps = check_tolerance(eps)
        out.append(k if eps == 0.0 else max(1, min(int((errors > eps).sum().item()), k)))
    return out


def align_rank(rank: int, multiple: int, max_rank: int, *, up: bool = True) -> int:
    """``rank`` moved to a multiple of ``multiple`` (tensor-core friendly GEMM shapes), within [1, max_rank].

    ``up=True`` rounds up (a tolerance rank stays within its tolerance); ``up=False`` rounds down
    (a ratio rank keeps at least its parameter saving). ``max_rank`` itself is always allowed.
    """
    if multiple <= 1:
        return max(1, min(rank, max_rank))
    aligned = -(-rank // multiple) * multiple if up else (rank // multiple) * multiple
    if aligned < multiple:
        aligned = multiple
    return max(1, min(aligned, max_rank))


def ratio_rank(out_features: int, in_features: int, ratio: float) -> int:
    """Rank that removes a fraction ``ratio`` of an ``out x in`` layer's weight parameters."""
    ratio = check_ratio(ratio)
    m, n = int(out_features), int(in_features)
    r = math.floor((1.0 - ratio) * m * n / (m + n))
    return max(1, min(r, min(m, n)))


def break_even_rank(out_features: int, in_features: int) -> float:
    """``m*n/(m+n)``: a rank at or above this stores at least as many parameters as the dense weight."""
    m, n = int(out_features), int(in_features)
    return m * n / (m + n)


def dense_params(out_features: int, in_features: int, bias: bool = False) -> int:
    return out_features * in_features + (out_features if bias else 0)


def lowrank_params(out_features: int, in_features: int, rank: int, bias: bool = False) -> int:
    return rank * (out_features + in_features) + (out_features if bias else 0)


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """True when a rank-``rank`` factorisation stores strictly fewer weights than the dense layer."""
    return rank * (out_features + in_features) < out_features * in_features
