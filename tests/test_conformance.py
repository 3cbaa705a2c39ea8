"""The public conformance kit on every built-in vision-language family (tiny random models, offline)."""

from __future__ import annotations

import pytest

from vlmpress import testing


def test_open_clip_vit(tmp_path):
    info = testing.check_adapter(testing.tiny_open_clip(), tmp_path, fresh_process=True)
    assert info["targets"] == {"vision": 12, "text": 12}


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
