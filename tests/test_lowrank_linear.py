import pytest
import torch
from torch import nn

from vlmpress.core.lowrank import FactoredWeight, LowRankLinear
from vlmpress.core.solvers import solve_svd


def test_matches_dense_linear_of_product():
    torch.manual_seed(0)
    A, B, bias = torch.randn(12, 4), torch.randn(4, 9), torch.randn(12)
    layer = LowRankLinear.from_factors(A, B, bias)
    dense = nn.Linear(9, 12)
    with torch.no_grad():
        dense.weight.copy_(A @ B)
        dense.bias.copy_(bias)
    x = torch.randn(3, 5, 9)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_dense()(x), dense(x), rtol=1e-5, atol=1e-5)
    assert (layer.in_features, layer.out_features, layer.rank) == (9, 12, 4)
    assert layer.num_parameters() == 4 * (9 + 12) + 12 == sum(p.numel() for p in layer.parameters())
    assert "rank=4" in repr(layer) and "in_features=9" in repr(layer)


def test_no_bias_and_state_dict_keys():
    layer = LowRankLinear(6, 5, 2, bias=False)
    assert set(layer.state_dict()) == {"A", "B"}
    assert layer(torch.randn(2, 6)).shape == (2, 5)
    with pytest.raises(ValueError):
        LowRankLinear(6, 5, 6)


def test_full_rank_reproduces_weight_float64():
    torch.manual_seed(1)
    W = torch.randn(20, 14, dtype=torch.float64)
    f = solve_svd(W, 14)
    layer = LowRankLinear.from_factors(f.A, f.B, None)
    assert torch.max(torch.abs(layer.to_dense().weight - W)).item() < 1e-10


def test_weight_proxy_does_not_materialise(monkeypatch):
    layer = LowRankLinear(8, 6, 3, dtype=torch.float64)
    calls = []
    monkeypatch.setattr(FactoredWeight, "materialize", lambda self: calls.append(1) or self._layer.A @ self._layer.B)
    w = layer.weight
    assert w.dtype == torch.float64 and w.device.type == "cpu" and w.shape == (6, 8) and w.size(1) == 8
    assert calls == []
    # used as a tensor by a torch function: materialised on demand and correct
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(torch.nn.functional.linear(x, layer.weight), x @ (layer.A @ layer.B).T)
    assert calls == [1]


def test_dtype_and_device_move_with_module():
    layer = LowRankLinear(8, 6, 3).to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
