"""Tiny configs derived from a family's default transformers config (no names-to-shapes table).

:func:`shrink_config` walks the default config's fields and shrinks every size it recognises by its
role -- widths to 64, feed-forward widths to 128 (expert widths to 32), 2 layers, 4 heads (keeping
MQA at 1 and GQA at 2 key/value heads), 4 experts with top-2 routing, MLA ranks of 8-32, a 256-token
vocabulary, 128 positions -- and cuts per-layer lists (``layer_types``...) to the kept layers while
keeping one layer of each distinct type (hybrid stacks keep an attention and an SSM layer). Where
the shrunk config does not build, :data:`TINY_OVERRIDES` holds a hand-written correction and the
reason it is needed.
"""

from __future__ import annotations

from typing import Any

HIDDEN = 64
FFN = 128
EXPERT_FFN = 32
LAYERS = 2
HEADS = 4
VOCAB = 256

_RULES: dict[tuple[str, ...], Any] = {
    ("hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "model_dim", "word_embed_proj_dim", "embedding_size",
     "emb_dim", "dim_model", "lru_width"): HIDDEN,
    ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "decoder_ffn_dim", "encoder_ffn_dim", "d_ff",
     "inner_hidden_size", "mlp_dim", "dense_intermediate_size", "hidden_dim", "intermediate_size_mlp",
     "first_dense_intermediate_size", "shared_intermediate_size", "dim_ff"): FFN,
    ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size", "moe_ffn_hidden_size",
     "moe_dim", "expert_dim", "expert_ffn_hidden_size"): EXPERT_FFN,
    ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers"): LAYERS,
    ("num_attention_heads", "n_head", "num_heads", "decoder_attention_heads", "encoder_attention_heads", "n_heads"): HEADS,
    ("head_dim", "attention_head_dim", "kv_channels", "dim_head", "d_head", "mamba_d_head", "linear_head_dim", "swa_head_dim",
     "pronunciation_embed_dim", "shape_embed_dim"): HIDDEN // HEADS,
    ("rotary_dim",): 8,
    ("pronunciation_vocab_size", "shape_vocab_size"): 64,
    ("decoder_vocab_size", "unpadded_vocab_size", "encoder_hash_byte_group_vocab"): VOCAB,
    ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"): 4,
    ("n_group", "topk_group", "num_expert_group", "topk_groups"): 1,
    ("kv_lora_rank",): 16,
    ("q_lora_rank",): 32,
    ("qk_rope_head_dim", "qk_nope_head_dim"): 8,
    ("v_head_dim", "qk_head_dim"): 16,
    ("mamba_d_state", "state_size", "ssm_state_size", "d_state"): 8,
    ("mamba_dt_rank", "time_step_rank", "dt_rank"): 8,
    ("vocab_size",): VOCAB,
}
_CAPS = {
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_seq_len": 128,
    "sliding_window": 16, "num_experts_per_tok": 2, "moe_topk": 2, "attention_chunk_size": 16,
    "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "attention_window_size": 16,
    "sliding_window_size": 16, "local_attention_window_len": 16, "zero_expert_num": 1,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "decoder_start_token_id")
_KV_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")

#: model_type -> (field overrides applied after shrinking, why the generic rules need them)
TINY_OVERRIDES: dict[str, tuple[dict[str, Any], str]] = {
    "jamba": ({"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
              "attention/expert layer periods (8, 2) exceed 2 layers"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kept_layers(types: list, n: int) -> list[int]:
    """Indices of ``n`` (or more, up to 4) layers covering every distinct entry of a per-layer list."""
    firsts: list[int] = []
    seen = []
    for i, t in enumerate(types):
        key = repr(t)
        if key not in seen:
            seen.append(key)
            firsts.append(i)
    keep = sorted(firsts[:4])
    for i in range(len(types)):
        if len(keep) >= n:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def shrink_config_dict(values: dict[str, Any]) -> dict[str, Any]:
    """The shrunk copy of a config's ``to_dict()`` (rules of the module docstring)."""
    out = dict(values)
    heads = next((values[k] for k in _RULES_KEYS["heads"] if _is_int(values.get(k))), None)
    n_layers = next((values[k] for k in _RULES_KEYS["layers"] if _is_int(values.get(k))), None)
    for keys, size in _RULES.items():
        for key in keys:
            if _is_int(values.get(key)) and values[key] > 0:
                out[key] = min(values[key], size) if key not in ("vocab_size",) else size
    for key, cap in _CAPS.items():
        if _is_int(values.get(key)) and values[key] > cap:
            out[key] = cap
    for key in _KV_KEYS:
        kv = values.get(key)
        if _is_int(kv) and kv > 0:
            out[key] = 1 if kv == 1 else HEADS if heads is not None and kv >= heads else 2
    for key in _TOKEN_IDS:
        token = values.get(key)
        if _is_int(token) and token >= VOCAB:
            out[key] = {"pad_token_id": 0, "bos_token_id": 1}.get(key, 2)
        elif isinstance(token, list):
            out[key] = [t if not _is_int(t) or t < VOCAB else 2 for t in token]
    if values.get("head_dim", 0) is None and heads is not None:
        out["head_dim"] = HIDDEN // HEADS
    for key in _KV_KEYS[:1]:
        if key in values and values[key] is None and heads is not None:
            out[key] = HEADS
    # SSM heads must tile the expanded width: n_heads * head_dim == expand * hidden
    for n_key, d_key, e_key in (("num_heads", "head_dim", "expand"), ("mamba_n_heads", "mamba_d_head", "mamba_expand")):
        if all(_is_int(out.get(k)) for k in (n_key, d_key)) and isinstance(out.get(e_key), (int, float)):
            out[n_key] = max(1, int(out[e_key] * HIDDEN) // out[d_key])
            if _is_int(out.get("mamba_d_ssm")):
                out["mamba_d_ssm"] = out[n_key] * out[d_key]
    if n_layers is not None:
        lists = {k: v for k, v in values.items() if isinstance(v, list) and len(v) == n_layers and n_layers > 1}
        pattern = next((v for k, v in lists.items() if "type" in k or "pattern" in k), None)
        keep = _kept_layers(pattern, LAYERS) if pattern else list(range(min(LAYERS, n_layers)))
        for k, v in lists.items():
            out[k] = [v[i] for i in keep]
        for k, v in values.items():  # per-layer dicts keyed by layer index
            if isinstance(v, dict) and v and all(str(i).isdigit() and int(i) < n_layers for i in v):
                old = {int(i): x for i, x in v.items()}
                out[k] = {new: old[i] for new, i in enumerate(keep) if i in old}
        for key in _RULES_KEYS["layers"]:
            if _is_int(values.get(key)):
                out[key] = len(keep)
    if _is_int(values.get("qk_rope_head_dim")) and _is_int(values.get("head_dim")):
        out["head_dim"] = out["qk_rope_head_dim"]  # MLA: rotary embeddings are sized by head_dim
    if "is_decoder" in values and not values.get("is_encoder_decoder"):
        out["is_decoder"] = True  # masked-LM families are causal LMs only as decoders
    out.pop("_name_or_path", None)
    return out


_RULES_KEYS = {
    "heads": ("num_attention_heads", "n_head", "num_heads", "decoder_attention_heads", "n_heads"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"),
}


def tiny_config(model_type: str):
    """(config, note): the family's default config shrunk, with its override note ('' when none).

    Raises whatever transformers raises when the shrunk values do not form a valid config.
    """
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    values = shrink_config_dict(cls().to_dict())
    override, note = TINY_OVERRIDES.get(model_type, ({}, ""))
    values.update(override)
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    return cls(**values), note


__all__ = ["TINY_OVERRIDES", "shrink_config_dict", "tiny_config"]
