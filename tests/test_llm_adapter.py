"""HFCausalLMAdapter on tiny random Llama (GQA), Qwen2, GPT-2 (Conv1D) and OPT models (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from vlmpress.adapters import adapter_for_spec
from vlmpress.adapters.base import replace_module
from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter, UnsupportedArchitectureError
from vlmpress.pipeline.checkpoint import export_dense, load_compressed, save_compressed
from vlmpress.pipeline.compress import calibrate, compress, count_parameters, select_layers
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.core.rank import saves_parameters, tolerance_rank
from vlmpress.core.solvers import solve_svd
from vlmpress.data.text_calibration import TokenCalibration
from vlmpress.errors import CalibrationError, ConfigError, VlmpressError
from vlmpress.reference.lm import TINY_TEXT, save_tiny_causal_lm

ARCHS = ["llama", "qwen2", "gpt2", "opt"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llms")
    dirs = {arch: save_tiny_causal_lm(root / arch, arch, seed=1) for arch in ARCHS}
    text = root / "calib.txt"
    text.write_text(TINY_TEXT)
    return dirs, text


def _cfg(spec, text, **kw):
    base = dict(model=spec, n_samples=6, seq_len=24, batch_size=4, calib_text=str(text), device="cpu", als_iters=2)
    base.update(kw)
    return CompressionConfig(**base)


def _load(tiny_dirs, arch):
    dirs, text = tiny_dirs
    spec = f"hf:{dirs[arch]}"
    return HFCausalLMAdapter.load(spec), spec, text


def _logits(adapter, ids):
    with torch.no_grad():
        return adapter.model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 11, 200]])


def test_spec_picks_the_adapter_and_kinds(tiny_dirs):
    dirs, _ = tiny_dirs
    for arch in ARCHS:
        assert adapter_for_spec(f"hf:{dirs[arch]}") is HFCausalLMAdapter
    adapter, _, _ = _load(tiny_dirs, "llama")
    layers = adapter.target_layers()
    names = {l.name.rsplit(".", 1)[-1]: l for l in layers if ".layers.0." in l.name}
    assert set(names) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert names["k_proj"].weight_matrix.shape[0] < names["q_proj"].weight_matrix.shape[0]  # GQA
    assert {l.kind for l in layers if l.name != "lm_head"} == {"attn", "mlp"}
    assert all(l.group == "decoder" for l in layers)
    selected = [l.name for l in select_layers(adapter, CompressionConfig(method="svd", ratio=0.5))]
    assert "lm_head" in [l.name for l in layers] and "lm_head" not in selected  # excluded by default
    assert [l.name for l in select_layers(adapter, CompressionConfig(method="svd", ratio=0.5, targets=["lm_head"]))] == ["lm_head"]
    gpt2, _, _ = _load(tiny_dirs, "gpt2")
    c_attn = [l for l in gpt2.target_layers() if l.name.endswith("attn.c_attn")]
    assert len(c_attn) == 2 and tuple(c_attn[0].weight_matrix.shape) == (96, 32)  # packed q/k/v: one layer, out x in


@pytest.mark.parametrize("arch", ARCHS)
def test_eps_zero_and_full_rank_factors_keep_logits(tiny_dirs, arch):
    adapter, spec, text = _load(tiny_dirs, arch)
    ref = _logits(adapter, IDS)
    report = compress(adapter, _cfg(spec, text, method="pgsvd", eps=0.0), None)
    assert all(l.rank is None for l in report.layers) and report.targeted_reduction == 0
    torch.testing.assert_close(_logits(adapter, IDS), ref, rtol=1e-5, atol=1e-5)
    # full-rank factors through LowRankLinear for every target (Conv1D transposes included)
    for layer in adapter.target_layers():
        W = layer.weight_matrix.detach()
        fact = solve_svd(W, min(W.shape), device="cpu")
        new = LowRankLinear.from_factors(fact.A, fact.B, getattr(layer.module, "bias", None), dtype=W.dtype)
        replace_module(adapter.model, layer.name, new)
    assert not any(type(m).__name__ in ("Conv1D", "Linear") for n, m in adapter.model.named_modules() if ".h." in n or ".layers." in n)
    torch.testing.assert_close(_logits(adapter, IDS), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_ranks_follow_tolerance_and_parameters_add_up(tiny_dirs, arch):
    adapter, spec, text = _load(tiny_dirs, arch)
    weights = {l.name: l.weight_matrix.detach().clone() for l in adapter.target_layers()}
    before = count_parameters(adapter.model)
    cfg = _cfg(spec, text, method="pgsvd", eps_attn=0.5, eps_mlp=0.7)
    calib = HFCausalLMAdapter.load_calibration(cfg)
    report = compress(adapter, cfg, calib)
    assert report.tolerances == {"attn": 0.5, "mlp": 0.7}
    compressed = 0
    for layer in report.layers:
        eps = 0.5 if layer.kind == "attn" else 0.7
        r = tolerance_rank(torch.linalg.svdvals(weights[layer.name].double()), eps)
        saves = saves_parameters(layer.out_features, layer.in_features, r)
        assert layer.rank == (r if saves else None), layer.name
        module = adapter.model.get_submodule(layer.name)
        assert isinstance(module, LowRankLinear) == saves
        assert sum(p.numel() for p in module.parameters()) == layer.params_after
        if saves:
            compressed += 1
            assert layer.tokens == sum(w.numel() for w in calib.windows)  # every window token counted
            assert layer.act_error <= layer.act_error_init + 1e-9
    assert compressed > 0
    assert report.whole_model_params_before == before
    assert report.whole_model_params_after == count_parameters(adapter.model)
    assert before - report.whole_model_params_after == report.targeted_params_before - report.targeted_params_after


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_and_export_dense_give_identical_logits(tiny_dirs, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, spec, text = _load(tiny_dirs, arch)
    cfg = _cfg(spec, text, method="svd_llm", ratio=0.3)
    report = compress(adapter, cfg, HFCausalLMAdapter.load_calibration(cfg))
    assert report.rank_map
    ref = _logits(adapter, IDS)
    out = save_compressed(adapter, tmp_path / "ckpt", report)
    loaded = load_compressed(out)
    assert loaded.tokenizer is not None and loaded.checkpoint_config["ranks"] == report.rank_map
    torch.testing.assert_close(_logits(loaded, IDS), ref, rtol=0, atol=0)
    dense_dir = export_dense(loaded, tmp_path / "dense")
    assert any(isinstance(m, LowRankLinear) for m in loaded.model.modules())  # export leaves the model compressed
    stock = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    assert not any(isinstance(m, LowRankLinear) for m in stock.modules())
    if arch == "gpt2":
        assert type(stock.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_padding_is_masked_out_of_the_covariance(tiny_dirs):
    adapter, spec, text = _load(tiny_dirs, "llama")
    windows = [torch.arange(3, 23), torch.arange(30, 38), torch.arange(50, 62)]
    cfg = _cfg(spec, text, method="pgsvd", eps=0.5, batch_size=3)
    layers = select_layers(adapter, cfg)
    padded = calibrate(adapter, layers, TokenCalibration(windows, "test", 20, pad_token_id=0), cfg)["decoder"]
    separate = [
        calibrate(adapter, layers, TokenCalibration([w], "test", 20), cfg.replace(batch_size=1))["decoder"] for w in windows
    ]
    for layer in layers:
        assert padded.token_count(layer.name) == 20 + 8 + 12
        expected = sum(c.covariance(layer.name) for c in separate)
        torch.testing.assert_close(padded.covariance(layer.name), expected, rtol=1e-5, atol=1e-4)


def test_bad_inputs_give_clear_errors(tiny_dirs, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from vlmpress.cli import main

    dirs, text = tiny_dirs
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    with pytest.raises(UnsupportedArchitectureError, match="bidirectional encoder.*HFDualEncoderAdapter.*HFGenerativeVLMAdapter.*HFCausalLMAdapter.*vlmpress.adapters"):
        HFCausalLMAdapter.load(f"hf:{bert}")
    with pytest.raises(UnsupportedArchitectureError, match="architecture 'bert'.*is_decoder=true"):
        adapter_for_spec(f"hf:{bert}")
    spec = f"hf:{dirs['llama']}"
    with pytest.raises(ConfigError, match="larger than the model's maximum of 64"):
        HFCausalLMAdapter.load_calibration(_cfg(spec, text, method="pgsvd", eps=0.5, seq_len=65))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        HFCausalLMAdapter.load_calibration(_cfg(spec, empty, method="pgsvd", eps=0.5))
    assert issubclass(UnsupportedArchitectureError, VlmpressError)
    common = ["--eps", "0.5", "--n-samples", "4", "--device", "cpu", "--out", str(tmp_path / "o")]
    cases = [
        (["--model", f"hf:{bert}", "--calib-text", str(text), "--seq-len", "16"], "architecture 'bert'"),
        (["--model", spec, "--calib-text", str(text), "--seq-len", "4096"], "larger than the model's maximum"),
        (["--model", spec, "--calib-text", str(empty), "--seq-len", "16"], "is empty"),
        (["--model", spec, "--calib-text", str(tmp_path / "missing.txt"), "--seq-len", "16"], "does not exist"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(["compress", *argv, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_cli_compress_clustered_eps(tiny_dirs, tmp_path, capsys):
    from vlmpress.cli import main

    dirs, text = tiny_dirs
    out = tmp_path / "ckpt"
    argv = ["compress", "--model", f"hf:{dirs['gpt2']}", "--eps-attn", "0.5", "--eps-mlp", "0.7", "--calib-text", str(text),
            "--n-samples", "4", "--seq-len", "16", "--als-iters", "1", "--device", "cpu", "--out", str(out),
            "--export-dense", str(tmp_path / "dense")]
    assert main(argv) == 0
    cfg = json.loads((out / "vlmpress_config.json").read_text())
    assert cfg["family"] == "hf_causal_lm" and cfg["tolerances"] == {"attn": 0.5, "mlp": 0.7} and cfg["ranks"]
    assert cfg["compression"]["calibration"]["n_samples"] == 4
    assert (tmp_path / "dense" / "config.json").is_file() and (tmp_path / "dense" / "tokenizer.json").is_file()


def test_torch_dtype_passes_through_to_from_pretrained(tiny_dirs):
    import vlmpress
    from vlmpress.core.lowrank import LowRankLinear
    from vlmpress.errors import ConfigError
    from vlmpress.testing import TINY_OPEN_CLIP_SPEC

    dirs, text = tiny_dirs
    adapter, report = vlmpress.compress_model(
        f"hf:{dirs['llama']}", method="pgsvd", eps=0.5, calib_text=str(text), n_samples=4, seq_len=16,
        als_iters=1, device="cpu", torch_dtype="bfloat16",
    )
    layers = [m for m in adapter.model.modules() if isinstance(m, LowRankLinear)]
    assert layers and all(m.A.dtype == torch.bfloat16 and m.B.dtype == torch.bfloat16 for m in layers)
    assert adapter.model.get_input_embeddings().weight.dtype == torch.bfloat16
    auto = HFCausalLMAdapter.load(f"hf:{dirs['llama']}", torch_dtype="auto")  # the checkpoint's own dtype
    assert auto.model.get_input_embeddings().weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="torch_dtype"):
        vlmpress.compress_model(TINY_OPEN_CLIP_SPEC, eps=0.5, torch_dtype="float16", calib_images=str(text.parent))
    with pytest.raises(ConfigError, match="torch_dtype must be"):
        vlmpress.CompressionConfig(torch_dtype="int8").validate()
