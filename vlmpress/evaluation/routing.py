"""How compression changes an MoE model's routing: the experts each token is sent to, before and after.

Compressing the layers before a router (attention, earlier experts) moves its input, so a token may
be sent to other experts afterwards. :func:`routing_decisions` records, for every split experts
module (:class:`~vlmpress.adapters.routed_experts.RoutedExperts`), the top-k expert set the block's
own router chose for each token; :func:`routing_change` compares two such records: the fraction of
(token, MoE layer) pairs whose top-k *set* differs (order within the set does not count).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from vlmpress.adapters.routed_experts import RoutedExperts


def routing_decisions(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per MoE layer (experts module path): the sorted top-k expert ids of every token, (tokens, k).

    ``batches``: ``input_ids`` tensors (batch, seq) run through ``model`` without a cache. The model's
    fused experts must be split first (``adapter.prepare_for_compression()``; outputs unchanged).
    """
    modules = {name: m for name, m in model.named_modules() if isinstance(m, RoutedExperts)}
    if not modules:
        raise ValueError("the model has no split MoE experts (call prepare_for_compression on its adapter first)")
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def hook(name: str):
        def record(module: RoutedExperts, args: tuple, kwargs: dict) -> None:
            index = args[1] if len(args) > 1 else kwargs.get(module._routing_names[0], kwargs.get("top_k_index"))
            seen[name].append(index.detach().sort(dim=-1).values.cpu())

        return record

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


def routing_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Fraction of tokens whose top-k expert set differs, overall and per MoE layer."""
    if set(before) != set(after):
        raise ValueError("the two routing records cover different MoE layers")
    per_layer, changed, total = {}, 0, 0
    for name in before:
        a, b = before[name], after[name]
        if a.shape != b.shape:
            raise ValueError(f"routing records of {name} have shapes {tuple(a.shape)} and {tuple(b.shape)}")
        diff = (a != b).any(dim=-1)
        per_layer[name] = float(diff.float().mean())
        changed += int(diff.sum())
        total += diff.numel()
    return {"tokens": total // max(1, len(before)), "layers": len(before), "changed_fraction": changed / max(1, total),
            "per_layer": per_layer}


__all__ = ["routing_change", "routing_decisions"]
