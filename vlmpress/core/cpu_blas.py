"""SciPy's LAPACK on CPU tensors, where its drivers measured faster than torch's (see
:func:`vlmpress.core.solvers.symmetric_eigh` and ``symmetric_eigenvalues``). Calls run with
torch's thread count, so ``torch.set_num_threads`` governs them too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch


_CONTROLLER = None  # threadpoolctl's library scan costs milliseconds: done once


@contextlib.contextmanager
def scipy_linalg() -> Iterator[ModuleType | None]:
    """``scipy.linalg`` with its BLAS threads set to torch's count, or None when SciPy is missing."""
    global _CONTROLLER
    try:
        import scipy.linalg
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - scipy and threadpoolctl are dependencies
        yield None
        return
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    with _CONTROLLER.limit(limits=torch.get_num_threads(), user_api="blas"):
        yield scipy.linalg
