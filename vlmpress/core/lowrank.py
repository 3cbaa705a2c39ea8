"""``LowRankLinear``: a drop-in replacement for ``nn.Linear`` storing ``W ~= A @ B``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _packed(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """A detached, row-major (contiguous) copy of ``t`` on ``device`` in ``dtype``."""
    return t.detach().to(device=device, dtype=dtype).clone(memory_format=torch.contiguous_format)


class FactoredWeight:
    """Stand-in for ``LowRankLinear.weight``.

    Model code often reads attributes of a layer's weight (open_clip's ``get_cast_dtype()`` reads
    ``mlp.c_fc.weight.dtype`` on every ``encode_text``). This object answers ``dtype``, ``device``,
    ``shape``, ``size()``, ``dim()`` and ``requires_grad`` from the factors without computing
    ``A @ B``. Code that really uses it as a tensor (``F.linear(x, layer.weight)``) still works:
    torch functions receive the materialised product, computed only then.
    """

    __slots__ = ("_layer",)

    def __init__(self, layer: "LowRankLinear"):
        self._layer = layer

    @property
    def dtype(self) -> torch.dtype:
        return self._layer.A.dtype

    @property
    def device(self) -> torch.device:
        return self._layer.A.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._layer.out_features, self._layer.in_features))

    @property
    def requires_grad(self) -> bool:
        return self._layer.A.requires_grad

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def ndim(self) -> int:
        return 2

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    def materialize(self) -> torch.Tensor:
        return self._layer.A @ self._layer.B

    @property
    def data(self) -> torch.Tensor:
        return self.materialize().detach()

    @property
    def T(self) -> torch.Tensor:
        return self.materialize().T

    def __repr__(self) -> str:
        return f"FactoredWeight(shape={tuple(self.shape)}, rank={self._layer.rank}, dtype={self.dtype})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            if isinstance(x, FactoredWeight):
                return x.materialize()
            if isinstance(x, (list, tuple)):
                return type(x)(unwrap(v) for v in x)
            return x

        kwargs = {k: unwrap(v) for k, v in (kwargs or {}).items()}
        return func(*unwrap(args), **kwargs)


class LowRankLinear(nn.Module):
    """``y = x @ B^T @ A^T + bias`` with ``A`` (out x rank) and ``B`` (rank x in).

    Keeps ``in_features``/``out_features`` like ``nn.Linear`` so code that inspects layers works.
    The state dict holds ``A``, ``B`` and (optionally) ``bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rank = int(rank)
        self.A = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.B = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's product at init; only used when not built from factors.
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_factors(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        device=None,
    ) -> "LowRankLinear":
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(f"factors must be A (out x r) and B (r x in), got {tuple(A.shape)} and {tuple(B.shape)}")
        dtype = dtype or A.dtype
        device = device or A.device
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, device="meta", dtype=dtype)
        layer.A = nn.Parameter(_packed(A, device, dtype))
        layer.B = nn.Parameter(_packed(B, device, dtype))
        if bias is not None:
            layer.bias = nn.Parameter(_packed(bias, device, dtype))
        return layer

    def pack_(self, dtype: torch.dtype | None = None) -> "LowRankLinear":
        """Store A, B (and bias) as row-major tensors in ``dtype`` (default: their own), in place.

        Solvers can hand back transposed views (``Vh.T``); ``clone`` keeps such strides, and a
        GEMM on a column-major weight can take a slower kernel. Packing once at load or before
        deployment makes every forward read both factors row by row in the compute dtype.
        """
        for name in ("A", "B", "bias"):
            p = getattr(self, name)
            if p is not None and (not p.is_contiguous() or (dtype is not None and p.dtype != dtype)):
                setattr(self, name, nn.Parameter(_packed(p, p.device, dtype or p.dtype), requires_grad=p.requires_grad))
        return self

    @property
    def weight(self) -> FactoredWeight:
        return FactoredWeight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with ``weight = A @ B`` (same dtype and device)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight = nn.Parameter((self.A @ self.B).detach().clone())
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer

    def num_parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features) + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )
