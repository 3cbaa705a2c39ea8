"""Compression pipeline mechanics on a toy two-tower model (no model library involved)."""

import json
import subprocess
import sys

import pytest
import torch

from toy_adapter import ToyAdapter, toy_calibration
from vlmpress.pipeline.rank_plan import LayerPlan, reduction_of, tolerances_for_target
from vlmpress.pipeline.checkpoint import load_compressed, save_compressed
from vlmpress.pipeline.compress import compress, count_parameters
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.core.rank import tolerance_rank
from vlmpress.errors import CheckpointError, ConfigError


def features(adapter, calib):
    with torch.no_grad():
        img = adapter.encode_image(torch.stack(list(calib.images[:6])))
        txt = adapter.encode_text(adapter.tokenize(calib.captions[:6]))
    return img, txt


@pytest.fixture
def calib():
    return toy_calibration()


def test_eps_zero_keeps_features(calib):
    adapter = ToyAdapter.load("toy:0")
    ref = features(adapter, calib)
    # eps = 0 -> full rank; square layers would not save parameters and stay dense -> use svd on all
    report = compress(adapter, CompressionConfig(method="pgsvd", eps=0.0, device="cpu"), calib)
    assert all(l.rank is None for l in report.layers)  # full rank never saves parameters
    assert report.targeted_reduction == 0
    out = features(adapter, calib)
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_separate_tolerances_give_tolerance_ranks_per_tower(calib):
    adapter = ToyAdapter.load("toy:1")
    weights = {l.name: l.weight_matrix.detach().clone() for l in adapter.target_layers()}
    cfg = CompressionConfig(method="pgsvd", eps_v=0.6, eps_t=0.8, als_iters=3, device="cpu")
    report = compress(adapter, cfg, calib)
    assert report.tolerances == {"vision": 0.6, "text": 0.8}
    for layer in report.layers:
        eps = 0.6 if layer.group == "vision" else 0.8
        expected = tolerance_rank(torch.linalg.svdvals(weights[layer.name].double()), eps)
        saves = expected * (layer.out_features + layer.in_features) < layer.out_features * layer.in_features
        assert layer.rank == (expected if saves else None), layer.name
        module = adapter.model.get_submodule(layer.name)
        assert isinstance(module, LowRankLinear) == saves
        if saves:
            assert module.rank == expected
            assert layer.act_error <= layer.act_error_init + 1e-9  # ALS never worse than its SVD start
    v = [l.rank for l in report.layers if l.group == "vision" and l.rank]
    t = [l.rank for l in report.layers if l.group == "text" and l.rank]
    assert v and t and sum(v) / len(v) > sum(t) / len(t)  # looser text tolerance -> smaller ranks


def test_reported_parameters_match_model(calib):
    adapter = ToyAdapter.load("toy:2")
    before = count_parameters(adapter.model)
    report = compress(adapter, CompressionConfig(method="svd_als", ratio=0.4, als_iters=2, device="cpu"), calib)
    assert report.whole_model_params_before == before
    assert report.whole_model_params_after == count_parameters(adapter.model)
    counted = 0
    for layer in report.layers:
        module = adapter.model.get_submodule(layer.name)
        counted += sum(p.numel() for p in module.parameters())
    assert counted == report.targeted_params_after
    assert before - report.whole_model_params_after == report.targeted_params_before - report.targeted_params_after
    assert report.targeted_reduction >= 0.4  # floor of the uniform rank removes at least the ratio


@pytest.mark.parametrize("method,allocation", [("pgsvd", "shared"), ("pgsvd", "proportion"), ("svd_llm", "shared")])
def test_target_reduction_is_hit(calib, method, allocation):
    adapter = ToyAdapter.load("toy:3")
    cfg = CompressionConfig(
        method=method, target_reduction=0.35, allocation=allocation, eps_proportion={"vision": 0.7, "text": 1.3},
        als_iters=1, device="cpu",
    )
    report = compress(adapter, cfg, calib)
    assert abs(report.targeted_reduction - 0.35) <= 0.03  # few, tiny layers: coarse steps
    if allocation == "proportion":
        assert report.tolerances["text"] / report.tolerances["vision"] == pytest.approx(1.3 / 0.7)


def random_plans(count: int, shapes: list[tuple[int, int]], seed: int) -> list[LayerPlan]:
    """Layer plans with random decaying spectra; the first half 'vision', the rest 'text'."""
    g = torch.Generator().manual_seed(seed)
    plans = []
    for i in range(count):
        n, m = shapes[i % len(shapes)]
        s = torch.linalg.svdvals(torch.randn(n, m, generator=g, dtype=torch.float64) @ torch.diag(torch.rand(m, generator=g, dtype=torch.float64)))
        plans.append(LayerPlan(f"l{i}", "vision" if i < count // 2 else "text", "mlp", n, m, True, s))
    return plans


def test_tolerance_bisection_within_half_a_point_on_many_layers():
    plans = random_plans(60, [(192, 96), (96, 96), (96, 96)], seed=0)
    for target in (0.2, 0.4, 0.6):
        for weights in ({"*": 1.0}, {"vision": 1.3, "text": 0.7}):
            tols, achieved = tolerances_for_target(plans, target, weights)
            assert abs(achieved - target) <= 0.005
            from vlmpress.pipeline.rank_plan import ranks_from_tolerances

            assert reduction_of(plans, ranks_from_tolerances(plans, tols)) == pytest.approx(achieved)


def test_targets_and_exclude_regexes(calib):
    adapter = ToyAdapter.load("toy:4")
    report = compress(
        adapter, CompressionConfig(method="svd", ratio=0.5, targets=[r"visual\.", r"text\.blocks\.0\."], exclude=[r"\.fc2$"], device="cpu")
    )
    names = [l.name for l in report.layers]
    assert names and all(("visual." in n or "text.blocks.0." in n) and not n.endswith("fc2") for n in names)
    with pytest.raises(ConfigError, match="no layer matched"):
        compress(ToyAdapter.load("toy:4"), CompressionConfig(method="svd", ratio=0.5, targets=["nothing_here"], device="cpu"))


def test_save_load_roundtrip_and_errors(tmp_path, calib):
    adapter = ToyAdapter.load("toy:5")
    report = compress(adapter, CompressionConfig(method="pgsvd", eps=0.7, als_iters=2, device="cpu"), calib)
    assert len(report.rank_map) >= 6
    out = save_compressed(adapter, tmp_path / "ckpt", report)
    cfg = json.loads((out / "vlmpress_config.json").read_text())
    assert cfg["ranks"] == report.rank_map and cfg["method"] == "pgsvd" and "torch" in cfg["versions"]
    assert (out / "compression_report.csv").read_text().count("\n") == len(report.layers) + 1
    loaded = load_compressed(out)
    for a, b in zip(features(adapter, calib), features(loaded, calib)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a different model into the same directory is refused
    other = ToyAdapter.load("toy:6")
    rep2 = compress(other, CompressionConfig(method="svd", ratio=0.5, device="cpu"))
    with pytest.raises(ConfigError, match="different compressed model"):
        save_compressed(other, out, rep2)
    save_compressed(other, out, rep2, overwrite=True)
    # corrupt weights file
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_compressed(out)
    # mismatched rank map
    out2 = save_compressed(adapter, tmp_path / "ckpt2", report)
    cfg = json.loads((out2 / "vlmpress_config.json").read_text())
    name = next(iter(cfg["ranks"]))
    cfg["ranks"][name] += 1
    (out2 / "vlmpress_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_compressed(out2)
    (out2 / "vlmpress_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_compressed(out2)


def test_save_is_atomic_when_interrupted(tmp_path, calib, monkeypatch):
    adapter = ToyAdapter.load("toy:7")
    report = compress(adapter, CompressionConfig(method="svd", ratio=0.5, device="cpu"))
    import vlmpress.pipeline.checkpoint as ck

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "atomic_write_json", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(adapter, tmp_path / "ckpt", report)
    assert not (tmp_path / "ckpt").exists()
    assert not [p for p in tmp_path.iterdir()]  # temp dir cleaned up


def test_config_validation_and_yaml_roundtrip(tmp_path):
    cfg = CompressionConfig(model="toy:0", method="pgsvd", eps_v=0.3, eps_t=0.5)
    path = tmp_path / "r.yaml"
    cfg.to_yaml(path)
    assert CompressionConfig.from_yaml(path) == cfg
    for bad in (
        dict(method="pgsvd", eps=1.5),
        dict(method="pgsvd", eps=-0.1),
        dict(method="svd_als", ratio=1.0),
        dict(method="svd_als", ratio=0.0),
        dict(method="svd_als", eps=0.3),
        dict(method="pgsvd"),
        dict(method="magic", eps=0.3),
        dict(method="pgsvd", eps=0.3, target_reduction=0.4),
    ):
        with pytest.raises(ConfigError):
            CompressionConfig(**bad).validate()
    (tmp_path / "bad.yaml").write_text("method: pgsvd\nepsilon: 0.3\n")
    with pytest.raises(ConfigError, match="unknown config keys: epsilon"):
        CompressionConfig.from_yaml(tmp_path / "bad.yaml")


def test_all_recipes_in_configs_are_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "configs" / "recipes").glob("*.yaml"))
    assert recipes, "configs/recipes/ holds no recipe"
    for path in recipes:
        CompressionConfig.from_yaml(path).validate()


def test_compress_model_entry_point_accepts_spec_dict_and_overrides(tmp_path, calib):
    import vlmpress

    adapter, report = vlmpress.compress_model("toy:8", {"method": "pgsvd", "eps": 0.7}, calib, als_iters=1, device="cpu")
    assert adapter.spec == "toy:8" and report.method == "pgsvd" and report.config["als_iters"] == 1
    assert report.rank_map and all(isinstance(adapter.model.get_submodule(n), LowRankLinear) for n in report.rank_map)
    out = vlmpress.save_compressed(adapter, tmp_path / "c")
    assert vlmpress.load_model(str(out)).checkpoint_config["ranks"] == report.rank_map
    with pytest.raises(ConfigError, match="already a compressed checkpoint"):
        vlmpress.compress_model(str(out), {"method": "svd", "ratio": 0.5})


def test_rank_multiple_keeps_tolerance_and_target():
    """Aligned ranks (GPU-friendly GEMMs): multiples of 8, error still <= eps, targets still met."""
    from vlmpress.pipeline.rank_plan import ranks_for_target_ratio, ranks_from_ratio, ranks_from_tolerances
    from vlmpress.core.rank import align_rank, relative_truncation_errors

    assert [align_rank(r, 8, 100) for r in (1, 8, 9, 97, 100)] == [8, 8, 16, 100, 100]
    assert [align_rank(r, 8, 100, up=False) for r in (1, 8, 15, 99)] == [8, 8, 8, 96]
    assert align_rank(5, 8, 6) == 6 and align_rank(37, 1, 30) == 30
    plans = random_plans(40, [(256, 128), (128, 128)], seed=1)
    ranks = ranks_from_tolerances(plans, {"*": 0.3}, multiple=8)
    for p in plans:
        r = ranks[p.name]
        assert r % 8 == 0 or r == min(p.out_features, p.in_features)
        assert relative_truncation_errors(p.singular_values)[r] <= 0.3  # rounding up never loosens eps
        assert r >= ranks_from_tolerances([p], {"*": 0.3})[p.name]
    assert all(r % 8 == 0 for r in ranks_from_ratio(plans, 0.4, multiple=8).values())
    for target in (0.2, 0.5):
        tols, achieved = tolerances_for_target(plans, target, {"*": 1.0}, multiple=8)
        assert abs(achieved - target) <= 0.005
        assert all(r % 8 == 0 for r in ranks_from_tolerances(plans, tols, 8).values())
        ranks, achieved = ranks_for_target_ratio(plans, target, multiple=8)
        assert abs(achieved - target) <= 0.005 and all(r % 8 == 0 for r in ranks.values())
    with pytest.raises(ConfigError, match="rank_multiple"):
        CompressionConfig(rank_multiple=0).validate()
