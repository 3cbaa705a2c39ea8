"""Checkpoint integrity: hashes verified at load, crash-consistent overwrites, stale temporaries cleaned."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

import toy_adapter  # noqa: F401  (registers the "toy" adapter family)
from toy_adapter import ToyAdapter
import vlmpress.pipeline.checkpoint as ck
from vlmpress.pipeline.checkpoint import load_compressed, save_compressed
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.errors import CheckpointError, ConfigError
from vlmpress.io.atomic_dir import OWNER_MARKER
from child_process import own_progress_lock

pytestmark = pytest.mark.usefixtures("one_thread")


def _compressed(seed: int, ratio: float = 0.5):
    adapter = ToyAdapter.load(f"toy:{seed}")
    report = compress(adapter, CompressionConfig(method="svd", ratio=ratio, device="cpu"))
    return adapter, report


def _state(adapter):
    return {k: v.clone() for k, v in adapter.model.state_dict().items()}


def test_hash_recorded_and_verified(tmp_path):
    adapter, report = _compressed(1)
    out = save_compressed(adapter, tmp_path / "ck", report)
    cfg = json.loads((out / "vlmpress_config.json").read_text())
    assert cfg["file_sha256"]["model.safetensors"] == ck.file_sha256(out / "model.safetensors")
    # one flipped byte inside a tensor's data: safetensors still parses it, the hash does not match
    path = out / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_compressed(out)
    loaded = load_compressed(out, verify=False)  # the opt-out for huge files really skips it
    assert isinstance(loaded, ToyAdapter)


def test_same_model_overwrite_needs_flag(tmp_path):
    adapter, report = _compressed(2)
    out = save_compressed(adapter, tmp_path / "ck", report)
    with pytest.raises(ConfigError, match="same model.*--overwrite"):
        save_compressed(adapter, out, report)
    assert save_compressed(adapter, out, report, overwrite=True) == out


def test_overwrite_exchanges_directories_atomically(tmp_path):
    a, rep_a = _compressed(3, 0.5)
    b, rep_b = _compressed(3, 0.7)
    out = save_compressed(a, tmp_path / "ck", rep_a)
    save_compressed(b, out, rep_b, overwrite=True)
    assert json.loads((out / "vlmpress_config.json").read_text())["ratio"] == 0.7
    assert not (out / OWNER_MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the old copy is gone, no temporaries


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path):
    """Only marked temporaries of dead processes go; look-alike user folders are never touched."""
    adapter, report = _compressed(4)
    out = tmp_path / "ck"
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    stale = tmp_path / f".ck.vlmpress-{dead.pid}.abc.tmp"
    look_alike = tmp_path / f".ck.vlmpress-{dead.pid}.xyz.tmp"  # same pattern, no marker: a user's folder
    live = tmp_path / f".ck.vlmpress-{os.getpid()}.def.tmp"  # a save in progress elsewhere: kept
    legacy_tmp = tmp_path / ".ck.k2j3x9ab.tmp"  # earlier releases' names: can't be told from a user's
    legacy_old = tmp_path / ".ck.old"
    neighbour = tmp_path / ".ck.v2.vlmpress-1.abc.tmp"  # another checkpoint's temporary: not ours
    for d in (stale, look_alike, live, legacy_tmp, legacy_old, neighbour):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    for d in (stale, live, neighbour):
        (d / OWNER_MARKER).write_text("x")
    unmarked_empty = tmp_path / f".ck.vlmpress-{dead.pid}.e1m2.tmp"  # killed between mkdtemp and marking
    unmarked_empty.mkdir()
    save_compressed(adapter, out, report)
    assert not stale.exists() and not unmarked_empty.exists()
    assert all(d.exists() for d in (look_alike, live, legacy_tmp, legacy_old, neighbour))
    assert not (out / OWNER_MARKER).exists()  # the marker never stays in the saved checkpoint


def test_backup_of_a_killed_two_rename_swap_is_restored(tmp_path):
    adapter, report = _compressed(4)
    out = save_compressed(adapter, tmp_path / "ck", report)
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    backup = tmp_path / f".ck.vlmpress-{dead.pid}.q1w2e3.old"
    os.replace(out, backup)  # killed after the first rename: only the backup holds the checkpoint
    assert ck.clean_stale_temporaries(out) == [] and out.is_dir() and not backup.exists()
    load_compressed(out)


def _save_forever(out: str, seed: int, ready) -> None:  # runs in a forked child until killed
    own_progress_lock()
    torch.set_num_threads(1)
    ratios = [0.3, 0.5, 0.7]
    models = [_compressed(seed, r) for r in ratios]
    ready.set()  # the kill clock starts at the first save, however long building the models took
    i = 0
    while True:
        adapter, report = models[i % len(models)]
        save_compressed(adapter, out, report, overwrite=True)
        i += 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_during_save_never_loses_the_checkpoint(tmp_path):
    """SIGKILL a process that keeps overwriting the checkpoint, at random instants, many times:
    the path always loads (hashes verified) and the next save leaves no orphan behind."""
    out = tmp_path / "ck"
    adapter, report = _compressed(5, 0.5)
    save_compressed(adapter, out, report)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    if not ck.exchange_paths(out, out):  # exchanging a path with itself is a no-op where supported
        pytest.skip("the file system does not support atomic directory exchange")
    rng = random.Random(0)
    ctx = multiprocessing.get_context("fork")
    seen_ratios, kills = set(), 25
    for _ in range(kills):
        ready = ctx.Event()
        child = ctx.Process(target=_save_forever, args=(str(out), 5, ready))
        child.start()
        assert ready.wait(120), "the saving process never got ready"
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert out.is_dir(), "the checkpoint path vanished"
        loaded = load_compressed(out)  # verifies every file hash
        seen_ratios.add(loaded.checkpoint_config["ratio"])
    assert len(seen_ratios) >= 2, "the kills never hit after a completed overwrite"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("ck", "probe")]
    print(f"{kills} kills: ratios seen {sorted(seen_ratios)}, {len(leftovers)} temporaries left by killed saves")
    save_compressed(adapter, out, report, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "probe"], f"orphans after the next save: {leftovers}"
    load_compressed(out)
