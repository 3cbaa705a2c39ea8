"""LLaVA / PaliGemma checkpoints written before the generative base keep loading, with the same logits.

``tests/fixtures/checkpoints_genvlm_v0.2`` was written by the fixed-prefix ``HFLlavaAdapter`` /
``HFPaliGemmaAdapter`` (SVD at half rank on the tiny factories' models); the ``*.expected`` tensors
are that code's pixels, paired input ids and next-token logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlmpress
from vlmpress.core.lowrank import LowRankLinear

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_genvlm_v0.2"
CAPTIONS = ["a cat", "a close-up photo of a dog on the grass"]


@pytest.mark.parametrize("name, family", [("llava_tiny", "hf_llava"), ("paligemma_tiny", "hf_paligemma")])
def test_old_generative_checkpoint_loads_with_same_logits(tmp_path, name, family):
    shutil.copytree(FIXTURES, tmp_path / "ckpt")
    adapter = vlmpress.load_model(str(tmp_path / "ckpt" / name))
    expected = load_file(str(tmp_path / "ckpt" / f"{name}.expected.safetensors"))
    assert adapter.family == family and adapter.fixed_prefix
    assert sum(isinstance(m, LowRankLinear) for m in adapter.model.modules()) > 0
    batch = adapter.pair_batch(expected["pixels"], CAPTIONS)
    assert torch.equal(batch["input_ids"], expected["input_ids"])  # the saved processor builds the same inputs
    with torch.no_grad():
        logits = adapter.forward_tokens(batch).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
