"""The conformance kit for dual-encoder adapters: six checks any vision-language adapter must pass.

``check_adapter`` dispatches generative VLMs to :mod:`vlmpress.testing.conformance_genvlm`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vlmpress.testing.factories import random_images
from vlmpress.testing.process import fresh_process_env


def _outputs(adapter, pixels, texts) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return adapter.encode_image(pixels).float().cpu(), adapter.encode_text(adapter.tokenize(texts)).float().cpu()


def _close(a, b, what: str, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    for x, y, tower in zip(a, b, ("image", "text")):
        if not torch.allclose(x, y, rtol=rtol, atol=atol):
            raise AssertionError(f"{what}: {tower} embeddings differ (max abs diff {(x - y).abs().max().item():.3g})")


def check_adapter(adapter, tmp_dir: str | Path, *, fresh_process: bool = False, rank_fraction: float = 0.5) -> dict:
    """Conformance checks any vision-language adapter should pass; raises AssertionError on the first failure.

    ``adapter`` is a freshly loaded (uncompressed, eval-mode) adapter. A generative VLM
    (:class:`~vlmpress.adapters.hf_llava.HFGenerativeVLMAdapter`: LLaVA, PaliGemma and subclasses)
    gets the same six checks on next-token logits of an image + caption batch, see
    :func:`vlmpress.testing.conformance_genvlm.check_generative_adapter`. For a dual encoder
    (:class:`VisionLanguageAdapter`) the checks are:

    1. :meth:`prepare_for_compression` leaves image and text embeddings unchanged (1e-4);
    2. every group has targets, each a module of the model that is called during its group's forward;
    3. text padding is excluded from covariances (a mixed-length batch = its captions one by one);
    4. after compression (truncated SVD) outputs equal those of the dense ``A @ B`` reconstruction;
    5. ``save_compressed`` -> ``load_compressed`` (in a fresh Python process with ``fresh_process``)
       gives identical outputs;
    6. ``export_dense`` -> the family's stock loader (:meth:`exported_spec`) gives the same outputs.

    Returns a small dict of what was checked (group target counts, exported spec).
    """
    import copy
    import json
    import subprocess


    from vlmpress.adapters.base import VisionLanguageAdapter
    from vlmpress.adapters.hf_llava import HFGenerativeVLMAdapter

    if isinstance(adapter, HFGenerativeVLMAdapter):
        from vlmpress.testing.conformance_genvlm import check_generative_adapter

        return check_generative_adapter(adapter, tmp_dir, fresh_process=fresh_process, rank_fraction=rank_fraction)
    dual_encoder_api = ("preprocess", "tokenize", "encode_image", "encode_text")
    if not isinstance(adapter, VisionLanguageAdapter) and not all(hasattr(adapter, a) for a in dual_encoder_api):
        raise TypeError(
            f"check_adapter checks vision-language adapters (VisionLanguageAdapter or HFGenerativeVLMAdapter "
            f"subclasses); got {type(adapter).__name__} (family '{getattr(adapter, 'family', '?')}')"
        )

    from vlmpress.adapters.merge import merge_lowrank_layers
    from vlmpress.pipeline.checkpoint import export_dense, load_compressed, save_compressed
    from vlmpress.pipeline.compress import compress
    from vlmpress.pipeline.config import CompressionConfig
    from vlmpress.core.covariance import CovarianceCollector

    tmp = Path(tmp_dir)
    images = random_images(2)
    texts = ["a photo", "a much longer caption of a small photo of a thing"]
    pixels = torch.stack([adapter.preprocess(im) for im in images])
    adapter.eval()
    before = _outputs(adapter, pixels, texts)
    adapter.prepare_for_compression()
    _close(before, _outputs(adapter, pixels, texts), "prepare_for_compression changed the outputs", 1e-5, 1e-5)

    layers = adapter.target_layers()
    info = {"family": adapter.family, "targets": {}}
    for group in adapter.groups:
        mine = [layer for layer in layers if layer.group == group]
        assert mine, f"{adapter.family}: group '{group}' has no target layers"
        info["targets"][group] = len(mine)
        for layer in mine:
            assert adapter.model.get_submodule(layer.name) is layer.module, f"{layer.name} is not the model's module"
        collector = CovarianceCollector({layer.name: layer.module for layer in mine})
        batch = pixels if adapter.group_modality[group] == "images" else texts
        with collector, torch.no_grad():
            adapter.calibration_forward(group, batch, collector)
        collector.check_complete()  # every target called as a module
        if adapter.group_modality[group] == "texts":
            singles = []
            for text in texts:
                c = CovarianceCollector({layer.name: layer.module for layer in mine})
                with c, torch.no_grad():
                    adapter.calibration_forward(group, [text], c)
                singles.append(c)
            for layer in mine:
                joint = collector.covariance(layer.name)
                alone = sum(c.covariance(layer.name) for c in singles)
                assert collector.token_count(layer.name) == sum(c.token_count(layer.name) for c in singles), (
                    f"{layer.name}: padding positions counted in the text covariance"
                )
                assert torch.allclose(joint, alone, rtol=1e-3, atol=1e-3), f"{layer.name}: padding changes the covariance"

    config = CompressionConfig(model=adapter.spec, method="svd", ratio=rank_fraction, device="cpu")
    report = compress(adapter, config)
    compressed = _outputs(adapter, pixels, texts)
    dense = copy.deepcopy(adapter)
    merge_lowrank_layers(dense.model)
    _close(compressed, _outputs(dense, pixels, texts), "compressed outputs differ from the dense A@B reconstruction")

    ckpt = save_compressed(adapter, tmp / "ckpt", report, overwrite=True)
    if fresh_process:
        script = (
            "import sys, torch, json\n"
            "from vlmpress.pipeline.checkpoint import load_compressed\n"
            "a = load_compressed(sys.argv[1])\n"
            "p = torch.load(sys.argv[2])\n"
            "t = json.loads(sys.argv[3])\n"
            "with torch.no_grad():\n"
            "    torch.save((a.encode_image(p).float(), a.encode_text(a.tokenize(t)).float()), sys.argv[4])\n"
        )
        torch.save(pixels, tmp / "pixels.pt")
        env = fresh_process_env()
        subprocess.run(
            [sys.executable, "-c", script, str(ckpt), str(tmp / "pixels.pt"), json.dumps(texts), str(tmp / "out.pt")],
            check=True, env=env, capture_output=True,
        )
        reloaded = tuple(torch.load(tmp / "out.pt"))
    else:
        reloaded = _outputs(load_compressed(ckpt), pixels, texts)
    _close(compressed, reloaded, "save -> load changed the outputs", 1e-5, 1e-5)

    exported = export_dense(adapter, tmp / "dense", overwrite=True)
    spec = adapter.exported_spec(exported)
    info["exported_spec"] = spec
    if spec is not None:
        stock = type(adapter).load(spec).eval()
        _close(compressed, _outputs(stock, pixels, texts), "export_dense -> stock load changed the outputs")
    return info
