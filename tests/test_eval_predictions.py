"""eval --save-predictions (per-image top-k, checkable against the metrics) and quiet checkpoint loading."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from vlmpress.pipeline.checkpoint import load_compressed, save_compressed
from vlmpress.cli import main
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.testing import tiny_open_clip

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (30, 40, 220)}


@pytest.fixture
def checkpoint(tmp_path):
    adapter = tiny_open_clip(seed=1)
    report = compress(adapter, CompressionConfig(method="svd", ratio=0.4, device="cpu"))
    return save_compressed(adapter, tmp_path / "ck", report)


def test_save_predictions_top_k_agree_with_metrics(tmp_path, checkpoint):
    images = tmp_path / "colors"
    for name, rgb in COLORS.items():
        (images / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 12), tuple(max(0, c - 15 * i) for c in rgb)).save(images / name / f"{i}.png")
    out = tmp_path / "res"
    assert main(["eval", "--model", str(checkpoint), "--datasets", f"imagefolder:{images}", "--test-fraction", "0.5",
                 "--templates", "single", "--out", str(out), "--save-predictions", "2", "--no-progress", "--device", "cpu",
                 "-q"]) == 0
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    lines = [json.loads(l) for l in open(rec["predictions_file"])]
    assert len(lines) == rec["n_images"]
    assert all(len(l["top_k"]) == 2 and l["top_k"][0]["score"] >= l["top_k"][1]["score"] for l in lines)
    assert all(l["image"] and l["label_name"] in COLORS for l in lines)
    # the per-image file reproduces the reported accuracy independently
    assert sum(l["correct_top1"] for l in lines) / len(lines) == pytest.approx(rec["metrics"]["top1"])


def test_loading_a_checkpoint_is_quiet(checkpoint, caplog, recwarn):
    """No 'initialized randomly' / model-config INFO noise: the weights are loaded right after."""
    with caplog.at_level(logging.INFO):
        load_compressed(checkpoint)
    noisy = [r.getMessage() for r in caplog.records if not r.name.startswith("vlmpress")]
    assert noisy == []
    assert not [w for w in recwarn if "random" in str(w.message).lower()]
