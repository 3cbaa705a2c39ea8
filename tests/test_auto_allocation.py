import pytest
import torch

from toy_adapter import ToyAdapter, toy_calibration
from vlmpress.pipeline.auto_allocation import auto_compress
from vlmpress.pipeline.auto_allocation.contrastive import search_allocation, split_calibration
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.errors import ConfigError


def test_split_is_disjoint_and_deterministic():
    calib = toy_calibration(n_images=12, n_captions=12)
    fit, held = split_calibration(calib)
    fit2, held2 = split_calibration(calib)
    assert len(fit.images) + len(held.images) == 12 and len(held.images) == 3
    ids = lambda xs: {id(x) for x in xs}
    assert not ids(fit.images) & ids(held.images)
    assert ids(held.images) == ids(held2.images)


def test_auto_scores_only_calibration_data_and_stays_in_budget():
    calib = toy_calibration(n_images=16, n_captions=16)
    adapter = ToyAdapter.load("toy:11")
    calib_ids = {id(x) for x in calib.images}
    seen = []

    def spy(reference, candidate_adapter, held):
        # the scorer only ever receives held-out *calibration* images, never evaluation data
        assert {id(x) for x in held.images} <= calib_ids
        assert "held-out" in held.image_source
        seen.append(candidate_adapter)
        return float(len(seen)), 1.0  # prefer the first candidate

    cfg = CompressionConfig(method="pgsvd", target_reduction=0.3, allocation="auto", als_iters=1, device="cpu")
    result = search_allocation(adapter, cfg, calib, proportions=(0.5, 1.0, 2.0), scorer=spy)
    assert len(seen) == 3 and all(a is not adapter for a in seen)
    assert result.best.proportion == 0.5
    for c in result.candidates:
        assert abs(c.planned_reduction - 0.3) <= 0.03
        assert c.tolerances["vision"] / c.tolerances["text"] == pytest.approx(c.proportion, rel=1e-6) or max(c.tolerances.values()) == 1.0
    # the original model was not modified by the search
    assert all(isinstance(l.module, torch.nn.Linear) for l in adapter.target_layers())


def test_auto_compress_uses_default_kl_proxy_and_records_search():
    calib = toy_calibration(n_images=16, n_captions=16)
    adapter = ToyAdapter.load("toy:12")
    cfg = CompressionConfig(method="pgsvd", target_reduction=0.3, allocation="auto", als_iters=1, device="cpu")
    report = auto_compress(adapter, cfg, calib, proportions=(0.6, 1.0, 1.6))
    info = report.calibration["auto_allocation"]
    scores = [c["score"] for c in info["candidates"]]
    assert all(s >= 0 for s in scores) and len(scores) == 3
    best = min(info["candidates"], key=lambda c: c["score"])
    assert info["chosen_proportion_eps_v_over_eps_t"] == best["proportion"]
    assert report.allocation == "auto" and abs(report.targeted_reduction - 0.3) <= 0.03


def test_auto_needs_target_reduction():
    with pytest.raises(ConfigError):
        search_allocation(ToyAdapter.load("toy:0"), CompressionConfig(method="pgsvd", eps=0.3, device="cpu"), toy_calibration())
