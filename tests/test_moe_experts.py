"""MoE experts as layers: fused expert tensors split per expert, routing-aware calibration, round trips.

Tiny random Mixtral, Qwen3-MoE, gpt-oss (transposed fused tensors with biases), Qwen2-MoE and
DeepSeek-V3 (shared experts) models, from the census' shrunk default configs.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter
from vlmpress.adapters.routed_experts import EXPERT_KINDS, RoutedExperts
from vlmpress.census.tiny_configs import tiny_config
from vlmpress.data.text_calibration import TokenCalibration
from vlmpress.errors import CheckpointError
from vlmpress.pipeline.checkpoint import export_dense, load_compressed, save_compressed
from vlmpress.pipeline.compress import calibrate, compress, factorise_layer, layer_plan, select_layers
from vlmpress.pipeline.config import CompressionConfig

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 11, 200], [9, 8, 7, 6, 5, 4, 3, 2, 1, 30, 40, 50]]) % 250 + 3


def _model_dir(tmp_path_factory, family: str):
    from transformers import AutoModelForCausalLM

    config, _ = tiny_config(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp(family) / "model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {f: _model_dir(tmp_path_factory, f) for f in ("mixtral", "qwen3_moe", "gpt_oss", "qwen2_moe", "deepseek_v3")}


def _stock(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _calibration(windows: int = 16, seq_len: int = 32, ragged: bool = False, seed: int = 0) -> TokenCalibration:
    """Random token windows; ``ragged``: every other window shorter (padding in each batch)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [seq_len - (7 if ragged and i % 2 else 0) for i in range(windows)]
    return TokenCalibration([torch.randint(3, 250, (n,), generator=gen) for n in lengths], "random ids", seq_len, pad_token_id=0)


def _config(**kw) -> CompressionConfig:
    return CompressionConfig(**{"model": "x", "method": "pgsvd", "device": "cpu", "batch_size": 4, **kw})


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "qwen2_moe", "deepseek_v3"])
def test_experts_are_split_per_expert_with_unchanged_logits(dirs, family):
    ref = _logits(_stock(dirs[family]))
    adapter = HFCausalLMAdapter.load(f"hf:{dirs[family]}")
    adapter.prepare_for_compression()
    adapter.prepare_for_compression()  # idempotent
    assert (_logits(adapter.model) - ref).abs().max() <= 1e-6 * ref.abs().max()  # gpt-oss: x @ W vs x W^T rounding
    split = [(n, m) for n, m in adapter.model.named_modules() if isinstance(m, RoutedExperts)]
    assert split and all(item.reason is None and item.router for item in adapter.fused_experts)
    assert not any(p.dim() == 3 for _, m in split for p in m.parameters())  # no fused tensor left behind
    targets = adapter.target_layers()
    experts = [t for t in targets if t.kind in EXPERT_KINDS]
    n_experts = split[0][1].num_experts
    assert len(experts) == 2 * n_experts * len(split) and all(t.routed for t in experts)
    assert not any(t.routed for t in targets if t.kind not in EXPERT_KINDS)
    routers = {item.router for item in adapter.fused_experts}
    assert not any(t.name in routers for t in targets)  # routers stay dense
    if family in ("qwen2_moe", "deepseek_v3"):  # shared experts are ordinary MLP linears
        assert any("shared_expert" in t.name and t.kind == "mlp" for t in targets)


def _routed_inputs(model, family_router: str, ids, mask):
    """Independent of vlmpress: each MoE block's input (hook on the block), the routing recomputed from
    the router's own weight (top-k of x W^T; softmax keeps the order), the real-token mask."""
    captured = {}
    handles = []
    for name, module in model.named_modules():
        if hasattr(module, "experts") and hasattr(module, family_router):
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: captured.setdefault(n, []).append(a[0].detach())))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    out = {}
    for name, inputs in captured.items():
        block = model.get_submodule(name)
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double()
        router = getattr(block, family_router)
        index = (x @ router.weight.double().T).topk(router.top_k, dim=-1).indices
        out[name] = (x, index, mask.reshape(-1).bool())
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_covariances_equal_an_independent_computation_from_routed_tokens(dirs, family):
    calib = _calibration(windows=4, seq_len=24, ragged=True)
    adapter = HFCausalLMAdapter.load(f"hf:{dirs[family]}")
    cfg = _config(eps=0.5, batch_size=4)
    layers = [l for l in select_layers(adapter, cfg) if l.routed]
    collectors = calibrate(adapter, layers, calib, cfg)["decoder"]
    (batch,) = adapter.token_batches(calib, 4)
    assert not batch["attention_mask"].all()  # padding present: it must not count
    stock = _stock(dirs[family])
    routed = _routed_inputs(stock, "gate", batch["input_ids"], batch["attention_mask"])
    assert len(routed) == 2
    for block, (x, index, valid) in routed.items():
        experts = stock.get_submodule(block).experts
        for e in range(experts.num_experts):
            rows = valid & (index == e).any(-1)
            X = x[rows]
            gate, up = experts.gate_up_proj[e].detach().double().chunk(2, dim=0)
            H = torch.nn.functional.silu(X @ gate.T) * (X @ up.T)
            for layer, want in ((f"{block}.experts.gate_up.{e}", X.T @ X), (f"{block}.experts.down.{e}", H.T @ H)):
                assert collectors.token_count(layer) == int(rows.sum())
                got = collectors.covariance(layer)
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.detach().abs().max())), layer


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_full_rank_expert_factors_keep_the_logits(dirs, family):
    adapter = HFCausalLMAdapter.load(f"hf:{dirs[family]}")
    ref = _logits(_stock(dirs[family]))
    cfg = _config(method="svd_llm", ratio=0.3)  # the closed-form activation-aware solve
    layers = [l for l in select_layers(adapter, cfg) if l.routed]
    collector = calibrate(adapter, layers, _calibration(), cfg)["decoder"]
    for layer in layers:
        plan = layer_plan(layer)
        rank = min(plan.out_features, plan.in_features)
        report = factorise_layer(adapter, layer, plan, rank, cfg, torch.device("cpu"), tol=None, ratio=None,
                                 M=collector.covariance(layer.name), tokens=collector.token_count(layer.name))
        assert report.rank == rank and report.status == "compressed"
    assert sum(type(m).__name__ == "LowRankLinear" for m in adapter.model.modules()) == len(layers)
    got = _logits(adapter.model)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_report_lists_every_expert_with_its_rank_and_kind(dirs, tmp_path):
    adapter = HFCausalLMAdapter.load(f"hf:{dirs['mixtral']}")
    report = compress(adapter, _config(eps=0.5), _calibration())
    experts = [r for r in report.layers if r.kind in EXPERT_KINDS]
    assert len(experts) == 2 * 2 * 4  # 2 MoE blocks x 2 matrices x 4 experts
    assert {r.kind for r in experts} == {"expert_gate_up", "expert_down"}
    assert all(r.rank is not None and r.tokens > r.in_features and not r.weight_only for r in experts)
    ranks = {r.name: r.rank for r in experts}
    assert len(set(ranks.values())) > 1  # own tolerance ranks, not one shared rank
    assert report.summary()["experts"] == {"layers": 16, "compressed": 16, "weight_only": 0}
    table = report.format_table()
    for name, rank in ranks.items():
        assert any(line.startswith(name) and f" {rank} " in line for line in table.splitlines())
    assert "MoE experts       : 16 expert layers, 16 factorised, 0 from their weights alone" in table
    # each expert's rank is its own eps-tolerance rank: the smallest with ||W - W_r||_F <= eps ||W||_F
    stock = _stock(dirs["mixtral"])
    r = experts[0]
    block, e = r.name.split(".experts.")[0], int(r.name.rsplit(".", 1)[1])
    W = stock.get_submodule(block).experts.gate_up_proj[e].double()
    s = torch.linalg.svdvals(W)
    tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0])) / s.norm()  # tail[k]: error at rank k
    assert tail[r.rank] <= 0.5 < tail[r.rank - 1]


def test_eps_mlp_covers_expert_layers(dirs):
    adapter = HFCausalLMAdapter.load(f"hf:{dirs['mixtral']}")  # no dense MLP at all: only experts
    report = compress(adapter, _config(eps=None, eps_attn=0.3, eps_mlp=0.6), _calibration())
    tolerances = {r.kind: r.tolerance for r in report.layers}
    assert tolerances["expert_gate_up"] == tolerances["expert_down"] == 0.6 and tolerances["attn"] == 0.3


def test_experts_with_too_few_tokens_are_factorised_from_their_weights(dirs):
    """gpt-oss's router has a bias: pushing one expert's bias down leaves it with no token at all."""
    adapter = HFCausalLMAdapter.load(f"hf:{dirs['gpt_oss']}")
    with torch.no_grad():
        adapter.model.model.layers[0].mlp.router.bias[3] = -1e4  # expert 3 of block 0 is never chosen
    calib = _calibration(windows=2, seq_len=12)  # 24 tokens x top-2 over 4 experts: fewer than 64 inputs
    report = compress(adapter, _config(eps=0.5), calib)
    experts = {r.name: r for r in report.layers if r.kind in EXPERT_KINDS}
    silent = experts["model.layers.0.mlp.experts.gate_up.3"]
    assert silent.tokens == 0 and silent.weight_only and silent.rank is not None and silent.act_error is None
    assert all(r.weight_only == (r.tokens < r.in_features) for r in experts.values())
    assert report.summary()["experts"]["weight_only"] == sum(r.weight_only for r in experts.values()) == len(experts)
    # weight-only = the truncated SVD of the weight at the planned rank
    stock = _stock(dirs["gpt_oss"])
    W = stock.model.layers[0].mlp.experts.gate_up_proj[3].double().T  # stored transposed: (out x in)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = silent.rank
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    layer = adapter.model.get_submodule(silent.name)
    assert torch.allclose((layer.A @ layer.B).double(), best, atol=1e-5)
    assert "from their weights alone" in report.format_summary()


def test_enough_tokens_means_activation_aware_experts(dirs):
    adapter = HFCausalLMAdapter.load(f"hf:{dirs['gpt_oss']}")
    report = compress(adapter, _config(eps=0.5), _calibration(windows=16, seq_len=32))
    experts = [r for r in report.layers if r.kind in EXPERT_KINDS]
    assert not any(r.weight_only for r in experts)
    assert all(r.tokens >= r.in_features and r.act_error is not None for r in experts)  # solved against X X^T


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_save_load_and_dense_export_round_trip(dirs, family, tmp_path):
    adapter = HFCausalLMAdapter.load(f"hf:{dirs[family]}")
    report = compress(adapter, _config(eps=0.5), _calibration())
    assert any(r.kind in EXPERT_KINDS and r.rank for r in report.layers)
    ref = _logits(adapter.model)
    save_compressed(adapter, tmp_path / "c", report)
    config = json.loads((tmp_path / "c" / "vlmpress_config.json").read_text())
    assert any(".experts.down." in name for name in config["ranks"])
    loaded = load_compressed(tmp_path / "c")
    assert torch.equal(_logits(loaded.model), ref)
    export_dense(loaded, tmp_path / "dense")
    stock = _stock(tmp_path / "dense")
    assert any(p.dim() == 3 for p in stock.parameters())  # the stock fused layout again
    assert (_logits(stock) - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert not any(isinstance(m, RoutedExperts) for m in stock.modules())


def test_checkpoint_checks_cover_expert_layers(dirs, tmp_path):
    """Issue 20's checks apply to expert layers: a recorded shape or rank that does not fit is refused."""
    adapter = HFCausalLMAdapter.load(f"hf:{dirs['mixtral']}")
    report = compress(adapter, _config(eps=0.5), _calibration())
    save_compressed(adapter, tmp_path / "c", report)
    path = tmp_path / "c" / "vlmpress_config.json"
    original = json.loads(path.read_text())
    name = next(n for n in original["ranks"] if ".experts.gate_up." in n)
    bad_shape = {**original, "layer_shapes": {**original["layer_shapes"], name: [7, 9]}}
    path.write_text(json.dumps(bad_shape))
    with pytest.raises(CheckpointError, match="rank|7x9|shape"):
        load_compressed(tmp_path / "c", verify=False)
    bad_rank = {**original, "ranks": {**original["ranks"], name: original["ranks"][name] + 1}}
    path.write_text(json.dumps(bad_rank))
    with pytest.raises(CheckpointError, match="shape"):
        load_compressed(tmp_path / "c", verify=False)


def test_sequential_mode_gives_the_same_expert_ranks_and_model(dirs, tmp_path):
    from vlmpress.pipeline.sequential import compress_sequential

    calib = _calibration()
    whole = HFCausalLMAdapter.load(f"hf:{dirs['qwen3_moe']}")
    cfg = _config(eps=0.5, propagate="original")
    report = compress(whole, cfg, calib)
    seq = HFCausalLMAdapter.load(f"hf:{dirs['qwen3_moe']}")
    seq_report = compress_sequential(seq, cfg, calib, state_dir=tmp_path / "state")
    assert seq_report.rank_map == report.rank_map
    assert any(".experts." in n for n in seq_report.rank_map)
    assert (_logits(seq.model) - _logits(whole.model)).abs().max() <= 1e-4


def test_cli_compresses_an_moe_model_and_reports_its_experts(tmp_path, capsys):
    from vlmpress.cli import main
    from vlmpress.reference.lm import TINY_TEXT, save_tiny_causal_lm

    model = save_tiny_causal_lm(tmp_path / "mixtral", "mixtral", seed=1)
    text = tmp_path / "calib.txt"
    text.write_text(TINY_TEXT)
    out = tmp_path / "ckpt"
    argv = ["compress", "--model", f"hf:{model}", "--eps-attn", "0.4", "--eps-mlp", "0.6", "--calib-text", str(text),
            "--n-samples", "4", "--seq-len", "24", "--device", "cpu", "--out", str(out), "--export-dense", str(tmp_path / "dense")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "MoE experts       : 16 expert layers" in printed
    cfg = json.loads((out / "vlmpress_config.json").read_text())
    assert cfg["compression"]["experts"]["layers"] == 16 and cfg["tolerances"] == {"attn": 0.4, "mlp": 0.6}
    # every expert layer is in the report with the tokens routed to it; the few-token rule follows those counts
    report = json.loads((out / "compression_report.json").read_text())
    experts = [l for l in report["layers"] if l["kind"] in EXPERT_KINDS]
    assert len(experts) == 16 and all(l["weight_only"] == (l["tokens"] < l["in_features"]) for l in experts)
    assert _logits(_stock(tmp_path / "dense")).isfinite().all()


def test_quantised_factors_of_an_expert_that_saw_no_token(dirs):
    """--quantize measures activation errors from the covariances; an expert without tokens has none."""
    adapter = HFCausalLMAdapter.load(f"hf:{dirs['gpt_oss']}")
    with torch.no_grad():
        adapter.model.model.layers[0].mlp.router.bias[3] = -1e4  # expert 3 of block 0 is never chosen
    report = compress(adapter, _config(eps=0.5, quantize="int8"), _calibration(windows=8, seq_len=32))
    rows = {r.name: r for r in report.layers}
    silent = rows["model.layers.0.mlp.experts.gate_up.3"]
    assert silent.tokens == 0 and silent.quant_weight_error is not None and silent.quant_act_error is None
    assert rows["model.layers.0.mlp.experts.gate_up.0"].quant_act_error is not None
    assert torch.isfinite(_logits(adapter.model)).all()
