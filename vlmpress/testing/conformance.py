"""The conformance kit for dual-encoder adapters (CoCa's decoder included): the checks any
vision-language adapter must pass.

``check_adapter`` dispatches generative VLMs to :mod:`vlmpress.testing.conformance_genvlm`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vlmpress.testing.factories import random_images
from vlmpress.testing.process import fresh_process_env


def group_output(adapter, group: str, batch):
    """``adapter.group_output`` (VisionLanguageAdapter), or the encoder of the group's modality (any duck-typed adapter)."""
    if hasattr(adapter, "group_output"):
        return adapter.group_output(group, batch)
    return adapter.encode_image(batch) if adapter.group_modality[group] == "images" else adapter.encode_text(batch)


def _outputs(adapter, pixels, texts, extra: dict | None = None) -> tuple[torch.Tensor, ...]:
    """Image and text embeddings, then the outputs of every ``tokens`` group (CoCa's captioning logits)."""
    with torch.no_grad():
        out = [adapter.encode_image(pixels).float().cpu(), adapter.encode_text(adapter.tokenize(texts)).float().cpu()]
        out += [group_output(adapter, g, b).float().cpu() for g, b in (extra or {}).items()]
    return tuple(out)


def _close(a, b, what: str, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    names = ("image", "text", "multimodal", "other")
    for x, y, tower in zip(a, b, names):
        if not torch.allclose(x, y, rtol=rtol, atol=atol):
            raise AssertionError(f"{what}: {tower} outputs differ (max abs diff {(x - y).abs().max().item():.3g})")


def check_embedding_shapes(adapter, image_emb: torch.Tensor, text_emb: torch.Tensor, n_images: int, n_texts: int) -> int:
    """Encoders must return (batch, dim) embeddings of one width; returns the width."""
    family = getattr(adapter, "family", type(adapter).__name__)
    for emb, n, what in ((image_emb, n_images, "encode_image"), (text_emb, n_texts, "encode_text")):
        if emb.dim() != 2 or emb.shape[0] != n:
            raise AssertionError(
                f"{family}: {what} returned shape {tuple(emb.shape)} for {n} inputs; it must return (batch, dim) "
                "embeddings (pool per-token outputs before returning them)"
            )
    if image_emb.shape[1] != text_emb.shape[1]:
        raise AssertionError(f"{family}: image embeddings have width {image_emb.shape[1]}, text embeddings {text_emb.shape[1]}")
    return int(image_emb.shape[1])


def check_targets_influence_outputs(adapter, layers, batches: dict[str, object]) -> None:
    """Perturbing any target's weight must change its group's output (:meth:`group_output`).

    A layer whose output never reaches the model's outputs (a pooler the forward computes but does
    not read, a linear never called) cannot be calibrated meaningfully and must not be a target. Any
    change counts: a block behind a tiny layer scale (ConvNeXt's 1e-6 init) changes the output little.
    """
    from vlmpress.adapters.layers import weight_matrix

    family = getattr(adapter, "family", type(adapter).__name__)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for group, batch in batches.items():
            reference = group_output(adapter, group, batch).float()
            for layer in (l for l in layers if l.group == group):
                weight = layer.module.weight
                saved = weight.detach().clone()
                scale = 1.0 + float(weight_matrix(layer.module).abs().max())  # large: tiny random models have tiny outputs
                weight.add_(torch.randn(saved.shape, generator=gen).to(weight) * scale)
                try:
                    changed = (group_output(adapter, group, batch).float() - reference).abs().max().item()
                finally:
                    weight.copy_(saved)
                if not changed > 0:
                    raise AssertionError(
                        f"{family}: target '{layer.name}' ({group}) cannot influence the {group} output "
                        "(perturbing its weight changes nothing); it must not be a compression target"
                    )


def check_adapter(adapter, tmp_dir: str | Path, *, fresh_process: bool = False, rank_fraction: float = 0.5) -> dict:
    """Conformance checks any vision-language adapter should pass; raises AssertionError on the first failure.

    ``adapter`` is a freshly loaded (uncompressed, eval-mode) adapter. A generative VLM
    (:class:`~vlmpress.adapters.hf_generative.HFGenerativeVLMAdapter`: any image-text-to-text family, LLaVA, PaliGemma)
    gets the same six checks on next-token logits of an image + caption batch, see
    :func:`vlmpress.testing.conformance_genvlm.check_generative_adapter`. For a dual encoder
    (:class:`VisionLanguageAdapter`) the checks are:

    0. both encoders return (batch, dim) embeddings of one width, and perturbing any target's
       weight changes its group's output (:func:`check_targets_influence_outputs`);
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
    from vlmpress.adapters.hf_generative import HFGenerativeVLMAdapter

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
    from vlmpress.data.calibration import CalibrationSet

    tmp = Path(tmp_dir)
    images = random_images(2)
    texts = ["a photo", "a much longer caption of a small photo of a thing"]
    pixels = torch.stack([adapter.preprocess(im) for im in images])
    pairs = CalibrationSet(images, texts)
    extra = {g: adapter.token_batches(pairs, len(images))[0] for g in adapter.groups if adapter.group_modality[g] == "tokens"}
    adapter.eval()
    before = _outputs(adapter, pixels, texts, extra)
    info = {"family": adapter.family, "targets": {}}
    info["embedding_dim"] = check_embedding_shapes(adapter, before[0], before[1], len(images), len(texts))
    adapter.prepare_for_compression()
    _close(before, _outputs(adapter, pixels, texts, extra), "prepare_for_compression changed the outputs", 1e-5, 1e-5)

    layers = adapter.target_layers()
    batch_of = {"images": pixels, "texts": texts}
    group_batches = {g: extra.get(g, batch_of.get(adapter.group_modality[g])) for g in adapter.groups}
    check_targets_influence_outputs(
        adapter, layers, {g: (adapter.tokenize(b) if adapter.group_modality[g] == "texts" else b) for g, b in group_batches.items()}
    )
    for group in adapter.groups:
        mine = [layer for layer in layers if layer.group == group]
        assert mine, f"{adapter.family}: group '{group}' has no target layers"
        info["targets"][group] = len(mine)
        for layer in mine:
            assert adapter.model.get_submodule(layer.name) is layer.module, f"{layer.name} is not the model's module"
        collector = CovarianceCollector({layer.name: layer.module for layer in mine})
        batch = group_batches[group]
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
    compressed = _outputs(adapter, pixels, texts, extra)
    dense = copy.deepcopy(adapter)
    merge_lowrank_layers(dense.model)
    _close(compressed, _outputs(dense, pixels, texts, extra), "compressed outputs differ from the dense A@B reconstruction")

    ckpt = save_compressed(adapter, tmp / "ckpt", report, overwrite=True)
    if fresh_process:
        script = (
            "import sys, torch, json\n"
            "from vlmpress.pipeline.checkpoint import load_compressed\n"
            "a = load_compressed(sys.argv[1])\n"
            "p = torch.load(sys.argv[2])\n"
            "t = json.loads(sys.argv[3])\n"
            "extra = torch.load(sys.argv[5])\n"
            "with torch.no_grad():\n"
            "    out = [a.encode_image(p).float(), a.encode_text(a.tokenize(t)).float()]\n"
            "    out += [a.group_output(g, b).float() for g, b in extra.items()]\n"
            "    torch.save(tuple(out), sys.argv[4])\n"
        )
        torch.save(pixels, tmp / "pixels.pt")
        torch.save(extra, tmp / "extra.pt")
        env = fresh_process_env()
        subprocess.run(
            [sys.executable, "-c", script, str(ckpt), str(tmp / "pixels.pt"), json.dumps(texts), str(tmp / "out.pt"), str(tmp / "extra.pt")],
            check=True, env=env, capture_output=True,
        )
        reloaded = tuple(torch.load(tmp / "out.pt"))
    else:
        reloaded = _outputs(load_compressed(ckpt), pixels, texts, extra)
    _close(compressed, reloaded, "save -> load changed the outputs", 1e-5, 1e-5)

    exported = export_dense(adapter, tmp / "dense", overwrite=True)
    spec = adapter.exported_spec(exported)
    info["exported_spec"] = spec
    if spec is not None:
        stock = type(adapter).load(spec).eval()
        _close(compressed, _outputs(stock, pixels, texts, extra), "export_dense -> stock load changed the outputs")
    return info
