"""Turn compressed layers back into dense ``nn.Linear`` ones (for stock-format export)."""

from __future__ import annotations

from torch import nn

from vlmpress.adapters.base import replace_module


def merge_lowrank_layers(model: nn.Module) -> int:
    """Replace every ``LowRankLinear`` in ``model`` in place by its dense ``to_dense()``.

    Returns how many layers were merged. Works on the module given; callers that must keep the
    compressed model (export) pass a deep copy.
    """
    from vlmpress.core.lowrank import LowRankLinear

    names = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    for name in names:
        if not name:
            raise ValueError("cannot merge a LowRankLinear that is the root module; merge it with .to_dense()")
        layer = model.get_submodule(name)
        dense = layer.to_dense()
        dense.train(layer.training)
        dense.weight.requires_grad_(layer.A.requires_grad)
        replace_module(model, name, dense)
    return len(names)
