"""Second generative family: PaliGemma (SigLIP tower, linear projector, Gemma prefix-LM) through the same adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmpress.adapters import adapter_for_spec
from vlmpress.adapters.hf_llava import HFPaliGemmaAdapter
from vlmpress.adapters.merge import merge_lowrank_layers
from vlmpress.api import compress_model
from vlmpress.pipeline.checkpoint import export_dense, load_compressed, save_compressed
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.evaluation.likelihood import caption_log_likelihoods, full_sequence_log_likelihoods
from vlmpress.pipeline.sequential import compress_sequential
from vlmpress.testing.genvlm import save_tiny_paligemma, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("paligemma")
    spec = f"hf:{save_tiny_paligemma(root / 'pg', seed=2)}"
    images = write_image_folder(root / "images", per_class=3)
    adapter = HFPaliGemmaAdapter.load(spec)
    batch = adapter.pair_batch(adapter.pixel_values(sorted(images.rglob("*.jpg"))[:2]), ["a photo of a cat.", "a dog"])
    return spec, images, batch


def _cfg(spec, images, **kw):
    return CompressionConfig(**{**dict(model=spec, calib_images=str(images), device="cpu", batch_size=4, als_iters=2), **kw})


def _logits(adapter, batch):
    with torch.no_grad():
        return adapter.forward_tokens(batch).logits


def test_prefix_lm_inputs_and_targets(tiny):
    spec, _, batch = tiny
    assert adapter_for_spec(spec) is HFPaliGemmaAdapter
    adapter = HFPaliGemmaAdapter.load(spec)
    types = batch["token_type_ids"]
    assert (types[batch["caption_mask"]] == 1).all() and (types[:, : adapter.prefix_ids().numel()] == 0).all()
    # the prefix is bidirectional: dropping the token types changes the outputs
    plain = {k: v for k, v in batch.items() if k != "token_type_ids"}
    assert not torch.allclose(_logits(adapter, batch), _logits(adapter, plain), atol=1e-5)
    groups = {(l.group, l.kind) for l in adapter.target_layers()}
    assert {("vision", "attn"), ("vision", "mlp"), ("projector", "mlp"), ("text", "attn"), ("text", "mlp")} == groups


def test_cached_scores_equal_full_forward(tiny):
    spec, images, _ = tiny
    adapter = HFPaliGemmaAdapter.load(spec)
    pixels = adapter.pixel_values(sorted(images.rglob("*.jpg"))[:2])
    captions = ["a photo of a cat.", "a dog", "the bird"]
    cached, _ = caption_log_likelihoods(adapter, pixels, captions, max_sequences=3)
    full, _ = full_sequence_log_likelihoods(adapter, pixels, captions, max_sequences=3)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_compress_save_reload_export_and_sequential(tiny, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    spec, images, batch = tiny
    adapter, report = compress_model(spec, _cfg(spec, images, method="svd_llm", ratio=0.4))
    assert {r.group for r in report.layers if r.rank is not None} == {"vision", "text"}
    expected = _logits(adapter, batch)
    dense = copy.deepcopy(adapter)
    merge_lowrank_layers(dense.model)
    torch.testing.assert_close(_logits(dense, batch), expected, rtol=1e-4, atol=1e-4)
    loaded = load_compressed(save_compressed(adapter, tmp_path / "ckpt", report))
    assert isinstance(loaded, HFPaliGemmaAdapter) and loaded.prompt == "caption en"
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=0)
    stock = PaliGemmaForConditionalGeneration.from_pretrained(export_dense(loaded, tmp_path / "dense")).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(**adapter.model_inputs(batch)).logits, expected, rtol=1e-4, atol=1e-4)

    cfg = _cfg(spec, images, method="pgsvd", eps=0.6, targets=["language_model"], propagate="original")
    whole, whole_report = compress_model(spec, cfg)
    seq = HFPaliGemmaAdapter.load(spec)
    seq_report = compress_sequential(seq, cfg.replace(mode="sequential"), HFPaliGemmaAdapter.load_calibration(cfg))
    assert seq_report.rank_map == whole_report.rank_map and seq_report.rank_map
    torch.testing.assert_close(_logits(seq, batch), _logits(whole, batch), rtol=1e-4, atol=1e-4)
