"""The zoo round trip (a tiny copy of each family really compresses) and the committed zoo table."""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from vlmpress.adapters.discovery import layer_kind
from vlmpress.io.resources import project_root
from vlmpress.testing.zoo import _shrink_timm_kwargs, open_clip_roundtrip

TABLE = project_root() / "eval" / "zoo" / "zoo.json"
#: always in the sample: CoCa (three groups) and a ModifiedResNet; the rest is drawn from the table
ALWAYS = ["coca_ViT-B-32", "RN50"]
#: seconds the sampled round trips may take in the default suite (at least the ALWAYS ones run)
BUDGET_S = 45


def _ok_rows() -> list[dict]:
    data = json.loads(TABLE.read_text())
    return [r for r in data["rows"] if r["source"] == "open_clip" and r["status"] == "ok"]


def test_sampled_open_clip_configs_round_trip(tmp_path):
    """A sampled, time-bounded subset of the table's "ok" rows: each must still pass the round trip."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seed = int(os.environ.get("VLMPRESS_ZOO_SEED", "0"))
    others = sorted({r["name"] for r in _ok_rows()} - set(ALWAYS))
    names = ALWAYS + random.Random(seed).sample(others, min(3, len(others)))
    t0, ran = time.perf_counter(), 0
    for name in names:
        if ran >= len(ALWAYS) and time.perf_counter() - t0 > BUDGET_S:
            break
        row = open_clip_roundtrip(name, tmp_path / name)
        assert row.status == "ok", (name, row.reason)
        assert all(cell["compressed"] > 0 for cell in row.towers.values()), row.towers
        ran += 1
    assert ran >= len(ALWAYS)


def test_coca_row_has_its_decoder_group(tmp_path):
    row = open_clip_roundtrip("coca_base", tmp_path)
    assert row.status == "ok", row.reason
    assert set(row.towers) == {"vision", "text", "multimodal"}
    assert row.towers["multimodal"]["targets"] == 24 and row.towers["multimodal"]["compressed"] == 24


def test_a_failing_stage_is_reported_not_ok(tmp_path, monkeypatch):
    from vlmpress.adapters.open_clip import OpenClipAdapter

    monkeypatch.setattr(OpenClipAdapter, "export_dense", lambda self, out: (_ for _ in ()).throw(OSError("disk full")))
    row = open_clip_roundtrip("RN50", tmp_path)
    assert row.status == "failed" and row.reason.startswith("export_dense: OSError: disk full")


def test_shrink_rules():
    assert _shrink_timm_kwargs({"depth": 12, "embed_dim": 768, "num_heads": 12}) == {"depth": 2, "embed_dim": 64, "num_heads": 2}
    swin = _shrink_timm_kwargs({"depths": (2, 2, 18, 2), "embed_dim": 128, "num_heads": (4, 8, 16, 32)})
    assert swin == {"depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 2, 4, 8)}
    assert _shrink_timm_kwargs({"dims": (96, 192, 384, 768)})["dims"] == (8, 16, 32, 64)
    assert _shrink_timm_kwargs({"depth": 12, "embed_dim": 768}, widths=False) == {"depth": 2, "embed_dim": 768}


def test_layer_kinds():
    assert layer_kind("visual.trunk.blocks.0.attn.qkv") == "attn"
    assert layer_kind("visual.attnpool.c_proj") == "attn"
    assert layer_kind("text.transformer.encoder.layer.0.attention.self.query") == "attn"
    assert layer_kind("text.transformer.encoder.layer.0.attention.output.dense") == "attn"
    assert layer_kind("text.transformer.encoder.block.0.layer.0.SelfAttention.o") == "attn"
    assert layer_kind("text.transformer.encoder.layer.0.intermediate.dense") == "mlp"
    assert layer_kind("text.transformer.encoder.layer.0.output.dense") == "mlp"
    assert layer_kind("text.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0") == "mlp"
    assert layer_kind("visual.trunk.stages.0.blocks.1.mlp.fc1") == "mlp"
    assert layer_kind("text_decoder.cross_attn.0.mlp.c_fc") == "mlp"
    assert layer_kind("visual.trunk.head.fc") == "other"
    assert layer_kind("visual.head.proj") == "other"


def test_committed_table_means_round_trips():
    data = json.loads(TABLE.read_text())
    rows = [r for r in data["rows"] if r["source"] == "open_clip"]
    built = [r for r in rows if r["status"] != "not built"]
    ok = [r for r in built if r["status"] == "ok"]
    assert len(ok) >= 0.95 * len(built) and len(ok) >= 130
    for r in rows:
        assert r["status"] in ("ok", "failed", "not built"), r
        assert r["status"] == "ok" or r["reason"], r
        if r["status"] == "ok":
            assert r["forward_check"] == "round trip ok" and all(c.get("compressed", 0) > 0 for c in r["towers"].values()), r
    assert {"vision", "text", "multimodal"} == set(next(r for r in rows if r["name"] == "coca_ViT-B-32")["towers"])
    hf = {r["name"].split()[0] for r in data["rows"] if r["source"] == "hf" and r["status"] == "ok"}
    assert {"hf_clip", "hf_siglip", "hf_siglip2", "hf_altclip", "hf_chinese_clip", "hf_blip_itr"} <= hf


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VLMPRESS_FULL_ZOO"), reason="the whole zoo takes ~30 min: set VLMPRESS_FULL_ZOO=1")
def test_every_ok_config_still_round_trips(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for r in _ok_rows():
        row = open_clip_roundtrip(r["name"], tmp_path / r["name"])
        assert row.status == "ok", (r["name"], row.reason)
