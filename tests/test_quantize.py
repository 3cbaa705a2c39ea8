"""Quantised factors: int8 per channel, int4 group-wise (packed), fp8 (CUDA only); checkpoints round-trip."""

import pytest
import torch
from safetensors import safe_open

from toy_adapter import ToyAdapter, toy_calibration
from vlmpress.cli import main as cli_main
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.core.quantize import (
    QuantizationError,
    QuantizedLinear,
    QuantizedLowRankLinear,
    activation_error,
    dequantize,
    fp8_supported,
    quantize,
)
from vlmpress.errors import ConfigError
from vlmpress.pipeline.checkpoint import load_compressed, save_compressed
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig


def _weight(out_f=24, in_f=100, seed=0):
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    W[3] = 0.0  # an all-zero row must stay exactly zero (scale 1, no division by zero)
    return W


def test_int8_is_per_channel_symmetric_within_half_a_step():
    W = _weight()
    t = quantize(W, "int8")
    assert t["qdata"].dtype == torch.int8 and t["qdata"].shape == W.shape and t["scale"].shape == (24,)
    assert int(t["qdata"].abs().max()) == 127  # each row's largest entry hits the end of the range
    W_hat = dequantize(t["qdata"], t["scale"], "int8", W.shape, torch.float64)
    assert torch.all((W - W_hat).abs() <= t["scale"].double().unsqueeze(1) / 2 + 1e-7)
    assert torch.equal(W_hat[3], torch.zeros(100, dtype=torch.float64))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_is_group_wise_and_packs_two_values_per_byte(group):
    W = _weight()  # 100 columns: padded to whole groups; a row shorter than a group is one group
    t = quantize(W, "int4", group)
    group = min(group, 100)
    groups = -(-100 // group)
    assert t["qdata"].dtype == torch.uint8 and t["qdata"].shape == (24, groups * group // 2)
    assert t["scale"].shape == (24, groups)
    W_hat = dequantize(t["qdata"], t["scale"], "int4", W.shape, torch.float64, group)
    assert W_hat.shape == W.shape
    step = t["scale"].double().repeat_interleave(group, dim=1)[:, :100]
    assert torch.all((W - W_hat).abs() <= step / 2 + 1e-7)
    assert torch.equal(W_hat[3], torch.zeros(100, dtype=torch.float64))
    # smaller groups follow the weights more closely
    if group == 32:
        coarse = dequantize(*quantize(W, "int4", 128).values(), "int4", W.shape, torch.float64, 128)
        assert (W - W_hat).norm() < (W - coarse).norm()


def test_int4_of_a_low_rank_factor_stores_no_padding_group():
    """A factor A (out x rank) with rank < group: one group per row of its own length (+1 if odd),
    so int4 stays about half of int8's bytes instead of storing mostly padding."""
    A = torch.randn(48, 9, dtype=torch.float64)
    t = quantize(A, "int4", 64)
    assert t["qdata"].shape == (48, 5) and t["scale"].shape == (48, 1)
    A_hat = dequantize(t["qdata"], t["scale"], "int4", A.shape, torch.float64, 64)
    assert A_hat.shape == A.shape and (A - A_hat).abs().max() <= t["scale"].double().max() / 2 + 1e-7
    int8 = quantize(A, "int8")
    int4_bytes = sum(v.numel() * v.element_size() for v in t.values())
    assert int4_bytes < sum(v.numel() * v.element_size() for v in int8.values())


def test_fp8_storage_and_bad_schemes():
    W = _weight()
    t = quantize(W, "fp8")
    assert t["qdata"].dtype == torch.float8_e4m3fn
    W_hat = dequantize(t["qdata"], t["scale"], "fp8", W.shape, torch.float64)
    assert (W - W_hat).norm() / W.norm() < 0.05
    with pytest.raises(QuantizationError, match="unknown quantisation scheme 'int3'"):
        quantize(W, "int3")
    with pytest.raises(QuantizationError, match="group size"):
        quantize(W, "int4", 48)


def test_activation_error_matches_the_definition():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(10, 16, generator=g, dtype=torch.float64)
    X = torch.randn(16, 200, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64).unsqueeze(1)
    W_hat = W + 0.01 * torch.randn(10, 16, generator=g, dtype=torch.float64)
    expected = float(((W - W_hat) @ X).norm() / (W @ X).norm())
    assert activation_error(W, W_hat, X @ X.T) == pytest.approx(expected, rel=1e-9)
    assert activation_error(W, W, X @ X.T) == 0.0


def test_quantized_layers_compute_with_dequantised_weights():
    g = torch.Generator().manual_seed(2)
    layer = LowRankLinear.from_factors(torch.randn(12, 4, generator=g), torch.randn(4, 70, generator=g), torch.randn(12, generator=g))
    x = torch.randn(5, 70, generator=g)
    for scheme, tol in (("int8", 0.02), ("int4", 0.25)):
        q = QuantizedLowRankLinear.from_lowrank(layer, scheme, 32)
        expected = x @ q.dense_weight(torch.float32).T + layer.bias
        torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-4)
        assert (q(x) - layer(x)).norm() / layer(x).norm() < tol
    dense = torch.nn.Linear(70, 12)
    qd = QuantizedLinear.from_linear(dense, "int8")
    assert (qd(x) - dense(x)).norm() / dense(x).norm() < 0.02


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compress_quantize_reports_errors_and_checkpoint_round_trips(tmp_path, scheme):
    calib = toy_calibration()
    adapter = ToyAdapter.load("toy:3")
    cfg = CompressionConfig(method="svd_llm", ratio=0.3, device="cpu", quantize=scheme, quantize_group_size=32)
    report = compress(adapter, cfg, calib)
    compressed = [l for l in report.layers if l.rank is not None]
    assert compressed and all(isinstance(adapter.model.get_submodule(l.name), QuantizedLowRankLinear) for l in compressed)
    # quantisation adds error on top of the low-rank error, measured through the covariance
    assert all(l.quant_act_error is not None and l.quant_act_error >= l.act_error - 1e-6 for l in compressed)
    assert f"quantised         : {scheme} factors in {len(compressed)} layers" in report.format_summary()

    x = torch.stack(list(calib.images[:4]))
    with torch.no_grad():
        before = adapter.encode_image(x)
    out = save_compressed(adapter, tmp_path / "ckpt", report)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        name = compressed[0].name
        assert f.get_tensor(f"{name}.A.qdata").dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    loaded = load_compressed(out)
    assert loaded.checkpoint_config["quantization"]["scheme"] == scheme
    assert isinstance(loaded.model.get_submodule(name), QuantizedLowRankLinear)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), before)
    assert loaded.checkpoint_config["format_version"] == 3  # quantised: the format that records it

    # a quantisation entry under an older format is a crafted or corrupt config: refused, one line
    import json

    from vlmpress.errors import CheckpointError

    cfg_path = out / "vlmpress_config.json"
    data = json.loads(cfg_path.read_text())
    data["format_version"] = 2
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="needs format_version 3"):
        load_compressed(out)


def test_quantized_checkpoint_is_smaller_with_the_same_parameter_count(tmp_path):
    calib = toy_calibration()
    sizes, params = {}, {}
    for scheme in ("none", "int8"):
        adapter = ToyAdapter.load("toy:3")
        report = compress(adapter, CompressionConfig(method="svd_llm", ratio=0.3, device="cpu", quantize=scheme), calib)
        sizes[scheme] = (save_compressed(adapter, tmp_path / scheme, report) / "model.safetensors").stat().st_size
        params[scheme] = report.whole_model_params_after
    assert sizes["int8"] < sizes["none"]
    assert params["int8"] == params["none"]  # quantised codes still count as the layer's weights


def test_bad_quantize_inputs_give_one_clear_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown quantisation scheme 'int3'"):
        CompressionConfig(method="svd", ratio=0.3, quantize="int3").validate()
    with pytest.raises(ConfigError, match="group size"):
        CompressionConfig(method="svd", ratio=0.3, quantize="int4", quantize_group_size=48).validate()
    if not fp8_supported("cuda" if torch.cuda.is_available() else "cpu"):
        with pytest.raises(ConfigError, match="fp8 quantisation needs a CUDA GPU"):
            CompressionConfig(method="svd", ratio=0.3, quantize="fp8", device="cpu").validate()
    for flag in (["--quantize", "int3"], ["--quantize", "fp8", "--device", "cpu"]):
        code = cli_main(["compress", "--model", "toy:3", "--method", "svd", "--ratio", "0.3", "--out", str(tmp_path / "o"), *flag])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "quantis" in err[0] and "Traceback" not in err[0]


@pytest.mark.gpu
def test_fp8_factors_on_a_capable_gpu(tmp_path):
    if not torch.cuda.is_available() or not fp8_supported("cuda"):
        pytest.skip("needs a CUDA GPU with fp8 support (compute capability >= 8.9)")
    calib = toy_calibration()
    adapter = ToyAdapter.load("toy:3")
    adapter.model.cuda()
    report = compress(adapter, CompressionConfig(method="svd_llm", ratio=0.3, device="cuda", quantize="fp8"), calib)
    compressed = [l for l in report.layers if l.rank is not None]
    assert all(l.quant_act_error is not None and l.quant_act_error < 0.2 for l in compressed)
    x = torch.stack(list(calib.images[:4])).cuda()
    with torch.no_grad():
        before = adapter.encode_image(x)
    loaded = load_compressed(save_compressed(adapter, tmp_path / "fp8", report), device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), before)


def test_quantized_open_clip_runs_both_towers():
    """open_clip reads ``mlp.c_fc.weight.dtype`` in encode_text: quantised layers answer it."""
    from vlmpress.testing.factories import tiny_lowrank_open_clip
    from vlmpress.adapters.base import replace_module

    adapter = tiny_lowrank_open_clip(seed=1)
    names = [n for n, m in adapter.model.named_modules() if isinstance(m, LowRankLinear)]
    tokens = adapter.tokenize(["a cat", "a dog"])
    with torch.no_grad():
        before = adapter.encode_text(tokens)
        for name in names:
            replace_module(adapter.model, name, QuantizedLowRankLinear.from_lowrank(adapter.model.get_submodule(name), "int8"))
        layer = adapter.model.get_submodule(names[-1])
        assert layer.weight.dtype == torch.float32 and layer.weight.shape == (layer.out_features, layer.in_features)
        after = adapter.encode_text(tokens)
    assert (after - before).norm() / before.norm() < 0.05
