"""``SplitMultiheadAttention``: ``nn.MultiheadAttention`` with four explicit ``nn.Linear`` layers.

``nn.MultiheadAttention`` keeps q/k/v in one packed ``in_proj_weight`` parameter and applies
``out_proj`` functionally (``F.linear(x, out_proj.weight)``), so none of its projections is a module
that can be hooked (covariance collection) or swapped (low-rank replacement). This module computes
exactly the same function with ``q_proj``/``k_proj``/``v_proj``/``out_proj`` as real submodules,
called as modules, and can be converted back (:meth:`SplitMultiheadAttention.to_mha`) for export.

When ``query is key is value`` (self-attention), the three projections receive the *same tensor
object*, which lets the covariance collector share one ``X^T X`` accumulator between them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from vlmpress.adapters.base import replace_module

logger = logging.getLogger(__name__)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out x in) weight of an ``nn.Linear`` or a ``LowRankLinear`` (``A @ B``), detached."""
    from vlmpress.core.lowrank import LowRankLinear

    if isinstance(layer, LowRankLinear):
        return (layer.A @ layer.B).detach()
    if hasattr(layer, "dense_weight"):  # quantised layers (vlmpress.core.quantize): dequantised
        bias = getattr(layer, "bias", None)
        return layer.dense_weight(bias.dtype if bias is not None else torch.float32).detach()
    if isinstance(layer, nn.Linear):
        return layer.weight.detach()
    raise TypeError(f"cannot take a dense weight of {type(layer).__name__}")


def _bias(layer: nn.Module) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return None if bias is None else bias.detach()


class SplitMultiheadAttention(nn.Module):
    """Drop-in, numerically equivalent replacement for ``nn.MultiheadAttention``.

    Supports everything open_clip and transformers use: ``batch_first`` either way, unbatched
    inputs, different ``kdim``/``vdim``, bool or float ``attn_mask`` (2-D ``(L, S)`` or 3-D
    ``(N*heads, L, S)``), ``key_padding_mask``, ``need_weights`` (averaged or per head), dropout.
    ``bias_k``/``bias_v``/``add_zero_attn`` are not supported (:meth:`from_mha` refuses them).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        """Copy an ``nn.MultiheadAttention``'s weights into separate projection layers."""
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise NotImplementedError("SplitMultiheadAttention does not support bias_k/bias_v/add_zero_attn")
        ref = mha.out_proj.weight
        has_bias = mha.in_proj_bias is not None
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            bias=has_bias,
            kdim=mha.kdim,
            vdim=mha.vdim,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
            device="meta",
            dtype=ref.dtype,
        )
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.detach().chunk(3, dim=0)
        else:
            wq, wk, wv = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if has_bias else (None, None, None)
        for layer, w, b in zip((new.q_proj, new.k_proj, new.v_proj), (wq, wk, wv), biases):
            layer.weight = nn.Parameter(w.clone())
            if b is not None:
                layer.bias = nn.Parameter(b.clone())
        new.out_proj.weight = nn.Parameter(mha.out_proj.weight.detach().clone())
        if mha.out_proj.bias is not None:
            new.out_proj.bias = nn.Parameter(mha.out_proj.bias.detach().clone())
        new.train(mha.training)
        return new

    def stock_state_dict(self) -> dict[str, torch.Tensor]:
        """This layer's weights under ``nn.MultiheadAttention``'s keys (low-rank layers merged)."""
        wq, wk, wv = (dense_weight(p) for p in (self.q_proj, self.k_proj, self.v_proj))
        out: dict[str, torch.Tensor] = {}
        if self.kdim == self.embed_dim and self.vdim == self.embed_dim:
            out["in_proj_weight"] = torch.cat([wq, wk, wv], dim=0).contiguous()
        else:
            out["q_proj_weight"], out["k_proj_weight"], out["v_proj_weight"] = (
                wq.contiguous(),
                wk.contiguous(),
                wv.contiguous(),
            )
        biases = [_bias(p) for p in (self.q_proj, self.k_proj, self.v_proj)]
        if all(b is not None for b in biases):
            out["in_proj_bias"] = torch.cat(biases).contiguous()  # type: ignore[arg-type]
        elif any(b is not None for b in biases):
            raise ValueError("q/k/v projections disagree on having a bias; cannot pack into nn.MultiheadAttention")
        out["out_proj.weight"] = dense_weight(self.out_proj).contiguous()
        out_bias = _bias(self.out_proj)
        if out_bias is not None:
            out["out_proj.bias"] = out_bias.contiguous()
        return out

    def to_mha(self) -> nn.MultiheadAttention:
        """A stock ``nn.MultiheadAttention`` computing the same function (low-rank layers merged)."""
        state = self.stock_state_dict()
        ref = state["out_proj.weight"]
        mha = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias="in_proj_bias" in state,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=ref.device,
            dtype=ref.dtype,
        )
        mha.load_state_dict(state)
        mha.train(self.training)
        return mha

    # ------------------------------------------------------------------ forward
    def _merged_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        batch: int,
        tgt_len: int,
        src_len: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Additive float mask broadcastable to (N, heads, L, S), as nn.MultiheadAttention builds it."""

        def as_float(mask: torch.Tensor) -> torch.Tensor:
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
            if not torch.is_floating_point(mask):
                raise TypeError(f"only bool and floating masks are supported, got {mask.dtype}")
            return mask.to(dtype)

        merged = None
        if attn_mask is not None:
            mask = as_float(attn_mask)
            if mask.dim() == 2:
                if tuple(mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(f"2-D attn_mask should be {(tgt_len, src_len)}, got {tuple(mask.shape)}")
                merged = mask.view(1, 1, tgt_len, src_len)
            elif mask.dim() == 3:
                expected = (batch * self.num_heads, tgt_len, src_len)
                if tuple(mask.shape) != expected:
                    raise RuntimeError(f"3-D attn_mask should be {expected}, got {tuple(mask.shape)}")
                merged = mask.view(batch, self.num_heads, tgt_len, src_len)
            else:
                raise RuntimeError(f"attn_mask must be 2-D or 3-D, got {mask.dim()}-D")
        if key_padding_mask is not None:
            kpm = as_float(key_padding_mask).reshape(batch, 1, 1, src_len)
            merged = kpm if merged is None else merged + kpm
        return merged

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same signature and return value as ``nn.MultiheadAttention.forward``."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # as nn.MultiheadAttention
        # Project first, on the caller's tensors: identical objects in -> shared covariance in the collector.
        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)

        unbatched = query.dim() == 2
        if unbatched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        elif not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        batch, tgt_len, _ = q.shape
        src_len = k.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        q = q.reshape(batch, tgt_len, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, src_len, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, src_len, heads, head_dim).transpose(1, 2)

        mask = self._merged_mask(attn_mask, key_padding_mask, batch, tgt_len, src_len, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                probs = F.dropout(probs, p=dropout_p)
            out = probs @ v
            weights = probs.mean(dim=1) if average_attn_weights else probs
            if unbatched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

        out = out.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def split_attention_modules(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by a :class:`SplitMultiheadAttention`.

    Returns how many were replaced (0 when already split: idempotent). Attention modules using
    ``bias_k``/``bias_v``/``add_zero_attn`` are left as they are, with a warning.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]
    count = 0
    for name in names:
        mha = model.get_submodule(name)
        try:
            split = SplitMultiheadAttention.from_mha(mha)
        except NotImplementedError as err:
            logger.warning("leaving attention '%s' packed: %s", name, err)
            continue
        if name:
            replace_module(model, name, split)
        else:  # pragma: no cover - the root itself cannot be swapped in place
            raise ValueError("split_attention_modules needs a parent module around the attention layer")
        count += 1
    if count:
        logger.debug("split %d packed attention module(s) into q/k/v/out projections", count)
    return count


def unsplit_attention_modules(model: nn.Module) -> int:
    """Inverse of :func:`split_attention_modules` (merging low-rank projections); returns the count."""
    names = [name for name, module in model.named_modules() if isinstance(module, SplitMultiheadAttention)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).to_mha())
    return len(names)
