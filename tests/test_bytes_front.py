"""Equal-bytes evidence: the Pareto front and the dense quantised baseline."""

import copy

from vlmpress.core.quantize import QuantizedLinear
from vlmpress.evaluation.bytes_front import BytesRow, bytes_table, pareto_front, plot_bytes_front
from vlmpress.pipeline.compress import calibrate, select_layers
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.pipeline.quantize import quantize_dense_layers
from toy_adapter import ToyAdapter, toy_calibration


def _row(label, targeted, metric, kind="low-rank", quant="fp32"):
    return BytesRow(label, kind, quant, None, targeted, targeted + 1000, metric)


def test_front_keeps_exactly_the_undominated_rows():
    rows = [
        _row("dense", 100, 90.0, kind="dense"),
        _row("small good", 40, 89.0),
        _row("smaller worse", 20, 80.0),
        _row("dominated", 50, 85.0),  # larger than "small good" and worse
        _row("tie in bytes, worse", 40, 88.0),
        _row("larger, same metric", 60, 89.0),  # same metric at more bytes: dominated
    ]
    assert pareto_front(rows, higher_is_better=True) == [True, True, True, False, False, False]
    # perplexity: lower is better, the order flips
    ppl = [_row("a", 10, 30.0), _row("b", 20, 25.0), _row("c", 30, 26.0)]
    assert pareto_front(ppl, higher_is_better=False) == [True, True, False]


def test_table_and_plot(tmp_path):
    rows = [_row("dense fp32", 100, 90.0, kind="dense"), _row("PGSVD 40 % + int8", 16, 89.5, quant="int8")]
    table = bytes_table(rows, "top-1", True)
    lines = table.splitlines()
    assert lines[2].startswith("| PGSVD 40 % + int8 | 16 | 0.160 |") and lines[3].startswith("| dense fp32 | 100 | 1.000 |")
    png = plot_bytes_front(rows, tmp_path / "f.png", "top-1", True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dense_quantisation_replaces_targets_and_reports_activation_errors():
    adapter = ToyAdapter.load("toy:3")
    cfg = CompressionConfig(method="pgsvd", eps=0.5, device="cpu")
    layers = select_layers(adapter, cfg)
    collectors = calibrate(adapter, layers, toy_calibration(), cfg)
    before = copy.deepcopy(adapter)
    rows = quantize_dense_layers(adapter, layers, "int8", 64, collectors)
    assert len(rows) == len(layers)
    for layer, row in zip(layers, rows):
        module = adapter.model.get_submodule(layer.name)
        assert isinstance(module, QuantizedLinear)
        W = before.model.get_submodule(layer.name).weight.detach().double()
        # int8 per-channel: every entry within half a step of its row's scale
        assert (W - module.dense_weight()).abs().max() <= module.qweight.scale.double().max() / 2 + 1e-7
        assert 0 < row["act_error"] < 0.05 and 0 < row["weight_error"] < 0.05
    assert quantize_dense_layers(adapter, layers, "int8", 64, collectors) == []  # already quantised: untouched
