"""The generative base on dynamic-resolution families: tiny Qwen2-VL (dynamic grid, M-RoPE) and
LLaVA-NeXT (any-resolution tiles), each image with a prefix of its own length."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

import vlmpress
from vlmpress.adapters.hf_generative import HFGenerativeVLMAdapter
from vlmpress.api import compress_model
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.evaluation.likelihood import caption_log_likelihoods, full_sequence_log_likelihoods
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.testing.genvlm import plain_per_class_log_likelihoods, write_image_folder
from vlmpress.testing.genvlm_families import save_tiny_llava_next, save_tiny_qwen2_vl

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a photo of a cat.", "a dog", "a bad photo of the small bird.", "x"]
SAVERS = {"qwen2_vl": save_tiny_qwen2_vl, "llava_next": save_tiny_llava_next}


def _images() -> list[Image.Image]:
    """Three aspect ratios (wide, tall, square) with different content."""
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 24), (20, 60), (40, 40)]
    return [
        Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy(), "RGB") for w, h in sizes
    ]


@pytest.fixture(scope="module", params=sorted(SAVERS))
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    directory = SAVERS[request.param](root / "model", seed=3)
    return request.param, vlmpress.load_model(f"hf:{directory}").eval(), f"hf:{directory}", root


def test_family_is_read_from_structure(tiny):
    kind, adapter, _, _ = tiny
    assert type(adapter) is HFGenerativeVLMAdapter and adapter.family == "hf_generative" and not adapter.fixed_prefix
    layers = adapter.target_layers()
    kinds = Counter((layer.group, layer.kind) for layer in layers)
    assert kinds[("vision", "attn")] and kinds[("vision", "mlp")] and kinds[("text", "attn")] and kinds[("text", "mlp")]
    projector = {layer.name for layer in layers if layer.group == "projector"}
    if kind == "qwen2_vl":  # the patch merger lives inside the tower but is the connector
        assert projector == {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}
        assert not any(".merger." in layer.name for layer in layers if layer.group == "vision")
    else:  # LLaVA-NeXT reads vision_feature_layer -2: the last of 3 tower blocks is unused, never a target
        assert projector == {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
        blocks = {layer.name.split(".layers.")[1].split(".")[0] for layer in layers if layer.group == "vision"}
        assert blocks == {"0", "1"}
    config = CompressionConfig(model=adapter.spec, method="svd", ratio=0.5, device="cpu")
    from vlmpress.pipeline.compress import select_layers

    selected = {layer.group for layer in select_layers(adapter, config)}
    assert selected == {"vision", "text"}  # the connector stays dense unless targeted


def test_each_image_has_its_own_prefix(tiny):
    _, adapter, _, _ = tiny
    prefixes = adapter.encode_prefixes(adapter.pixel_values(_images()))
    lengths = [len(ids) for ids in prefixes.ids]
    image_id = adapter.model.config.image_token_id
    n_image_tokens = [ids.count(image_id) for ids in prefixes.ids]
    assert len(set(lengths)) >= 2 and len(set(n_image_tokens)) >= 2, (lengths, n_image_tokens)
    # the text around the image tokens is the same for every image
    assert len({n - k for n, k in zip(lengths, n_image_tokens)}) == 1


@pytest.mark.parametrize("max_sequences", [1, 3, 256])
def test_cached_likelihood_equals_plain_per_class_forward_image_for_image(tiny, max_sequences):
    """Each image's own prefix once + KV cache == one full forward per image x class, no cache."""
    _, adapter, _, _ = tiny
    pixels = adapter.pixel_values(_images())
    cached, counts = caption_log_likelihoods(adapter, pixels, CAPTIONS, max_sequences=max_sequences)
    expected = plain_per_class_log_likelihoods(adapter, pixels, CAPTIONS)
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-4)
    full, _ = full_sequence_log_likelihoods(adapter, pixels, CAPTIONS, max_sequences=max_sequences)
    torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == [len(x) for x in adapter.caption_ids(CAPTIONS)]
    # the images really are scored differently (not one prefix reused for all)
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_compress_save_load_export_round_trip(tiny):
    """Calibration on images of several sizes, then the conformance kit's checks on the compressed model."""
    kind, _, spec, root = tiny
    images = write_image_folder(root / "calib", per_class=2)
    config = CompressionConfig(model=spec, calib_images=str(images), device="cpu", batch_size=3, method="svd_llm", ratio=0.5)
    adapter, report = compress_model(spec, config)
    groups = {r.group for r in report.layers if r.rank is not None}
    assert groups == {"vision", "text"}
    n_lowrank = sum(isinstance(m, LowRankLinear) for m in adapter.model.modules())
    assert n_lowrank == len([r for r in report.layers if r.rank is not None])
    ckpt = vlmpress.save_compressed(adapter, root / f"ckpt-{kind}", report, overwrite=True)
    loaded = vlmpress.load_model(str(ckpt))
    pixels = adapter.pixel_values(_images()[:2])
    batch = adapter.pair_batch(pixels, CAPTIONS[:2])
    with torch.no_grad():
        before = adapter.forward_tokens(batch).logits
        after = loaded.forward_tokens(loaded.pair_batch(pixels, CAPTIONS[:2])).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    vlmpress.export_dense(adapter, root / f"dense-{kind}")
    stock = vlmpress.load_model(f"hf:{root / f'dense-{kind}'}")
    assert not any(isinstance(m, LowRankLinear) for m in stock.model.modules())
    with torch.no_grad():
        dense = stock.forward_tokens(stock.pair_batch(pixels, CAPTIONS[:2])).logits
    torch.testing.assert_close(dense, before, rtol=1e-4, atol=1e-4)


def test_unsupported_family_refusal_names_the_three_bases_and_the_entry_point_group(tmp_path):
    from transformers import BertConfig

    from vlmpress.adapters.registry import ENTRY_POINT_GROUP, adapter_for_spec
    from vlmpress.errors import UnknownModelSpecError

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(UnknownModelSpecError) as info:
        adapter_for_spec(f"hf:{tmp_path}")
    message = str(info.value)
    assert "'bert'" in message and ENTRY_POINT_GROUP in message and "\n" not in message
    for base in ("HFDualEncoderAdapter", "HFGenerativeVLMAdapter", "HFCausalLMAdapter"):
        assert base in message


def test_cli_compress_then_eval_on_images_of_different_sizes(tiny, tmp_path, cli_compress_and_eval):
    """``vlmpress compress`` + ``vlmpress eval`` (likelihood zero-shot through the data loader's canvases)."""
    kind, _, spec, _ = tiny
    if kind != "qwen2_vl":
        pytest.skip("one family is enough for the CLI path")
    images = write_image_folder(tmp_path / "images", per_class=2)  # 24x28, 28x28, 32x28 images
    records = cli_compress_and_eval(spec, images, tmp_path, ratio=0.5)
    assert [r["method"] for r in records] == ["base", "svd_llm"]
    for rec in records:
        assert rec["n_images"] >= 3 and 0 <= rec["metrics"]["top1"] <= 1 and rec["metrics"]["caption_perplexity"] > 1


def test_sequential_mode_on_the_language_model_matches_whole_mode(tiny, tmp_path):
    """Block-by-block compression of the LM (block inputs captured from the model's own forward,
    M-RoPE positions included) gives whole mode's ranks with ``propagate original``."""
    kind, _, spec, _ = tiny
    images = write_image_folder(tmp_path / "images", per_class=2)
    ranks = {}
    for mode in ("whole", "sequential"):
        config = CompressionConfig(
            model=spec, calib_images=str(images), device="cpu", batch_size=3, method="pgsvd", eps=0.4,
            targets=["language_model"], mode=mode, propagate="original",
        )
        _, report = compress_model(spec, config)
        ranks[mode] = {r.name: r.rank for r in report.layers if r.rank is not None}
    assert ranks["whole"] and ranks["whole"] == ranks["sequential"]
    assert all(".language_model." in name for name in ranks["whole"])
