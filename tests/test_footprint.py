"""Bytes and memory in every report: tensor bytes by dtype, peak forward memory, bytes on disk."""

import torch
from torch import nn

from toy_adapter import ToyAdapter, toy_calibration
from vlmpress.deploy.footprint import peak_forward_bytes, tensor_bytes_by_dtype
from vlmpress.pipeline.checkpoint import save_compressed
from vlmpress.pipeline.compress import compress
from vlmpress.pipeline.config import CompressionConfig


def test_tensor_bytes_by_dtype_counts_tied_weights_once_and_buffers():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    model.register_buffer("codes", torch.zeros(5, 4, dtype=torch.int8))
    assert tensor_bytes_by_dtype(model) == {"float32": 10 * 8 * 4, "int8": 20}


def test_peak_forward_bytes_follows_the_activations():
    layer = nn.Sequential(nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 64))
    small = peak_forward_bytes(lambda: layer(torch.randn(256, 64)))
    large = peak_forward_bytes(lambda: layer(torch.randn(512, 64)))
    hidden = 256 * 1024 * 4  # one hidden activation of the small batch
    assert hidden <= small <= 4 * hidden
    assert 1.6 < large / small < 2.4


def test_compress_report_gives_bytes_peak_memory_and_bytes_on_disk(tmp_path):
    adapter = ToyAdapter.load("toy:3")
    report = compress(adapter, CompressionConfig(method="svd_llm", ratio=0.4, device="cpu", quantize="int8", batch_size=8), toy_calibration())
    fp = report.footprint
    assert fp["tensor_bytes_after"] < fp["tensor_bytes_before"] == fp["tensor_bytes_by_dtype_before"]["float32"]
    assert fp["tensor_bytes_by_dtype_after"]["int8"] > 0 and fp["tensor_bytes_after"] == sum(fp["tensor_bytes_by_dtype_after"].values())
    assert set(fp["peak_forward_bytes"]) == {"vision", "text"} and all(v > 0 for v in fp["peak_forward_bytes"].values())
    assert fp["peak_forward_batch"] == 8
    out = save_compressed(adapter, tmp_path / "c", report)
    assert report.footprint["bytes_on_disk"] == (out / "model.safetensors").stat().st_size
    summary = report.format_summary()
    assert "bytes             :" in summary and "on disk" in summary and "peak forward mem  : vision" in summary
    import json

    assert json.loads((out / "compression_report.json").read_text())["summary"]["footprint"]["bytes_on_disk"] > 0
