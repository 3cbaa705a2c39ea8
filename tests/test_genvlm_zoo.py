"""The image-text-to-text census: tiny families really round-trip, and the committed table says so."""

from __future__ import annotations

import json
import os
import random
import time

import pytest
import torch

from vlmpress.adapters.genvlm_inputs import CanvasTransform, PrefixBatch, canvas_images, pair_inputs
from vlmpress.io.resources import project_root
from vlmpress.testing.genvlm_census import family_roundtrip, shrink_config

TABLE = project_root() / "eval" / "zoo" / "image_text_to_text.json"
#: families the issue names; each must be ok in the committed table
REQUIRED = (
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "llava_next", "llava_onevision", "gemma3",
    "internvl", "mllama", "blip-2",
)
#: seconds the sampled round trips may take in the default suite (at least one runs)
BUDGET_S = 25


def _rows() -> list[dict]:
    return json.loads(TABLE.read_text())["rows"]


def test_committed_table_covers_the_named_families_and_most_that_build():
    rows = {r["model_type"]: r for r in _rows()}
    missing = [t for t in REQUIRED if rows.get(t, {}).get("status") != "ok"]
    assert not missing, missing
    built = [r for r in rows.values() if r["status"] != "not built"]
    ok = [r for r in built if r["status"] == "ok"]
    assert len(ok) >= 0.8 * len(built), f"{len(ok)} of {len(built)} built families ok"
    for r in ok:  # an ok row really compressed layers and records what it targeted
        assert r["compressed"] > 0 and 0 < r["targeted_share"] <= 1 and r["groups"]["vision"] and r["groups"]["text"]
    for r in rows.values():
        if r["status"] != "ok":
            assert r["reason"] and "\n" not in r["reason"]


def test_sampled_families_round_trip(tmp_path):
    """A sampled, time-bounded subset of the table's ok rows must still pass the round trip."""
    pytest.importorskip("num2words")  # SmolVLM's processor (the zoo extra); other families do not need it
    seed = int(os.environ.get("VLMPRESS_ZOO_SEED", "0"))
    ok = sorted(r["model_type"] for r in _rows() if r["status"] == "ok" and r["seconds"] < 15)
    t0, ran = time.perf_counter(), 0
    for model_type in random.Random(seed).sample(ok, min(3, len(ok))):
        if ran and time.perf_counter() - t0 > BUDGET_S:
            break
        row = family_roundtrip(model_type, tmp_path)
        assert row.status == "ok", (model_type, row.stage, row.reason)
        assert row.compressed > 0
        ran += 1
    assert ran >= 1


@pytest.mark.slow
def test_whole_census_still_passes(tmp_path):
    if not os.environ.get("VLMPRESS_FULL_ZOO"):
        pytest.skip("the whole census takes ~15 min: set VLMPRESS_FULL_ZOO=1")
    pytest.importorskip("num2words")
    failed = []
    for r in _rows():
        if r["status"] == "ok":
            row = family_roundtrip(r["model_type"], tmp_path)
            if row.status != "ok":
                failed.append((r["model_type"], row.reason))
    assert not failed, failed


def test_a_failing_stage_is_a_failed_row_with_a_reason(tmp_path, monkeypatch):
    from vlmpress.adapters.hf_generative import HFGenerativeVLMAdapter

    monkeypatch.setattr(HFGenerativeVLMAdapter, "export_dense", lambda self, out: (_ for _ in ()).throw(OSError("disk full")))
    row = family_roundtrip("qwen2_vl", tmp_path)
    assert row.status == "failed" and row.stage == "round trip" and "disk full" in row.reason


def test_shrunk_default_config_keeps_coupled_sizes():
    from transformers import Qwen2VLConfig

    config = shrink_config(Qwen2VLConfig())
    text = config.text_config
    assert text.num_hidden_layers == 2 and text.hidden_size == 64 and config.vision_config.depth == 2
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2  # M-RoPE sections fit the tiny heads
    assert config.vision_config.hidden_size == text.hidden_size  # the merger maps into the LM's width


def test_canvas_keeps_each_image_and_its_size():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy()) for w, h in [(30, 12), (9, 40)]]
    transform = CanvasTransform(48)
    back = canvas_images(torch.stack([transform(img) for img in images]))
    assert [b.size for b in back] == [(30, 12), (9, 40)]
    assert all(torch.equal(torch.tensor(list(a.getdata())), torch.tensor(list(b.getdata()))) for a, b in zip(images, back))
    big = canvas_images(CanvasTransform(20)(images[1]).unsqueeze(0))[0]
    assert max(big.size) == 20 and big.size[0] < big.size[1]  # downscaled, aspect ratio kept


def test_pairs_continue_per_token_inputs_over_the_caption():
    prefixes = PrefixBatch(
        ids=[[5, 6, 7], [5, 6]],
        per_token={"mm_token_type_ids": [torch.tensor([0, 1, 0]), torch.tensor([1, 0])],
                   "cross_attention_mask": [torch.tensor([[1, 0], [1, 1], [0, 1]]), torch.tensor([[1, 1], [1, 0]])]},
        image_inputs={"pixel_values": torch.zeros(2, 3)},
    )
    batch = pair_inputs(prefixes, [[9], [9, 10, 11]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 0], [5, 6, 9, 10, 11]]
    assert batch["caption_mask"].tolist() == [[False, False, False, True, False], [False, False, True, True, True]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    # tiles a token sees: the caption sees what the prompt's last token sees
    assert batch["cross_attention_mask"][0, 3].tolist() == [0, 1] and batch["cross_attention_mask"][1, 4].tolist() == [1, 0]
