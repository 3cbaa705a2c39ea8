"""Fast inference path: packed factors and one GEMM for low-rank siblings that read the same input."""

import copy

import pytest
import torch
from torch import nn

from vlmpress.core.lowrank import LowRankLinear
from vlmpress.deploy.fuse import (
    FusedLowRankLinear,
    SharedFirstFactor,
    find_shared_input_groups,
    fuse_shared_inputs,
    unfuse,
)
from vlmpress.testing.factories import lowrank_by_svd, tiny_lowrank_open_clip


def _lr(n_in, n_out, r, seed):
    g = torch.Generator().manual_seed(seed)
    return LowRankLinear.from_factors(torch.randn(n_out, r, generator=g), torch.randn(r, n_in, generator=g), torch.randn(n_out, generator=g))


class TwoInputs(nn.Module):
    """q reads x; k and v read ``y`` -- the same tensor as x only when the caller passes it twice."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = _lr(8, 6, 3, 0), _lr(8, 5, 2, 1), _lr(8, 7, 4, 2)
        self.other = _lr(4, 6, 2, 3)  # different in_features: never grouped

    def forward(self, x, y=None):
        y = x if y is None else y
        return torch.cat([self.q(x), self.k(y), self.v(y), self.other(x[..., :4])], dim=-1)


@pytest.fixture(scope="module")
def compressed_clip():
    return tiny_lowrank_open_clip(seed=3)


def _clip_sample(adapter):
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = adapter.tokenize(["a photo of a cat", "a red car", "two dogs"])
    return pixels, tokens


def test_groups_are_found_by_shared_input_not_by_name(compressed_clip):
    adapter = copy.deepcopy(compressed_clip)
    pixels, tokens = _clip_sample(adapter)
    groups = find_shared_input_groups(adapter.model, lambda: (adapter.encode_image(pixels), adapter.encode_text(tokens)))
    # every attention block of both towers: q, k, v read the same tensor; out_proj / MLP layers do not share
    attn_blocks = {n for n, _ in adapter.model.named_modules() if n.endswith(".attn")}
    assert {g.parent for g in groups} == attn_blocks and len(groups) == 4
    assert all(g.children == ["q_proj", "k_proj", "v_proj"] for g in groups)

    # renaming changes nothing: detection never reads names
    model = TwoInputs()
    groups = find_shared_input_groups(model, lambda: model(torch.randn(2, 8)))
    assert [(g.parent, g.children) for g in groups] == [("", ["q", "k", "v"])]
    groups = find_shared_input_groups(model, lambda: model(torch.randn(2, 8), torch.randn(2, 8)))
    assert [(g.parent, g.children) for g in groups] == [("", ["k", "v"])]  # q reads another tensor


def test_fused_clip_matches_unfused_and_unfuses_back(compressed_clip):
    adapter = copy.deepcopy(compressed_clip)
    pixels, tokens = _clip_sample(adapter)
    with torch.no_grad():
        ref_img, ref_txt = adapter.encode_image(pixels), adapter.encode_text(tokens)
        state = {k: v.clone() for k, v in adapter.model.state_dict().items()}
        groups = fuse_shared_inputs(adapter.model, lambda: (adapter.encode_image(pixels), adapter.encode_text(tokens)))
        assert len(groups) == 4
        fused = [m for m in adapter.model.modules() if isinstance(m, FusedLowRankLinear)]
        assert len(fused) == 12 and all(isinstance(m, FusedLowRankLinear) for m in (adapter.model.visual.transformer.resblocks[0].attn.k_proj,))
        torch.testing.assert_close(adapter.encode_image(pixels), ref_img, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(adapter.encode_text(tokens), ref_txt, rtol=1e-6, atol=1e-6)
        # other batch sizes, still equal; no product is held between forwards
        torch.testing.assert_close(adapter.encode_image(pixels[:1]), ref_img[:1], rtol=1e-5, atol=1e-6)
        assert all(m._product is None for m in adapter.model.modules() if isinstance(m, SharedFirstFactor))
        assert unfuse(adapter.model) == 12
        assert adapter.model.state_dict().keys() == state.keys()
        assert all(torch.equal(adapter.model.state_dict()[k], v) for k, v in state.items())


def test_member_called_with_another_tensor_computes_its_own_slice():
    model = TwoInputs()
    x = torch.randn(2, 8)
    fuse_shared_inputs(model, lambda: model(x))  # sample: all of q, k, v read x
    reference = copy.deepcopy(model)
    unfuse(reference)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, y), reference(x, y))  # k, v read y: not q's product
        torch.testing.assert_close(model(x), reference(x))


def test_input_changed_in_place_between_members_is_not_reused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _lr(8, 4, 2, 5), _lr(8, 4, 3, 6)
            self.mutate = False

        def forward(self, x):
            out_a = self.a(x)
            if self.mutate:
                x.mul_(2.0)  # same object, new contents
            return out_a, self.b(x)

    model = InPlace()
    model.mutate = True
    assert find_shared_input_groups(model, lambda: model(torch.randn(3, 8))) == []  # modified between calls
    model.mutate = False
    fuse_shared_inputs(model, lambda: model(torch.randn(3, 8)))
    assert isinstance(model.b, FusedLowRankLinear)
    model.mutate = True
    x = torch.randn(3, 8)
    with torch.no_grad():
        _, out_b = model(x.clone())
        expected = LowRankLinear.from_factors(model.b.A, model.b.B, model.b.bias)(2.0 * x)
    torch.testing.assert_close(out_b, expected)


def test_fused_llama_groups_qkv_and_gate_up(tmp_path):
    from vlmpress.pipeline.loading import load_model
    from vlmpress.reference.lm import save_tiny_causal_lm

    adapter = load_model(f"hf:{save_tiny_causal_lm(tmp_path / 'lm')}")
    adapter.prepare_for_compression()
    names = [n for n, m in adapter.model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    lowrank_by_svd(adapter.model, names, 4)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    run = lambda: adapter.model(input_ids=ids).logits  # noqa: E731
    with torch.no_grad():
        ref = run()
        groups = fuse_shared_inputs(adapter.model, run)
        children = sorted(tuple(g.children) for g in groups)
        assert children == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
        torch.testing.assert_close(run(), ref, rtol=1e-5, atol=1e-5)


def test_pack_makes_factors_row_major_in_the_compute_dtype():
    g = torch.Generator().manual_seed(0)
    A, Bt = torch.randn(10, 3, generator=g), torch.randn(7, 3, generator=g)
    layer = LowRankLinear.from_factors(A, Bt.T)  # a transposed view, as solvers return
    assert layer.B.is_contiguous() and layer.A.is_contiguous()
    layer.B = nn.Parameter(Bt.T.clone())  # clone keeps the transposed strides
    assert not layer.B.is_contiguous()
    x = torch.randn(4, 7, generator=g)
    ref = layer(x)
    layer.pack_()
    assert layer.B.is_contiguous() and torch.equal(layer.B, Bt.T)
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-6)  # only the GEMM's summation order may differ
    layer.pack_(torch.bfloat16)
    assert layer.A.dtype == layer.B.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x.bfloat16()).float(), ref, rtol=0.05, atol=0.05)


def _compile_available() -> bool:
    try:
        torch.compile(lambda t: t + 1)(torch.zeros(1))
        return True
    except Exception:  # noqa: BLE001 - no compiler toolchain / unsupported platform
        return False


@pytest.mark.slow
def test_torch_compile_matches_eager_on_fused_model(compressed_clip):
    if not _compile_available():
        pytest.skip("torch.compile is not available in this environment")
    adapter = copy.deepcopy(compressed_clip)
    pixels, tokens = _clip_sample(adapter)
    fuse_shared_inputs(adapter.model, lambda: adapter.encode_image(pixels))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = adapter.encode_image(pixels)
        compiled = torch.compile(adapter.model.visual, fullgraph=True)(pixels)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
