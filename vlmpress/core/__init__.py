"""Model-agnostic core: rank rules, factorisation solvers, LowRankLinear, covariance collection."""

from vlmpress.core.covariance import CovarianceCollector, collect_covariances
from vlmpress.core.lowrank import FactoredWeight, LowRankLinear
from vlmpress.core.rank import (
    break_even_rank,
    ratio_rank,
    relative_truncation_errors,
    saves_parameters,
    tolerance_rank,
)
from vlmpress.core.solvers import (
    SOLVERS,
    Factorization,
    activation_optimal_factors,
    activation_relative_error,
    factorize,
    solve_als,
    solve_svd,
    solve_svd_llm,
    svd_of,
    weight_relative_error,
)

__all__ = [
    "CovarianceCollector",
    "collect_covariances",
    "FactoredWeight",
    "LowRankLinear",
    "break_even_rank",
    "ratio_rank",
    "relative_truncation_errors",
    "saves_parameters",
    "tolerance_rank",
    "SOLVERS",
    "Factorization",
    "activation_optimal_factors",
    "activation_relative_error",
    "factorize",
    "solve_als",
    "solve_svd",
    "solve_svd_llm",
    "svd_of",
    "weight_relative_error",
]
