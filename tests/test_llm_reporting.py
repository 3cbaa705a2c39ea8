"""LLM runs: default context capped at the model's positions; results carry label, mode, propagation."""

from __future__ import annotations

import json

import pytest

from vlmpress.cli import main
from vlmpress.reference.lm import TINY_TEXT, save_tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_seq_len_capped_and_results_carry_run_identity(tmp_path, capsys):
    model = save_tiny_causal_lm(tmp_path / "llama", "llama", seed=1, layers=2, max_positions=48)
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT)
    out = tmp_path / "ck"
    # no --seq-len: 2048 would exceed the model's 48 positions, so the default is 48
    assert main(["compress", "--model", f"hf:{model}", "--calib-text", str(text), "--out", str(out), "--mode", "sequential",
                 "--propagate", "original", "--eps", "0.5", "--als-iters", "1", "--n-samples", "2", "--device", "cpu", "-q"]) == 0
    calib = json.loads((out / "compression_report.json").read_text())["summary"]["calibration"]
    assert calib["seq_len"] == 48
    res = tmp_path / "res"
    assert main(["eval", "--model", str(out), "--perplexity", str(text), "--out", str(res), "--label", "seq-orig",
                 "--no-progress", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "perplexity:" not in captured.err  # --no-progress silences the perplexity bar
    rec = json.loads((res / "results.jsonl").read_text().splitlines()[0])
    assert rec["seq_len"] == 48 and rec["label"] == "seq-orig"
    assert rec["mode"] == "sequential" and rec["propagation"] == "original"


def test_plain_svd_reports_activation_error_when_given_data(tmp_path):
    """SVD needs no data; given calibration data, its activation error is measured, like the other methods."""
    import vlmpress

    model = save_tiny_causal_lm(tmp_path / "llama", "llama", seed=4, layers=2)
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT)
    for mode in ("whole", "sequential"):
        adapter, report = vlmpress.compress_model(f"hf:{model}", method="svd", ratio=0.5, calib_text=str(text),
                                                  n_samples=2, seq_len=16, device="cpu", mode=mode)
        errors = [l.act_error for l in report.layers if l.rank is not None]
        assert errors and all(e is not None and 0 < e < 1 for e in errors), mode
    _, data_free = vlmpress.compress_model(f"hf:{model}", method="svd", ratio=0.5, device="cpu")
    assert all(l.act_error is None for l in data_free.layers)  # no data, no claim


def test_one_calibration_window_per_document(tmp_path):
    from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
    from vlmpress.pipeline.config import CompressionConfig
    from vlmpress.data.text_calibration import tokenize_text

    model = save_tiny_causal_lm(tmp_path / "llama", "llama", seed=5, layers=1)
    docs = ["the quick brown fox jumps over the lazy dog " * 3, "a second document about models", "third one here"]
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(docs) + "\n")
    cfg = CompressionConfig(model=f"hf:{model}", calib_text=str(text), n_samples=5, seq_len=12, calib_windows="document", eps=0.5)
    calib = HFCausalLMAdapter.load_calibration(cfg.validate())
    tok = HFCausalLMAdapter._load_tokenizer(str(model))
    expected = [tokenize_text(tok, d.strip())[:12] for d in docs]
    assert len(calib.windows) == 3  # every document once, never more windows than documents
    for window, want in zip(calib.windows, expected):
        assert window.tolist() == want.tolist()  # a document's own prefix: no boundary crossed
    assert calib.describe()["windows"] == "document" and calib.describe()["documents"] == 3


def test_quiet_summary_shows_every_tolerance_and_no_layer_table(tmp_path, capsys):
    model = save_tiny_causal_lm(tmp_path / "llama", "llama", seed=6, layers=2)
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT)
    argv = ["compress", "--model", f"hf:{model}", "--calib-text", str(text), "--eps-attn", "0.3", "--eps-mlp", "0.45",
            "--als-iters", "1", "--n-samples", "2", "--seq-len", "16", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a"), "-q"]) == 0
    quiet = capsys.readouterr().out
    assert "eps attn=0.3000, mlp=0.4500" in quiet  # both tolerances, not just one
    assert "model.layers.0.self_attn.q_proj" not in quiet  # -q: no per-layer table
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    full = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj " in full  # full names, never cut from the left


def test_no_progress_silences_compress_bars(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    model = save_tiny_causal_lm(tmp_path / "llama", "llama", seed=7, layers=1)
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT)
    capsys.readouterr()
    assert main(["compress", "--model", f"hf:{model}", "--calib-text", str(text), "--eps", "0.5", "--als-iters", "1",
                 "--n-samples", "2", "--seq-len", "16", "--device", "cpu", "--out", str(tmp_path / "o"), "-q",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "it/s]" not in err and "layer/s]" not in err and "batch/s]" not in err, err


def test_progress_bars_disabled_overrides_explicit_disable_false(capsys):
    from tqdm.auto import tqdm

    from vlmpress.cli import progress_bars_disabled

    with progress_bars_disabled():
        for _ in tqdm(range(3), desc="forced-off", disable=False):
            pass
    assert "forced-off" not in capsys.readouterr().err
    for _ in tqdm(range(3), desc="back-on", disable=False, mininterval=0):  # restored afterwards
        pass
    assert "back-on" in capsys.readouterr().err
