"""Resume state is as safe as a checkpoint: changed inputs, lost manifests and tampered blocks are refused
(exit 2, one line), and the state survives until the final checkpoint is written and verified."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmpress.pipeline.checkpoint as ck
from vlmpress.cli import main
from vlmpress.pipeline.sequential_state import MANIFEST, SequentialState, state_dir_for
from vlmpress.reference.lm import TINY_TEXT, save_tiny_causal_lm
from test_resume import _argv, _killed_after

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A model, its calibration text and the state of a run killed after 2 of 4 blocks."""
    root = tmp_path_factory.mktemp("resume_safety")
    (root / "calib.txt").write_text(TINY_TEXT)
    model = save_tiny_causal_lm(root / "llama", "llama", seed=4, layers=4)
    out = root / "ck"
    child = multiprocessing.get_context("fork").Process(target=_killed_after, args=(2, _argv(model, root / "calib.txt", out, "compressed")))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    return root, model, state_dir_for(out)


@pytest.fixture()
def case(interrupted, tmp_path):
    """A private copy of the interrupted state, for an output in ``tmp_path`` (same model and text paths)."""
    root, model, state = interrupted
    out = tmp_path / "ck"
    shutil.copytree(state, state_dir_for(out))
    return root, model, out, state_dir_for(out)


def _run(root, model, out, *extra):
    return main(_argv(model, root / "calib.txt", out, "compressed", "--resume", *extra))


def _one_line(capsys, expect):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err


def _rehash(state, index):
    from vlmpress.pipeline.sequential_state import _sha256

    manifest = json.loads((state / MANIFEST).read_text())
    manifest["blocks"][str(index)] = {"weights_sha256": _sha256(state / f"block-{index:04d}.safetensors"),
                                      "meta_sha256": _sha256(state / f"block-{index:04d}.json")}
    (state / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture()
def restore(interrupted):
    """Undo in-place edits of the shared model / calibration files after a test."""
    root, model, _ = interrupted
    files = [root / "calib.txt", model / "model.safetensors"]
    saved = {f: f.read_bytes() for f in files}
    stats = {f: f.stat() for f in files}
    yield
    for f, data in saved.items():
        f.write_bytes(data)
        os.utime(f, ns=(stats[f].st_atime_ns, stats[f].st_mtime_ns))


def test_changed_model_weights_at_the_same_path_are_refused(case, restore, capsys):
    root, model, out, state = case
    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k in weights if k.endswith("mlp.up_proj.weight"))
    weights[key] = weights[key] * 1.01
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert _run(root, model, out) == 2
    _one_line(capsys, "the content of model changed")
    assert state.is_dir()


def test_changed_calibration_text_at_the_same_path_is_refused(case, restore, capsys):
    root, model, out, state = case
    (root / "calib.txt").write_text(TINY_TEXT.replace("the", "a"))
    assert _run(root, model, out) == 2
    _one_line(capsys, "the content of calib_text changed")


@pytest.mark.parametrize("eps", ["0.5", "0.3"])
def test_missing_manifest_refuses_to_reuse_blocks(case, capsys, eps):
    root, model, out, state = case
    (state / MANIFEST).unlink()
    assert _run(root, model, out, "--eps", eps) == 2
    _one_line(capsys, "no readable manifest.json")
    assert main(_argv(model, root / "calib.txt", out, "compressed", "--eps", eps)) == 2  # nor without --resume


@pytest.mark.parametrize("content, expect", [
    ("[1, 2]", "not a vlmpress run manifest"),
    ("{garbage", "not valid JSON"),
    ('{"fingerprint": "x", "blocks": {"0": {"weights_sha256": 5}}}', "malformed block list"),
    (b"\xff\xfe", "not valid UTF-8"),
])
def test_corrupt_manifest_is_one_line(case, capsys, content, expect):
    root, model, out, state = case
    (state / MANIFEST).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert _run(root, model, out) == 2
    _one_line(capsys, expect)


def test_flipped_block_byte_is_refused(case, capsys):
    root, model, out, state = case
    path = state / "block-0001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert _run(root, model, out) == 2
    _one_line(capsys, "does not match the SHA-256 in the manifest")


def _edit_block(state, index, edit):
    path = state / f"block-{index:04d}.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    _rehash(state, index)  # the attacker (or a buggy tool) fixes the manifest too


@pytest.mark.parametrize("edit, expect", [
    (lambda t: t.__setitem__(next(k for k in t if k.endswith(".A")), torch.full_like(t[next(k for k in t if k.endswith(".A"))], float("nan"))), "NaN/inf"),
    (lambda t: t.__setitem__(next(k for k in t if k.endswith(".A")), torch.zeros(3, 3)), "factors of shape"),
    (lambda t: t.__setitem__(next(k for k in t if k.endswith(".A")), torch.ones(2, 2, dtype=torch.int32)), "not floating point"),
    (lambda t: t.__setitem__("model.layers.3.mlp.up_proj.A", torch.zeros(2, 2)), "tensors of other layers"),
])
def test_tampered_block_tensors_are_refused_before_use(case, capsys, edit, expect):
    root, model, out, state = case
    _edit_block(state, 0, edit)
    assert _run(root, model, out) == 2
    _one_line(capsys, expect)


@pytest.mark.parametrize("meta, expect", [
    ("{garbage", "not valid JSON"),
    ('{"reports": [{"name": "x"}]}', "not a block record"),
    ('{"reports": [], "reports": []}', "appears twice"),
])
def test_garbage_block_record_is_refused(case, capsys, meta, expect):
    root, model, out, state = case
    (state / "block-0000.json").write_text(meta)
    _rehash(state, 0)
    assert _run(root, model, out) == 2
    _one_line(capsys, expect)


def test_state_survives_a_failed_final_save(case, monkeypatch, capsys):
    root, model, out, state = case

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "save_model", full)
    assert _run(root, model, out) == 2
    _one_line(capsys, "could not write the checkpoint")
    assert state.is_dir() and len(SequentialState(state, "").done_blocks()) == 4  # all blocks kept
    monkeypatch.undo()
    assert _run(root, model, out) == 0  # resumes from the kept state, no recompression
    assert not state.exists() and ck.load_compressed(out)
