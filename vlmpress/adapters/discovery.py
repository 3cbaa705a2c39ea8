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


def layer_kind(path: str) -> str:
    """``attn`` / ``mlp`` / ``other`` from the components of a dotted module path."""
    parts = path.split(".")
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
