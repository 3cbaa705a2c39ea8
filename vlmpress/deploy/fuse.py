"""One GEMM for the first factors of low-rank layers that read the same input (q/k/v, gate/up).

A low-rank layer computes ``(x B^T) A^T``. When several sibling layers are applied to the *same
tensor* (``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)``; ``gate_proj(x)``, ``up_proj(x)``), their
``B`` factors can be stacked and ``x`` multiplied once: one wide GEMM instead of several narrow
ones, and ``x`` is read from memory once. The second factors stay separate.

Groups are found structurally, never by name: :func:`find_shared_input_groups` runs the model on a
sample batch with forward pre-hooks and groups ``LowRankLinear`` children of one parent with the
same ``in_features`` that received the identical, unmodified tensor object on every call.
:func:`fuse_shared_inputs` swaps them for :class:`FusedLowRankLinear` members sharing one
:class:`SharedFirstFactor`; the first member called (in the order seen on the sample) computes the
stacked product and the others take their column slice of it. A member called with another tensor
(cross-attention, a different call pattern) computes its own slice, so results never depend on
the sample: fusion only changes which GEMMs run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlmpress.core.lowrank import LowRankLinear

logger = logging.getLogger(__name__)


class SharedFirstFactor(nn.Module):
    """The stacked ``B`` factors (sum of ranks x in_features) of one group of sibling layers.

    Holds at most one product between the first and the last member's call of a forward; it is
    dropped when the last member has read it, so no activation outlives its forward.
    """

    def __init__(self, B: torch.Tensor, ranks: list[int]):
        super().__init__()
        self.B = nn.Parameter(B.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)
        self.ranks = [int(r) for r in ranks]
        self.offsets = [sum(self.ranks[:i]) for i in range(len(self.ranks))]
        self._input: torch.Tensor | None = None
        self._input_version = -1
        self._product: torch.Tensor | None = None

    def first_factor(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """``x @ B_index^T`` for member ``index``, from the stacked product when ``x`` is the shared input."""
        start, rank = self.offsets[index], self.ranks[index]
        last = index == len(self.ranks) - 1
        if index == 0:
            product = F.linear(x, self.B)
            if not last:
                # identity + version: the very same, unmodified tensor, so the slice is exact
                self._input, self._product = x, product
                if not torch.compiler.is_compiling():
                    self._input_version = x._version
            return product[..., :rank]
        if self._product is not None and self._input is x and self._unchanged(x):
            out = self._product[..., start : start + rank]
        else:
            out = F.linear(x, self.B[start : start + rank])
        if last:
            self._input, self._product = None, None
        return out

    def _unchanged(self, x: torch.Tensor) -> bool:
        # Eager: the version counter proves no in-place write since the product was taken. Under
        # torch.compile the counter is a data-dependent value that cannot be guarded on; there the
        # grouping rests on the sample run, which checked that every member saw an unmodified input.
        if torch.compiler.is_compiling():
            return True
        return self._input_version == x._version

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, in_features={self.B.shape[1]}"


class FusedLowRankLinear(nn.Module):
    """A group member: ``(x B^T) A^T + bias`` with ``x B^T`` taken from its :class:`SharedFirstFactor`."""

    def __init__(self, shared: SharedFirstFactor, index: int, A: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not a submodule: the parent owns it once
        self.index = index
        self.in_features = int(shared.B.shape[1])
        self.out_features = int(A.shape[0])
        self.rank = int(A.shape[1])
        self.A = nn.Parameter(A.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def B(self) -> torch.Tensor:
        start = self.shared.offsets[self.index]
        return self.shared.B[start : start + self.rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.shared.first_factor(x, self.index), self.A, self.bias)

    def to_lowrank(self) -> LowRankLinear:
        """The equivalent stand-alone :class:`LowRankLinear` (for unfusing / saving)."""
        return LowRankLinear.from_factors(self.A, self.B, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, member={self.index}"


@dataclass
class SharedInputGroup:
    """Sibling low-rank layers (child names of ``parent``, in call order) that read one input."""

    parent: str
    children: list[str]

    def names(self) -> list[str]:
        return [f"{self.parent}.{c}" if self.parent else c for c in self.children]


def find_shared_input_groups(model: nn.Module, run_sample: Callable[[], Any]) -> list[SharedInputGroup]:
    """Groups of ``LowRankLinear`` siblings that received the identical input tensor on every call.

    ``run_sample`` runs the model once on a representative batch (e.g. ``lambda:
    adapter.encode_image(pixels)``). Candidates share a parent and ``in_features``; they are grouped
    when their per-call inputs are the same tensor objects (kept alive during the run, so an id is
    never reused) and ordered by their first call.
    """
    calls: dict[str, list[tuple[torch.Tensor, int]]] = {}
    order: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def record(_module, args):
            if args and isinstance(args[0], torch.Tensor):
                calls.setdefault(name, []).append((args[0], args[0]._version))
                order.setdefault(name, len(order))

        return record

    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            run_sample()
    finally:
        for h in handles:
            h.remove()

    groups: list[SharedInputGroup] = []
    by_parent: dict[tuple[str, int], list[str]] = {}
    for name in calls:
        parent, _, child = name.rpartition(".")
        by_parent.setdefault((parent, model.get_submodule(name).in_features), []).append(child)
    for (parent, _), children in by_parent.items():
        children.sort(key=lambda c: order[f"{parent}.{c}" if parent else c])
        remaining = list(children)
        while remaining:
            head, rest = remaining[0], remaining[1:]
            key = calls[f"{parent}.{head}" if parent else head]
            same = [c for c in rest if _same_inputs(calls[f"{parent}.{c}" if parent else c], key)]
            if same:
                groups.append(SharedInputGroup(parent, [head, *same]))
            remaining = [c for c in rest if c not in same]
    calls.clear()
    return groups


def _same_inputs(a: list[tuple[torch.Tensor, int]], b: list[tuple[torch.Tensor, int]]) -> bool:
    """The same tensor objects, call for call, and unmodified in between (equal version counters)."""
    return len(a) == len(b) and all(x is y and vx == vy for (x, vx), (y, vy) in zip(a, b))


def fuse_shared_inputs(model: nn.Module, run_sample: Callable[[], Any]) -> list[SharedInputGroup]:
    """Fuse every group found by :func:`find_shared_input_groups` in place; returns the groups.

    Each group's stacked ``B`` is registered on the parent as ``fused_first_factor_<k>`` (k counts
    groups of that parent); members keep their names. Inference only (factors are frozen).
    """
    groups = find_shared_input_groups(model, run_sample)
    for group in groups:
        parent = model.get_submodule(group.parent) if group.parent else model
        layers = [getattr(parent, c) for c in group.children]
        dtype = layers[0].B.dtype
        shared = SharedFirstFactor(torch.cat([l.B.detach().to(dtype) for l in layers]), [l.rank for l in layers])
        k = sum(name.startswith("fused_first_factor_") for name, _ in parent.named_children())
        parent.add_module(f"fused_first_factor_{k}", shared)
        for i, (child, layer) in enumerate(zip(group.children, layers)):
            setattr(parent, child, FusedLowRankLinear(shared, i, layer.A, layer.bias))
    if groups:
        logger.info("fused the first factors of %d groups of low-rank layers sharing an input", len(groups))
    return groups


def unfuse(model: nn.Module) -> int:
    """Inverse of :func:`fuse_shared_inputs`: stand-alone ``LowRankLinear`` layers again; returns the count."""
    count = 0
    for _, parent in list(model.named_modules()):
        shared_names = [n for n, c in parent.named_children() if isinstance(c, SharedFirstFactor)]
        for child, module in list(parent.named_children()):
            if isinstance(module, FusedLowRankLinear):
                setattr(parent, child, module.to_lowrank())
                count += 1
        for n in shared_names:
            delattr(parent, n)
    return count
