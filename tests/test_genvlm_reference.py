"""The generative reference VLM's building blocks: open_clip ViT -> transformers CLIPVisionModel, LLaVA assembly."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def visual():
    import open_clip

    from vlmpress.reference.config import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("vlmpress-caltech-vit")
    return model.visual.eval()


def test_converted_vision_tower_matches_open_clip(visual):
    from transformers import CLIPVisionModel

    from vlmpress.reference.genvlm import hf_vision_config, openclip_visual_to_hf

    hf = CLIPVisionModel(hf_vision_config(visual)).eval()
    hf.load_state_dict(openclip_visual_to_hf(visual), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = visual(x)  # ln_post(class token) @ proj
        out = hf(pixel_values=x)
        pooled = out.pooler_output @ visual.proj
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-4)


def test_built_llava_scores_captions_through_the_adapter(visual, tmp_path):
    from vlmpress.adapters.hf_llava import HFLlavaAdapter
    from vlmpress.evaluation.likelihood import caption_log_likelihoods
    from vlmpress.reference.genvlm import GenVLMConfig, build_llava

    captions = ["a photo of a cat.", "a photo of a dog."]
    model, processor = build_llava(visual, captions * 20, GenVLMConfig(text_hidden=32, text_intermediate=64, vocab_size=300))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    adapter = HFLlavaAdapter.load(f"hf:{tmp_path}")
    assert adapter.prefix_ids().eq(model.config.image_token_id).sum() == 65  # 8x8 patches + class token ('full')
    from PIL import Image

    pixels = adapter.pixel_values([Image.new("RGB", (80, 70), (200, 10, 10))])
    scores, counts = caption_log_likelihoods(adapter, pixels, captions)
    assert scores.shape == (1, 2) and torch.isfinite(scores).all() and (counts > 0).all()
    # the vision tower is the converted CLIP tower: every feature block is a compression target
    assert sum(l.group == "vision" for l in adapter.target_layers()) == 6 * 6


@pytest.mark.slow
def test_quick_genvlm_reference_trains_saves_and_loads(tmp_path, monkeypatch):
    """End to end on a handful of digits: reference CLIP -> converted tower -> trained projector + LM -> hf:<dir>."""
    from vlmpress.pipeline.loading import load_model
    from vlmpress.reference.genvlm import DIGITS_LLAVA, get_genvlm_reference

    monkeypatch.setenv("VLMPRESS_CACHE", str(tmp_path / "cache"))
    directory = get_genvlm_reference(DIGITS_LLAVA, quick=True, progress=False)
    import json

    meta = json.loads((directory / "reference.json").read_text())
    assert meta["dataset"] == "digits" and len(meta["epoch_loss"]) == 2 and all(x > 0 for x in meta["epoch_loss"])
    assert get_genvlm_reference(DIGITS_LLAVA, quick=True, progress=False) == directory  # cached
    adapter = load_model(f"hf:{directory}")
    assert adapter.family == "hf_llava" and adapter.prefix_ids().numel() > 0
