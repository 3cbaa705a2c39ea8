"""CLIP compression end to end through the real open_clip adapter (tiny random-init model)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmpress.pipeline.loading import load_model
from vlmpress.cli import main
from vlmpress.pipeline.compress import compress, count_parameters
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.core.rank import saves_parameters, tolerance_rank
from vlmpress.data.calibration import build_calibration_set
from vlmpress.testing import TINY_OPEN_CLIP_SPEC, tiny_open_clip


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    g = torch.Generator().manual_seed(0)
    for cls in ("red_apple", "blue_car", "green_tree"):
        (root / cls).mkdir()
        for i in range(6):
            arr = (torch.rand(40, 40, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def features(adapter, images, texts):
    with torch.no_grad():
        pix = torch.stack([adapter.preprocess(Image.open(p).convert("RGB")) for p in images])
        return adapter.encode_image(pix), adapter.encode_text(adapter.tokenize(texts))


TEXTS = ["a photo of a red apple.", "a blue car on the road", "green tree"]


def test_pgsvd_separate_tolerances_on_open_clip(image_folder):
    adapter = tiny_open_clip(seed=1)
    adapter.prepare_for_compression()
    spectra = {l.name: torch.linalg.svdvals(l.weight_matrix.detach().double()) for l in adapter.target_layers()}
    calib = build_calibration_set(str(image_folder), None, n_images=12, n_captions=12)
    assert "class names" in calib.caption_source and len(calib.captions) == 12
    before = count_parameters(adapter.model)
    report = compress(adapter, CompressionConfig(method="pgsvd", eps_v=0.45, eps_t=0.7, als_iters=3, device="cpu"), calib)
    assert {l.group for l in report.layers} == {"vision", "text"}
    assert len(report.layers) == 24  # 2 towers x 2 blocks x (q, k, v, out, c_fc, c_proj)
    for l in report.layers:
        eps = 0.45 if l.group == "vision" else 0.7
        r = tolerance_rank(spectra[l.name], eps)
        module = adapter.model.get_submodule(l.name)
        if saves_parameters(l.out_features, l.in_features, r):
            assert l.rank == r and isinstance(module, LowRankLinear) and module.rank == r
            assert l.tokens > 0 and l.act_error <= l.act_error_init + 1e-9
        else:
            assert l.rank is None and isinstance(module, torch.nn.Linear)
    ranks_v = [l.rank or 0 for l in report.layers if l.group == "vision"]
    ranks_t = [l.rank or 0 for l in report.layers if l.group == "text"]
    assert ranks_v != ranks_t
    assert report.whole_model_params_before == before
    assert report.whole_model_params_after == count_parameters(adapter.model)
    assert before - count_parameters(adapter.model) == report.targeted_params_before - report.targeted_params_after
    # text calibration excludes padding after end-of-text: far fewer tokens than 77 per caption
    text_tokens = max(l.tokens for l in report.layers if l.group == "text" and l.tokens)
    assert text_tokens < 12 * 20


def test_target_reduction_within_half_a_point(image_folder):
    adapter = tiny_open_clip(seed=2)
    calib = build_calibration_set(str(image_folder), None, n_images=8, n_captions=8)
    report = compress(adapter, CompressionConfig(method="pgsvd", target_reduction=0.4, als_iters=1, device="cpu"), calib)
    assert abs(report.targeted_reduction - 0.4) <= 0.005
    report2 = compress(tiny_open_clip(seed=2), CompressionConfig(method="svd_llm", target_reduction=0.4, device="cpu"), calib)
    assert abs(report2.targeted_reduction - 0.4) <= 0.005


def test_cli_compress_then_reload_in_fresh_process(tmp_path, image_folder):
    out = tmp_path / "tiny-pgsvd"
    code = main([
        "-q", "compress", "--model", TINY_OPEN_CLIP_SPEC, "--eps-v", "0.5", "--eps-t", "0.6", "--als-iters", "2",
        "--calib-images", str(image_folder), "--n-images", "9", "--n-captions", "9", "--out", str(out),
        "--export-dense", str(tmp_path / "dense"),
    ])
    assert code == 0
    cfg = json.loads((out / "vlmpress_config.json").read_text())
    assert cfg["family"] == "open_clip" and cfg["tolerances"] == {"vision": 0.5, "text": 0.6} and cfg["ranks"]
    adapter = load_model(str(out))
    images = sorted(image_folder.rglob("*.png"))[:4]
    img, txt = features(adapter, images, TEXTS)
    torch.save({"img": img, "txt": txt}, tmp_path / "ref.pt")
    script = f"""
import torch
from PIL import Image
from vlmpress.pipeline.loading import load_model
a = load_model({str(out)!r})
imgs = {[str(p) for p in images]!r}
with torch.no_grad():
    pix = torch.stack([a.preprocess(Image.open(p).convert("RGB")) for p in imgs])
    ref = torch.load({str(tmp_path / 'ref.pt')!r})
    assert torch.equal(a.encode_image(pix), ref["img"]), "image features differ"
    assert torch.equal(a.encode_text(a.tokenize({TEXTS!r})), ref["txt"]), "text features differ"
print("FRESH-OK")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "FRESH-OK" in result.stdout, result.stderr[-2000:]
    # the dense export loads with stock open_clip and matches the compressed model
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'dense'}")
    model.eval()
    with torch.no_grad():
        pix = torch.stack([adapter.preprocess(Image.open(p).convert("RGB")) for p in images])
        torch.testing.assert_close(model.encode_image(pix), img, rtol=1e-4, atol=1e-4)
