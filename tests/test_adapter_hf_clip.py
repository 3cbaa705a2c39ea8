"""HFClipAdapter / HFSiglipAdapter on tiny random models saved to disk and loaded via ``hf:<dir>``."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

from vlmpress.adapters import adapter_for_spec
from vlmpress.adapters.hf_clip import HFClipAdapter, HFSiglipAdapter, hf_model_type
from vlmpress.adapters.merge import merge_lowrank_layers
from vlmpress.core.covariance import CovarianceCollector
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.errors import ConfigError, UnknownModelSpecError
from vlmpress.testing import lowrank_by_svd, tiny_hf_clip, tiny_hf_siglip

CAPTIONS = ["the cat", "a photo of the thing", "x"]
FACTORIES = {"clip": tiny_hf_clip, "siglip": tiny_hf_siglip}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: factory(root) for kind, factory in FACTORIES.items()}


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _features(adapter, pixels, captions=CAPTIONS):
    with torch.no_grad():
        return adapter.encode_image(pixels), adapter.encode_text(adapter.tokenize(captions))


def _assert_same(a, b, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def test_spec_resolution(adapters, tmp_path):
    clip_spec, siglip_spec = adapters["clip"].spec, adapters["siglip"].spec
    assert hf_model_type(clip_spec) == "clip" and hf_model_type(siglip_spec) == "siglip"
    assert hf_model_type(f"hf:{tmp_path / 'missing'}") is None
    assert hf_model_type("open_clip:ViT-B-16") is None
    assert HFClipAdapter.accepts(clip_spec) and not HFClipAdapter.accepts(siglip_spec)
    assert HFSiglipAdapter.accepts(siglip_spec) and not HFSiglipAdapter.accepts(clip_spec)
    assert adapter_for_spec(clip_spec) is HFClipAdapter and adapter_for_spec(siglip_spec) is HFSiglipAdapter
    for spec in ["hf:", f"hf:{tmp_path / 'missing'}", "open_clip:vlmpress-tiny", clip_spec[3:]]:
        assert not HFClipAdapter.accepts(spec) and not HFSiglipAdapter.accepts(spec), spec
    with pytest.raises(UnknownModelSpecError, match="type 'siglip', not 'clip'"):
        HFClipAdapter.load(siglip_spec)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_target_layers(adapters, kind):
    """Every linear of both towers: encoder layers, projections (CLIP), the split pooling head (SigLIP)."""
    from vlmpress.adapters.attention import SplitMultiheadAttention

    layers = adapters[kind].target_layers()
    model = adapters[kind].model
    for group, tower in [("vision", "vision_model"), ("text", "text_model")]:
        mine = [t for t in layers if t.group == group]
        encoder = [t for t in mine if t.name.startswith(f"{tower}.encoder.layers.")]
        assert len(encoder) == 12
        assert sum(t.kind == "attn" for t in encoder) == 8 and sum(t.kind == "mlp" for t in encoder) == 4
        assert {t.name.rsplit(".", 1)[1] for t in encoder} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    names = {t.name for t in layers}
    if kind == "clip":
        assert {"visual_projection", "text_projection"} <= names
    else:  # the attention-pooling head is split exactly and targeted
        assert isinstance(model.vision_model.head.attention, SplitMultiheadAttention)
        assert "vision_model.head.attention.q_proj" in names and "vision_model.head.mlp.fc1" in names
    for t in layers:
        assert model.get_submodule(t.name) is t.module and isinstance(t.module, nn.Linear)
    inventory = adapters[kind].tower_inventory()
    assert all(inv.coverage == 1.0 for inv in inventory.values())
    assert inventory["vision"].conv_layers == 1  # the patch embedding stays dense
    adapters[kind].prepare_for_compression()
    assert [t.name for t in adapters[kind].target_layers()] == [t.name for t in layers]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_calibration_masks(adapters, pixels, kind):
    adapter = adapters[kind]
    layers = {t.name: t.module for t in adapter.target_layers()}
    with CovarianceCollector(layers) as cov:
        adapter.calibration_forward("vision", pixels, cov)
        adapter.calibration_forward("text", CAPTIONS, cov)
    assert all(cov.call_count(name) == 1 for name in layers)
    patches = 17 if kind == "clip" else 16  # CLIP prepends a class token, SigLIP does not
    assert cov.token_count("vision_model.encoder.layers.0.self_attn.q_proj") == 2 * patches
    tokens = adapter.tokenize(CAPTIONS)
    if kind == "clip":
        real = int(tokens["attention_mask"].sum())
        assert real < tokens["input_ids"].numel()  # captions have different lengths: there is padding
        eot = adapter.tokenizer.eos_token_id
        first_eot = (tokens["input_ids"] == eot).int().argmax(-1)
        assert real == int((first_eot + 1).sum())  # every token up to and including end-of-text
    else:
        assert "attention_mask" not in tokens and tokens["input_ids"].shape == (3, 16)  # padded to max_length
        real = 3 * 16  # SigLIP: bidirectional, pools the last position -> every position counts
    for name in ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2"]:
        assert cov.token_count(name) == real
    q = "text_model.encoder.layers.1.self_attn.q_proj"
    assert cov.shared_inputs[q] == [q, q.replace("q_proj", "k_proj"), q.replace("q_proj", "v_proj")]
    with pytest.raises(ConfigError):
        adapter.calibration_forward("audio", CAPTIONS, cov)


def test_clip_padding_does_not_change_text_features(adapters):
    adapter = adapters["clip"]
    with torch.no_grad():
        alone = adapter.encode_text(adapter.tokenize(["x"]))
        batched = adapter.encode_text(adapter.tokenize(["x", "a photo of the thing"]))
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_preprocess_and_features(adapters, kind):
    adapter = adapters[kind]
    px = adapter.preprocess(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert isinstance(px, torch.Tensor) and px.shape == (3, 32, 32) and px.dtype == torch.float32
    image, text = _features(adapter, px[None])
    dim = 16 if kind == "clip" else 32
    assert image.shape == (1, dim) and text.shape == (3, dim)
    assert adapter.logit_scale() > 0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_spec_config_round_trip(adapters, pixels, kind, tmp_path):
    adapter = adapters[kind]
    config = json.loads(json.dumps(adapter.spec_config()))
    assert config["family"] == adapter.family
    adapter.save_preprocessing(tmp_path / "pre")
    rebuilt = type(adapter).build_from_spec_config(config, preprocessing_dir=tmp_path / "pre")
    ref_state, new_state = adapter.model.state_dict(), rebuilt.model.state_dict()
    assert {k: v.shape for k, v in ref_state.items()} == {k: v.shape for k, v in new_state.items()}
    key = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(ref_state[key], new_state[key])  # random init: no weights were loaded
    rebuilt.model.load_state_dict(ref_state)
    _assert_same(_features(rebuilt, pixels), _features(adapter, pixels))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_export_dense_loads_with_stock_transformers(adapters, pixels, kind, tmp_path):
    import transformers

    source = adapters[kind]
    adapter = type(source).load(source.spec)  # fresh copy: this test compresses it
    names = [
        "vision_model.encoder.layers.0.self_attn.q_proj",
        "vision_model.encoder.layers.1.mlp.fc1",
        "text_model.encoder.layers.0.self_attn.out_proj",
        "text_model.encoder.layers.1.mlp.fc2",
    ]
    lowrank_by_svd(adapter.model, names, rank=4)
    expected = _features(adapter, pixels)
    adapter.export_dense(tmp_path / "dense")
    assert isinstance(adapter.model.get_submodule(names[0]), LowRankLinear)  # adapter stays compressed

    model_class = getattr(transformers, "CLIPModel" if kind == "clip" else "SiglipModel")
    stock = model_class.from_pretrained(str(tmp_path / "dense")).eval()
    assert isinstance(stock.get_submodule(names[0]), nn.Linear)
    assert torch.linalg.matrix_rank(stock.get_submodule(names[1]).weight) == 4
    with torch.no_grad():
        tokens = adapter.tokenize(CAPTIONS)
        got = (
            stock.get_image_features(pixel_values=pixels).pooler_output,
            stock.get_text_features(**tokens).pooler_output,
        )
    _assert_same(got, expected)
    reloaded = type(adapter).load(f"hf:{tmp_path / 'dense'}")  # processor files were exported too
    _assert_same(_features(reloaded, pixels), expected)


def test_merge_lowrank_layers_counts():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 6)))
    lowrank_by_svd(model, ["0", "1.0"], rank=3)
    x = torch.randn(4, 8)
    expected = model(x)
    assert merge_lowrank_layers(model) == 2
    assert isinstance(model[0], nn.Linear) and isinstance(model[1][0], nn.Linear)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    assert merge_lowrank_layers(model) == 0
