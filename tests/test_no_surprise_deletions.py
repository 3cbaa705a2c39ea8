"""No surprise deletions or lost records: what --overwrite may replace, failed saves, JSONL appends."""

from __future__ import annotations

import errno
import json
import os

import pytest

import toy_adapter  # noqa: F401  (registers the "toy" adapter family)
from toy_adapter import ToyAdapter
import vlmpress.pipeline.checkpoint as ck
from vlmpress.cli import main
from vlmpress.errors import ConfigError, OutputError
from vlmpress.evaluation.results import read_records
from vlmpress.io.atomic import append_jsonl
from vlmpress.pipeline.checkpoint import check_export_dir, check_output_dir, export_dense, load_compressed, save_compressed
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.reference.lm import save_tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _compressed(seed=1):
    adapter = ToyAdapter.load(f"toy:{seed}")
    return adapter, compress(adapter, CompressionConfig(method="svd", ratio=0.5, device="cpu"))


def _tree(d):
    return sorted((p.relative_to(d).as_posix(), p.read_bytes()) for p in d.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ --overwrite
def test_overwrite_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path):
    adapter, report = _compressed()
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "chapter1.tex").write_text("precious")
    before = _tree(user)
    with pytest.raises(ConfigError, match="holds no vlmpress checkpoint; --overwrite replaces only"):
        save_compressed(adapter, user, report, overwrite=True)
    assert _tree(user) == before


def test_overwrite_replaces_a_checkpoint_and_an_empty_folder(tmp_path):
    adapter, report = _compressed()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_compressed(adapter, empty, report, overwrite=True) == empty
    assert save_compressed(adapter, empty, report, overwrite=True) == empty  # a checkpoint now
    load_compressed(empty)


@pytest.mark.parametrize("where", ["same", "parent"])
def test_output_is_never_the_input_model(tmp_path, where):
    model = save_tiny_causal_lm(tmp_path / "models" / "llm", "llama", seed=0, layers=1)
    before = _tree(model)
    out = model if where == "same" else model.parent
    with pytest.raises(ConfigError, match="is \\(or contains\\) the input model"):
        check_output_dir(out, f"hf:{model}", overwrite=True)
    code = main(["compress", "--model", f"hf:{model}", "--calib-text", str(model / "config.json"), "--out", str(out),
                 "--overwrite", "--eps", "0.5", "-q"])
    assert code == 2 and _tree(model) == before


def test_export_dense_never_targets_the_checkpoint(tmp_path, capsys):
    adapter, report = _compressed()
    out = save_compressed(adapter, tmp_path / "ck", report)
    before = _tree(out)
    with pytest.raises(ConfigError, match="overlaps --out"):
        check_export_dir(out, out, "toy:1", overwrite=True)
    with pytest.raises(ConfigError, match="overlaps --out"):  # the loaded checkpoint's own directory
        export_dense(load_compressed(out), out, overwrite=True)
    other = save_compressed(adapter, tmp_path / "ck2", report)
    with pytest.raises(ConfigError, match="holds a compressed vlmpress checkpoint"):
        export_dense(adapter, other, overwrite=True)
    code = main(["compress", "--model", "toy:2", "--calib-images", str(tmp_path), "--out", str(out), "--overwrite",
                 "--export-dense", str(out), "--eps", "0.5", "-q"])
    assert code == 2 and "overlaps --out" in capsys.readouterr().err
    assert _tree(out) == before


# ------------------------------------------------------------------------------------------ failed saves
@pytest.mark.parametrize("failure", ["enospc", "safetensors"])
def test_disk_full_during_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, failure):
    from safetensors import SafetensorError

    adapter, report = _compressed()
    out = save_compressed(adapter, tmp_path / "ck", report)
    before = _tree(out)

    def full(*args, **kwargs):
        if failure == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(ck, "save_model", full)
    with pytest.raises(OutputError, match="could not write the checkpoint.*previous checkpoint there is unchanged") as info:
        save_compressed(adapter, out, report, overwrite=True)
    assert "\n" not in str(info.value)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # temporary removed


# ------------------------------------------------------------------------------------------ JSONL
def test_append_after_a_torn_line_never_glues_records(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    append_jsonl(path, {"model": "a", "dataset": "d", "metrics": {"top1": 0.5}})
    with open(path, "a") as f:
        f.write('{"model": "b", "dataset": "d", "metr')  # a crash mid-append (earlier release)
    append_jsonl(path, {"model": "c", "dataset": "d", "metrics": {"top1": 0.7}})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["model"] == "c"
    assert "torn line" in caplog.text
    assert [r.model for r in read_records(path)] == ["a", "c"]


def test_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    append_jsonl(path, {"model": "a"})
    before = path.read_bytes()
    real_write = os.write

    def short_write(fd, data):
        return real_write(fd, data[: len(data) // 2])  # the disk filled up half way

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError, match="short write"):
        append_jsonl(path, {"model": "b", "padding": "x" * 100})
    monkeypatch.undo()
    assert path.read_bytes() == before
    append_jsonl(path, {"model": "c"})
    assert [json.loads(line)["model"] for line in path.read_text().splitlines()] == ["a", "c"]
