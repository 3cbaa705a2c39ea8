"""Output-preserving rewrites that make linears read functionally into module calls.

Some towers own ``nn.Linear`` layers but read their ``.weight`` directly (``F.linear`` /
``F.multi_head_attention_forward``), so a forward hook never sees their input and a swapped-in
low-rank layer would be bypassed. Each rewrite here changes only *how* such a module computes (its
class or a flag), never its parameters or state-dict keys, so checkpoints and stock exports are
unaffected. Rewrites are registered by the class they apply to and are idempotent.

* open_clip ``AttentionPool2d`` (ModifiedResNet, RN50...): q/k/v/c_proj are fed to
  ``F.multi_head_attention_forward``. :class:`ModuleCallAttentionPool2d` computes the same pooled
  token with module calls; only the pooled (first) position is projected by ``q_proj``/``c_proj``,
  which is both exact and the right calibration input (the other queries never reach the output).
* open_clip ``TextTransformer`` with an ``nn.Linear`` ``text_projection`` (SigLIP) tests
  ``isinstance(text_projection, nn.Linear)`` and otherwise multiplies by it as a matrix, which a
  low-rank replacement is not; :func:`_module_projection_forward` applies it as a module call.
* timm ``EvaAttention`` with separate q/v biases applies ``F.linear(x, qkv.weight, qkv_bias)``;
  setting ``qkv_bias_separate`` makes it call ``qkv(x)`` and add the bias after (same function).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

#: class name -> rewrite(module) -> bool (True when the module was changed)
_REWRITES: dict[str, Callable[[nn.Module], bool]] = {}


def register_rewrite(class_name: str):
    def deco(fn: Callable[[nn.Module], bool]):
        _REWRITES[class_name] = fn
        return fn

    return deco


def prepare_module_calls(model: nn.Module) -> int:
    """Apply every registered rewrite in ``model``; returns how many modules changed."""
    count = 0
    for module in model.modules():
        rewrite = _REWRITES.get(type(module).__name__)
        if rewrite is not None and rewrite(module):
            count += 1
    return count


def _attention_pool_forward(self, x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[0], x.shape[1]
    x = x.reshape(n, c, -1).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + self.positional_embedding[:, None, :].to(x.dtype)
    length, heads = x.shape[0], self.num_heads
    q = self.q_proj(x[:1])  # only the pooled token is returned: the other queries are dead code
    k, v = self.k_proj(x), self.v_proj(x)
    q = q.permute(1, 0, 2).reshape(n, 1, heads, -1).transpose(1, 2)
    k = k.permute(1, 0, 2).reshape(n, length, heads, -1).transpose(1, 2)
    v = v.permute(1, 0, 2).reshape(n, length, heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)  # (n, heads, 1, head_dim)
    return self.c_proj(out.transpose(1, 2).reshape(n, -1))


#: (stock class, forward) -> its ``ModuleCall`` subclass (one per pair, so instances share it)
_SWAPPED_CLASSES: dict[tuple[type, Callable], type] = {}


def _swap_forward(module: nn.Module, forward: Callable) -> bool:
    """Give ``module`` a subclass of its class with ``forward`` (parameters and state-dict keys unchanged)."""
    key = (type(module), forward)
    if key not in _SWAPPED_CLASSES:
        _SWAPPED_CLASSES[key] = type("ModuleCall" + type(module).__name__, (type(module),), {"forward": forward})
    module.__class__ = _SWAPPED_CLASSES[key]
    return True


@register_rewrite("AttentionPool2d")
def _rewrite_attention_pool(module: nn.Module) -> bool:
    if not all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "c_proj", "positional_embedding")):
        return False
    return _swap_forward(module, _attention_pool_forward)


@register_rewrite("EvaAttention")
def _rewrite_eva_attention(module: nn.Module) -> bool:
    if getattr(module, "qkv", None) is None or getattr(module, "q_bias", None) is None:
        return False
    if getattr(module, "qkv_bias_separate", True):
        return False
    module.qkv_bias_separate = True
    return True


def _module_projection_forward(self, text: torch.Tensor):
    # the stock forward projects with ``pooled @ text_projection`` unless the projection is an
    # ``nn.Linear``; a low-rank replacement is a module but no ``nn.Linear``, so the forward runs
    # without it and the projection is applied here as a module call
    projection = self._modules.get("text_projection")
    if projection is None or isinstance(projection, nn.Linear):
        return super(type(self), self).forward(text)
    self._modules["text_projection"] = None
    try:
        out = super(type(self), self).forward(text)
    finally:
        self._modules["text_projection"] = projection
    if isinstance(out, tuple):
        return (projection(out[0]), *out[1:])
    return projection(out)


@register_rewrite("TextTransformer")
def _rewrite_text_transformer(module: nn.Module) -> bool:
    """open_clip ``TextTransformer`` with a linear ``text_projection`` (SigLIP): keep it a module call."""
    if not isinstance(module._modules.get("text_projection"), nn.Linear):
        return False
    return _swap_forward(module, _module_projection_forward)
