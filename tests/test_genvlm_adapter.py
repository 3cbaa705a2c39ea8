"""Generative VLMs (LLaVA) through the adapters: groups, multimodal calibration, compression, save/load/export."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from vlmpress.adapters import adapter_for_spec
from vlmpress.pipeline.loading import load_model
from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
from vlmpress.adapters.hf_llava import HFLlavaAdapter
from vlmpress.adapters.merge import merge_lowrank_layers
from vlmpress.api import compress_model
from vlmpress.pipeline.checkpoint import export_dense, load_compressed, save_compressed
from vlmpress.pipeline.compress import calibrate, select_layers
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.errors import CalibrationError
from vlmpress.testing.genvlm import save_tiny_llava, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("genvlm")
    model_dir = save_tiny_llava(root / "llava", seed=3)
    images = write_image_folder(root / "images", per_class=4)
    captions = root / "captions.txt"
    captions.write_text("a photo of a cat.\na bad photo of the dog.\na close-up photo of a bird sitting on a branch.\n")
    return f"hf:{model_dir}", images, captions


def _cfg(spec, images, **kw):
    base = dict(model=spec, calib_images=str(images), device="cpu", batch_size=4, als_iters=2)
    base.update(kw)
    return CompressionConfig(**base)


def _logits(adapter, batch):
    with torch.no_grad():
        return adapter.forward_tokens(batch).logits


@pytest.fixture(scope="module")
def probe_batch(tiny):
    spec, images, _ = tiny
    adapter = HFLlavaAdapter.load(spec)
    paths = sorted(images.rglob("*.jpg"))[:3]
    return adapter.pair_batch(adapter.pixel_values(paths), ["a photo of a cat.", "a dog", "a bad photo of the bird."])


def test_spec_picks_llava_adapter_with_three_groups(tiny):
    spec, _, _ = tiny
    assert adapter_for_spec(spec) is HFLlavaAdapter
    assert not HFCausalLMAdapter.accepts(spec)  # a config with a vision part is not a text-only LM
    adapter = load_model(spec)
    layers = adapter.target_layers()
    groups = {l.group for l in layers}
    assert groups == {"vision", "projector", "text"}
    assert {l.kind for l in layers if l.group == "text"} == {"attn", "mlp", "head"}
    # vision_feature_layer=-2 of 3 blocks: the last block never reaches the LM, so it is not a target
    vision_blocks = {l.name.split(".layers.")[1].split(".")[0] for l in layers if l.group == "vision"}
    assert vision_blocks == {"0", "1"}
    # projector and lm_head are candidates but dense by default
    selected = select_layers(adapter, CompressionConfig(model=spec, eps=0.5))
    assert {l.group for l in selected} == {"vision", "text"}
    assert not any("lm_head" in l.name or "projector" in l.name for l in selected)


def test_calibration_positions_per_group(tiny):
    spec, images, _ = tiny
    adapter = HFLlavaAdapter.load(spec)
    config = _cfg(spec, images, eps=0.5, targets=["vision_tower", "multi_modal_projector", "language_model"])
    calib = HFLlavaAdapter.load_calibration(config)
    assert len(calib) == 12 and all(c.split()[-1].strip(".") in ("cat", "dog", "bird") for c in calib.captions)
    layers = select_layers(adapter, config)
    collectors = calibrate(adapter, layers, calib, config)
    n_patches = (32 // 8) ** 2
    vision = next(l.name for l in layers if l.group == "vision")
    assert collectors["vision"].token_count(vision) == 12 * (n_patches + 1)  # class token + patches
    projector = next(l.name for l in layers if l.group == "projector")
    assert collectors["projector"].token_count(projector) == 12 * n_patches  # 'default' drops the class token
    text = next(l.name for l in layers if l.group == "text")
    batches = adapter.token_batches(calib, config.batch_size)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    assert collectors["text"].token_count(text) == real < padded  # image + prompt + caption, padding masked
    image_positions = int((batches[0]["input_ids"][0] == adapter.model.config.image_token_id).sum())
    assert image_positions == n_patches


def test_both_towers_compressed_and_outputs_equal_dense_reconstruction(tiny, probe_batch):
    spec, images, captions = tiny
    adapter, report = compress_model(spec, _cfg(spec, images, method="svd_llm", ratio=0.4, calib_captions=str(captions)))
    kinds = {(r.group, r.kind) for r in report.layers if r.rank is not None}
    assert {("vision", "attn"), ("vision", "mlp"), ("text", "attn"), ("text", "mlp")} <= kinds
    assert report.calibration["caption_source"].startswith("file")
    assert set(report.calibration["positions"]) == {"vision", "projector", "text"}
    n_lowrank = sum(isinstance(m, LowRankLinear) for m in adapter.model.modules())
    assert n_lowrank == len([r for r in report.layers if r.rank is not None]) > 0
    dense = copy.deepcopy(adapter)
    assert merge_lowrank_layers(dense.model) == n_lowrank
    torch.testing.assert_close(_logits(adapter, probe_batch), _logits(dense, probe_batch), rtol=1e-4, atol=1e-4)


def test_clustered_eps_applies_inside_the_language_model(tiny):
    spec, images, _ = tiny
    adapter, report = compress_model(spec, _cfg(spec, images, method="svd", eps_v=0.6, eps_attn=0.5, eps_mlp=0.7))
    tol = {(r.group, r.kind): r.tolerance for r in report.layers}
    assert tol[("vision", "attn")] == tol[("vision", "mlp")] == 0.6
    assert tol[("text", "attn")] == 0.5 and tol[("text", "mlp")] == 0.7


def test_target_reduction_shared_and_auto(tiny):
    spec, images, _ = tiny
    _, shared = compress_model(spec, _cfg(spec, images, method="pgsvd", target_reduction=0.3, allocation="shared"))
    assert abs(shared.targeted_reduction - 0.3) < 0.05
    _, auto = compress_model(spec, _cfg(spec, images, method="pgsvd", target_reduction=0.3, allocation="auto"))
    info = auto.calibration["auto_allocation"]
    assert auto.allocation == "auto" and "caption tokens" in info["proxy"]
    assert len(info["candidates"]) > 1 and all(c["score"] >= 0 for c in info["candidates"])
    best = min(info["candidates"], key=lambda c: c["score"])
    assert info["chosen_proportion_eps_v_over_eps_t"] == best["proportion"]
    assert abs(auto.targeted_reduction - 0.3) < 0.05
    assert "held-out" in info["held_out"]["image_source"]


def test_save_reload_and_export_dense(tiny, probe_batch, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    spec, images, _ = tiny
    adapter, report = compress_model(spec, _cfg(spec, images, method="svd_als", ratio=0.3))
    expected = _logits(adapter, probe_batch)
    out = save_compressed(adapter, tmp_path / "ckpt", report)
    loaded = load_compressed(out)
    assert isinstance(loaded, HFLlavaAdapter) and loaded.processor is not None
    assert loaded.prefix_text() == adapter.prefix_text()
    torch.testing.assert_close(_logits(loaded, probe_batch), expected, rtol=0, atol=0)
    dense_dir = export_dense(loaded, tmp_path / "dense")
    stock = LlavaForConditionalGeneration.from_pretrained(dense_dir).eval()
    AutoProcessor.from_pretrained(dense_dir)
    with torch.no_grad():
        stock_logits = stock(**adapter.model_inputs(probe_batch)).logits
    torch.testing.assert_close(stock_logits, expected, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, LowRankLinear) for m in stock.modules())


def test_sequential_equals_whole_with_original_propagation(tiny, probe_batch):
    from vlmpress.pipeline.sequential import compress_sequential

    spec, images, _ = tiny
    cfg = _cfg(spec, images, method="pgsvd", eps=0.6, targets=["language_model"], propagate="original")
    whole, whole_report = compress_model(spec, cfg)
    seq = HFLlavaAdapter.load(spec)
    sink: dict = {}
    seq_report = compress_sequential(seq, cfg.replace(mode="sequential"), HFLlavaAdapter.load_calibration(cfg), covariance_sink=sink)
    assert seq_report.rank_map == whole_report.rank_map and seq_report.rank_map
    torch.testing.assert_close(_logits(seq, probe_batch), _logits(whole, probe_batch), rtol=1e-4, atol=1e-4)


def test_sequential_refuses_vision_layers(tiny):
    from vlmpress.errors import ConfigError

    spec, images, _ = tiny
    with pytest.raises(ConfigError, match="decoder blocks only"):
        compress_model(spec, _cfg(spec, images, method="pgsvd", eps=0.6, mode="sequential"))


def test_calibration_without_captions_or_classes_is_a_clear_error(tiny, tmp_path):
    spec, images, _ = tiny
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(images.rglob("*.jpg"))[:3]:
        (flat / p.name).write_bytes(p.read_bytes())
    with pytest.raises(CalibrationError, match="--calib-captions"):
        compress_model(spec, _cfg(spec, flat, method="pgsvd", eps=0.5))


def test_cli_compress_both_towers(tiny, tmp_path, capsys):
    from vlmpress.cli import main

    spec, images, captions = tiny
    out = tmp_path / "cli"
    rc = main([
        "compress", "--model", spec, "--method", "pgsvd", "--eps-v", "0.6", "--eps-t", "0.6", "--calib-images", str(images),
        "--calib-captions", str(captions), "--device", "cpu", "--als-iters", "2", "--out", str(out),
        "--export-dense", str(tmp_path / "cli-dense"),
    ])
    assert rc == 0
    config = json.loads((out / "vlmpress_config.json").read_text())
    assert config["family"] == "hf_llava"
    groups = {name.split(".")[1] for name in config["ranks"]}
    assert groups == {"vision_tower", "language_model"}
    assert (out / "processor_config.json").is_file() and (tmp_path / "cli-dense" / "config.json").is_file()
