"""The reference-LM training script: a few steps on a tiny corpus learn, and the result reloads."""

import pytest
import torch

from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
from vlmpress.evaluation.perplexity import evaluate_perplexity
from vlmpress.reference.lm import TINY_TEXT, Corpus, ReferenceLMConfig, train_reference_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reference_lm_learns_and_reloads_through_the_adapter(tmp_path):
    corpus = Corpus(TINY_TEXT * 30, TINY_TEXT * 3, {"source": "test text"})
    cfg = ReferenceLMConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
        seq_len=32, batch_size=4, steps=40, lr=5e-3, warmup=4, threads=1,
    )
    threads = torch.get_num_threads()
    summary = train_reference_lm(tmp_path / "lm", cfg, corpus)
    assert torch.get_num_threads() == threads  # restored
    assert summary["final_train_loss"] < summary["first_train_loss"] - 1.0
    assert (tmp_path / "lm" / "training.json").is_file() and summary["corpus"]["source"] == "test text"
    adapter = HFCausalLMAdapter.load(f"hf:{tmp_path / 'lm' / 'model'}")
    vocab = adapter.model.config.vocab_size
    ppl = evaluate_perplexity(adapter, str(tmp_path / "lm" / "test.txt"), 32)["perplexity"]
    assert ppl < vocab / 4  # far better than a uniform guess over the vocabulary
