import pytest
import torch
from torch import nn

from vlmpress.core.covariance import CovarianceCollector, collect_covariances
from vlmpress.errors import CalibrationError


class QKVBlock(nn.Module):
    """q/k/v read the same tensor; out and fc read different ones."""

    def __init__(self, d=6):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.fc = nn.Linear(d, 2 * d)
        self.unused = nn.Linear(d, d)

    def forward(self, x):
        h = self.q(x) + self.k(x) * self.v(x)
        return self.fc(self.out(h))


def layers(block, names=("q", "k", "v", "out", "fc")):
    return {n: getattr(block, n) for n in names}


def test_accumulates_xtx_over_batches_and_shares_qkv():
    torch.manual_seed(0)
    block = QKVBlock()
    xs = [torch.randn(3, 4, 6) for _ in range(3)]
    with CovarianceCollector(layers(block), accumulate_dtype="float64") as cov:
        for x in xs:
            block(x)
    X = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    torch.testing.assert_close(cov.covariance("q"), X.T @ X)
    assert cov.covariance("k") is cov.covariance("q") and cov.covariance("v") is cov.covariance("q")
    assert cov.shared_inputs == {"q": ["q", "k", "v"]}
    assert cov.token_count("v") == 36 and cov.call_count("v") == 3
    # out reads a different tensor: its own accumulator, equal to h^T h
    with torch.no_grad():
        H = torch.cat([(block.q(x) + block.k(x) * block.v(x)).reshape(-1, 6) for x in xs]).double()
    torch.testing.assert_close(cov.covariance("out"), H.T @ H)
    assert cov.covariance("fc").shape == (6, 6)


def test_float32_accumulation_is_close_to_float64():
    torch.manual_seed(1)
    block = QKVBlock()
    xs = [torch.randn(8, 5, 6) for _ in range(4)]
    results = {}
    for mode in ("float32", "float64"):
        with CovarianceCollector(layers(block), accumulate_dtype=mode) as cov:
            for x in xs:
                block(x)
        results[mode] = cov.covariance("fc")
        assert results[mode].dtype == torch.float64
    torch.testing.assert_close(results["float32"], results["float64"], rtol=1e-5, atol=1e-5)


def test_hooks_removed_after_success_and_after_exception():
    block = QKVBlock()
    with CovarianceCollector(layers(block)):
        assert len(block.q._forward_pre_hooks) == 1
    assert all(len(m._forward_pre_hooks) == 0 for m in block.modules())

    def boom(collector):
        block(torch.randn(2, 6))
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        collect_covariances(layers(block), boom)
    assert all(len(m._forward_pre_hooks) == 0 for m in block.modules())

    with pytest.raises(RuntimeError):
        with CovarianceCollector(layers(block)):
            raise RuntimeError("x")
    assert all(len(m._forward_pre_hooks) == 0 for m in block.modules())


def test_mask_excludes_positions_batch_and_sequence_first():
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with CovarianceCollector({"lin": lin}, accumulate_dtype="float64") as cov:
        with cov.mask(valid):
            lin(x)
    kept = x[valid].double()
    torch.testing.assert_close(cov.covariance("lin"), kept.T @ kept)
    assert cov.token_count("lin") == 8
    # (seq, batch, dim) input with a (batch, seq) mask is transposed
    with CovarianceCollector({"lin": lin}, accumulate_dtype="float64") as cov:
        with cov.mask(valid):
            lin(x.transpose(0, 1).contiguous())
    torch.testing.assert_close(cov.covariance("lin"), kept.T @ kept)
    bad = torch.ones(3, 3, dtype=torch.bool)
    bad[0, 0] = False
    with CovarianceCollector({"lin": lin}) as cov:
        with cov.mask(bad), pytest.raises(CalibrationError, match="mask"):
            lin(x)
    # an all-true mask keeps every row whatever the layout (ProphetNet's n-gram streams: (batch, 3 * seq))
    with CovarianceCollector({"lin": lin}, accumulate_dtype="float64") as cov:
        with cov.mask(torch.ones(3, 3, dtype=torch.bool)):
            lin(x)
    flat = x.reshape(-1, 4).double()
    torch.testing.assert_close(cov.covariance("lin"), flat.T @ flat)


def test_mask_follows_singleton_axes_and_per_token_groups():
    torch.manual_seed(3)
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    kept = x[valid].double()
    with CovarianceCollector({"lin": lin}, accumulate_dtype="float64") as cov:  # MLA latent: (batch, 1, seq, dim)
        with cov.mask(valid):
            lin(x[:, None])
    torch.testing.assert_close(cov.covariance("lin"), kept.T @ kept)
    groups = torch.randn(2, 5, 3, 4)  # (batch, seq, groups, dim): every group of a real token counts
    with CovarianceCollector({"lin": lin}, accumulate_dtype="float64") as cov:
        with cov.mask(valid):
            lin(groups)
    rows = groups[valid].reshape(-1, 4).double()
    torch.testing.assert_close(cov.covariance("lin"), rows.T @ rows)
    assert cov.token_count("lin") == 8 * 3


def test_missing_layer_is_named():
    block = QKVBlock()
    with CovarianceCollector(layers(block, ("q", "unused"))) as cov:
        block(torch.randn(2, 6))
    with pytest.raises(CalibrationError, match="unused"):
        cov.covariances()
    with pytest.raises(CalibrationError, match="unused"):
        collect_covariances(layers(block, ("q", "unused")), lambda c: block(torch.randn(2, 6)))
    # fully masked input counts as no input
    lin = nn.Linear(4, 3)
    with CovarianceCollector({"lin": lin}) as cov:
        with cov.mask(torch.zeros(1, 2, dtype=torch.bool)):
            lin(torch.randn(1, 2, 4))
    assert cov.missing() == ["lin"]


def test_without_sharing_each_layer_has_its_own_sum():
    block = QKVBlock()
    with CovarianceCollector(layers(block), share_inputs=False) as cov:
        block(torch.randn(3, 6))
    assert cov.covariance("k") is not cov.covariance("q")
    torch.testing.assert_close(cov.covariance("k"), cov.covariance("q"))


def test_empty_selection_is_an_error():
    with pytest.raises(CalibrationError, match="no layers"):
        CovarianceCollector({})


@pytest.mark.parametrize("m", [5, 17, 40])
def test_blocked_gram_equals_the_full_product_and_is_symmetric(m):
    from vlmpress.core.covariance import gram

    g = torch.Generator().manual_seed(m)
    rows = torch.randn(33, m, generator=g, dtype=torch.float64)
    for min_width in (1, 8, 1000):
        G = gram(rows, min_width=min_width)
        torch.testing.assert_close(G, rows.T @ rows, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(G, G.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 9), (5, 40), (40, 24)])
def test_sandwich_equals_the_direct_product_and_is_exactly_symmetric(shape):
    """C M C^T from M's block upper triangle (min_width small enough to split) == the full product."""
    from vlmpress.core.covariance import sandwich

    n, m = shape
    g = torch.Generator().manual_seed(n * m)
    C = torch.randn(2, n, m, generator=g, dtype=torch.float64)
    X = torch.randn(2, m, m // 2 + 1, generator=g, dtype=torch.float64)  # singular M
    M = X @ X.mT
    ref = C @ M @ C.mT
    for min_width in (1, 8, 1000):
        K = sandwich(C, M, min_width=min_width)
        torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-10)
        assert bool((K == K.mT).all())
        torch.testing.assert_close(sandwich(C[0], M[0], min_width=min_width), K[0], rtol=1e-12, atol=1e-10)


def test_routed_rows_select_the_real_tokens_of_a_routed_input():
    """An expert sees rows ``index`` of the flattened (batch, seq) tokens: a (batch, seq) mask must
    select those of them that are real, and a layer no token reached may be optional."""
    from vlmpress.core.covariance import routed_rows

    torch.manual_seed(0)
    expert, unused = nn.Linear(4, 3), nn.Linear(4, 3)
    hidden = torch.randn(2, 5, 4)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    index = torch.tensor([0, 3, 4, 6, 9])  # flattened rows routed to this expert (3, 4, 9 are padding)
    collector = CovarianceCollector({"expert": expert, "unused": unused}, accumulate_dtype="float64", optional=["unused"])
    with collector, collector.mask(valid), routed_rows(index, 10):
        expert(hidden.reshape(10, 4)[index])
    rows = hidden.reshape(10, 4)[torch.tensor([0, 6])].double()
    assert collector.token_count("expert") == 2
    assert torch.allclose(collector.covariance("expert"), rows.T @ rows)
    collector.check_complete()  # 'unused' got no token but is optional
    with pytest.raises(CalibrationError, match="unused"):
        CovarianceCollector({"expert": expert, "unused": unused}).check_complete()
