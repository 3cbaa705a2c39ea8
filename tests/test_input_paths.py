"""Input paths whose right outcome is a documented success: link loops in eval folders, calibration
split files for folders, crafted or stale --cache-dir files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import toy_adapter  # noqa: F401  (registers the "toy" adapter family)
from toy_adapter import ToyAdapter
from vlmpress.cli import main
from vlmpress.commands.evaluate import _cache_path
from vlmpress.data.datasets import build_dataset
from vlmpress.errors import DatasetError
from vlmpress.evaluation.zeroshot import preprocess_fingerprint
from vlmpress.pipeline.checkpoint import save_compressed
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(root: Path, per_class: int = 3) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 100 if cls == "cat" else 10, 200)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    adapter = ToyAdapter.load("toy:5")
    report = compress(adapter, CompressionConfig(method="svd", ratio=0.5, device="cpu"))
    return save_compressed(adapter, tmp_path_factory.mktemp("ck") / "ckpt", report)


def test_symlink_loop_in_an_eval_folder_counts_each_file_once(tmp_path):
    folder = _images(tmp_path / "imgs")
    (folder / "cat" / "loop").symlink_to(folder / "cat")  # cat/loop/loop/loop/... forever
    (folder / "dog" / "up").symlink_to(folder)  # dog/up/cat/... would relabel cats as dogs
    with pytest.raises(DatasetError, match="reachable under two classes"):
        build_dataset(f"imagefolder:{folder}", "test", test_fraction=0.5)
    (folder / "dog" / "up").unlink()
    (folder / "dog" / "again").symlink_to(folder / "dog")
    ds = build_dataset(f"imagefolder:{folder}", "test", test_fraction=0.5)
    train = build_dataset(f"imagefolder:{folder}", "train", test_fraction=0.5)
    samples = ds.samples + train.samples
    assert len(samples) == 6
    assert sorted((s.path.parent.name if s.path.parent.name in ("cat", "dog") else "?", s.label) for s in samples) == [
        ("cat", 0)] * 3 + [("dog", 1)] * 3


def test_calib_split_file_is_honoured_for_folders(tmp_path):
    folder = _images(tmp_path / "imgs")
    split = tmp_path / "test.txt"
    split.write_text("cat/0.png\ndog/2.png\n")
    out = tmp_path / "ck"
    assert main(["compress", "--model", "toy:3", "--calib-images", str(folder), "--calib-split-file", str(split),
                 "--out", str(out), "--eps", "0.6", "--als-iters", "1", "-q"]) == 0
    calib = json.loads((out / "compression_report.json").read_text())["summary"]["calibration"]
    assert calib["n_images"] == 4, calib
    assert "2 test images of test.txt excluded" in json.dumps(calib)


def _eval(ckpt, folder, out, cache):
    assert main(["eval", "--model", str(ckpt), "--datasets", f"imagefolder:{folder}", "--out", str(out), "--no-progress",
                 "--device", "cpu", "--cache-dir", str(cache), "--test-fraction", "0.5"]) == 0
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()][-1]


def test_crafted_cache_files_are_rebuilt_not_trusted(toy_ckpt, tmp_path, caplog):
    folder = _images(tmp_path / "imgs")
    cache = tmp_path / "cache"
    reference = _eval(toy_ckpt, folder, tmp_path / "r0", tmp_path / "other-cache")
    ds = build_dataset(f"imagefolder:{folder}", "test", test_fraction=0.5)
    from vlmpress.pipeline.checkpoint import load_compressed

    path = _cache_path(cache, ds, preprocess_fingerprint(load_compressed(toy_ckpt).preprocess))
    path.parent.mkdir(parents=True)
    crafted = [
        {"format": 1, "evil": True},
        {"format": 1, "pixels": torch.zeros(len(ds), 5, 12), "labels": torch.zeros(len(ds), dtype=torch.int64), "preprocess_id": "x",
         "dataset": ds.name, "split_id": ds.split_id, "classnames": list(ds.classnames), "templates": [], "split_detail": {}},
        {"format": 1, "pixels": torch.zeros(len(ds), 1, 5, 12), "labels": torch.full((len(ds),), 7, dtype=torch.int64), "preprocess_id": "x",
         "dataset": ds.name, "split_id": ds.split_id, "classnames": list(ds.classnames), "templates": [], "split_detail": {}},
    ]
    for i, data in enumerate(crafted):
        torch.save(data, path)
        result = _eval(toy_ckpt, folder, tmp_path / f"r{i + 1}", cache)
        assert result["metrics"] == reference["metrics"] and result["n_images"] == reference["n_images"]
    assert "is invalid" in caplog.text
    path.write_bytes(b"not a torch file")
    assert _eval(toy_ckpt, folder, tmp_path / "r9", cache)["metrics"] == reference["metrics"]


def test_images_changed_in_place_get_a_new_cache(toy_ckpt, tmp_path):
    folder = _images(tmp_path / "imgs")
    cache = tmp_path / "cache"
    _eval(toy_ckpt, folder, tmp_path / "r1", cache)
    assert len(list(cache.iterdir())) == 1
    for p in folder.rglob("*.png"):  # same names, new content
        Image.new("RGB", (8, 8), (255, 0, 0)).save(p)
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    after = _eval(toy_ckpt, folder, tmp_path / "r2", cache)
    fresh = _eval(toy_ckpt, folder, tmp_path / "r3", tmp_path / "fresh-cache")
    assert len(list(cache.iterdir())) == 2  # keyed by content, the stale pixels are not reused
    assert after["metrics"] == fresh["metrics"]
