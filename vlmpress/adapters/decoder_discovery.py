"""Decoder structure from the module tree: the block list of a causal LM and the kind of every linear.

No table of model names: every rule reads the modules and the config.

Block list
    The decoder blocks are the ``nn.ModuleList`` whose elements are blocks (modules holding linear
    layers or fused expert weights), taken outermost (a list inside a block, such as an old-style
    expert list, is part of that block), preferring, in order: a length equal to the config's layer
    count (``num_hidden_layers``, ``n_layer``, ``num_layers``; a nested ``text_config`` too), the
    most parameters, the greatest length. Hybrid stacks (attention and Mamba layers of different
    classes in one list) are one list.

Kinds (per linear, relative to its block; the first rule that decides wins)
    0. a per-expert layer of a split MoE experts module (:mod:`vlmpress.adapters.routed_experts`)
       -> ``expert_gate_up`` / ``expert_up`` / ``expert_down`` (routed: calibrated on its own tokens);
    1. a module on the path that is a state-space / recurrent mixer -- it owns an ``A_log``/``dt_bias``
       parameter or a depthwise ``Conv1d`` (Mamba, Jamba, Granite-hybrid, gated delta nets) -> ``other``;
    2. a module on the path whose class or attribute name says attention (``...Attention``,
       ``self_attn``, ``attn``) -> ``attn`` (q/k/v/o, packed ``query_key_value``, DeepSeek MLA's
       ``q_a_proj``/``q_b_proj``/``kv_a_proj_with_mqa``/``kv_b_proj``);
    3. a module whose class or name says feed-forward (``...MLP``, ``FeedForward``, ``...Moe...``,
       ``experts``, ``shared_expert``) -> ``mlp``;
    4. otherwise the path's component names (:func:`vlmpress.adapters.discovery.layer_kind`:
       ``fc1``, ``intermediate``, ``output`` -> ``mlp``; ``q``, ``query`` -> ``attn``), else ``other``.

Layers a probe forward (a few tokens) does not call as modules -- their weight is read functionally,
as Mamba's slow path reads ``dt_proj.weight`` -- are not targets either (:func:`uncalled_layers`),
except under a ``ModuleList`` inside a block (routed experts a short probe may simply not reach).
Cross-attention (``encoder_attn``, ``crossattention``) is only called with encoder states, which a
causal LM's forward never has, so its linears are not targets. Routers in transformers 5 are not
``nn.Linear`` (``MixtralTopKRouter`` holds a bare weight) or are ``nn.Linear`` subclasses with their own
``forward`` (Llama 4, PhiMoE: :func:`has_own_forward`), and stay dense.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmpress.adapters.discovery import is_linear_like, layer_kind
from vlmpress.adapters.routed_experts import RoutedExperts

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
_ATTN_CLASS = re.compile(r"attention|attn", re.I)
_ATTN_NAME = re.compile(r"^(self_attn|self_attention|attn|attention|mixer_attn|sa)$", re.I)
_MLP_CLASS = re.compile(r"mlp|feedforward|ffn|moe|expert|swiglu", re.I)
_MLP_NAME = re.compile(r"^(mlp|ffn|feed_forward|moe|experts|shared_experts?|block_sparse_moe|ff|fc)$", re.I)
_CROSS_NAME = re.compile(r"cross_?att|encoder_attn|^crossattention$", re.I)
_SSM_PARAMS = ("A_log", "dt_bias", "A", "time_decay")


def config_layer_count(config: Any) -> int | None:
    """The decoder layer count a transformers config declares (a nested ``text_config`` too)."""
    for source in (config, getattr(config, "text_config", None)):
        if source is None:
            continue
        for key in _LAYER_COUNT_KEYS:
            value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _holds_weights(module: nn.Module) -> bool:
    """A block: not itself a linear, and holding a linear or a weight of 2+ dimensions below it."""
    if is_linear_like(module):
        return False
    return any(is_linear_like(m) for m in module.modules()) or any(p.dim() >= 2 for p in module.parameters())


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class BlockList:
    """Where the decoder blocks are: the dotted path of the list and its elements in order."""

    path: str
    blocks: list[tuple[str, nn.Module]]
    homogeneous: bool  # every block of one class (False for hybrid attention/SSM stacks)


def find_block_list(model: nn.Module, config: Any = None) -> BlockList | None:
    """The decoder block list by the rules of the module docstring; None when the model has none."""
    candidates = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(_holds_weights(b) for b in module):
            candidates.append((path, module))
    # outermost lists only: a list inside a candidate's element belongs to that block
    outer = [
        (path, lst) for path, lst in candidates
        if not any(path != other and path.startswith(other + ".") for other, _ in candidates)
    ]
    if not outer:
        return None
    expected = config_layer_count(config if config is not None else getattr(model, "config", None))
    path, blocks = max(outer, key=lambda c: (len(c[1]) == expected, _param_count(c[1]), len(c[1])))
    return BlockList(
        path,
        [(f"{path}.{i}" if path else str(i), block) for i, block in enumerate(blocks)],
        len({type(b) for b in blocks}) == 1,
    )


def is_state_space_mixer(module: nn.Module) -> bool:
    """A Mamba-style / recurrent mixer: an ``A_log``-like parameter or a depthwise ``Conv1d`` child."""
    own = {name for name, _ in module.named_parameters(recurse=False)}
    if own.intersection(_SSM_PARAMS):
        return True
    return any(
        isinstance(child, nn.Conv1d) and child.groups > 1 and child.groups == child.in_channels
        for child in module.children()
    )


def _ancestors(block: nn.Module, rel_path: str) -> Iterator[tuple[str, nn.Module]]:
    """(attribute name, module) of every module between ``block`` (excluded) and the layer (excluded)."""
    module = block
    for part in rel_path.split(".")[:-1]:
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
        yield part, module


def linear_kind(block: nn.Module, rel_path: str) -> str:
    """``attn`` / ``mlp`` / ``other`` of the linear at ``rel_path`` inside ``block`` (module docstring)."""
    ancestors = list(_ancestors(block, rel_path))
    for (_, module), (attribute, _) in zip(ancestors, ancestors[1:]):
        if isinstance(module, RoutedExperts):
            return module.layer_kind(attribute)
    if any(is_state_space_mixer(m) for _, m in ancestors):
        return "other"
    for name, module in ancestors:
        cls = type(module).__name__
        if _ATTN_NAME.match(name) or (_ATTN_CLASS.search(cls) and not _MLP_CLASS.search(cls)):
            return "attn"
        if _MLP_NAME.match(name) or _MLP_CLASS.search(cls):
            return "mlp"
    return layer_kind(rel_path)


def is_cross_attention(rel_path: str) -> bool:
    """A layer under a cross-attention module (called only with encoder states)."""
    return any(_CROSS_NAME.search(part) for part in rel_path.split(".")[:-1])


def has_own_forward(module: nn.Module) -> bool:
    """An ``nn.Linear`` subclass whose own ``forward`` is not the linear map ``x W^T + b`` (Llama 4's
    and PhiMoE's routers return scores and indices): no target. Checked by calling it on two random
    rows (a subclass that only re-implements the map, like ``FalconLinear``, passes); offloaded
    (meta) weights cannot be checked and count as linear."""
    if not isinstance(module, nn.Linear) or type(module).forward is nn.Linear.forward:
        return False
    weight = module.weight
    if weight.device.type == "meta" or not weight.is_floating_point():
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, module.in_features, generator=gen).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        try:
            out = module(x)
        except Exception:  # noqa: BLE001 - a forward that needs more than a tensor is no plain linear
            return True
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, module.out_features):
            return True
        expected = torch.nn.functional.linear(x, weight, module.bias)
        return not torch.allclose(out.float(), expected.float(), rtol=1e-3, atol=1e-3)


def block_linears(block: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(relative path, module, kind) of every linear-like layer a causal forward calls in ``block``."""
    out = []
    for rel, module in block.named_modules():
        if rel and is_linear_like(module) and not has_own_forward(module) and not is_cross_attention(rel):
            out.append((rel, module, linear_kind(block, rel)))
    return out


def uncalled_layers(modules: dict[str, nn.Module], run) -> set[str]:
    """Names of ``modules`` a call of ``run()`` does not call as modules (their weight is read
    functionally, as Mamba's slow path reads ``dt_proj.weight``): calibration hooks and low-rank
    replacement cannot reach them, so they stay dense."""
    called: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: called.add(n)) for name, m in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return set(modules) - called


def bidirectional_reason(config: Any, model: nn.Module | None = None) -> str | None:
    """Why a model is not a causal LM although its family has a causal-LM class, or None.

    Masked-LM families (BERT, RoBERTa, ELECTRA...) are causal only as decoders: their config says
    ``is_decoder: false`` (and is no encoder-decoder, whose decoder is causal) and, once built,
    none of their self-attention modules is ``is_causal``.
    """
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if get("is_decoder", None) is not False or get("is_encoder_decoder", False):
        return None
    if model is not None:
        flags = [
            m.is_causal for n, m in model.named_modules()
            if isinstance(getattr(m, "is_causal", None), bool) and not is_cross_attention(n + ".x")
        ]
        if not flags or any(flags):
            return None
    return (
        f"'{get('model_type')}' is configured as a bidirectional encoder (is_decoder is false); set "
        "is_decoder=true in its config.json to use it as a causal LM"
    )


__all__ = [
    "BlockList",
    "bidirectional_reason",
    "block_linears",
    "config_layer_count",
    "find_block_list",
    "has_own_forward",
    "is_cross_attention",
    "is_state_space_mixer",
    "linear_kind",
    "uncalled_layers",
]
