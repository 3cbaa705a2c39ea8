"""Weight-only quantisation of low-rank factors and dense weights (pure torch, float64 error math).

Schemes (the storage is plain tensors, so checkpoints go through safetensors without pickle):

- ``int8``: per-output-channel symmetric; ``q = round(W / s)`` in [-127, 127], ``s = max|W_row| / 127``.
- ``int4``: group-wise symmetric along the input dimension (groups of 32, 64 or 128 columns);
  ``q`` in [-8, 7], ``s = max|W_group| / 7``, two values packed per byte (low nibble first).
- ``fp8``: ``float8_e4m3fn`` with a per-output-channel scale (``max|W_row| / 448``); runs only
  on CUDA GPUs with fp8 support (compute capability >= 8.9), see :func:`check_scheme_supported`.

Layers dequantise their weights to the activation dtype in each forward (weight-only
quantisation: bytes and memory shrink; the GEMMs run in the compute dtype).

Why not torchao: torchao 0.18 runs int8 weight-only on CPU, but its int4 layouts need the
``mslk`` CUDA kernels or bfloat16 tile packing, and its tensor subclasses do not save through
``safetensors.torch.save_file``; vlmpress needs one portable, pickle-free format on every device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmpress.core.lowrank import FactoredWeight

SCHEMES = ("none", "int8", "int4", "fp8")
INT4_GROUP_SIZES = (32, 64, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class QuantizationError(ValueError):
    """An unknown scheme or group size, or a scheme the device cannot run (caught and re-raised
    as a user-facing ``ConfigError`` above core)."""


def check_scheme(scheme: str, group_size: int = 64) -> None:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantisation scheme '{scheme}'; expected one of {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")


def fp8_supported(device: torch.device | str) -> bool:
    """fp8 GEMM-capable device: a CUDA GPU of compute capability >= 8.9 (Ada, Hopper and later)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "float8_e4m3fn"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_scheme_supported(scheme: str, device: torch.device | str) -> None:
    """Refuse fp8 where it cannot run, naming what can."""
    if scheme == "fp8" and not fp8_supported(device):
        raise QuantizationError(
            f"fp8 quantisation needs a CUDA GPU with fp8 support (compute capability >= 8.9, e.g. L4, H100); "
            f"device '{device}' has none: use --quantize int8 or int4"
        )


def int4_group(in_features: int, group_size: int) -> int:
    """The group an int4 row is cut into: ``group_size``, or the whole (even-padded) row when it is
    shorter -- low ranks (a factor ``A`` has ``rank`` inputs) would otherwise store mostly padding."""
    return min(group_size, in_features + in_features % 2)


def _row_scale(W: torch.Tensor, qmax: float) -> torch.Tensor:
    # zero rows get scale 1 (their values quantise to 0 exactly): never a division by zero
    amax = W.abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize(W: torch.Tensor, scheme: str, group_size: int = 64) -> dict[str, torch.Tensor]:
    """Plain tensors storing ``W`` (2-D) in ``scheme``: ``qdata`` and ``scale`` (float32)."""
    check_scheme(scheme, group_size)
    if W.dim() != 2 or not torch.isfinite(W).all():
        raise QuantizationError(f"quantise expects a finite 2-D weight, got shape {tuple(W.shape)}")
    W = W.detach().to(torch.float64)
    if scheme == "int8":
        scale = _row_scale(W, 127.0)
        q = torch.clamp(torch.round(W / scale), -127, 127).to(torch.int8)
        return {"qdata": q, "scale": scale.squeeze(1).float()}
    if scheme == "fp8":
        scale = _row_scale(W, FP8_MAX)
        return {"qdata": (W / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), "scale": scale.squeeze(1).float()}
    out_f, in_f = W.shape
    group_size = int4_group(in_f, group_size)
    padded = math.ceil(in_f / group_size) * group_size
    Wp = F.pad(W, (0, padded - in_f)).reshape(out_f, padded // group_size, group_size)
    scale = _row_scale(Wp, 7.0)  # (out, groups, 1)
    q = (torch.clamp(torch.round(Wp / scale), -8, 7) + 8).to(torch.uint8).reshape(out_f, padded)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return {"qdata": packed.contiguous(), "scale": scale.squeeze(-1).float()}


def dequantize(
    qdata: torch.Tensor, scale: torch.Tensor, scheme: str, shape: tuple[int, int], dtype: torch.dtype, group_size: int = 64
) -> torch.Tensor:
    """The ``shape`` weight in ``dtype`` from :func:`quantize`'s tensors."""
    out_f, in_f = shape
    if scheme in ("int8", "fp8"):
        return (qdata.to(dtype) * scale.to(dtype).unsqueeze(1)).reshape(out_f, in_f)
    group_size = int4_group(in_f, group_size)
    low = (qdata & 0x0F).to(torch.int8) - 8
    high = (qdata >> 4).to(torch.int8) - 8
    q = torch.stack((low, high), dim=-1).reshape(out_f, -1, group_size)
    return (q.to(dtype) * scale.to(dtype).unsqueeze(-1)).reshape(out_f, -1)[:, :in_f]


def storage_shapes(scheme: str, shape: tuple[int, int], group_size: int = 64) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of :func:`quantize`'s tensors for a ``shape`` weight (to rebuild a checkpoint)."""
    out_f, in_f = shape
    if scheme == "int8":
        return {"qdata": ((out_f, in_f), torch.int8), "scale": ((out_f,), torch.float32)}
    if scheme == "fp8":
        return {"qdata": ((out_f, in_f), torch.float8_e4m3fn), "scale": ((out_f,), torch.float32)}
    group_size = int4_group(in_f, group_size)
    groups = math.ceil(in_f / group_size)
    return {"qdata": ((out_f, groups * group_size // 2), torch.uint8), "scale": ((out_f, groups), torch.float32)}


class QuantizedWeight(nn.Module):
    """One quantised matrix: buffers ``qdata`` and ``scale`` (what the state dict stores)."""

    def __init__(self, scheme: str, shape: tuple[int, int], group_size: int = 64, tensors: dict | None = None):
        super().__init__()
        check_scheme(scheme, group_size)
        self.scheme, self.shape, self.group_size = scheme, (int(shape[0]), int(shape[1])), int(group_size)
        if tensors is None:
            tensors = {k: torch.zeros(s, dtype=d) for k, (s, d) in storage_shapes(scheme, self.shape, group_size).items()}
        self.register_buffer("qdata", tensors["qdata"])
        self.register_buffer("scale", tensors["scale"])

    @classmethod
    def from_weight(cls, W: torch.Tensor, scheme: str, group_size: int = 64) -> "QuantizedWeight":
        tensors = {k: v.to(W.device) for k, v in quantize(W, scheme, group_size).items()}
        return cls(scheme, tuple(W.shape), group_size, tensors)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qdata, self.scale, self.scheme, self.shape, dtype, self.group_size)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"{self.scheme}, shape={self.shape}{group}"


class DequantizedWeight(FactoredWeight):
    """``layer.weight`` of a quantised layer: answers ``dtype``/``device``/``shape`` without
    dequantising (open_clip reads ``mlp.c_fc.weight.dtype`` on every ``encode_text``); the dtype is
    the one the layer computes in (its scales follow ``model.to(dtype)``)."""

    __slots__ = ()

    @property
    def dtype(self) -> torch.dtype:
        return self._layer.compute_dtype

    @property
    def device(self) -> torch.device:
        return self._layer.bias.device if self._layer.bias is not None else self._layer.scale_device

    @property
    def requires_grad(self) -> bool:
        return False

    def materialize(self) -> torch.Tensor:
        return self._layer.dense_weight(self.dtype)


class QuantizedLowRankLinear(nn.Module):
    """``LowRankLinear`` with quantised factors: ``(x B^T) A^T + bias`` with A, B dequantised per call."""

    def __init__(self, A: QuantizedWeight, B: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.A, self.B = A, B
        self.out_features, self.rank = A.shape
        self.in_features = B.shape[1]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_lowrank(cls, layer: nn.Module, scheme: str, group_size: int = 64) -> "QuantizedLowRankLinear":
        return cls(
            QuantizedWeight.from_weight(layer.A, scheme, group_size),
            QuantizedWeight.from_weight(layer.B, scheme, group_size),
            layer.bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(F.linear(x, self.B.dequantize(x.dtype)), self.A.dequantize(x.dtype), bias)

    def dense_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.A.dequantize(dtype) @ self.B.dequantize(dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.A.scale.dtype

    @property
    def scale_device(self) -> torch.device:
        return self.A.scale.device

    @property
    def weight(self) -> DequantizedWeight:
        return DequantizedWeight(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class QuantizedLinear(nn.Module):
    """A dense ``nn.Linear`` with its weight quantised (the dense baseline at equal bytes)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.qweight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Linear, scheme: str, group_size: int = 64) -> "QuantizedLinear":
        return cls(QuantizedWeight.from_weight(layer.weight, scheme, group_size), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.qweight.dequantize(x.dtype), bias)

    def dense_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    rank = None  # dense (for DequantizedWeight's repr)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.qweight.scale.dtype

    @property
    def scale_device(self) -> torch.device:
        return self.qweight.scale.device

    @property
    def weight(self) -> DequantizedWeight:
        return DequantizedWeight(self)


def activation_error(W: torch.Tensor, W_hat: torch.Tensor, M: torch.Tensor) -> float:
    """``||(W - W_hat) X|| / ||W X||`` from the input covariance ``M = X X^T`` (float64):
    ``tr(E M E^T) / tr(W M W^T)``, square-rooted; 0 when ``W X`` is 0."""
    W64, M64 = W.detach().to(torch.float64), M.detach().to(device=W.device, dtype=torch.float64)
    E = W64 - W_hat.detach().to(device=W.device, dtype=torch.float64)
    num = torch.einsum("ij,jk,ik->", E, M64, E).clamp_min(0)
    den = torch.einsum("ij,jk,ik->", W64, M64, W64)
    return float(torch.sqrt(num / den)) if den > 0 else 0.0
