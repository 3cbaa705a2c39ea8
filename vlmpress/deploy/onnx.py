"""ONNX export of compressed models (dynamic batch), verified with onnxruntime.

CLIP-style models export one graph per tower (``image_encoder.onnx``: pixels -> embedding,
``text_encoder.onnx``: token ids -> embedding); decoder LMs export ``decoder.onnx`` (input ids
and attention mask -> logits, no KV cache). Low-rank layers become two MatMuls; layers fused by
:mod:`vlmpress.deploy.fuse` export their shared first GEMM once. Quantised factors export as
their dequantisation (weight-only: the graph stores the integer codes and scales).

Uses torch's exporter (``torch.onnx.export(dynamo=True)``, which needs ``onnxscript``) and checks
each graph with onnxruntime on a batch of a different size than the one traced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmpress.errors import ConfigError

logger = logging.getLogger(__name__)


class _ImageEncoder(nn.Module):
    def __init__(self, adapter):
        super().__init__()
        self.model = adapter.model
        object.__setattr__(self, "adapter", adapter)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.adapter.encode_image(pixels)


class _TextEncoder(nn.Module):
    def __init__(self, adapter):
        super().__init__()
        self.model = adapter.model
        object.__setattr__(self, "adapter", adapter)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.adapter.encode_text(tokens)


class _Decoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@dataclass
class ExportedGraph:
    """One exported graph, with its example inputs and onnxruntime's agreement with PyTorch."""

    path: Path
    inputs: dict[str, torch.Tensor]
    max_abs_error: float | None = None
    reference_scale: float | None = None


def _require_onnx() -> None:
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ConfigError("ONNX export needs the deploy extra: pip install 'vlmpress[deploy]' (onnx, onnxscript, onnxruntime)") from None


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], path: Path, output: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = {name: {0: batch} for name in inputs}
    try:
        torch.onnx.export(
            module.eval(), tuple(inputs.values()), str(path), input_names=list(inputs), output_names=[output],
            dynamic_shapes=dynamic, dynamo=True, verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; the user needs one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"torch's ONNX exporter cannot export {path.stem} of this model ({type(err).__name__}: {first[:300]})") from None


def default_sample(adapter) -> dict[str, Any]:
    """Small synthetic inputs: 2 images at the adapter's input size and 2 captions, or 2 x 16 ids."""
    if hasattr(adapter, "decoder_blocks"):
        vocab = int(getattr(adapter.model.config, "vocab_size", 100))
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    from PIL import Image

    image = Image.new("RGB", (256, 256), (120, 60, 200))
    return {"pixels": torch.stack([adapter.preprocess(image)] * 2), "tokens": adapter.tokenize(["a photo of a cat", "a diagram"])}


def fuse_for_export(adapter) -> list:
    """Fuse shared-input low-rank layers (:func:`vlmpress.deploy.fuse.fuse_shared_inputs`) on the default sample."""
    from vlmpress.deploy.fuse import fuse_shared_inputs

    s = default_sample(adapter)
    if "input_ids" in s:
        return fuse_shared_inputs(adapter.model, lambda: _Decoder(adapter.model)(s["input_ids"], s["attention_mask"]))
    return fuse_shared_inputs(adapter.model, lambda: (adapter.encode_image(s["pixels"]), adapter.encode_text(s["tokens"])))


def export_onnx(adapter, out_dir: str | Path, *, sample: dict[str, Any] | None = None) -> list[ExportedGraph]:
    """Export a (compressed) model's graphs into ``out_dir``; returns them with their sample inputs.

    ``sample`` overrides example inputs (``pixels``, ``tokens`` or ``input_ids``/``attention_mask``;
    default: :func:`default_sample`).
    """
    _require_onnx()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter.model.eval()
    graphs = []
    if not hasattr(adapter, "decoder_blocks") and not (hasattr(adapter, "encode_image") and hasattr(adapter, "encode_text")):
        raise ConfigError(f"ONNX export supports CLIP-style models and decoder LMs, not family '{adapter.family}'")
    sample = {**default_sample(adapter), **(sample or {})}
    if hasattr(adapter, "decoder_blocks"):
        inputs = {"input_ids": sample["input_ids"], "attention_mask": sample["attention_mask"]}
        _export(_Decoder(adapter.model), inputs, out / "decoder.onnx", "logits")
        graphs.append(ExportedGraph(out / "decoder.onnx", inputs))
        return graphs
    pixels, tokens = sample["pixels"], sample["tokens"]
    if not isinstance(tokens, torch.Tensor):
        raise ConfigError("ONNX export of text towers supports models whose tokenizer returns one id tensor (open_clip)")
    for name, module, inputs, output in (
        ("image_encoder", _ImageEncoder(adapter), {"pixels": pixels}, "image_features"),
        ("text_encoder", _TextEncoder(adapter), {"tokens": tokens}, "text_features"),
    ):
        _export(module, inputs, out / f"{name}.onnx", output)
        graphs.append(ExportedGraph(out / f"{name}.onnx", inputs))
    return graphs


def verify_onnx(adapter, graphs: list[ExportedGraph], *, repeat: int = 3) -> list[ExportedGraph]:
    """Run each graph in onnxruntime (CPU) on its inputs repeated ``repeat`` times along the batch
    (a batch size not traced) and record the largest absolute difference from PyTorch."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("verifying an ONNX export needs onnxruntime: pip install 'vlmpress[deploy]'") from None
    for graph in graphs:
        feeds = {k: torch.cat([v] * repeat) for k, v in graph.inputs.items()}
        session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
        module = _reference_module(adapter, graph.path.stem)
        with torch.no_grad():
            want = module(*feeds.values()).float()
        graph.max_abs_error = float((got.float() - want).abs().max())
        graph.reference_scale = float(want.abs().max())
    return graphs


def _reference_module(adapter, stem: str) -> nn.Module:
    return {"image_encoder": _ImageEncoder, "text_encoder": _TextEncoder}.get(stem, lambda a: _Decoder(a.model))(adapter).eval()
