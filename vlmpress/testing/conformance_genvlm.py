"""Conformance checks for generative VLM adapters (``vision tower -> connector -> decoder LM``).

:func:`check_generative_adapter` is what :func:`vlmpress.testing.check_adapter` runs for a
:class:`~vlmpress.adapters.hf_generative.HFGenerativeVLMAdapter`; every check compares next-token
logits of the same image + caption batch, built with the adapter's own ``pixel_values`` /
``pair_batch`` (the inputs calibration and the likelihood harness use).
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from vlmpress.testing.process import fresh_process_env

logger = logging.getLogger(__name__)

#: captions of clearly different token lengths, so the paired batch is right padded
CAPTIONS = ("a cat", "a close-up photo of a dog sitting on the grass next to a small bird")

# Runs in a fresh interpreter: the checkpoint must rebuild the model and its processor by itself.
_RELOAD_SCRIPT = """\
import json, sys, torch
from vlmpress.pipeline.checkpoint import load_compressed
adapter = load_compressed(sys.argv[1])
pixels = torch.load(sys.argv[2])
batch = adapter.pair_batch(pixels, json.loads(sys.argv[3]))
with torch.no_grad():
    logits = adapter.forward_tokens(batch).logits.float()
torch.save((batch["input_ids"], logits), sys.argv[4])
"""


def _logits(adapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits at the real (unpadded) positions, float32 on the CPU."""
    with torch.no_grad():
        logits = adapter.forward_tokens(batch).logits
    return logits[batch["attention_mask"].to(torch.bool).to(logits.device)].float().cpu()


def _assert_close(expected: torch.Tensor, got: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    if expected.shape != got.shape:
        raise AssertionError(f"{what}: logits of shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if not torch.allclose(expected, got, rtol=tol, atol=tol):
        raise AssertionError(f"{what}: next-token logits differ (max abs diff {(expected - got).abs().max().item():.3g})")


def _assert_same_ids(expected: torch.Tensor, got: torch.Tensor, what: str) -> None:
    if not torch.equal(expected.cpu(), got.cpu()):
        raise AssertionError(f"{what}: the processor builds different input ids (it did not travel with the model)")


def _collect(adapter, group: str, layers: list, batch: Any):
    from vlmpress.core.covariance import CovarianceCollector

    collector = CovarianceCollector({layer.name: layer.module for layer in layers})
    with collector, torch.no_grad():
        adapter.calibration_forward(group, batch, collector)
    return collector


def _check_groups(adapter, pixels: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Check 2 (targets are the model's modules, called by their group's forward) and 3 (padding)."""
    from vlmpress.errors import CalibrationError

    layers = adapter.target_layers()
    counts: dict[str, int] = {}
    for group in adapter.groups:
        mine = [layer for layer in layers if layer.group == group]
        assert mine, f"{adapter.family}: group '{group}' has no target layers"
        counts[group] = len(mine)
        for layer in mine:
            assert adapter.model.get_submodule(layer.name) is layer.module, f"{layer.name} is not the model's module"
        modality = adapter.group_modality[group]
        if modality == "images":
            collector = _collect(adapter, group, mine, pixels)
        elif modality == "tokens":
            collector = _collect(adapter, group, mine, batch)
        else:
            raise AssertionError(f"{adapter.family}: group '{group}' has modality '{modality}', expected images or tokens")
        try:
            collector.check_complete()
        except CalibrationError as err:
            raise AssertionError(f"{adapter.family}: group '{group}': {err}") from None
        if modality != "tokens":
            continue
        # the mixed-length batch must count exactly what its pairs count one by one
        n = batch["input_ids"].shape[0]
        singles = [
            _collect(adapter, group, mine, adapter.pair_batch(pixels[i : i + 1], [CAPTIONS[i]])) for i in range(n)
        ]
        for layer in mine:
            joint_tokens = collector.token_count(layer.name)
            alone_tokens = sum(c.token_count(layer.name) for c in singles)
            assert joint_tokens == alone_tokens, (
                f"{layer.name}: padding positions counted in the '{group}' covariance "
                f"({joint_tokens} tokens in the padded batch, {alone_tokens} in its pairs one by one)"
            )
            joint = collector.covariance(layer.name)
            alone = sum(c.covariance(layer.name) for c in singles)
            scale = alone.abs().max().clamp_min(1.0)
            assert torch.allclose(joint / scale, alone / scale, rtol=1e-4, atol=1e-4), (
                f"{layer.name}: padding changes the '{group}' covariance "
                f"(max abs diff {(joint - alone).abs().max().item():.3g})"
            )
    return counts


def check_generative_adapter(
    adapter, tmp_dir: str | Path, *, fresh_process: bool = False, rank_fraction: float = 0.5
) -> dict:
    """Conformance checks for a generative VLM adapter; raises AssertionError on the first failure.

    ``adapter`` is a freshly loaded (uncompressed, eval-mode)
    :class:`~vlmpress.adapters.hf_generative.HFGenerativeVLMAdapter` with its processor. On a batch of
    two random images answered by captions of different lengths (:meth:`pair_batch`):

    1. :meth:`prepare_for_compression` leaves the next-token logits unchanged (1e-5);
    2. every group (``vision``, ``projector``, ``text``) has targets, each a module of the model
       that is called during its group's calibration forward; ``vision`` and ``text`` are compressed
       by default and groups the adapter's ``default_exclude`` covers (the projector) stay dense;
    3. padding is excluded from the LM covariances: the padded batch gives the same token counts
       and covariances as its image/caption pairs one by one;
    4. after compression (truncated SVD keeping ``rank_fraction`` of each rank) the logits equal
       those of the dense ``A @ B`` reconstruction;
    5. ``save_compressed`` -> ``load_compressed`` (in a fresh Python process with ``fresh_process``)
       rebuilds the processor (same input ids) and gives identical logits;
    6. ``export_dense`` -> the stock ``from_pretrained`` loader (:meth:`exported_spec`) gives the
       same logits, with the exported processor building the same input ids.

    Returns what was checked: target counts per group, low-rank layers per group, the groups kept
    dense by default and the exported spec.
    """
    from vlmpress.adapters.merge import merge_lowrank_layers
    from vlmpress.pipeline.checkpoint import export_dense, load_compressed, save_compressed
    from vlmpress.pipeline.compress import compress, select_layers
    from vlmpress.pipeline.config import CompressionConfig
    from vlmpress.core.lowrank import LowRankLinear
    from vlmpress.testing.factories import random_images

    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    adapter.eval()
    pixels = adapter.pixel_values(random_images(len(CAPTIONS)))
    batch = adapter.pair_batch(pixels, list(CAPTIONS))
    assert not batch["attention_mask"].bool().all(), (
        f"{adapter.family}: the conformance captions tokenise to equal lengths; the padding check needs a padded batch"
    )

    before = _logits(adapter, batch)
    adapter.prepare_for_compression()
    _assert_close(before, _logits(adapter, batch), "prepare_for_compression changed the outputs", 1e-5)

    info: dict[str, Any] = {"family": adapter.family, "targets": _check_groups(adapter, pixels, batch)}

    config = CompressionConfig(model=adapter.spec, method="svd", ratio=rank_fraction, device="cpu")
    selected = {layer.name for layer in select_layers(adapter, config)}
    candidates = adapter.target_layers()
    dense_by_default = sorted({l.group for l in candidates} - {l.group for l in candidates if l.name in selected})
    for group in ("vision", "text"):
        assert group not in dense_by_default, f"{adapter.family}: group '{group}' is not compressed by default"
    info["dense_by_default"] = dense_by_default

    report = compress(adapter, config)
    compressed = _logits(adapter, batch)
    lowrank = {name for name, module in adapter.model.named_modules() if isinstance(module, LowRankLinear)}
    assert lowrank, f"{adapter.family}: svd at rank fraction {rank_fraction} factorised no layer"
    assert lowrank <= selected, f"layers outside the default selection were factorised: {sorted(lowrank - selected)[:4]}"
    info["compressed"] = {g: sum(l.group == g and l.name in lowrank for l in candidates) for g in adapter.groups}
    for group in dense_by_default:
        assert info["compressed"][group] == 0, f"group '{group}' is dense by default but was factorised"
    dense = copy.deepcopy(adapter)
    merge_lowrank_layers(dense.model)
    _assert_close(_logits(dense, batch), compressed, "compressed outputs differ from the dense A@B reconstruction")
    del dense

    ckpt = save_compressed(adapter, tmp / "ckpt", report, overwrite=True)
    if fresh_process:
        torch.save(pixels, tmp / "pixels.pt")
        env = fresh_process_env()
        done = subprocess.run(
            [sys.executable, "-c", _RELOAD_SCRIPT, str(ckpt), str(tmp / "pixels.pt"), json.dumps(list(CAPTIONS)),
             str(tmp / "out.pt")],
            env=env, capture_output=True, text=True,
        )
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise AssertionError(f"load_compressed in a fresh process failed: {tail[0]}")
        ids, logits = torch.load(tmp / "out.pt")
        reloaded = logits[batch["attention_mask"].to(torch.bool)]
    else:
        loaded = load_compressed(ckpt)
        reloaded_batch = loaded.pair_batch(pixels, list(CAPTIONS))
        ids, reloaded = reloaded_batch["input_ids"], _logits(loaded, reloaded_batch)
    _assert_same_ids(batch["input_ids"], ids, "save -> load")
    _assert_close(compressed, reloaded, "save -> load changed the outputs", 1e-5)

    exported = export_dense(adapter, tmp / "dense", overwrite=True)
    spec = adapter.exported_spec(exported)
    info["exported_spec"] = spec
    if spec is not None:
        stock = type(adapter).load(spec).eval()  # transformers' from_pretrained + AutoProcessor
        assert not any(isinstance(m, LowRankLinear) for m in stock.model.modules()), "the export holds low-rank layers"
        stock_batch = stock.pair_batch(pixels, list(CAPTIONS))
        _assert_same_ids(batch["input_ids"], stock_batch["input_ids"], "export_dense -> stock load")
        _assert_close(compressed, _logits(stock, stock_batch), "export_dense -> stock load changed the outputs")
    logger.info("%s passed the generative conformance checks: %s", adapter.family, info)
    return info


__all__ = ["CAPTIONS", "check_generative_adapter"]
