"""The compression pipeline: from a loaded adapter and calibration data to a compressed, saved model.

* :mod:`~.config` -- :class:`CompressionConfig`, 1:1 with the YAML recipes in ``configs/recipes/``;
* :mod:`~.rank_plan` -- per-layer ranks from tolerances, ratios or a target reduction;
* :mod:`~.auto_allocation` -- the ``allocation: auto`` searches for the tower split;
* :mod:`~.compress` -- whole-model compression: select, plan, calibrate, factorise, install;
* :mod:`~.sequential` / :mod:`~.sequential_state` -- block-by-block compression of large decoders,
  with crash-consistent resume state;
* :mod:`~.report` -- the per-layer report (JSON / CSV);
* :mod:`~.checkpoint` / :mod:`~.loading` -- save / load / dense export, and the one loader for specs
  and compressed directories.

May import :mod:`vlmpress.adapters`, :mod:`vlmpress.data`, :mod:`vlmpress.core`, :mod:`vlmpress.io`
and :mod:`vlmpress.errors`; never evaluation, reference, testing or commands.
"""

from vlmpress.pipeline.checkpoint import export_dense, load_compressed, save_compressed
from vlmpress.pipeline.compress import calibrate, compress, select_layers
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.pipeline.loading import is_compressed_dir, load_model
from vlmpress.pipeline.report import CompressionReport, LayerReport

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "LayerReport",
    "calibrate",
    "compress",
    "export_dense",
    "is_compressed_dir",
    "load_compressed",
    "load_model",
    "save_compressed",
    "select_layers",
]
