"""Output-preserving preparation rewrites and the no-silent-skip rule."""

from __future__ import annotations

import pytest
import torch

from vlmpress.adapters.module_calls import prepare_module_calls
from vlmpress.errors import ConfigError


def test_attention_pool_rewrite_is_exact():
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(0)
    model = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=64, width=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert prepare_module_calls(model) == 1 and prepare_module_calls(model) == 0  # idempotent
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    seen = []
    hooks = [getattr(model.attnpool, n).register_forward_hook(lambda m, i, o, n=n: seen.append(n)) for n in ("q_proj", "k_proj", "v_proj", "c_proj")]
    with torch.no_grad():
        model(x)
    assert sorted(seen) == ["c_proj", "k_proj", "q_proj", "v_proj"]
    for h in hooks:
        h.remove()
    assert set(model.state_dict()) == set(ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=64, width=8).state_dict())


def test_eva_attention_rewrite_is_exact():
    from timm.models.eva import EvaAttention

    torch.manual_seed(0)
    attn = EvaAttention(32, num_heads=2, qkv_bias=True, scale_norm=False).eval()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = attn(x)
        assert prepare_module_calls(attn) == 1
        called = []
        attn.qkv.register_forward_hook(lambda *a: called.append(1))
        out = attn(x)
    assert called
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)




def _cfg(**kw):
    from vlmpress.pipeline.config import CompressionConfig

    base = dict(model="open_clip:vlmpress-tiny", method="svd", device="cpu")
    base.update(kw)
    return CompressionConfig(**base)


def test_group_given_a_tolerance_without_layers_is_an_error():
    from vlmpress.pipeline.compress import compress
    from vlmpress.testing import tiny_open_clip

    adapter = tiny_open_clip()
    with pytest.raises(ConfigError, match=r"group 'vision' of model 'open_clip:vlmpress-tiny' was given a tolerance \(eps-v=0.5\)"):
        compress(adapter, _cfg(eps_v=0.5, eps_t=0.5, targets=[r"^transformer\."]))
    with pytest.raises(ConfigError, match="has no group 'decoder'"):
        from vlmpress.pipeline.compress import check_groups_have_targets

        check_groups_have_targets(adapter, _cfg(eps=0.5, eps_proportion={"decoder": 1.0}, target_reduction=0.3, allocation="proportion"), [], [])


def test_saved_tolerances_are_only_applied_ones_and_coverage_reported():
    from vlmpress.pipeline.compress import compress
    from vlmpress.testing import tiny_open_clip

    adapter = tiny_open_clip()
    report = compress(adapter, _cfg(eps=0.5, eps_t=0.4, targets=[r"^transformer\."]))
    assert report.tolerances == {"text": 0.4}  # '*' never applied: every target is a text layer
    assert report.coverage["text"]["targeted_fraction"] == pytest.approx(1.0)
    assert report.coverage["vision"]["targeted_fraction"] == 0.0
    assert report.coverage["vision"]["dense_convs"] == ["visual.conv1"]
    assert "coverage" in report.summary()


def test_conv_only_vision_tower_exits_2_naming_group_and_model(tmp_path, capsys):
    """The case that used to compress only the text tower and exit 0: now a one-line error, exit 2."""
    from vlmpress.cli import main
    from vlmpress.testing import tiny_open_clip_from_cfg

    cfg = {"embed_dim": 96, "vision_cfg": {"timm_model_name": "test_resnet", "timm_model_pretrained": False,
                                           "timm_pool": "avg", "timm_proj": "none", "image_size": 64},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}, "custom_text": True}
    adapter = tiny_open_clip_from_cfg("vlmpress-test-conv-only", cfg, tmp_path / "cfg")
    inventory = adapter.tower_inventory()
    assert inventory["vision"].linear_layers == 0 and inventory["vision"].conv_layers > 0
    code = main(["compress", "--model", "open_clip:vlmpress-test-conv-only", "--method", "svd", "--eps-v", "0.5",
                 "--eps-t", "0.5", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "group 'vision' of model 'open_clip:vlmpress-test-conv-only' was given a tolerance (eps-v=0.5)" in err
    assert "0 linear layers" in err and "convolutions" in err
    assert not (tmp_path / "out").exists()
