"""open_clip CoCa: the text tower's appended class token, and the multimodal decoder as a third group."""

from __future__ import annotations

import pytest
import torch

from vlmpress import testing
from vlmpress.core.covariance import CovarianceCollector
from vlmpress.data.calibration import CalibrationSet
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig

CAPTIONS = ["a photo of a cat", "a dog", "the thing that is a bird on a tree", "a car"]


@pytest.fixture(scope="module")
def coca_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("coca")


def _calibration(n=4):
    return CalibrationSet(testing.random_images(n, 32), CAPTIONS[:n])


def test_three_groups_found_from_structure(coca_dir):
    adapter = testing.tiny_open_clip_coca(coca_dir / "cfg")
    assert adapter.groups == ("vision", "text", "multimodal")
    layers = adapter.target_layers()
    decoder = [l for l in layers if l.group == "multimodal"]
    # 2 self-attention + 2 cross-attention blocks, each q/k/v/out + 2 MLP linears
    assert len(decoder) == 24 and all(l.name.startswith("text_decoder.") for l in decoder)
    kinds = {l.name: l.kind for l in decoder}
    assert kinds["text_decoder.cross_attn.0.mlp.c_fc"] == "mlp"  # an MLP inside a cross-attention block
    assert kinds["text_decoder.cross_attn.0.attn.k_proj"] == "attn"
    # a plain CLIP has no such group
    assert testing.tiny_open_clip().groups == ("vision", "text")


@pytest.mark.parametrize("correct_cls_mask", [False, True])
def test_text_mask_covers_the_appended_class_token(coca_dir, correct_cls_mask):
    adapter = testing.tiny_open_clip_coca(coca_dir / "cfg")
    adapter.model.text.correct_cls_mask = correct_cls_mask
    tokens = adapter.tokenize(["a photo", "a much longer caption of a thing"])
    mask = adapter.text_valid_mask(tokens)
    assert mask.shape == (2, tokens.shape[1] + 1)  # the tower's real sequence: ids + class token
    assert mask[:, -1].all()  # the pooled class token
    # the mask equals the keys the tower's own padding mask lets through (plus the pooled token)
    additive = adapter.model.text._build_additive_mask(tokens, tokens.shape[1] + 1, torch.float32)
    keys = additive.view(2, -1, tokens.shape[1] + 1, tokens.shape[1] + 1)[:, 0, -1, :] == 0
    keys[:, -1] = True
    assert torch.equal(mask, keys)
    # a padded caption's covariance in a batch equals the caption alone
    layers = [l for l in adapter.target_layers() if l.group == "text"]
    joint = CovarianceCollector({l.name: l.module for l in layers})
    with joint:
        adapter.calibration_forward("text", ["a photo", "a much longer caption of a thing"], joint)
    alone = [CovarianceCollector({l.name: l.module for l in layers}) for _ in range(2)]
    for c, text in zip(alone, ["a photo", "a much longer caption of a thing"]):
        with c:
            adapter.calibration_forward("text", [text], c)
    name = layers[0].name
    assert joint.token_count(name) == sum(c.token_count(name) for c in alone) == int(mask.sum())
    assert torch.allclose(joint.covariance(name), sum(c.covariance(name) for c in alone), atol=1e-4)


def test_decoder_calibration_positions(coca_dir):
    adapter = testing.tiny_open_clip_coca(coca_dir / "cfg")
    layers = {l.name: l.module for l in adapter.target_layers() if l.group == "multimodal"}
    batch = adapter.token_batches(_calibration(2), 2)[0]
    collector = CovarianceCollector(layers)
    with collector:
        adapter.calibration_forward("multimodal", batch, collector)
    collector.check_complete()
    caption_positions = int((batch["tokens"][:, 1:] != 0).sum())  # positions predicting a real token
    image_tokens = adapter.model.encode_image  # noqa: F841 - the decoder reads the attention pool's tokens
    with torch.no_grad():
        _, embs = adapter.model._encode_image(batch["pixels"])
    assert collector.token_count("text_decoder.resblocks.0.attn.q_proj") == caption_positions
    assert collector.token_count("text_decoder.cross_attn.0.attn.q_proj") == caption_positions
    # the cross-attention keys/values read every image token of every image
    assert collector.token_count("text_decoder.cross_attn.0.attn.k_proj") == embs.shape[0] * embs.shape[1]


def test_compress_every_group_and_full_rank_keeps_caption_logits(coca_dir):
    adapter = testing.tiny_open_clip_coca(coca_dir / "cfg")
    batch = adapter.probe_batch("multimodal")
    with torch.no_grad():
        before = adapter.group_output("multimodal", batch).clone()
    report = compress(adapter, CompressionConfig(method="pgsvd", eps=0.0, als_iters=1, device="cpu"), _calibration())
    assert {r.group for r in report.layers} == {"vision", "text", "multimodal"}
    with torch.no_grad():
        after = adapter.group_output("multimodal", batch)
    assert torch.allclose(before, after, atol=1e-4)


def test_conformance_kit_on_coca(coca_dir, tmp_path):
    info = testing.check_adapter(testing.tiny_open_clip_coca(coca_dir / "cfg"), tmp_path)
    assert info["targets"] == {"vision": 16, "text": 12, "multimodal": 24}


def test_decoder_needs_captions(coca_dir):
    from vlmpress.errors import CalibrationError

    adapter = testing.tiny_open_clip_coca(coca_dir / "cfg")
    with pytest.raises(CalibrationError, match="images with captions"):
        adapter.token_batches(CalibrationSet(testing.random_images(2, 32), []), 2)
