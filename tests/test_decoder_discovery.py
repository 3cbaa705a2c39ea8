"""Structural decoder discovery (no model-name table) on tiny transformers families built in memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmpress.adapters.decoder_discovery import (
    bidirectional_reason,
    block_linears,
    config_layer_count,
    find_block_list,
    has_own_forward,
    linear_kind,
)
from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
from vlmpress.census.tiny_configs import shrink_config_dict, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str):
    from transformers import AutoModelForCausalLM

    config, _ = tiny_config(family)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _kinds(model) -> dict[str, str]:
    blocks = find_block_list(model, model.config)
    prefix, block = blocks.blocks[0]
    return {rel: kind for rel, _, kind in block_linears(block)}


def test_dense_gqa_decoder_blocks_and_kinds():
    model = _model("qwen3")
    blocks = find_block_list(model, model.config)
    assert blocks.path == "model.layers" and len(blocks.blocks) == config_layer_count(model.config) == 2
    assert blocks.homogeneous
    kinds = _kinds(model)
    assert kinds == {
        "self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn", "self_attn.o_proj": "attn",
        "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "mlp",
    }


def test_mla_parallel_and_packed_attention_kinds():
    mla = _kinds(_model("deepseek_v3"))  # layer 0 is dense (first_k_dense_replace=1)
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert mla[f"self_attn.{name}"] == "attn", name
    falcon = _kinds(_model("falcon"))  # parallel attention + MLP, packed query_key_value
    assert falcon["self_attention.query_key_value"] == "attn" and falcon["mlp.dense_h_to_4h"] == "mlp"
    gptj = _kinds(_model("gptj"))
    assert gptj["attn.q_proj"] == "attn" and gptj["mlp.fc_in"] == "mlp" and gptj["mlp.fc_out"] == "mlp"


def test_hybrid_ssm_stack_is_one_list_with_ssm_projections_as_other():
    model = _model("jamba")
    blocks = find_block_list(model, model.config)
    assert blocks.path == "model.layers" and not blocks.homogeneous  # a Mamba layer and an attention layer
    kinds = {rel: kind for _, b in blocks.blocks for rel, _, kind in block_linears(b)}
    assert kinds["mamba.in_proj"] == kinds["mamba.out_proj"] == kinds["mamba.x_proj"] == "other"
    assert kinds["self_attn.q_proj"] == "attn"
    # Mamba's slow path reads dt_proj.weight functionally: a probe forward finds it is no target
    adapter = HFCausalLMAdapter(model, "hf:tiny-jamba")
    names = {t.name for t in adapter.target_layers()}
    assert "model.layers.0.mamba.in_proj" in names and "model.layers.0.mamba.dt_proj" not in names


def test_cross_attention_routers_and_tied_heads_are_not_targets():
    bart = _kinds(_model("bart"))  # BartForCausalLM: the decoder alone, its encoder_attn never runs
    assert not any("encoder_attn" in rel for rel in bart) and bart["self_attn.q_proj"] == "attn" and bart["fc1"] == "mlp"
    llama4 = _model("llama4_text")  # its router is an nn.Linear subclass returning (scores, logits)
    routers = [m for m in llama4.modules() if isinstance(m, nn.Linear) and has_own_forward(m)]
    assert routers and not any(has_own_forward(m) for _, m, _ in block_linears(find_block_list(llama4).blocks[1][1]))
    gpt2 = HFCausalLMAdapter(_model("gpt2"), "hf:tiny-gpt2")  # tied head: not a candidate
    assert not any(t.kind == "head" for t in gpt2.target_layers())


def test_state_space_rule_and_kind_fallback():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.A_log = nn.Parameter(torch.zeros(4))
            self.in_proj = nn.Linear(4, 8)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = Mixer()
            self.fc1 = nn.Linear(4, 8)
            self.proj = nn.Linear(8, 4)

    block = Block()
    assert linear_kind(block, "mixer.in_proj") == "other"
    assert linear_kind(block, "fc1") == "mlp" and linear_kind(block, "proj") == "other"


def test_block_list_prefers_the_configured_layer_count():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.ModuleList(Block() for _ in range(5))
            self.layers = nn.ModuleList(Block() for _ in range(3))

    assert find_block_list(Model(), {"num_hidden_layers": 3}).path == "layers"
    assert find_block_list(Model(), {}).path == "big"  # no count: the largest list
    assert find_block_list(nn.Sequential(nn.Linear(2, 2))) is None


def test_masked_lm_configs_are_refused_unless_decoders():
    assert "is_decoder=true" in bidirectional_reason({"model_type": "bert", "is_decoder": False})
    assert bidirectional_reason({"model_type": "bert", "is_decoder": True}) is None
    assert bidirectional_reason({"model_type": "bart", "is_decoder": False, "is_encoder_decoder": True}) is None
    assert bidirectional_reason({"model_type": "llama"}) is None


def test_shrinking_keeps_one_layer_of_each_type_and_gqa():
    values = {
        "hidden_size": 4096, "num_hidden_layers": 6, "num_attention_heads": 32, "num_key_value_heads": 8,
        "layer_types": ["sliding", "sliding", "sliding", "full", "sliding", "full"], "vocab_size": 32000,
        "eos_token_id": 31999, "per_layer": {"3": {"x": 1}},
    }
    out = shrink_config_dict(values)
    assert out["hidden_size"] == 64 and out["num_attention_heads"] == 4 and out["num_key_value_heads"] == 2
    assert out["layer_types"] == ["sliding", "full"] and out["num_hidden_layers"] == 2
    assert out["vocab_size"] == 256 and out["eos_token_id"] < 256 and out["per_layer"] == {1: {"x": 1}}
    assert shrink_config_dict({"num_attention_heads": 8, "num_key_value_heads": 1})["num_key_value_heads"] == 1  # MQA kept
