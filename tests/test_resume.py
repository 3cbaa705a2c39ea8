"""Resumable sequential mode: a run SIGKILLed after N blocks resumes to the identical checkpoint."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from vlmpress.cli import main
from vlmpress.reference.lm import TINY_TEXT, save_tiny_causal_lm
from vlmpress.pipeline.sequential_state import SequentialState, state_dir_for
from child_process import own_progress_lock

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "calib.txt").write_text(TINY_TEXT)
    return save_tiny_causal_lm(root / "llama", "llama", seed=3, layers=4), root / "calib.txt"


def _argv(model, text, out, propagate, *extra):
    return ["compress", "--model", f"hf:{model}", "--calib-text", str(text), "--out", str(out), "--mode", "sequential",
            "--propagate", propagate, "--eps", "0.5", "--als-iters", "2", "--n-samples", "4", "--seq-len", "16",
            "--device", "cpu", "-q", *extra]


def _killed_after(blocks: int, argv: list[str]) -> None:  # forked child: SIGKILL itself once N blocks are saved
    own_progress_lock()
    torch.set_num_threads(1)
    original = SequentialState.save_block

    def save_then_die(self, index, *a, **k):
        original(self, index, *a, **k)
        if index + 1 >= blocks:
            os.kill(os.getpid(), signal.SIGKILL)

    SequentialState.save_block = save_then_die
    main(argv)
    os._exit(0)  # not reached when the kill fires


@pytest.mark.parametrize("propagate", ["compressed", "original"])
def test_killed_sequential_run_resumes_to_identical_checkpoint(llm, tmp_path, propagate):
    model, text = llm
    ref = tmp_path / "uninterrupted"
    assert main(_argv(model, text, ref, propagate)) == 0
    assert not state_dir_for(ref).exists()  # progress removed once the checkpoint is saved

    out = tmp_path / "resumed"
    child = multiprocessing.get_context("fork").Process(target=_killed_after, args=(2, _argv(model, text, out, propagate)))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    state = state_dir_for(out)
    assert not out.exists() and len(SequentialState(state, "").done_blocks()) == 2

    # without --resume the saved progress is not silently thrown away
    assert main(_argv(model, text, out, propagate)) == 2
    # another recipe cannot resume it
    assert main(_argv(model, text, out, propagate, "--resume", "--als-iters", "3")) == 2
    assert main(_argv(model, text, out, propagate, "--resume")) == 0
    assert not state.exists()

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = json.loads((ref / "compression_report.json").read_text())["layers"]
    rb = json.loads((out / "compression_report.json").read_text())["layers"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb)


def test_state_without_finished_blocks_is_not_in_the_way(llm, tmp_path):
    """A run killed before its first block finished left nothing worth keeping: a plain rerun starts over."""
    model, text = llm
    out = tmp_path / "ck"
    state = state_dir_for(out)
    state.mkdir()
    (state / "manifest.json").write_text(json.dumps({"fingerprint": "old", "model_spec": "x", "n_blocks": 4}))
    assert main(_argv(model, text, out, "compressed")) == 0
    assert out.is_dir() and not state.exists()
