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


def test_moe_reference_lm_trains_and_its_routing_is_recorded(tmp_path):
    """The MoE variant (configs/reference/lm-moe.json's fields, tiny): a Mixtral that learns, whose
    experts are split for compression and whose top-k routing is read and compared."""
    from vlmpress.evaluation.routing import routing_change, routing_decisions

    corpus = Corpus(TINY_TEXT * 30, TINY_TEXT * 3, {"source": "test text"})
    cfg = ReferenceLMConfig(
        vocab_size=300, hidden_size=32, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
        seq_len=32, batch_size=4, steps=30, lr=5e-3, warmup=4, threads=1, num_experts=4, experts_per_token=2,
    )
    summary = train_reference_lm(tmp_path / "lm", cfg, corpus)
    assert summary["final_train_loss"] < summary["first_train_loss"] - 1.0
    adapter = HFCausalLMAdapter.load(f"hf:{tmp_path / 'lm' / 'model'}")
    assert adapter.model.config.model_type == "mixtral" and adapter.model.config.num_experts_per_tok == 2
    adapter.prepare_for_compression()
    ids = torch.randint(3, 290, (3, 16), generator=torch.Generator().manual_seed(0))
    before = routing_decisions(adapter.model, [ids])
    assert len(before) == 2 and all(v.shape == (48, 2) for v in before.values())
    assert routing_change(before, routing_decisions(adapter.model, [ids]))["changed_fraction"] == 0.0
    gate = adapter.model.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.weight[0] += 3 * gate.weight.abs().max()  # pushes tokens towards expert 0 in block 1
    after = routing_decisions(adapter.model, [ids])
    change = routing_change(before, after)
    name = "model.layers.1.mlp.experts"
    expected = (before[name] != after[name]).any(-1).float().mean().item()
    assert change["per_layer"][name] == expected > 0 and change["per_layer"]["model.layers.0.mlp.experts"] == 0.0
    assert change["changed_fraction"] == expected / 2


def test_reference_lm_config_file_is_valid():
    from vlmpress.io.resources import project_root

    cfg = ReferenceLMConfig.from_json(project_root() / "configs" / "reference" / "lm-moe.json")
    assert cfg.num_experts in range(4, 9) and cfg.experts_per_token == 2
