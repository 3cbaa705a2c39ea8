"""Perplexity (exact sliding-window accounting), LLM evaluation CLI records, lm-eval plumbing, table."""

from __future__ import annotations

import argparse
import json
import math
import sys
import types

import pytest
import torch

from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
from vlmpress.errors import CalibrationError, ConfigError
from vlmpress.evaluation.perplexity import evaluate_perplexity, window_plan
from vlmpress.reference.lm import TINY_TEXT, save_tiny_causal_lm


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    model_dir = save_tiny_causal_lm(root / "llama", "llama", seed=3)
    text = root / "text.txt"
    text.write_text(TINY_TEXT[:300])
    return HFCausalLMAdapter.load(f"hf:{model_dir}"), model_dir, text


@pytest.mark.parametrize("n,L,s", [(40, 16, 16), (40, 16, 5), (40, 16, 1), (17, 16, 16), (10, 16, 4), (33, 8, 8)])
def test_window_plan_scores_each_token_once(n, L, s):
    scored = []
    for begin, end, first in window_plan(n, L, s):
        assert end - begin <= L and begin < first <= end
        scored += list(range(first, end))
    assert len(scored) == len(set(scored))
    n_windows = len(window_plan(n, L, s))
    if s == L:  # disjoint windows: every window's first token lacks context
        assert sorted(scored) == [t for t in range(1, n) if t % L != 0]
        assert len(scored) == n - math.ceil(n / L)  # a trailing 1-token window scores nothing
    else:
        assert sorted(scored) == list(range(1, n))


def test_perplexity_equals_hand_computation(tiny):
    adapter, _, text = tiny
    L, s = 16, 6
    res = evaluate_perplexity(adapter, str(text), L, s)
    ids = adapter.tokenizer(text.read_text(), return_tensors="pt")["input_ids"][0]
    assert res["text_tokens"] == ids.numel() and res["seq_len"] == L and res["stride"] == s
    # by hand: token t is predicted from the tokens of its window before it (window starts at k*s)
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.numel(), s):
            end = min(begin + L, ids.numel())
            for t in range(max(prev_end, begin + 1), end):
                logits = adapter.model(input_ids=ids[begin:t].unsqueeze(0)).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, -1)[ids[t]])
                count += 1
            prev_end = end
            if end == ids.numel():
                break
    assert res["n_tokens"] == count == ids.numel() - 1
    assert res["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # Hugging Face's guide (loss-based) with disjoint windows gives the same number
    res2 = evaluate_perplexity(adapter, str(text), L, L)
    nlls, n_tok = [], 0
    with torch.no_grad():
        for begin in range(0, ids.numel(), L):
            window = ids[begin : begin + L].unsqueeze(0)
            if window.shape[1] < 2:
                continue
            loss = adapter.model(input_ids=window, labels=window).loss
            nlls.append(float(loss) * (window.shape[1] - 1))
            n_tok += window.shape[1] - 1
    assert res2["n_tokens"] == n_tok
    assert res2["perplexity"] == pytest.approx(math.exp(sum(nlls) / n_tok), rel=1e-5)


def test_perplexity_errors(tiny, tmp_path):
    adapter, _, text = tiny
    with pytest.raises(ConfigError, match="larger than the model's maximum of 64"):
        evaluate_perplexity(adapter, str(text), 128)
    with pytest.raises(ConfigError, match="stride"):
        evaluate_perplexity(adapter, str(text), 16, 17)
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="empty"):
        evaluate_perplexity(adapter, str(empty), 16)


def _args(model, out, **kw):
    base = dict(model=model, out=str(out), device="cpu", batch_size=1, perplexity=None, seq_len=16, stride=None,
                max_tokens=None, tasks=None, num_fewshot=None, task_limit=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_run_lm_records_base_and_compressed(tiny, tmp_path, capsys):
    import vlmpress
    from vlmpress.commands.evaluate_lm import run_lm

    adapter, model_dir, text = tiny
    out = tmp_path / "results"
    assert run_lm(_args(f"hf:{model_dir}", out, perplexity=str(text), stride=8)) == 0
    _, report = vlmpress.compress_model(
        f"hf:{model_dir}", method="pgsvd", target_reduction=0.3, calib_text=str(text), n_samples=4, seq_len=16,
        device="cpu", als_iters=1,
    )
    ckpt = vlmpress.save_compressed(_, tmp_path / "ckpt", report)
    assert run_lm(_args(str(ckpt), out, perplexity=str(text), stride=8)) == 0
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and len(list(out.glob("*.json"))) == 2
    base, comp = lines
    assert base["method"] == "base" and base["reduction"] == 0.0
    assert comp["method"] == "pgsvd" and comp["reduction"] == pytest.approx(report.targeted_reduction)
    for rec in lines:
        assert rec["seq_len"] == 16 and rec["stride"] == 8 and rec["dataset"] == str(text)
        assert set(rec["metrics"]) == {"perplexity", "nll", "n_tokens"} and "torch" in rec["versions"]
    assert comp["metrics"]["perplexity"] != base["metrics"]["perplexity"]
    assert "stride 8" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_lm(_args(f"hf:{model_dir}", out))


def test_lm_eval_missing_and_present(tiny, tmp_path, monkeypatch):
    from vlmpress.commands.evaluate_lm import run_lm
    from vlmpress.evaluation.lm_tasks import MissingDependencyError, evaluate_lm_tasks

    adapter, model_dir, _ = tiny
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'vlmpress\[llm\]'"):
        run_lm(_args(f"hf:{model_dir}", tmp_path, tasks="arc_easy"))
    seen = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            seen.update(model=pretrained, tokenizer=tokenizer)

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = lambda model, tasks, num_fewshot, limit: {
        "results": {t: {"acc,none": 0.5, "acc_norm,none": 0.625, "acc_stderr,none": 0.01, "alias": t} for t in tasks}
    }
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = FakeHFLM
    for name, mod in (("lm_eval", fake), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, mod)
    res = evaluate_lm_tasks(adapter, ["arc_easy", "piqa"])
    assert seen["model"] is adapter.model and seen["tokenizer"] is adapter.tokenizer  # the in-memory model
    assert res["tasks"] == {"arc_easy": {"acc": 0.5, "acc_norm": 0.625}, "piqa": {"acc": 0.5, "acc_norm": 0.625}}


def test_build_lm_table_layout():
    from vlmpress.evaluation.lm_table import build_lm_table

    def ppl(method, red, value):
        return {"model": "m", "method": method, "reduction": red, "dataset": "wiki", "seq_len": 2048, "stride": 2048,
                "metrics": {"perplexity": value, "nll": math.log(value), "n_tokens": 10}}

    def tasks(method, red, a, b):
        return {"model": "m", "method": method, "reduction": red, "dataset": "arc_easy,piqa", "seq_len": None,
                "stride": None, "metrics": {"tasks": {"arc_easy": {"acc": a, "acc_norm": a}, "piqa": {"acc": b}}}}

    records = [ppl("pgsvd", 0.401, 9.5), ppl("base", 0.0, 5.68), ppl("svd", 0.2, 20000.0), tasks("base", 0.0, 0.7, 0.8),
               ppl("pgsvd", 0.199, 7.1), tasks("pgsvd", 0.199, 0.6, 0.7), ppl("svd_llm", 0.2, 7.9)]
    md, csv_text = build_lm_table(records)
    lines = md.splitlines()
    assert lines[0] == "| Reduction | Method | PPL wiki (L=2048, s=2048) | arc_easy | piqa | Avg |"
    methods = [l.split("|")[2].strip() for l in lines[2:]]
    assert methods == ["Base", "SVD", "SVD-LLM", "PGSVD", "PGSVD"]
    assert "| - | Base | 5.68 | 70.0 | 80.0 | 75.0 |" in md
    assert "| 19.9% | PGSVD | 7.10 | 60.0 | 70.0 | 65.0 |" in md
    assert "| 40.1% | PGSVD | 9.50 |  |  |  |" in md
    assert csv_text.splitlines()[0] == "Reduction,Method,\"PPL wiki (L=2048, s=2048)\",arc_easy,piqa,Avg"


def test_cli_eval_perplexity_then_report_builds_table_1(tiny, tmp_path, capsys):
    from vlmpress.cli import main

    _, model_dir, text = tiny
    out = tmp_path / "res"
    argv = ["eval", "--model", f"hf:{model_dir}", "--perplexity", str(text), "--seq-len", "16", "--out", str(out)]
    assert main(argv) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["report", str(out / "results.jsonl")]) == 0
    table = (out / "table.md").read_text()
    assert "PPL" in table and "L=16, s=16" in table and "Base" in table
    # zero-shot and LM flags do not mix; nothing to evaluate is a one-line error
    capsys.readouterr()
    assert main([*argv, "--datasets", "caltech101"]) == 2
    assert main(["eval", "--model", f"hf:{model_dir}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "separate runs" in err[0] and "nothing to evaluate" in err[1]


def test_write_records_keeps_in_memory_variants_apart(tmp_path):
    from vlmpress.commands.evaluate_lm import write_records

    base = {"model": "hf:/m", "kind": "perplexity", "dataset": "t.txt", "seq_len": 16, "stride": 16, "metrics": {}}
    recs = [dict(base, method="base", reduction=0.0), dict(base, method="svd", reduction=0.2),
            dict(base, method="pgsvd", reduction=0.2), dict(base, method="pgsvd", reduction=0.4)]
    paths = write_records(tmp_path, recs)
    assert len(set(paths)) == 4 and len(list(tmp_path.glob("*.json"))) == 4
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4


def test_lm_table_never_merges_distinct_runs():
    """Same method and level, but another mode / label / checkpoint: separate rows, named apart."""
    from vlmpress.evaluation.lm_table import build_lm_table

    def ppl(model, value, **extra):
        return {"model": model, "method": "pgsvd", "reduction": 0.2, "dataset": "wiki", "seq_len": 64, "stride": 64,
                "metrics": {"perplexity": value}, **extra}

    records = [ppl("runs/a", 7.0, mode="whole"), ppl("runs/b", 7.5, mode="sequential", propagation="original"),
               ppl("runs/c", 7.2, label="PGSVD 1:1.5"), ppl("runs/d", 7.3, mode="whole"),
               ppl("runs/a", 7.05, mode="whole")]  # a re-evaluation of runs/a replaces its cell
    md, _ = build_lm_table(records)
    rows = [l.split("|")[2].strip() + "=" + l.split("|")[3].strip() for l in md.splitlines()[2:]]
    assert sorted(rows) == sorted(["PGSVD [a]=7.05", "PGSVD [d]=7.30", "PGSVD (sequential, original)=7.50", "PGSVD 1:1.5=7.20"])
