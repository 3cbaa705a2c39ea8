"""Structure-driven target discovery: every linear layer of a tower gets a group and a kind.

Adapters name their towers by module-path prefix (``{"vision": ("visual.",), "text": ("text.",)}``);
everything else follows from the module tree, whatever library built the tower (open_clip blocks,
timm trunks, transformers encoders):

* every ``nn.Linear`` (and GPT-2 style ``Conv1D``) under a tower prefix is a target candidate;
* its kind is ``attn`` when a path component names attention (``attn``, ``attention``,
  ``SelfAttention``, ``attn_pool``...), ``mlp`` when one names a feed-forward part (``mlp``, ``ffn``,
  ``fc1``, ``intermediate``, ``DenseReluDense``...), ``other`` otherwise (projection heads, poolers,
  patch merging);
* convolutions and embeddings are never targets: :func:`tower_inventory` lists them as dense so the
  report can say what stayed untouched, with the fraction of each tower's linear parameters targeted.

Packed q/k/v linears (timm's ``attn.qkv``) are factorised as *one* layer with its shared input: the
three projections see the same activations, so one covariance serves them, and the layer stays a
stock ``nn.Linear`` in exports. Packed ``nn.MultiheadAttention`` (whose projections are not modules)
is split exactly by :mod:`vlmpress.adapters.attention` first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmpress.adapters.layers import TargetLayer

_ATTN_RE = re.compile(r"attn|attention|^(q|k|v|o|qkv|kv|query|key|value|q_proj|k_proj|v_proj|in_proj)$", re.I)
_MLP_RE = re.compile(
    r"mlp|ffn|feed_?forward|densereludense|intermediate|^(fc\d+|c_fc|c_proj|wi(_\d)?|wo|output|w[123]|gate_proj|up_proj|down_proj)$",
    re.I,
)


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, transformers' GPT-2 ``Conv1D`` and vlmpress' own ``LowRankLinear``."""
    if isinstance(module, nn.Linear):
        return True
    name = type(module).__name__
    return (name == "Conv1D" and hasattr(module, "nf")) or name == "LowRankLinear"


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


_MLP_CONTAINER_RE = re.compile(r"mlp|ffn|feed_?forward|densereludense|intermediate", re.I)


def layer_kind(path: str) -> str:
    """``attn`` / ``mlp`` / ``other`` from the components of a dotted module path.

    The innermost container naming attention or a feed-forward part decides (CoCa's
    ``cross_attn.0.mlp.c_fc`` is an MLP layer inside a cross-attention block); otherwise any
    component naming attention, then any naming a feed-forward part.
    """
    parts = path.split(".")
    for part in reversed(parts[:-1]):
        if _MLP_CONTAINER_RE.search(part) and not _ATTN_RE.search(part):
            return "mlp"
        if _ATTN_RE.search(part):
            return "attn"
    if any(_ATTN_RE.search(p) for p in parts[:-1]) or _ATTN_RE.search(parts[-1]):
        return "attn"
    if any(_MLP_RE.search(p) for p in parts):
        return "mlp"
    return "other"


def group_of(path: str, towers: Mapping[str, Iterable[str]]) -> str | None:
    """The group whose prefix ``path`` starts with (first match), else None."""
    for group, prefixes in towers.items():
        if any(path.startswith(p) or path + "." == p for p in prefixes):
            return group
    return None


def discover_targets(
    model: nn.Module,
    towers: Mapping[str, Iterable[str]],
    *,
    skip: Callable[[str, nn.Module], bool] | None = None,
) -> list[TargetLayer]:
    """Every linear-like layer of every tower, grouped and kinded, towers in ``towers`` order.

    ``skip(path, module)`` drops layers an adapter knows are not called as modules (their weight is
    read functionally), which could not be hooked or replaced.
    """
    found: dict[str, list[TargetLayer]] = {group: [] for group in towers}
    for path, module in model.named_modules():
        if not is_linear_like(module):
            continue
        group = group_of(path, towers)
        if group is None or (skip is not None and skip(path, module)):
            continue
        found[group].append(TargetLayer(path, group, layer_kind(path), module))
    return [layer for group in towers for layer in found[group]]


@dataclass
class TowerInventory:
    """What a tower holds: linear parameters (targeted or not) and the layers that stay dense."""

    group: str
    linear_layers: int = 0
    linear_params: int = 0
    targeted_layers: int = 0
    targeted_params: int = 0
    conv_layers: int = 0
    conv_params: int = 0
    untargeted_linear: list[str] = field(default_factory=list)
    dense_convs: list[str] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        """Fraction of the tower's linear parameters that are compression targets."""
        return self.targeted_params / self.linear_params if self.linear_params else 0.0

    def describe(self) -> str:
        """One-line account of what was found (used in 'nothing to compress' errors)."""
        return (
            f"{self.linear_layers} linear layers ({self.linear_params:,} params, {self.targeted_layers} targeted), "
            f"{self.conv_layers} convolutions ({self.conv_params:,} params, kept dense)"
        )

    def to_dict(self) -> dict:
        return {
            "linear_layers": self.linear_layers,
            "linear_params": self.linear_params,
            "targeted_layers": self.targeted_layers,
            "targeted_params": self.targeted_params,
            "coverage": round(self.coverage, 6),
            "conv_layers": self.conv_layers,
            "conv_params": self.conv_params,
            "untargeted_linear": list(self.untargeted_linear),
            "dense_convs": list(self.dense_convs),
        }


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def tower_inventory(
    model: nn.Module, towers: Mapping[str, Iterable[str]], targets: Iterable[str]
) -> dict[str, TowerInventory]:
    """Per tower: linear parameters, how many of them ``targets`` (layer names) cover, dense convs."""
    targets = set(targets)
    out = {group: TowerInventory(group) for group in towers}
    for path, module in model.named_modules():
        group = group_of(path, towers)
        if group is None:
            continue
        inv = out[group]
        if is_linear_like(module):
            n = _params(module)
            inv.linear_layers += 1
            inv.linear_params += n
            if path in targets:
                inv.targeted_layers += 1
                inv.targeted_params += n
            else:
                inv.untargeted_linear.append(path)
        elif is_conv(module):
            inv.conv_layers += 1
            inv.conv_params += _params(module)
            inv.dense_convs.append(path)
    return out


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output: tensors, tuples/lists, dicts and ModelOutputs."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def unreached_layers(modules: Mapping[str, nn.Module], run: Callable[[], Any]) -> set[str]:
    """Names of ``modules`` whose output cannot influence what ``run()`` returns (a call trace).

    During one forward (``run``, with autograd on), every layer's output gets a zero tensor added
    that requires grad; afterwards the gradient of the outputs with respect to each of those zeros
    is taken. A layer never called, or called but only feeding values the outputs do not depend
    on (a text pooler the contrastive path does not read, the last vision block of a model that
    reads the second-to-last hidden state), has no gradient path: it is *unreached*. The values of
    the outputs are unchanged (adding zeros), and the test is structural, so it also runs on the
    meta device.
    """
    probes: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Any):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return None
            zero = torch.zeros_like(output, requires_grad=True)
            probes[name].append(zero)
            return output + zero

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        with torch.enable_grad():
            outputs = [t for t in _tensors(run()) if t.is_floating_point() and t.requires_grad]
            leaves = [z for zs in probes.values() for z in zs]
            if not outputs or not leaves:  # nothing called, or outputs computed without autograd
                return set(modules)
            total = sum(t.float().sum() for t in outputs)
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    reached: set[str] = set()
    index = 0
    for name, zs in probes.items():
        if any(g is not None for g in grads[index : index + len(zs)]):
            reached.add(name)
        index += len(zs)
    return set(modules) - reached
