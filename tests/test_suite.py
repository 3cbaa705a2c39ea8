"""Benchmark suites: data checked before the model, paths independent of the cwd, per-run reports,
and rows whose tolerances hit a bound flagged in the table and the log."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from PIL import Image

import vlmpress.evaluation.suite as suite_mod
from vlmpress.errors import DatasetError
from vlmpress.evaluation.suite import SuiteConfig, run_suite
from vlmpress.testing import TINY_OPEN_CLIP_SPEC

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (30, 40, 220), "grey": (120, 120, 120)}


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "data" / "colors"
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (16, 16), tuple(max(0, c - 12 * i) for c in rgb)).save(root / name / f"{i}.png")
    return root


def _suite_file(tmp_path, images, **extra):
    data = {
        "name": "t", "model": TINY_OPEN_CLIP_SPEC, "datasets": [f"imagefolder:{images}"], "calib_images": str(images),
        "methods": ["svd", "pgsvd"], "reductions": [0.7], "pgsvd_allocations": ["proportion"],
        "eps_proportion": {"vision": 1.0, "text": 40.0}, "als_iters": 1, "n_images": 8, "n_captions": 8,
        "eval_batch_size": 8, "templates": "single", "device": "cpu", "out": "out",
    }
    data.update(extra)
    (tmp_path / "suites").mkdir(exist_ok=True)
    path = tmp_path / "suites" / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_missing_data_fails_before_the_model_loads(tmp_path, images, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(suite_mod, "load_suite_model", no_model)
    cfg = SuiteConfig.from_yaml(_suite_file(tmp_path, images, datasets=[f"imagefolder:{tmp_path / 'nope'}"]))
    with pytest.raises(DatasetError):
        run_suite(cfg)
    cfg = SuiteConfig.from_yaml(_suite_file(tmp_path, images, split_file="colors/missing.txt", data_root="../data"))
    with pytest.raises(DatasetError, match="split_file"):
        run_suite(cfg)


def test_relative_data_root_resolves_from_the_suite_file(tmp_path, images, monkeypatch):
    monkeypatch.chdir(tmp_path / "data")  # a cwd from which "../data" would be wrong
    cfg = suite_mod.resolve_suite_paths(SuiteConfig.from_yaml(_suite_file(tmp_path, images, data_root="../data")))
    assert cfg.data_root == str((tmp_path / "data").resolve())


def test_suite_saves_reports_and_flags_runs_at_a_bound(tmp_path, images, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    cfg = SuiteConfig.from_yaml(_suite_file(tmp_path, images))
    with caplog.at_level(logging.WARNING):
        result = run_suite(cfg)
    out = tmp_path / "out"
    reports = sorted(p.name for p in (out / "reports").iterdir())
    assert reports == ["pgsvd-proportion-70", "svd-shared-70"]
    rep = json.loads((out / "reports" / "pgsvd-proportion-70" / "compression_report.json").read_text())
    hits = rep["summary"]["bound_hits"]
    assert any("eps_text hit its cap" in h for h in hits)  # 1:40 cannot run as asked
    flagged = json.loads((out / "suite.json").read_text())["flagged"]
    assert flagged and all(f.startswith("PGSVD") for f in flagged)
    assert "PGSVD †" in result.table_markdown and "† PGSVD" in result.table_markdown
    assert "SVD †" not in result.table_markdown.replace("PGSVD †", "")
    assert any("not the requested configuration" in r.getMessage() for r in caplog.records)
