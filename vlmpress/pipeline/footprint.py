"""The ``footprint`` block of a compression report: tensor bytes by dtype before/after, peak
forward memory at the calibration batch size (one batch per group), bytes on disk (at save)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable


from vlmpress.deploy.footprint import peak_forward_bytes, tensor_bytes_by_dtype
from vlmpress.errors import VlmpressError

logger = logging.getLogger(__name__)


class _NoCollector:
    """Stands in for a covariance collector when a calibration batch is run only to measure memory."""

    modules: dict = {}

    def mask(self, valid, *, unmasked=()):  # same signature as CovarianceCollector.mask
        return contextlib.nullcontext()


def model_footprint(
    adapter, bytes_before: dict[str, int], first_batch: Callable[[str], Any] | None, batch_size: int
) -> dict[str, Any]:
    """Bytes before/after by dtype, and the peak bytes one forward allocates per group.

    ``first_batch(group)`` returns a calibration batch of that group (None: no data for it).
    """
    after = tensor_bytes_by_dtype(adapter.model)
    out: dict[str, Any] = {
        "tensor_bytes_before": sum(bytes_before.values()),
        "tensor_bytes_after": sum(after.values()),
        "tensor_bytes_by_dtype_before": bytes_before,
        "tensor_bytes_by_dtype_after": after,
    }
    if first_batch is None:
        return out
    device = next(adapter.model.parameters()).device
    peaks = {}
    for group in adapter.groups:
        try:
            batch = first_batch(group)
        except (VlmpressError, StopIteration) as err:
            logger.debug("no peak memory for group %s: %s", group, err)
            continue
        if batch is None:
            continue
        was_training = adapter.model.training
        adapter.model.eval()
        try:
            peaks[group] = peak_forward_bytes(lambda: adapter.calibration_forward(group, batch, _NoCollector()), device)
        finally:
            adapter.model.train(was_training)
    if peaks:
        out["peak_forward_bytes"] = peaks
        out["peak_forward_batch"] = batch_size
        out["peak_forward_device"] = str(device)
    return out
