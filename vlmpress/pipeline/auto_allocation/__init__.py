"""``allocation: auto``: searches that split a target reduction between towers from calibration
data alone (:mod:`~.contrastive` for dual encoders, :mod:`~.generative` for generative VLMs); the
per-layer rank rules they call live in :mod:`vlmpress.pipeline.rank_plan`.

:func:`auto_compress` picks the search from the adapter's ``allocation_proxy``: adapters only
name their proxy, the pipeline owns the searches (so adapters never import the pipeline).
"""

from __future__ import annotations

from typing import Any, Callable

from vlmpress.errors import ConfigError
from vlmpress.pipeline.auto_allocation.contrastive import auto_compress_contrastive
from vlmpress.pipeline.auto_allocation.generative import auto_compress_generative

#: allocation_proxy -> search; a family with a new proxy adds its entry here
AUTO_ALLOCATION_PROXIES: dict[str, Callable[..., Any]] = {
    "zero_shot_kl": auto_compress_contrastive,
    "caption_kl": auto_compress_generative,
}


def auto_compress(adapter, config, calibration, **kwargs):
    """Search the tower split with the adapter's proxy, then compress ``adapter`` in place with the winner.

    An adapter may also bring its own search as an ``auto_compress(config, calibration)`` method.
    """
    own = getattr(adapter, "auto_compress", None)
    if callable(own):
        return own(config, calibration)
    proxy = getattr(adapter, "allocation_proxy", "zero_shot_kl")
    search = AUTO_ALLOCATION_PROXIES.get(proxy)
    if search is None:
        raise ConfigError(
            f"allocation: auto has no search for the proxy '{proxy}' of {type(adapter).__name__}; "
            f"known proxies: {', '.join(sorted(AUTO_ALLOCATION_PROXIES))}"
        )
    return search(adapter, config, calibration, **kwargs)


__all__ = ["AUTO_ALLOCATION_PROXIES", "auto_compress", "auto_compress_contrastive", "auto_compress_generative"]
