"""Deployment-aware ranks: timed dense vs low-rank per layer shape (cached), slow layers kept dense."""

import json

import pytest
import torch
from torch import nn

from toy_adapter import ToyAdapter, toy_calibration
from vlmpress.commands.compress import add_arguments, config_from_args
from vlmpress.deploy.latency import LatencyTable, LayerShape, time_linear
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.pipeline.rank_plan import LayerPlan, keep_dense_where_slower, ranks_for_target_ratio, reduction_of
from vlmpress.errors import ConfigError


def fake_timer(slow_shapes, calls=None):
    """Dense 1 ms; low-rank 2 ms for ``slow_shapes`` (out, in), else 0.5 ms."""

    def timer(shape: LayerShape, device) -> float:
        if calls is not None:
            calls.append(shape)
        if shape.rank is None:
            return 1e-3
        return 2e-3 if (shape.out_features, shape.in_features) in slow_shapes else 5e-4

    return timer


def test_table_times_each_shape_once_and_caches_by_device_torch_shape_rows_dtype(tmp_path):
    calls = []
    path = tmp_path / "lat.json"
    table = LatencyTable("cpu", path, timer=fake_timer({(8, 4)}, calls))
    assert table.compare(8, 4, 2, 64, torch.float32) == (1e-3, 2e-3)
    assert table.compare(8, 4, 2, 64, torch.float32) == (1e-3, 2e-3)
    assert table.compare(8, 4, 3, 64, torch.float32)[0] == 1e-3  # dense timing reused for another rank
    assert len(calls) == 3 and table.measured == 3
    keys = list(json.loads(path.read_text()))
    assert len(keys) == 3
    assert all(table.device_name in k and f"torch {torch.__version__}" in k and "rows 64" in k and "float32" in k for k in keys)
    assert any("8x4 dense" in k for k in keys) and any("8x4 rank 2" in k for k in keys)
    # another table on the same file (a later run) times nothing; other rows / dtypes are new keys
    again = LatencyTable("cpu", path, timer=fake_timer(set(), calls))
    assert again.compare(8, 4, 2, 64, torch.float32) == (1e-3, 2e-3) and again.measured == 0
    again.compare(8, 4, 2, 128, torch.bfloat16)
    assert again.measured == 2


def test_unreadable_cache_is_ignored_not_fatal(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text("{not json")
    table = LatencyTable("cpu", path, timer=fake_timer(set()))
    assert table.compare(4, 4, 1, 8, torch.float32) == (1e-3, 5e-4)
    assert len(json.loads(path.read_text())) == 2  # rewritten whole


def test_real_timer_measures_both_forms():
    dense = time_linear(LayerShape(64, 32, None, 16, "float32"), torch.device("cpu"), repeats=3)
    lowrank = time_linear(LayerShape(64, 32, 4, 16, "float32"), torch.device("cpu"), repeats=3)
    assert 0 < dense < 1 and 0 < lowrank < 1


def _plans():
    shapes = [(48, 24), (24, 48), (24, 24), (24, 24), (16, 40), (40, 16)]
    return [LayerPlan(f"l{i}", "g", "mlp", n, m, True) for i, (n, m) in enumerate(shapes)]


def test_keep_dense_where_slower_respends_the_target_elsewhere():
    plans = _plans()
    ranks, _ = ranks_for_target_ratio(plans, 0.4)
    slow = {"l0", "l1"}
    replan = lambda rest, t: ranks_for_target_ratio(rest, t)[0]  # noqa: E731
    new, kept = keep_dense_where_slower(plans, ranks, lambda p, r: p.name in slow, replan, 0.4)
    assert kept == slow
    after = {k: (None if k in kept else v) for k, v in new.items()}
    assert abs(reduction_of(plans, after) - 0.4) <= 0.02  # met by the others alone
    assert all(new[p.name] < ranks[p.name] for p in plans if p.name not in slow)  # they gave up rank
    # without a target nothing is re-spent; fixed-dense layers are never timed
    timed = []
    new, kept = keep_dense_where_slower(
        plans, ranks, lambda p, r: timed.append(p.name) or p.name in slow, None, None, fixed_dense={"l5"}
    )
    assert kept == slow and new == ranks and "l5" not in timed


def test_compress_latency_aware_keeps_slow_layers_dense_and_meets_target(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("vlmpress.deploy.latency.time_linear", fake_timer({(48, 24), (24, 48)}))
    adapter = ToyAdapter.load("toy:3")
    cfg = CompressionConfig(method="svd_llm", target_reduction=0.35, device="cpu", latency_aware=True)
    report = compress(adapter, cfg, toy_calibration())
    slow = sorted(n for n, m in adapter.model.named_modules() if isinstance(m, nn.Linear) and tuple(m.weight.shape) in {(48, 24), (24, 48)})
    assert slow and sorted(report.latency_dense_layers) == slow
    assert all(type(adapter.model.get_submodule(n)) is nn.Linear for n in slow)
    assert abs(report.targeted_reduction - 0.35) <= 0.03
    assert "low-rank ran slower on the device" in report.format_summary()
    assert report.summary()["latency_dense_layers"] == report.latency_dense_layers
    row = next(l for l in report.layers if l.name == slow[0])
    assert "latency" in row.status and "rows" in row.status
    cache = json.loads((tmp_path / "cache" / "latency.json").read_text())
    # rows = the calibration batch's rows of each layer (toy: 6 tokens x batch)
    assert cache and all("rows " in k for k in cache)


def test_flag_maps_to_config_field_and_yaml(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", "toy:3", "--out", str(tmp_path / "o"), "--method", "svd", "--ratio", "0.3", "--latency-aware"])
    cfg = config_from_args(args)
    assert cfg.latency_aware is True
    cfg.to_yaml(tmp_path / "c.yaml")
    assert CompressionConfig.from_yaml(tmp_path / "c.yaml").latency_aware is True
    args = p.parse_args(["--model", "toy:3", "--out", str(tmp_path / "o"), "--method", "svd", "--ratio", "0.3"])
    assert config_from_args(args).latency_aware is False
    with pytest.raises(ConfigError, match="latency_aware"):
        CompressionConfig(method="svd", ratio=0.3, latency_aware="yes").validate()
