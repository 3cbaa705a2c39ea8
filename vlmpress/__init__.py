"""vlmpress: activation-aware low-rank compression (PGSVD) for CLIP-style models and LLMs.

Entry points::

    vlmpress.compress_model(spec_or_adapter, config=None, calibration=None, **overrides)
    vlmpress.load_model(spec_or_compressed_dir)
    vlmpress.save_compressed(adapter, out_dir) / vlmpress.load_compressed(dir) / vlmpress.export_dense(adapter, dir)
"""

import logging

from vlmpress.pipeline.loading import load_model
from vlmpress.api import compress_model
from vlmpress.pipeline.checkpoint import export_dense, load_compressed, save_compressed
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.core import CovarianceCollector, LowRankLinear, factorize

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "CompressionConfig",
    "CovarianceCollector",
    "LowRankLinear",
    "compress_model",
    "export_dense",
    "factorize",
    "load_compressed",
    "load_model",
    "save_compressed",
    "__version__",
]
