"""Tower discovery over the open_clip zoo (meta device) and the committed zoo table."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vlmpress.adapters.discovery import layer_kind
from vlmpress.adapters.zoo import MIN_COVERAGE, survey_open_clip
from vlmpress.io.resources import project_root

TABLE = project_root() / "eval" / "zoo" / "zoo.json"
#: one config per vision-tower family (open_clip ViT, ModifiedResNet, timm ConvNeXt/EVA/SigLIP/Swin/FastViT/ViTamin/PE)
SAMPLE = [
    "RN50", "convnext_tiny", "EVA02-B-16", "ViT-B-16-SigLIP", "swin_base_patch4_window7_224",
    "MobileCLIP-S1", "ViTamin-S", "PE-Core-T-16-384", "coca_ViT-B-32", "vit_relpos_medium_patch16_cls_224",
]


@pytest.mark.parametrize("name", SAMPLE)
def test_sample_configs_cover_both_towers(name):
    row = survey_open_clip(name)
    assert row.status == "ok", row.reason
    assert row.forward_check == "ok"
    for group in ("vision", "text"):
        tower = row.towers[group]
        assert tower["targets"] > 0 and tower["coverage"] >= MIN_COVERAGE, (group, tower)


def test_layer_kinds():
    assert layer_kind("visual.trunk.blocks.0.attn.qkv") == "attn"
    assert layer_kind("visual.attnpool.c_proj") == "attn"
    assert layer_kind("text.transformer.encoder.layer.0.attention.self.query") == "attn"
    assert layer_kind("text.transformer.encoder.block.0.layer.0.SelfAttention.o") == "attn"
    assert layer_kind("text.transformer.encoder.layer.0.intermediate.dense") == "mlp"
    assert layer_kind("text.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0") == "mlp"
    assert layer_kind("visual.trunk.stages.0.blocks.1.mlp.fc1") == "mlp"
    assert layer_kind("visual.trunk.head.fc") == "other"
    assert layer_kind("visual.head.proj") == "other"


def test_committed_table_is_complete():
    data = json.loads(TABLE.read_text())
    rows = [r for r in data["rows"] if r["source"] == "open_clip"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 137
    for r in rows:
        assert r["status"] in ("ok", "not built"), r
        if r["status"] == "not built":
            assert r["reason"], r
    hf = {r["name"].split()[0] for r in data["rows"] if r["source"] == "hf"}
    assert {"hf_clip", "hf_siglip", "hf_siglip2", "hf_altclip", "hf_chinese_clip", "hf_blip_itr"} <= hf


@pytest.mark.slow
def test_no_buildable_config_loses_a_tower():
    """Rebuilds every config of the committed table: none that built may lose a tower or coverage."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = json.loads(TABLE.read_text())
    for r in data["rows"]:
        if r["source"] != "open_clip" or r["status"] != "ok":
            continue
        row = survey_open_clip(r["name"], forward=False)
        assert row.status == "ok", (r["name"], row.reason)
        for group, tower in r["towers"].items():
            assert row.towers[group]["targets"] >= tower["targets"], (r["name"], group)
