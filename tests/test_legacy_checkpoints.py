"""Checkpoints written by an earlier release keep loading, with the same outputs.

``tests/fixtures/checkpoints_v0.1.0`` was written by vlmpress 0.1.0 before the package layout
changed (``vlmpress compress`` on a tiny HF CLIP and a tiny Llama); the ``*.expected`` tensors are
that release's outputs on fixed inputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlmpress
from vlmpress.core.lowrank import LowRankLinear

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_v0.1.0"


@pytest.fixture()
def legacy(tmp_path):
    """A writable copy, so a test can never modify the committed fixture."""
    dst = tmp_path / "legacy"
    shutil.copytree(FIXTURES, dst)
    return dst


def _lowrank_count(model: torch.nn.Module) -> int:
    return sum(isinstance(m, LowRankLinear) for m in model.modules())


def test_old_hf_clip_checkpoint_loads_with_same_embeddings(legacy):
    adapter = vlmpress.load_model(str(legacy / "hf_clip_tiny"))
    expected = load_file(str(legacy / "hf_clip_tiny.expected.safetensors"))
    assert _lowrank_count(adapter.model) > 0
    with torch.no_grad():
        image = adapter.encode_image(expected["pixels"])
        text = adapter.encode_text(adapter.tokenize(["a cat", "a dog"]))
    torch.testing.assert_close(image, expected["image"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text, expected["text"], rtol=1e-5, atol=1e-6)


def test_old_causal_lm_checkpoint_loads_with_same_logits(legacy):
    adapter = vlmpress.load_model(str(legacy / "llama_tiny"))
    expected = load_file(str(legacy / "llama_tiny.expected.safetensors"))
    assert _lowrank_count(adapter.model) > 0
    with torch.no_grad():
        logits = adapter.model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_old_checkpoint_with_a_flipped_weight_is_refused(legacy):
    """The fixture is verified, not just read: a changed byte in the weights fails the hash check."""
    weights = legacy / "llama_tiny" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(vlmpress.errors.CheckpointError, match="sha256|hash|modified|corrupt"):
        vlmpress.load_model(str(legacy / "llama_tiny"))
