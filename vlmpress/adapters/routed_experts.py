"""MoE experts as layers: transformers 5's fused expert tensors become one linear per expert and matrix.

In transformers 5 the routed experts of an MoE block are one module holding 3-D parameters
(``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]; gpt-oss stores them transposed, with biases),
called by the block as ``experts(hidden_states, top_k_index, top_k_weights)`` after its router
chose each token's experts. Found from structure, never from model names:

* **experts module**: a module whose own 3-D parameters have a leading dimension equal to an
  expert count the config declares (``num_local_experts``, ``num_experts``, ``n_routed_experts``...);
* **router**: the module beside it (a sibling under the same parent) holding a 2-D weight with one
  row per expert (up to twice as many: "zero" or null experts some blocks add); every linear in it
  stays dense (its logits decide the routing; a low-rank router would move tokens between experts);
* **layout**: the flags transformers' experts interface sets on the module (``has_gate``,
  ``is_transposed``, ``has_bias``, ``has_post_expert_norm``; its batched and grouped kernels read the
  same flags) and its own gate function (``_apply_gate``). A fused module without them (its layout
  is not declared) stays fused and dense, with that reason.

:class:`RoutedExperts` replaces such a module: for each expert ``e`` a linear ``gate_up.e`` (or
``up.e``) and ``down.e``, called exactly on the tokens routed to ``e``, gated by the stock module's
own function and weighted by the router's weights -- the eager computation of transformers, so the
MoE block (routing included) runs unchanged. The swap is checked on a random routing before it is
kept (outputs equal to the stock module's within float rounding). :meth:`RoutedExperts.to_fused`
rebuilds the stock module with dense fused tensors for a stock export.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmpress.core.covariance import routed_rows

logger = logging.getLogger(__name__)

#: config fields that declare how many routed experts an MoE layer has
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
#: kinds of the per-expert layers (first matrix with / without a gate half, second matrix)
EXPERT_KINDS = ("expert_gate_up", "expert_up", "expert_down")
PROBE_TOKENS = 8
PROBE_RTOL = 1e-4


def config_expert_counts(config: Any) -> set[int]:
    """Expert counts a transformers config declares (a nested ``text_config`` too)."""
    counts = set()
    for source in (config, getattr(config, "text_config", None)):
        for key in EXPERT_COUNT_KEYS:
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                counts.add(value)
    return counts


@dataclass
class FusedExperts:
    """A fused experts module found in the model, and whether it can become per-expert layers."""

    path: str
    module: nn.Module
    num_experts: int
    router: str | None  # the router's module path (None: not found; the block still routes, the split works)
    reason: str | None = None  # why it stays fused and dense (None: it can be split)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters(recurse=False) if p.dim() == 3)


def _own_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return dict(module.named_parameters(recurse=False))


def _scores_experts(weight: torch.Tensor, experts: int) -> bool:
    return weight.dim() == 2 and experts <= weight.shape[0] <= 2 * experts


def _router_beside(model: nn.Module, path: str, module: nn.Module, experts: int) -> str | None:
    """The sibling (same parent) holding a 2-D weight of one row per expert (up to twice as many rows:
    zero / null experts): the router feeding ``module``. A weight directly on the parent counts too."""
    parent_path, _, _ = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    prefix = f"{parent_path}." if parent_path else ""
    for name, child in parent.named_children():
        if child is not module and any(_scores_experts(p, experts) for p in child.parameters()):
            return prefix + name
    for name, param in parent.named_parameters(recurse=False):
        if _scores_experts(param, experts):
            return prefix + name
    return None


def _layout_problem(module: nn.Module, experts: int) -> str | None:
    """Why ``module``'s fused tensors cannot be read as per-expert matrices, or None."""
    if not all(isinstance(getattr(module, flag, None), bool) for flag in ("has_gate", "is_transposed", "has_bias")):
        return "its layout is not declared through transformers' experts interface (has_gate / is_transposed / has_bias)"
    params = _own_params(module)
    first = "gate_up_proj" if module.has_gate else "up_proj"
    names = [first, "down_proj"] + ([f"{first}_bias", "down_proj_bias"] if module.has_bias else [])
    missing = [n for n in names if n not in params]
    if missing:
        return f"it lacks the fused tensors {missing} its declared layout names"
    others = [n for n, p in params.items() if n not in names and p.dim() >= 1 and p.shape[0] == experts]
    if others:
        return f"it holds other per-expert tensors ({others}) whose role is not declared"
    up, down = params[first], params["down_proj"]
    if up.dim() != 3 or down.dim() != 3 or up.shape[0] != experts or down.shape[0] != experts:
        return f"its fused tensors have shapes {tuple(up.shape)} / {tuple(down.shape)}, not [experts, out, in]"
    return None


def find_fused_experts(model: nn.Module, config: Any = None) -> list[FusedExperts]:
    """Every fused experts module (module docstring), with its router and why it stays fused, if so."""
    counts = config_expert_counts(config if config is not None else getattr(model, "config", None))
    found = []
    for path, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            continue
        leading = {p.shape[0] for p in _own_params(module).values() if p.dim() == 3}
        experts = sorted(leading & counts)
        if not experts:
            continue
        n = experts[0]
        router = _router_beside(model, path, module, n)
        reason = _layout_problem(module, n)
        if reason is None and any(p.device.type == "meta" for p in module.parameters()):
            reason = "its weights are offloaded (meta device); offloaded experts are not split"
        found.append(FusedExperts(path, module, n, router, reason))
    return found


def _routing_argument_names(module: nn.Module) -> tuple[str, str]:
    """Names of the stock forward's 2nd and 3rd parameters (``top_k_index``, ``top_k_weights`` or gpt-oss's)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):  # pragma: no cover - builtins
        params = []
    return (params[1], params[2]) if len(params) >= 3 else ("top_k_index", "top_k_weights")


class RoutedExperts(nn.Module):
    """One linear per expert and matrix, called on exactly the tokens routed to that expert.

    ``forward(hidden_states, top_k_index, top_k_weights)`` computes what transformers' eager
    experts forward computes: for each expert ``e`` with routed tokens, ``down_e(gate(up_e(x)))``
    times the router weight, summed per token. ``up_e``/``down_e`` may be ``nn.Linear`` or
    ``LowRankLinear``; the gate function, activation and optional post-expert norm are the stock
    module's own (kept, without its fused tensors, as ``stock``).
    """

    def __init__(self, fused: nn.Module, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.has_gate = bool(fused.has_gate)
        self.has_bias = bool(fused.has_bias)
        self.is_transposed = bool(fused.is_transposed)
        self.has_post_expert_norm = bool(getattr(fused, "has_post_expert_norm", False))
        self.first = "gate_up" if self.has_gate else "up"
        self._routing_names = _routing_argument_names(fused)
        up, down = getattr(fused, f"{self.first}_proj"), fused.down_proj
        up_bias = getattr(fused, f"{self.first}_proj_bias", None) if self.has_bias else None
        down_bias = fused.down_proj_bias if self.has_bias else None
        setattr(self, self.first, nn.ModuleList(self._linear(up[e], up_bias, e) for e in range(num_experts)))
        self.down = nn.ModuleList(self._linear(down[e], down_bias, e) for e in range(num_experts))
        self.stock = fused  # stripped of its fused tensors by :func:`split_experts` once the swap is checked

    def _linear(self, matrix: torch.Tensor, bias: torch.Tensor | None, e: int) -> nn.Linear:
        W = matrix.detach().T if self.is_transposed else matrix.detach()  # (out x in)
        layer = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            layer.weight.copy_(W)
            if bias is not None:
                layer.bias.copy_(bias[e].detach())
        return layer

    @property
    def first_layers(self) -> nn.ModuleList:
        return getattr(self, self.first)

    def layer_kind(self, attribute: str) -> str:
        """Kind of the layers under attribute ``gate_up`` / ``up`` / ``down``."""
        return "expert_down" if attribute == "down" else f"expert_{self.first}"

    def _expert_outputs(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> Iterator:
        with torch.no_grad():
            mask = nn.functional.one_hot(index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # indices >= E: none
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e >= self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            with routed_rows(token_idx, hidden.shape[0]):
                h = self.first_layers[e](hidden[token_idx])
                h = self.stock._apply_gate(h) if self.has_gate else self.stock.act_fn(h)
                out = self.down[e](h)
            if self.has_post_expert_norm:
                out = self.stock.post_expert_norm(out)
            yield token_idx, out * weights[token_idx, top_k_pos, None]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        index_name, weights_name = self._routing_names
        index = args[0] if len(args) > 0 else kwargs.get(index_name, kwargs.get("top_k_index"))
        weights = args[1] if len(args) > 1 else kwargs.get(weights_name, kwargs.get("top_k_weights"))
        out = torch.zeros_like(hidden_states)
        # indices beyond the experts (padding sentinels, "zero experts" handled by the block) get no expert
        index = index.clamp(max=self.num_experts)
        for token_idx, contribution in self._expert_outputs(hidden_states, index, weights):
            out.index_add_(0, token_idx, contribution.to(out.dtype))
        return out

    def expert_weight(self, attribute: str, e: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense (out x in) weight and bias of one expert's layer (factors multiplied out)."""
        layer = getattr(self, attribute)[e]
        dense = layer.to_dense() if hasattr(layer, "to_dense") else layer
        return dense.weight.detach(), (dense.bias.detach() if dense.bias is not None else None)

    def to_fused(self) -> nn.Module:
        """A stock experts module again, its fused tensors rebuilt from the (dense or merged) layers."""
        fused = copy.deepcopy(self.stock)
        for attribute, name in ((self.first, f"{self.first}_proj"), ("down", "down_proj")):
            mats, biases = zip(*(self.expert_weight(attribute, e) for e in range(self.num_experts)))
            stacked = torch.stack([m.T if self.is_transposed else m for m in mats]).contiguous()
            setattr(fused, name, nn.Parameter(stacked, requires_grad=False))
            if self.has_bias:
                setattr(fused, f"{name}_bias", nn.Parameter(torch.stack(biases).contiguous(), requires_grad=False))
        return fused


def _probe_matches(stock: nn.Module, split: RoutedExperts) -> str | None:
    """Compare both modules on random tokens and routing; None when equal within float rounding."""
    weight = split.down[0].weight
    gen = torch.Generator().manual_seed(0)
    hidden_size = split.first_layers[0].in_features
    top_k = min(2, split.num_experts)
    x = torch.randn(PROBE_TOKENS, hidden_size, generator=gen).to(device=weight.device, dtype=weight.dtype)
    index = torch.stack([torch.randperm(split.num_experts, generator=gen)[:top_k] for _ in range(PROBE_TOKENS)])
    weights = torch.rand(PROBE_TOKENS, top_k, generator=gen).to(device=weight.device, dtype=weight.dtype)
    index = index.to(weight.device)
    with torch.no_grad():
        try:
            want = stock(x, index, weights)
            got = split(x, index, weights)
        except Exception as err:  # noqa: BLE001 - a stock forward with another contract stays fused
            return f"its forward does not take (hidden_states, top_k_index, top_k_weights) ({type(err).__name__})"
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return "its forward returns something other than one tensor per token"
    scale = want.abs().max().clamp_min(1e-6)
    if not torch.allclose(got.float(), want.float(), rtol=PROBE_RTOL, atol=PROBE_RTOL * float(scale)):
        return f"its forward differs from the per-expert computation (max difference {(got - want).abs().max():.2e})"
    return None


def split_experts(model: nn.Module, config: Any = None) -> list[FusedExperts]:
    """Replace every splittable fused experts module by :class:`RoutedExperts` (idempotent).

    Returns every fused module found; those kept fused carry their ``reason``.
    """
    found = find_fused_experts(model, config)
    for item in found:
        if item.reason is not None:
            logger.info("experts %s stay fused and dense: %s", item.path, item.reason)
            continue
        split = RoutedExperts(item.module, item.num_experts)
        problem = _probe_matches(item.module, split)
        if problem:
            item.reason = problem
            logger.info("experts %s stay fused and dense: %s", item.path, problem)
            continue
        for name in list(_own_params(item.module)):
            if name.startswith((f"{split.first}_proj", "down_proj")):
                delattr(item.module, name)  # the per-expert layers hold them now
        parent_path, _, child = item.path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, split)
    return found


def fuse_experts(model: nn.Module) -> list[tuple[str, RoutedExperts]]:
    """Swap every :class:`RoutedExperts` for a stock fused module (dense); returns what to put back."""
    swapped = []
    for path, module in list(model.named_modules()):
        if isinstance(module, RoutedExperts):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, module.to_fused())
            swapped.append((path, module))
    return swapped


def restore_split(model: nn.Module, swapped: list[tuple[str, RoutedExperts]]) -> None:
    """Undo :func:`fuse_experts`."""
    for path, module in swapped:
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


__all__ = [
    "EXPERT_COUNT_KEYS",
    "EXPERT_KINDS",
    "FusedExperts",
    "RoutedExperts",
    "config_expert_counts",
    "find_fused_experts",
    "fuse_experts",
    "restore_split",
    "split_experts",
]
