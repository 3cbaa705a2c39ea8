"""vlmpress: activation-aware low-rank compression (PGSVD) for CLIP-style models and LLMs."""

import logging

from vlmpress.core import CovarianceCollector, LowRankLinear, factorize

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["CovarianceCollector", "LowRankLinear", "factorize", "__version__"]
