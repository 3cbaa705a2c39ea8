"""Conformance-kit contracts: (batch, dim) embeddings, targets that reach the outputs, plugins on PYTHONPATH."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from vlmpress import testing
from vlmpress.adapters.discovery import discover_targets, unreached_layers
from vlmpress.adapters.open_clip import OpenClipAdapter
from vlmpress.errors import AdapterContractError

from test_plugins import PLUGIN as MYCLIP_PLUGIN


class PerTokenAdapter(OpenClipAdapter):
    """A broken plugin: its text encoder returns per-token states instead of one embedding per caption."""

    family = "per_token_test"

    def encode_text(self, tokens):
        return self.model.token_embedding(tokens.to(self.device))


def _per_token(adapter: OpenClipAdapter) -> PerTokenAdapter:
    return PerTokenAdapter(adapter.model, adapter.spec, model_name=adapter.model_name, pretrained=None,
                           preprocess=adapter.preprocess, tokenizer=adapter.tokenizer, model_cfg=adapter.model_cfg)


def test_kit_refuses_per_token_encoders(tmp_path):
    with pytest.raises(AssertionError, match=r"encode_text returned shape \(2, 77, 64\) .* \(batch, dim\)"):
        testing.check_adapter(_per_token(testing.tiny_open_clip()), tmp_path)


def test_eval_refuses_per_token_encoders_in_one_line():
    from vlmpress.evaluation.zeroshot import build_text_classifier

    adapter = _per_token(testing.tiny_open_clip())
    with pytest.raises(AdapterContractError) as err:
        build_text_classifier(adapter, ["cat", "dog"], ["a photo of a {}."])
    assert "\n" not in str(err.value) and "(batch, dim)" in str(err.value) and "per_token_test" in str(err.value)


def _with_dead_linears(adapter: OpenClipAdapter) -> OpenClipAdapter:
    """Attach a text 'pooler' never called and one whose output the forward computes and drops."""
    width = adapter.model.transformer.width
    adapter.model.pooler_never_called = nn.Linear(width, width)
    adapter.model.pooler_dropped = nn.Linear(width, width)
    adapter.model.transformer.register_forward_hook(lambda m, i, o: [adapter.model.pooler_dropped(o)] and None)
    adapter.towers = {"vision": ("visual.",), "text": ("transformer.", "pooler_")}
    return adapter


def test_linears_that_never_reach_the_output_are_not_targets(tmp_path):
    adapter = _with_dead_linears(testing.tiny_open_clip())
    adapter.prepare_for_compression()
    found = [layer.name for layer in discover_targets(adapter.model, adapter.towers)]
    assert {"pooler_never_called", "pooler_dropped"} <= set(found)  # the prefixes alone would take them
    names = [layer.name for layer in adapter.target_layers()]
    assert "pooler_never_called" not in names and "pooler_dropped" not in names
    assert len(names) == len(found) - 2
    # calibration reaches every target (a never-called target would fail it)
    from vlmpress.data.calibration import CalibrationSet
    from vlmpress.pipeline.compress import compress
    from vlmpress.pipeline.config import CompressionConfig

    calib = CalibrationSet(testing.random_images(2, 32), ["a photo", "a dog"])
    report = compress(adapter, CompressionConfig(method="svd_als", ratio=0.5, als_iters=1, device="cpu"), calib)
    assert len(report.layers) == 24


def test_kit_catches_a_target_that_cannot_influence_the_output():
    from vlmpress.testing.conformance import check_targets_influence_outputs

    adapter = _with_dead_linears(testing.tiny_open_clip())
    adapter.prepare_for_compression()
    layers = discover_targets(adapter.model, adapter.towers)  # discovery without the call trace
    batches = {g: adapter.probe_batch(g) for g in adapter.groups}
    with pytest.raises(AssertionError, match="pooler_never_called' .* cannot influence the text output"):
        check_targets_influence_outputs(adapter, layers, batches)
    kept = [layer for layer in layers if not layer.name.startswith("pooler_never")]
    with pytest.raises(AssertionError, match="pooler_dropped' .* cannot influence the text output"):
        check_targets_influence_outputs(adapter, kept, batches)
    check_targets_influence_outputs(adapter, adapter.target_layers(), batches)  # the traced targets pass


def test_unreached_layers_trace():
    a, b, c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def run():
        x = torch.randn(2, 4)
        b(a(x))  # computed, dropped
        return c(x)

    assert unreached_layers({"a": a, "b": b, "c": c}, run) == {"a", "b"}


#: the entry-point plugin of test_plugins under another name and spec prefix
PLUGIN = MYCLIP_PLUGIN.replace("MyClipAdapter", "PathOnlyAdapter").replace('"myclip', '"pathonly')


@pytest.mark.slow
def test_fresh_process_check_finds_a_plugin_importable_only_via_pythonpath(tmp_path, monkeypatch):
    """``pip --target DIR`` + ``PYTHONPATH=DIR``: the plugin is on this process's path only."""
    site = tmp_path / "site"
    (site / "pathonly_plugin").mkdir(parents=True)
    (site / "pathonly_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "pathonly_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pathonly_plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlmpress.adapters]\npathonly = pathonly_plugin:PathOnlyAdapter\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    from vlmpress.pipeline.loading import load_model

    adapter = load_model("pathonly:vlmpress-tiny")
    assert adapter.family == "pathonly"
    # a child with an import path that lacks the plugin cannot rebuild the checkpoint ...
    probe = [sys.executable, "-c", "import pathonly_plugin"]
    assert subprocess.run(probe, env={"PATH": "/usr/bin:/bin"}, capture_output=True).returncode != 0
    # ... the kit's fresh process keeps the caller's import path, so the whole check passes
    result = testing.check_adapter(adapter, tmp_path / "kit", fresh_process=True)
    assert result["family"] == "pathonly"
