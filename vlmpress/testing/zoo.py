"""The zoo round trip: a family is "ok" only when a tiny copy of it really compresses.

Every open_clip config is *shrunk* (2 blocks, width 64, the same block types, poolers, heads and
towers -- including CoCa's multimodal decoder) and put through what a user does:

    load -> compress (SVD-ALS, activation-aware: every group is calibrated on its own data) ->
    forward (finite outputs) -> save_compressed -> load_compressed (same outputs) ->
    export_dense -> the stock open_clip loader (same outputs)

``open_clip_roundtrip`` returns a :class:`~vlmpress.adapters.zoo.ZooRow` whose status is ``ok`` only
when every stage passed; otherwise ``failed`` with the stage and the first line of the error, or
``not built`` when the shrunk architecture cannot be built offline. ``scripts/zoo_table.py``
writes the table; the test suite runs a sampled, time-bounded subset (the whole zoo is ``slow``).

Shrinking is structural: open_clip's own towers are shrunk through their config (layers, width,
heads, image size); a timm trunk is shrunk while it is built, by rewriting the constructor
arguments timm's builder receives (``depth``/``depths``/``layers`` -> 1-2 blocks per stage,
``embed_dim``/``dims``/``embed_dims`` -> 16-64 channels, heads to match). A transformers
tokenizer (SigLIP, multilingual configs) is replaced by a tiny offline BPE tokenizer: the
architecture, not the vocabulary, is under test.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from vlmpress.adapters.zoo import ZooRow, first_line, inventory_cells

logger = logging.getLogger(__name__)

#: the calibration data of every round trip (random images, a few captions)
_CAPTIONS = ["a photo of a cat", "a small dog on the grass", "the red car", "a bird"]
#: width of every shrunk open_clip tower (and of the shared embedding)
TINY_WIDTH = 64


# ---------------------------------------------------------------------------------------- shrinking
def _shrink_timm_kwargs(kwargs: dict, widths: bool = True) -> dict:
    """Constructor arguments of a timm trunk, shrunk: 1-2 blocks per stage, 8-64 channels (``widths``)."""
    out = dict(kwargs)
    if isinstance(out.get("depth"), int):
        out["depth"] = min(out["depth"], 2)
    for key in ("depths", "layers"):
        value = out.get(key)
        if isinstance(value, (tuple, list)) and value and all(isinstance(d, int) for d in value):
            out[key] = type(value)(min(d, 1) for d in value)
    if not widths:
        return out
    heads = out.get("num_heads")
    if isinstance(out.get("embed_dim"), int):
        if isinstance(heads, (tuple, list)):  # hierarchical (Swin): channels double per stage, 32 per head
            out["embed_dim"], out["num_heads"] = 32, type(heads)(2**i for i in range(len(heads)))
        else:
            out["embed_dim"], out["num_heads"] = TINY_WIDTH, 2
    for key in ("dims", "embed_dims", "embed_dim"):
        value = out.get(key)
        if isinstance(value, (tuple, list)) and value and all(isinstance(d, int) for d in value):
            # per-stage channels doubling up to the tiny width (a conv stem then feeds a width-64 transformer)
            out[key] = type(value)(max(8, TINY_WIDTH >> (len(value) - 1 - i)) for i in range(len(value)))
    if isinstance(out.get("stem_width"), int):
        out["stem_width"] = 16
    for key, value in out.items():  # nested stage configs (ViTamin's conv stem) shrink alike
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            shrunk = _shrink_timm_kwargs(fields, widths)
            out[key] = dataclasses.replace(value, **{k: v for k, v in shrunk.items() if k in fields and v != fields[k]})
    return out


@contextlib.contextmanager
def shrunk_timm(widths: bool = True) -> Iterator[None]:
    """While active, every timm model is built with :func:`_shrink_timm_kwargs` applied to its arguments.

    ``widths=False`` shrinks only the depth, for trunks whose stem is built before the builder sees
    the arguments (ViTamin's convolution stages fix the transformer width).
    """
    import timm  # noqa: F401 - loads timm.models.*

    patched = []
    for name, module in list(sys.modules.items()):
        original = getattr(module, "build_model_with_cfg", None) if name.startswith("timm.models") else None
        if original is None or getattr(original, "_vlmpress_shrunk", False):
            continue

        def build(*args, _original=original, **kwargs):
            return _original(*args, **_shrink_timm_kwargs(kwargs, widths))

        build._vlmpress_shrunk = True
        module.build_model_with_cfg = build
        patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            module.build_model_with_cfg = original


def _heads(width: int) -> int:
    return max(1, width // 32)


def shrink_open_clip_cfg(cfg: dict, tokenizer_dir: str | Path) -> dict:
    """A tiny copy of an open_clip model config: same tower types, 2 blocks, width 64.

    Raises ValueError when the text tower is a transformers model (its config lives on the hub).
    """
    cfg = copy.deepcopy(cfg)
    width = TINY_WIDTH
    cfg["embed_dim"] = width
    vision = cfg.setdefault("vision_cfg", {})
    if not vision.get("timm_model_name"):
        layers = vision.get("layers", 12)
        if isinstance(layers, (list, tuple)):  # ModifiedResNet: one bottleneck per stage
            vision.update(layers=[1] * len(layers), width=8, head_width=64, image_size=64)
        else:
            patch = vision.get("patch_size", 16)
            patch = patch[0] if isinstance(patch, (list, tuple)) else patch
            vision.update(layers=min(layers, 2), width=width, head_width=32, image_size=2 * patch)
            if vision.get("attentional_pool"):
                vision["attn_pooler_heads"] = 2
    text = cfg.setdefault("text_cfg", {})
    if text.get("hf_model_name"):
        raise ValueError(f"the text tower is the transformers model '{text['hf_model_name']}' (its config is on the hub)")
    text.update(layers=min(text.get("layers", 12), 2), width=width, heads=_heads(width))
    if text.get("hf_tokenizer_name"):
        text["hf_tokenizer_name"] = str(tokenizer_dir)
        text.pop("tokenizer_kwargs", None)
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"].update(layers=2, width=width, heads=_heads(width), attn_pooler_heads=2)
    return cfg


# ---------------------------------------------------------------------------------------- round trip
def _outputs(adapter, batches: dict[str, Any]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {g: adapter.group_output(g, b).detach().float().cpu() for g, b in batches.items()}


def _same(a: dict, b: dict, what: str, tol: float) -> None:
    for group in a:
        diff = (a[group] - b[group]).abs().max().item()
        if not diff <= tol * max(1.0, a[group].abs().max().item()):
            raise AssertionError(f"{what}: {group} outputs differ by {diff:.3g}")


def roundtrip(adapter, work_dir: str | Path, *, calibration=None, reload_stock=None) -> dict[str, Any]:
    """compress -> forward -> save -> load -> export_dense -> stock load on an adapter; raises on failure.

    Returns what was checked (groups compressed, layers per group). ``reload_stock(spec)`` loads the
    dense export (default: the adapter class's own ``load``).
    """
    from vlmpress.pipeline.checkpoint import export_dense, load_compressed, save_compressed
    from vlmpress.pipeline.compress import compress
    from vlmpress.pipeline.config import CompressionConfig

    work = Path(work_dir)
    stage = "probe"
    try:
        batches = {group: adapter.probe_batch(group) for group in adapter.groups}
        before = _outputs(adapter, batches)
        stage = "compress"
        config = CompressionConfig(model=adapter.spec, method="svd_als", ratio=0.5, als_iters=1, batch_size=4, device="cpu")
        report = compress(adapter, config, calibration)
        compressed = {g: sum(1 for r in report.layers if r.group == g and r.status == "compressed") for g in adapter.groups}
        if not all(compressed.values()):
            raise AssertionError(f"a group has no compressed layer: {compressed}")
        stage = "forward"
        after = _outputs(adapter, batches)
        for group, out in after.items():
            if not torch.isfinite(out).all() or out.shape != before[group].shape:
                raise AssertionError(f"{group} outputs are not finite or changed shape")
        stage = "save/load"
        ckpt = save_compressed(adapter, work / "ckpt", report, overwrite=True)
        _same(after, _outputs(load_compressed(ckpt), batches), "save -> load", 1e-5)
        stage = "export_dense"
        exported = export_dense(adapter, work / "dense", overwrite=True)
        spec = adapter.exported_spec(exported)
        stock = (reload_stock or type(adapter).load)(spec).eval()
        _same(after, _outputs(stock, batches), "export_dense -> stock load", 1e-4)
    except Exception as err:
        raise RoundTripError(stage, err) from err
    return {"compressed": compressed}


class RoundTripError(Exception):
    """A round-trip stage failed (``stage``, ``error``)."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {first_line(error)}")
        self.stage, self.error = stage, error


def open_clip_roundtrip(name: str, work_dir: str | Path | None = None, seed: int = 0) -> ZooRow:
    """The tiny round trip of open_clip config ``name`` (see the module docstring)."""
    import open_clip

    from vlmpress.adapters.open_clip import OpenClipAdapter
    from vlmpress.data.calibration import CalibrationSet
    from vlmpress.testing.factories import initialise_uninitialised, random_images, tiny_clip_tokenizer

    t0 = time.perf_counter()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        return ZooRow("open_clip", name, "not built", "no such open_clip config")
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zoo-")))
        work.mkdir(parents=True, exist_ok=True)
        tiny_name = f"zoo-tiny-{name}"
        adapter, errors = None, []
        for widths in (True, False):  # a trunk whose widths cannot shrink keeps them (depth still shrinks)
            shrink = stack.enter_context(contextlib.ExitStack())
            shrink.enter_context(shrunk_timm(widths))
            try:
                tiny_clip_tokenizer(model_max_length=cfg.get("text_cfg", {}).get("context_length", 77)).save_pretrained(work / "tokenizer")
                tiny = shrink_open_clip_cfg(cfg, work / "tokenizer")
                (work / "configs").mkdir(exist_ok=True)
                (work / "configs" / f"{tiny_name}.json").write_text(json.dumps(tiny))
                open_clip.add_model_config(work / "configs")
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    adapter = initialise_uninitialised(OpenClipAdapter.load(f"open_clip:{tiny_name}", pretrained_hf=False).eval())
                break
            except Exception as err:  # noqa: BLE001 - recorded in the table
                errors.append(first_line(err))
                shrink.close()
                if isinstance(err, ValueError) and "transformers model" in str(err):
                    break
        if adapter is None:
            return ZooRow("open_clip", name, "not built", errors[0])
        size = adapter.probe_pixels().shape[-1]
        calibration = CalibrationSet(random_images(4, max(32, size), seed=seed), list(_CAPTIONS))
        row = ZooRow("open_clip", name, "ok")
        try:
            row.towers = inventory_cells(adapter, adapter.target_layers())
            checked = roundtrip(adapter, work / "run", calibration=calibration)
            row.forward_check = "round trip ok"
            for group, count in checked["compressed"].items():
                row.towers.setdefault(group, {})["compressed"] = count
        except RoundTripError as err:
            row.status, row.reason, row.forward_check = "failed", str(err), f"failed at {err.stage}"
        except Exception as err:  # noqa: BLE001 - discovery itself failed
            row.status, row.reason = "failed", f"targets: {first_line(err)}"
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


#: the transformers dual encoders with a tiny offline factory (:mod:`vlmpress.testing.factories`)
HF_DUAL_ENCODER_KINDS = ("clip", "siglip", "siglip2", "altclip", "chinese_clip", "blip")


def hf_dual_encoder_roundtrip(kind: str, work_dir: str | Path | None = None, seed: int = 0) -> ZooRow:
    """The tiny round trip of a transformers dual-encoder family (``kind`` of :data:`HF_DUAL_ENCODER_KINDS`)."""
    from vlmpress.data.calibration import CalibrationSet
    from vlmpress.pipeline.loading import load_model
    from vlmpress.testing.factories import random_images, save_tiny_hf_clip, save_tiny_hf_dual_encoder, save_tiny_hf_siglip

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zoo-")))
        try:
            save = {"clip": save_tiny_hf_clip, "siglip": save_tiny_hf_siglip}.get(kind)
            directory = save(work / kind, seed) if save else save_tiny_hf_dual_encoder(kind, work / kind, seed)
            adapter = load_model(f"hf:{directory}").eval()
        except Exception as err:  # noqa: BLE001 - recorded in the table
            return ZooRow("hf", kind, "not built", first_line(err))
        row = ZooRow("hf", f"{adapter.family} ({type(adapter.model).__name__}, tiny config)", "ok")
        calibration = CalibrationSet(random_images(4, 32, seed=seed), list(_CAPTIONS))
        try:
            row.towers = inventory_cells(adapter, adapter.target_layers())
            checked = roundtrip(adapter, work / "run", calibration=calibration, reload_stock=load_model)
            row.forward_check = "round trip ok"
            for group, count in checked["compressed"].items():
                row.towers.setdefault(group, {})["compressed"] = count
        except RoundTripError as err:
            row.status, row.reason, row.forward_check = "failed", str(err), f"failed at {err.stage}"
    row.seconds = round(time.perf_counter() - t0, 2)
    return row
