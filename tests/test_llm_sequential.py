"""Sequential (block-by-block) compression: same covariances, ranks and results as whole mode."""

from __future__ import annotations

import pytest
import torch

from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
from vlmpress.pipeline.compress import calibrate, compress, select_layers
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.errors import ConfigError
from vlmpress.reference.lm import TINY_TEXT, save_tiny_causal_lm
from vlmpress.pipeline.sequential import compress_sequential

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 11, 200]])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq_llms")
    text = root / "calib.txt"
    text.write_text(TINY_TEXT)
    dirs = {arch: save_tiny_causal_lm(root / arch, arch, seed=2, layers=3) for arch in ("llama", "gpt2", "opt", "qwen2")}
    return dirs, text


def _setup(tiny, arch, **kw):
    dirs, text = tiny
    spec = f"hf:{dirs[arch]}"
    base = dict(model=spec, n_samples=5, seq_len=20, batch_size=2, calib_text=str(text), device="cpu", als_iters=2)
    base.update(kw)
    cfg = CompressionConfig(**base)
    return spec, cfg, HFCausalLMAdapter.load_calibration(cfg)


def _logits(adapter):
    with torch.no_grad():
        return adapter.model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2"])
def test_original_propagation_matches_whole_mode_exactly(tiny, arch):
    spec, cfg, calib = _setup(tiny, arch, method="pgsvd", eps=0.6, propagate="original")
    whole = HFCausalLMAdapter.load(spec)
    layers = select_layers(whole, cfg)
    collector = calibrate(whole, layers, calib, cfg)["decoder"]
    whole_cov = {l.name: collector.covariance(l.name).clone() for l in layers}
    whole_report = compress(whole, cfg, calib, collectors={"decoder": collector})

    seq = HFCausalLMAdapter.load(spec)
    sink: dict[str, torch.Tensor] = {}
    seq_report = compress_sequential(seq, cfg, calib, covariance_sink=sink)
    assert sink and set(sink) == set(whole_report.rank_map)
    for name, M in sink.items():
        assert torch.equal(M, whole_cov[name]), name  # bit-identical covariances
    assert seq_report.rank_map == whole_report.rank_map
    assert [l.tokens for l in seq_report.layers] == [l.tokens for l in whole_report.layers]
    assert seq_report.targeted_params_after == whole_report.targeted_params_after
    assert seq_report.whole_model_params_after == whole_report.whole_model_params_after
    torch.testing.assert_close(_logits(seq), _logits(whole), rtol=1e-6, atol=1e-6)


def test_target_reduction_plans_globally_and_compressed_propagation(tiny):
    spec, cfg, calib = _setup(tiny, "llama", method="pgsvd", target_reduction=0.3, propagate="compressed")
    whole = HFCausalLMAdapter.load(spec)
    whole_report = compress(whole, cfg, calib)
    seq = HFCausalLMAdapter.load(spec)
    sink: dict[str, torch.Tensor] = {}
    seq_report = compress_sequential(seq, cfg, calib, covariance_sink=sink)
    assert seq_report.rank_map == whole_report.rank_map  # ranks are planned from all spectra first
    assert seq_report.tolerances == whole_report.tolerances
    assert abs(seq_report.targeted_reduction - 0.3) < 0.05
    # block 0 sees the same inputs either way; later blocks see the compressed blocks' outputs
    orig = {}
    compress_sequential(HFCausalLMAdapter.load(spec), cfg.replace(propagate="original"), calib, covariance_sink=orig)
    first = [n for n in sink if ".layers.0." in n]
    later = [n for n in sink if ".layers.0." not in n]
    assert first and later
    assert all(torch.equal(sink[n], orig[n]) for n in first)
    assert any(not torch.allclose(sink[n], orig[n]) for n in later)
    assert all(isinstance(seq.model.get_submodule(n), LowRankLinear) for n in seq_report.rank_map)


def test_ratio_methods_and_api_dispatch(tiny):
    import vlmpress

    spec, cfg, calib = _setup(tiny, "gpt2", method="svd_als", ratio=0.4, mode="sequential")
    adapter, report = vlmpress.compress_model(spec, cfg, calib)
    assert report.calibration["mode"] == "sequential" and report.ratio == 0.4
    assert report.targeted_reduction >= 0.4 and len(report.rank_map) == 12
    # data-free svd in sequential mode needs no calibration at all
    import dataclasses

    _, report = vlmpress.compress_model(spec, dataclasses.replace(cfg, method="svd", calib_text=None), None)
    assert len(report.rank_map) == 12


def test_disk_offloaded_model_compresses_block_by_block(tiny, tmp_path):
    pytest.importorskip("accelerate", reason="disk offload needs accelerate (pip install 'vlmpress[llm]')")
    spec, cfg, calib = _setup(tiny, "llama", method="pgsvd", eps=0.6, propagate="compressed")
    ref = HFCausalLMAdapter.load(spec)
    ref_report = compress_sequential(ref, cfg, calib)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    off = HFCausalLMAdapter.load(spec, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert off.model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    report = compress_sequential(off, cfg, calib)
    assert report.rank_map == ref_report.rank_map
    assert off.model.model.layers[0].self_attn.o_proj.weight.device.type == "cpu"  # resident once compressed
    torch.testing.assert_close(_logits(off), _logits(ref), rtol=1e-5, atol=1e-5)


def test_layers_outside_blocks_are_refused(tiny):
    dirs, _ = tiny
    spec = f"hf:{dirs['llama']}"
    cfg = CompressionConfig(model=spec, method="svd", ratio=0.5, targets=["lm_head", r"layers\.0\."], device="cpu")
    with pytest.raises(ConfigError, match="outside them"):
        compress_sequential(HFCausalLMAdapter.load(spec), cfg, None)
