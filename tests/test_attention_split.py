"""SplitMultiheadAttention computes exactly what nn.MultiheadAttention computes, with hookable layers."""

import logging

import pytest
import torch
from torch import nn

from vlmpress.adapters.attention import SplitMultiheadAttention, split_attention_modules, unsplit_attention_modules
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.testing import lowrank_by_svd, tiny_open_clip

ATOL = 1e-5


def _pair(embed=16, heads=4, **kwargs):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(embed, heads, **kwargs).eval()
    with torch.no_grad():  # non-zero biases so a bias mix-up cannot hide
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha, SplitMultiheadAttention.from_mha(mha).eval()


def _close(a, b):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_self_attention_matches_with_masks(batch_first, need_weights):
    mha, split = _pair(batch_first=batch_first)
    n, length = 3, 6
    x = torch.randn(n, length, 16) if batch_first else torch.randn(length, n, 16)
    causal_bool = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    causal_float = torch.zeros(length, length).masked_fill(causal_bool, float("-inf"))
    kpm = torch.zeros(n, length, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[2, -1] = True
    kpm_float = torch.zeros(n, length).masked_fill(kpm, float("-inf"))
    mask3d = torch.randn(n * 4, length, length)
    cases = [
        {},
        {"attn_mask": causal_bool},
        {"attn_mask": causal_float},
        {"key_padding_mask": kpm},
        {"attn_mask": causal_float, "key_padding_mask": kpm_float},
        {"attn_mask": causal_bool, "key_padding_mask": kpm},
        {"attn_mask": mask3d},
    ]
    with torch.no_grad():
        for kwargs in cases:
            ref_out, ref_w = mha(x, x, x, need_weights=need_weights, **kwargs)
            out, w = split(x, x, x, need_weights=need_weights, **kwargs)
            _close(out, ref_out)
            if need_weights:
                _close(w, ref_w)
            else:
                assert w is None and ref_w is None


def test_per_head_weights_unbatched_and_cross_attention():
    mha, split = _pair(batch_first=True, kdim=8, vdim=12)
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 8), torch.randn(2, 7, 12)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, -3:] = True
    with torch.no_grad():
        ref = mha(q, k, v, key_padding_mask=kpm, average_attn_weights=False)
        got = split(q, k, v, key_padding_mask=kpm, average_attn_weights=False)
        _close(got[0], ref[0])
        _close(got[1], ref[1])
        assert got[1].shape == (2, 4, 5, 7)
        _close(split(q[0], k[0], v[0])[0], mha(q[0], k[0], v[0])[0])  # unbatched input


def test_qkv_receive_the_same_tensor_object_and_out_proj_hook_fires():
    _, split = _pair(batch_first=True)
    seen = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(split, name).register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
    x = torch.randn(2, 5, 16)
    split(x, x, x, need_weights=False)
    assert set(seen) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]
    assert seen["out_proj"].shape == (2, 5, 16)


def test_dropout_is_used_only_in_training():
    mha = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True)
    split = SplitMultiheadAttention.from_mha(mha)
    x = torch.randn(2, 5, 16)
    assert split.training
    torch.manual_seed(1)
    a = split(x, x, x, need_weights=False)[0]
    b = split(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b)
    split.eval()
    mha.eval()
    _close(split(x, x, x)[0], mha(x, x, x)[0])


def test_to_mha_round_trip_merges_lowrank_projections():
    _, split = _pair(batch_first=True)
    lowrank_by_svd(split, ["q_proj", "out_proj"], rank=2)
    assert isinstance(split.q_proj, LowRankLinear)
    stock = split.to_mha().eval()
    assert isinstance(stock, nn.MultiheadAttention)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        _close(stock(x, x, x)[0], split(x, x, x)[0])
    assert torch.linalg.matrix_rank(stock.in_proj_weight[:16]) == 2


def test_split_attention_modules_counts_and_is_idempotent(caplog):
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "a": nn.MultiheadAttention(16, 2, batch_first=True),
            "inner": nn.Sequential(nn.MultiheadAttention(16, 4)),
            "odd": nn.MultiheadAttention(16, 2, add_bias_kv=True),
        }
    )
    with caplog.at_level(logging.WARNING):
        assert split_attention_modules(model) == 2
    assert "leaving attention 'odd' packed" in caplog.text
    assert isinstance(model["a"], SplitMultiheadAttention)
    assert isinstance(model["inner"][0], SplitMultiheadAttention)
    assert isinstance(model["odd"], nn.MultiheadAttention)
    assert split_attention_modules(model) == 0
    assert unsplit_attention_modules(model) == 2
    assert isinstance(model["inner"][0], nn.MultiheadAttention)


def test_tiny_open_clip_towers_match_block_by_block():
    """Both towers' attention, with the text causal mask, before and after splitting."""
    adapter = tiny_open_clip()
    model = adapter.model
    blocks = [("vision", b, None) for b in model.visual.transformer.resblocks]
    blocks += [("text", b, model.attn_mask) for b in model.transformer.resblocks]
    assert len(blocks) == 4
    torch.manual_seed(0)
    for tower, block, mask in blocks:
        length = 17 if tower == "vision" else 77
        x = torch.randn(3, length, 64)
        split = SplitMultiheadAttention.from_mha(block.attn).eval()
        with torch.no_grad():
            ref = block.attn(x, x, x, need_weights=False, attn_mask=mask)
            got = split(x, x, x, need_weights=False, attn_mask=mask)
        assert isinstance(ref, tuple) and isinstance(got, tuple) and got[1] is None
        _close(got[0], ref[0])
