"""CUDA paths: solvers, low-rank layers, CLIP and LLM compression give the CPU results on a GPU.

Every test is marked ``gpu`` and skipped (conftest) when no CUDA device is present.
"""

from __future__ import annotations

import pytest
import torch

from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.core.solvers import factorize

pytestmark = pytest.mark.gpu


def _problem(n=96, m=160, samples=40, seed=0):
    """W plus a rank-deficient covariance (fewer samples than features, dead features)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, m, generator=g, dtype=torch.float64)
    X = torch.randn(m, samples, generator=g, dtype=torch.float64)
    X[:10] = 0.0
    return W, X @ X.T


@pytest.mark.parametrize("method", ["svd", "svd_llm", "als"])
def test_solvers_on_cuda_match_cpu(method):
    W, M = _problem()
    cpu = factorize(method, W, 24, M, device="cpu", iters=5)
    gpu = factorize(method, W.float().cuda(), 24, M.cuda(), device="cuda", iters=5)
    assert gpu.A.device.type == "cuda" and gpu.A.dtype == torch.float64
    assert torch.isfinite(gpu.A).all() and torch.isfinite(gpu.B).all()
    # factors are unique only up to an r x r transform: compare the products and the errors
    torch.testing.assert_close((gpu.A @ gpu.B).cpu(), cpu.A @ cpu.B, rtol=1e-6, atol=1e-6)
    assert gpu.act_rel_error == pytest.approx(cpu.act_rel_error, rel=1e-6)


def test_lowrank_linear_half_precision_on_cuda():
    dense = torch.nn.Linear(64, 48).cuda()
    W = dense.weight.detach().double()
    f = factorize("svd", W, 48, None, device="cuda")  # full rank: exact
    layer = LowRankLinear.from_factors(f.A, f.B, dense.bias.detach()).cuda().half()
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.float16
    x = torch.randn(8, 64, device="cuda")
    torch.testing.assert_close(layer(x.half()).float(), dense(x), rtol=2e-2, atol=2e-2)


def test_open_clip_compression_on_cuda_matches_cpu(tmp_path):
    from PIL import Image

    from vlmpress.data.calibration import build_calibration_set
    from vlmpress.testing import tiny_open_clip

    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()).save(tmp_path / cls / f"{i}.png")
    calib = build_calibration_set(str(tmp_path), None, n_images=8, n_captions=8)
    results = {}
    for device in ("cpu", "cuda"):
        adapter = tiny_open_clip(seed=3)
        adapter.model.to(device)
        cfg = CompressionConfig(method="pgsvd", eps_v=0.4, eps_t=0.5, als_iters=3, device=device)
        report = compress(adapter, cfg, calib)
        assert next(adapter.model.parameters()).device.type == device
        tokens = adapter.tokenize(["a photo of a cat."]).to(device)
        with torch.no_grad():
            results[device] = (report, adapter.encode_text(tokens).float().cpu())
    (rc, tc), (rg, tg) = results["cpu"], results["cuda"]
    assert [l.rank for l in rc.layers] == [l.rank for l in rg.layers]
    torch.testing.assert_close(tg, tc, rtol=1e-3, atol=1e-4)


def test_llm_sequential_on_cuda_matches_cpu(tmp_path):
    from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
    from vlmpress.reference.lm import TINY_TEXT, save_tiny_causal_lm
    from vlmpress.pipeline.sequential import compress_sequential

    text = tmp_path / "calib.txt"
    text.write_text(TINY_TEXT)
    spec = f"hf:{save_tiny_causal_lm(tmp_path / 'llama', 'llama', seed=2, layers=2)}"
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    logits = {}
    for device in ("cpu", "cuda"):
        cfg = CompressionConfig(
            model=spec, method="pgsvd", eps=0.5, n_samples=4, seq_len=16, batch_size=2, calib_text=str(text),
            device=device, als_iters=2, mode="sequential", propagate="original",
        )
        adapter = HFCausalLMAdapter.load(spec)
        adapter.model.to(device)
        compress_sequential(adapter, cfg, HFCausalLMAdapter.load_calibration(cfg))
        with torch.no_grad():
            logits[device] = adapter.model(input_ids=ids.to(device)).logits.float().cpu()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=1e-3, atol=1e-3)
