"""OpenClipAdapter on the tiny ``open_clip:vlmpress-tiny`` model (random weights, offline)."""

import json

import open_clip
import pytest
import torch
from torch import nn

from vlmpress.adapters import adapter_for_spec
from vlmpress.adapters.attention import SplitMultiheadAttention
from vlmpress.adapters.open_clip import OpenClipAdapter, parse_spec
from vlmpress.core.covariance import CovarianceCollector
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.errors import ConfigError, UnknownModelSpecError
from vlmpress.testing import TINY_OPEN_CLIP_SPEC, lowrank_by_svd, tiny_open_clip

CAPTIONS = ["a photo of a cat", "dog", "a very small photo of a big red car on a street"]


@pytest.fixture(scope="module")
def reference():
    """Unprepared model + its features, and a prepared copy (same seed)."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    original = tiny_open_clip(seed=0)
    tokens = original.tokenize(CAPTIONS)
    with torch.no_grad():
        feats = original.encode_image(pixels), original.encode_text(tokens)
    prepared = tiny_open_clip(seed=0)
    prepared.prepare_for_compression()
    return {"original": original, "prepared": prepared, "pixels": pixels, "tokens": tokens, "feats": feats}


def _features(adapter, pixels, tokens):
    with torch.no_grad():
        return adapter.encode_image(pixels), adapter.encode_text(tokens)


def _assert_same(a, b, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def test_spec_parsing_and_acceptance():
    assert parse_spec("open_clip:ViT-B-16") == ("ViT-B-16", None)
    assert parse_spec("open_clip:ViT-B-16/openai") == ("ViT-B-16", "openai")
    assert parse_spec("open_clip:ViT-B-16//abs/ckpt.pt") == ("ViT-B-16", "/abs/ckpt.pt")
    assert parse_spec("open_clip:hf-hub:timm/some-repo") == ("hf-hub:timm/some-repo", None)
    assert OpenClipAdapter.accepts(TINY_OPEN_CLIP_SPEC)
    for spec in ["hf:openai/clip-vit-base-patch16", "open_clip:", "open_clip:/x", "ViT-B-16", "", "openclip:ViT-B-16"]:
        assert not OpenClipAdapter.accepts(spec), spec
    assert adapter_for_spec(TINY_OPEN_CLIP_SPEC) is OpenClipAdapter
    assert "vlmpress-tiny" in open_clip.list_models()


def test_unknown_names_and_tags_are_clear_errors(tmp_path):
    with pytest.raises(UnknownModelSpecError, match="no model config named 'vlmpress-tinyy'.*vlmpress-tiny"):
        OpenClipAdapter.load("open_clip:vlmpress-tinyy")
    with pytest.raises(UnknownModelSpecError, match="neither a pretrained tag"):
        OpenClipAdapter.load("open_clip:vlmpress-tiny/no-such-tag")


def test_prepared_model_has_identical_features(reference):
    prepared = reference["prepared"]
    attn = prepared.model.visual.transformer.resblocks[0].attn
    assert isinstance(attn, SplitMultiheadAttention)
    assert isinstance(prepared.model.transformer.resblocks[1].attn, SplitMultiheadAttention)
    got = _features(prepared, reference["pixels"], reference["tokens"])
    _assert_same(got, reference["feats"])
    assert not torch.allclose(got[1][0], got[1][1])  # captions really differ (the check is not vacuous)


def test_prepare_is_idempotent_and_targets_are_stable(reference):
    prepared = reference["prepared"]
    before = {t.name: t.module for t in prepared.target_layers()}
    prepared.prepare_for_compression()
    after = {t.name: t.module for t in prepared.target_layers()}
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)


def test_target_layers(reference):
    layers = reference["prepared"].target_layers()
    assert len(layers) == 24
    for group, prefix in [("vision", "visual.transformer.resblocks."), ("text", "transformer.resblocks.")]:
        mine = [t for t in layers if t.group == group]
        assert len(mine) == 12  # 2 blocks x (q, k, v, out, c_fc, c_proj)
        assert all(t.name.startswith(prefix) for t in mine)
        assert sum(t.kind == "attn" for t in mine) == 8 and sum(t.kind == "mlp" for t in mine) == 4
    names = {t.name for t in layers}
    assert "visual.transformer.resblocks.1.attn.out_proj" in names
    assert "transformer.resblocks.0.mlp.c_fc" in names
    assert not any("proj" == n.split(".")[-1] or "embedding" in n or "text_projection" in n for n in names)
    for t in layers:
        assert isinstance(t.module, nn.Linear)
        assert t.weight_matrix.shape == (t.module.out_features, t.module.in_features)


def test_calibration_hooks_fire_and_text_mask_excludes_padding(reference):
    adapter = reference["prepared"]
    layers = {t.name: t.module for t in adapter.target_layers()}
    with CovarianceCollector(layers) as cov:
        adapter.calibration_forward("vision", reference["pixels"], cov)
        adapter.calibration_forward("text", CAPTIONS, cov)
    for name in layers:
        assert cov.call_count(name) == 1, name
    # 2 images x (1 class token + 4x4 patches)
    assert cov.token_count("visual.transformer.resblocks.0.attn.q_proj") == 2 * 17
    assert cov.token_count("visual.transformer.resblocks.0.attn.out_proj") == 2 * 17
    tokens = adapter.tokenize(CAPTIONS)
    up_to_eot = int((tokens.argmax(dim=-1) + 1).sum())
    nonzero = int((tokens != 0).sum())
    assert up_to_eot == nonzero < tokens.numel()  # open_clip pads with 0 after the end-of-text token
    for name in ["transformer.resblocks.0.attn.q_proj", "transformer.resblocks.1.attn.out_proj",
                 "transformer.resblocks.1.mlp.c_proj"]:
        assert cov.token_count(name) == up_to_eot
    # q/k/v read the same tensor and share one accumulator
    shared = cov.shared_inputs
    prefix = "transformer.resblocks.0.attn."
    assert shared[prefix + "q_proj"] == [prefix + "q_proj", prefix + "k_proj", prefix + "v_proj"]
    # the masked covariance equals X^T X over the real tokens only
    captured = {}
    c_fc = layers["transformer.resblocks.0.mlp.c_fc"]
    handle = c_fc.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0].detach()))
    with torch.no_grad():
        adapter.encode_text(tokens)
    handle.remove()
    valid = adapter.text_valid_mask(tokens)
    rows = captured["x"][valid].double()
    full = captured["x"].reshape(-1, 64).double()
    got = cov.covariance("transformer.resblocks.0.mlp.c_fc")
    scale = float((rows.T @ rows).abs().max())
    torch.testing.assert_close(got, rows.T @ rows, atol=1e-5 * scale, rtol=1e-4)  # float32 products
    assert not torch.allclose(got, full.T @ full, atol=1e-2 * scale)
    with pytest.raises(ConfigError):
        adapter.calibration_forward("audio", CAPTIONS, cov)


def test_encode_text_after_c_fc_becomes_lowrank():
    adapter = tiny_open_clip()
    adapter.prepare_for_compression()
    lowrank_by_svd(adapter.model, ["transformer.resblocks.0.mlp.c_fc", "visual.transformer.resblocks.0.mlp.c_fc"], 8)
    assert isinstance(adapter.model.transformer.resblocks[0].mlp.c_fc, LowRankLinear)
    assert adapter.model.transformer.get_cast_dtype() == torch.float32
    with torch.no_grad():
        out = adapter.encode_text(adapter.tokenize(CAPTIONS))
    assert out.shape == (3, 32) and torch.isfinite(out).all()


def test_spec_config_round_trip(reference, tmp_path):
    adapter = reference["prepared"]
    config = json.loads(json.dumps(adapter.spec_config()))  # must survive JSON
    assert config["family"] == "open_clip" and config["model_name"] == "vlmpress-tiny"
    assert config["model_cfg"]["vision_cfg"]["patch_size"] == 8
    rebuilt = OpenClipAdapter.build_from_spec_config(config, preprocessing_dir=tmp_path)
    ref_state = adapter.model.state_dict()
    new_state = rebuilt.model.state_dict()
    assert {k: v.shape for k, v in ref_state.items()} == {k: v.shape for k, v in new_state.items()}
    assert not torch.equal(new_state["transformer.resblocks.0.mlp.c_fc.weight"],
                           ref_state["transformer.resblocks.0.mlp.c_fc.weight"])  # random init, nothing loaded
    rebuilt.model.load_state_dict(ref_state)
    _assert_same(_features(rebuilt, reference["pixels"], reference["tokens"]), reference["feats"])
    assert rebuilt.spec_config()["preprocess_cfg"] == config["preprocess_cfg"]
    # a config whose name this environment does not know still rebuilds from the stored model_cfg
    config["model_name"] = "some-unregistered-model"
    other = OpenClipAdapter.build_from_spec_config(config)
    assert {k: v.shape for k, v in other.model.state_dict().items()} == {k: v.shape for k, v in ref_state.items()}


def test_export_dense_loads_in_stock_open_clip(reference, tmp_path):
    adapter = tiny_open_clip(seed=3)
    adapter.prepare_for_compression()
    lowrank_by_svd(
        adapter.model,
        ["visual.transformer.resblocks.0.attn.q_proj", "visual.transformer.resblocks.1.mlp.c_fc",
         "transformer.resblocks.0.attn.v_proj", "transformer.resblocks.1.attn.out_proj"],
        rank=4,
    )
    pixels, tokens = reference["pixels"], reference["tokens"]
    expected = _features(adapter, pixels, tokens)
    adapter.export_dense(tmp_path / "dense")
    assert isinstance(adapter.model.transformer.resblocks[0].attn.v_proj, LowRankLinear)  # adapter unchanged

    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "dense" / "open_clip_model.safetensors"))
    assert "transformer.resblocks.0.attn.in_proj_weight" in state
    assert not any(k.endswith((".A", ".B")) or ".q_proj." in k for k in state)
    assert torch.linalg.matrix_rank(state["visual.transformer.resblocks.1.mlp.c_fc.weight"]) == 4

    by_name, _, _ = open_clip.create_model_and_transforms(
        "vlmpress-tiny", pretrained=str(tmp_path / "dense" / "open_clip_model.safetensors")
    )
    by_dir, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'dense'}")
    for stock in (by_name.eval(), by_dir.eval()):
        assert isinstance(stock.transformer.resblocks[0].attn, nn.MultiheadAttention)
        with torch.no_grad():
            got = stock.encode_image(pixels), stock.encode_text(tokens)
        _assert_same(got, expected)
    assert preprocess.transforms[0].size == 32


def test_custom_text_clip_is_supported():
    torch.manual_seed(0)
    adapter = OpenClipAdapter.load(TINY_OPEN_CLIP_SPEC, force_custom_text=True)
    assert isinstance(adapter.model, open_clip.CustomTextCLIP)
    tokens = adapter.tokenize(CAPTIONS)
    pixels = torch.randn(1, 3, 32, 32)
    before = _features(adapter, pixels, tokens)
    layers = adapter.target_layers()
    text = [t for t in layers if t.group == "text"]
    assert len(text) == 12 and all(t.name.startswith("text.transformer.resblocks.") for t in text)
    _assert_same(_features(adapter, pixels, tokens), before)
    assert adapter.text_valid_mask(tokens).sum() == (tokens.argmax(-1) + 1).sum()
    config = adapter.spec_config()
    assert config["model_cfg"]["custom_text"] is True
    assert isinstance(OpenClipAdapter.build_from_spec_config(config).model, open_clip.CustomTextCLIP)


def test_misc_interface(reference):
    adapter = reference["original"]
    assert adapter.logit_scale() == pytest.approx(1 / 0.07, rel=1e-4)
    from PIL import Image

    pixels = adapter.preprocess(Image.new("RGB", (48, 40), (200, 10, 10)))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert adapter.tokenize("one caption").shape == (1, 77)
