"""The public conformance kit on every built-in vision-language family (tiny random models, offline)."""

from __future__ import annotations

import json

import pytest

from vlmpress import testing


def test_open_clip_vit(tmp_path):
    info = testing.check_adapter(testing.tiny_open_clip(), tmp_path)
    assert info["targets"] == {"vision": 12, "text": 12}


@pytest.mark.slow
def test_open_clip_vit_fresh_process_reload(tmp_path):
    testing.check_adapter(testing.tiny_open_clip(), tmp_path, fresh_process=True)


def test_hf_clip(tmp_path):
    info = testing.check_adapter(testing.tiny_hf_clip(tmp_path), tmp_path / "kit")
    assert info["targets"]["vision"] == 13 and info["targets"]["text"] == 13


def test_hf_siglip(tmp_path):
    info = testing.check_adapter(testing.tiny_hf_siglip(tmp_path), tmp_path / "kit")
    assert info["targets"]["vision"] > 12  # encoder + split pooling head


def test_kit_catches_a_broken_adapter(tmp_path):
    adapter = testing.tiny_open_clip()
    adapter.prepare_for_compression = lambda: adapter.model.visual.conv1.weight.data.mul_(2)  # changes outputs
    with pytest.raises(AssertionError, match="prepare_for_compression changed the outputs"):
        testing.check_adapter(adapter, tmp_path)


def test_open_clip_modified_resnet(tmp_path):
    info = testing.check_adapter(testing.tiny_open_clip_resnet(tmp_path / "cfg"), tmp_path / "kit")
    assert info["targets"]["vision"] == 4  # q/k/v/c_proj of the attention pool


@pytest.mark.parametrize("trunk", ["test_vit", "test_convnext"])
def test_open_clip_timm_trunks(tmp_path, trunk):
    adapter = testing.tiny_open_clip_timm(tmp_path / "cfg", trunk)
    names = [layer.name for layer in adapter.target_layers()]
    if trunk == "test_vit":
        assert any(n.endswith("attn.qkv") for n in names)  # packed qkv: one target with its shared input
    testing.check_adapter(adapter, tmp_path / "kit")


def test_open_clip_hf_text_tower(tmp_path):
    import shutil

    from vlmpress.pipeline.checkpoint import load_compressed

    adapter = testing.tiny_open_clip_hf_text(tmp_path)
    info = testing.check_adapter(adapter, tmp_path / "kit")
    assert info["targets"]["text"] >= 12
    assert any(layer.name.startswith("text.transformer.encoder.layer.0.attention") for layer in adapter.target_layers())
    # the checkpoint carries its transformers tokenizer and text config: it reloads after the
    # original files are gone (the names in its config are never read)
    shutil.rmtree(tmp_path / "tiny-tokenizer")
    shutil.rmtree(tmp_path / "tiny-roberta")
    reloaded = load_compressed(tmp_path / "kit" / "ckpt")
    assert (tmp_path / "kit" / "ckpt" / "tokenizer").is_dir() and (tmp_path / "kit" / "ckpt" / "text_config").is_dir()
    hashed = json.loads((tmp_path / "kit" / "ckpt" / "vlmpress_config.json").read_text())["file_sha256"]
    assert "tokenizer/tokenizer_config.json" in hashed and "text_config/config.json" in hashed
    assert reloaded.tokenize(["a photo"]).shape == (1, 16)


@pytest.mark.parametrize("kind", ["siglip2", "altclip", "chinese_clip", "blip"])
def test_hf_dual_encoder_families(tmp_path, kind):
    adapter = testing.tiny_hf_dual_encoder(kind, tmp_path)
    assert adapter.family.startswith("hf_")
    info = testing.check_adapter(adapter, tmp_path / "kit")
    assert all(count > 0 for count in info["targets"].values())
