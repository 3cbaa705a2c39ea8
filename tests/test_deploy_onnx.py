"""ONNX export of compressed models, checked against PyTorch in onnxruntime (dynamic batch)."""

import copy

import pytest
from torch import nn

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from vlmpress.cli import main as cli_main  # noqa: E402
from vlmpress.deploy.onnx import export_onnx, fuse_for_export, verify_onnx  # noqa: E402
from vlmpress.testing.factories import lowrank_by_svd, tiny_lowrank_open_clip  # noqa: E402

pytestmark = pytest.mark.slow  # each export traces the model (~10-30 s on 2 cores)


@pytest.fixture(scope="module")
def compressed_clip():
    return tiny_lowrank_open_clip(seed=4)


def test_clip_towers_export_with_dynamic_batch_and_match_pytorch(compressed_clip, tmp_path):
    adapter = copy.deepcopy(compressed_clip)
    fuse_for_export(adapter)  # the fused first GEMM exports too
    graphs = verify_onnx(adapter, export_onnx(adapter, tmp_path))
    assert [g.path.name for g in graphs] == ["image_encoder.onnx", "text_encoder.onnx"]
    for g in graphs:
        assert g.max_abs_error is not None and g.max_abs_error <= 1e-4 * max(1.0, g.reference_scale)
        session = ort.InferenceSession(str(g.path), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] == "batch"  # dynamic, not the traced 2
    # low-rank layers are two MatMuls: the graph holds the factors, not dense weights
    import onnx

    model = onnx.load(str(graphs[0].path))
    shapes = {tuple(init.dims) for init in model.graph.initializer}
    assert any(6 in s for s in shapes)


def test_quantized_decoder_lm_exports(tmp_path):
    from vlmpress.core.quantize import QuantizedLowRankLinear
    from vlmpress.adapters.base import replace_module
    from vlmpress.pipeline.loading import load_model
    from vlmpress.reference.lm import save_tiny_causal_lm

    adapter = load_model(f"hf:{save_tiny_causal_lm(tmp_path / 'lm')}")
    adapter.prepare_for_compression()
    names = [n for n, m in adapter.model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    lowrank_by_svd(adapter.model, names, 4)
    for name in names[:3]:
        replace_module(adapter.model, name, QuantizedLowRankLinear.from_lowrank(adapter.model.get_submodule(name), "int8"))
    graphs = verify_onnx(adapter, export_onnx(adapter, tmp_path / "onnx"))
    assert graphs[0].path.name == "decoder.onnx"
    assert graphs[0].max_abs_error <= 1e-4 * max(1.0, graphs[0].reference_scale)


def test_export_onnx_command_on_a_checkpoint(tmp_path, capsys):
    from vlmpress.pipeline.checkpoint import save_compressed
    from vlmpress.pipeline.compress import compress
    from vlmpress.pipeline.config import CompressionConfig
    from vlmpress.testing.factories import tiny_open_clip

    adapter = tiny_open_clip(seed=5)
    report = compress(adapter, CompressionConfig(method="svd", ratio=0.4, device="cpu", quantize="int8"))
    ckpt = save_compressed(adapter, tmp_path / "ckpt", report)
    code = cli_main(["export-onnx", "--model", str(ckpt), "--out", str(tmp_path / "onnx"), "--fuse"])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "onnx" / "image_encoder.onnx").is_file() and (tmp_path / "onnx" / "text_encoder.onnx").is_file()
    assert out.count("max |onnxruntime - torch|") == 2
    # a path that is no checkpoint: one line, exit 2
    code = cli_main(["export-onnx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
