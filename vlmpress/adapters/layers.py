"""Compressible layers as data: :class:`TargetLayer`, the (out x in) weight view, peft-style
in-place replacement by parent lookup, and selection by name regexes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlmpress.errors import ConfigError


@dataclass
class TargetLayer:
    """A compressible layer: its dotted module path, group, kind and the module itself."""

    name: str
    group: str
    kind: str  # "attn" | "mlp" | "other" | "head" | "expert_gate_up" | "expert_up" | "expert_down"
    module: nn.Module
    #: sees only the tokens a router sends it (an MoE expert): it may get few or no calibration tokens
    routed: bool = False

    @property
    def weight_matrix(self) -> torch.Tensor:
        """The layer's weight as an (out x in) matrix (GPT-2 Conv1D stores it transposed)."""
        return weight_matrix(self.module)


#: kinds that take a broader kind's tolerance when none is given for them (MoE experts are MLPs:
#: ``--eps-mlp`` covers them unless a tolerance names the expert kind itself)
KIND_PARENTS: dict[str, str] = {"expert_gate_up": "mlp", "expert_up": "mlp", "expert_down": "mlp"}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """(out x in) view of a linear-like module's weight."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers GPT-2: y = x @ W + b
        return module.weight.T
    raise TypeError(f"unsupported layer type {type(module).__name__}")


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """peft-style parent lookup: (parent module, attribute name) for a dotted path."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the module at dotted path ``name`` for ``new`` in place; returns the old one."""
    parent, child = get_submodule_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def select_targets(
    layers: Sequence[TargetLayer],
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[TargetLayer]:
    """Filter layers by regexes on their names (peft's ``target_modules``/``exclude_modules``).

    A layer is kept when it matches (``re.search``) any ``targets`` pattern (all layers when
    ``targets`` is empty) and no ``exclude`` pattern.
    """
    try:
        inc = [re.compile(p) for p in (targets or [])]
        exc = [re.compile(p) for p in (exclude or [])]
    except re.error as err:
        raise ConfigError(f"invalid layer-name regex: {err}") from None
    kept = [
        layer
        for layer in layers
        if (not inc or any(p.search(layer.name) for p in inc)) and not any(p.search(layer.name) for p in exc)
    ]
    return kept
