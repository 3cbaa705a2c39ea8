"""Likelihood zero-shot for generative VLMs: cached prefix == plain per-class forward, metrics, CLI eval."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlmpress.adapters.hf_llava import HFLlavaAdapter
from vlmpress.data import build_dataset
from vlmpress.evaluation.likelihood import (
    caption_log_likelihoods,
    class_scores,
    evaluate_likelihood,
    full_sequence_log_likelihoods,
)
from vlmpress.evaluation.metrics import compute_metrics
from vlmpress.testing.genvlm import plain_per_class_log_likelihoods as _plain_per_class
from vlmpress.testing.genvlm import save_tiny_llava, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a photo of a cat.", "a dog", "a bad photo of the small bird.", "x"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("genvlm_ll")
    model_dir = save_tiny_llava(root / "llava", seed=5)
    images = write_image_folder(root / "images", per_class=3)
    return HFLlavaAdapter.load(f"hf:{model_dir}"), f"hf:{model_dir}", images


@pytest.mark.parametrize("max_sequences", [1, 5, 256])
def test_cached_prefix_scores_equal_a_plain_per_class_forward(tiny, max_sequences):
    adapter, _, images = tiny
    pixels = adapter.pixel_values(sorted(images.rglob("*.jpg"))[:3])
    cached, counts = caption_log_likelihoods(adapter, pixels, CAPTIONS, max_sequences=max_sequences)
    expected = _plain_per_class(adapter, pixels, CAPTIONS)
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-4)
    full, full_counts = full_sequence_log_likelihoods(adapter, pixels, CAPTIONS, max_sequences=max_sequences)
    torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == full_counts.tolist() == [len(x) for x in adapter.caption_ids(CAPTIONS)]


def test_class_scores_sum_or_length_normalised_template_mean():
    ll = torch.tensor([[-4.0, -9.0, -2.0, -8.0]])  # 2 classes x 2 templates
    counts = torch.tensor([2, 3, 1, 4])
    torch.testing.assert_close(class_scores(ll, counts, 2, 2, False), torch.tensor([[-6.5, -5.0]]))
    torch.testing.assert_close(class_scores(ll, counts, 2, 2, True), torch.tensor([[-2.5, -2.0]]))


@pytest.mark.parametrize("length_normalize", [False, True])
def test_evaluate_likelihood_metrics_and_perplexity(tiny, length_normalize):
    adapter, _, images = tiny
    ds = build_dataset(f"imagefolder:{images}", "test", test_fraction=0.99)
    templates = ["a photo of a {}.", "a {}"]
    result = evaluate_likelihood(
        adapter, ds, templates=templates, batch_size=2, device="cpu", length_normalize=length_normalize, show_progress=False
    )
    pixels = torch.stack([ds.with_transform(adapter.preprocess)[i][0] for i in range(len(ds))])
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    captions = [t.format(c) for c in ds.classnames for t in templates]
    ll = _plain_per_class(adapter, pixels, captions).view(len(ds), len(ds.classnames), len(templates))
    counts = torch.tensor([len(x) for x in adapter.caption_ids(captions)]).view(len(ds.classnames), len(templates)).float()
    scores = (ll / counts if length_normalize else ll).mean(-1)
    expected = compute_metrics(scores, labels)
    assert result.metrics.top1 == pytest.approx(expected.top1)
    assert result.metrics.mean_per_class_recall == pytest.approx(expected.mean_per_class_recall)
    nll = -sum(float(ll[i, y].sum()) for i, y in enumerate(labels.tolist()))
    tokens = sum(float(counts[y].sum()) for y in labels.tolist())
    assert result.caption_perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert result.n_templates == 2 and result.length_normalize is length_normalize


def test_cli_compress_then_eval_and_report(tiny, tmp_path, capsys, cli_compress_and_eval):
    from vlmpress.cli import main

    _, spec, images = tiny
    records = cli_compress_and_eval(spec, images, tmp_path)
    assert len(records) == 2
    base, compressed = records
    assert base["method"] == "base" and compressed["method"] == "svd_llm"
    for rec in records:
        assert 0 <= rec["metrics"]["top1"] <= 1 and rec["metrics"]["caption_perplexity"] > 1
        assert rec["metrics"]["length_normalized"] == 0.0
    assert main(["report", str(tmp_path / "results" / "results.jsonl")]) == 0
    assert "svd" in capsys.readouterr().out.lower()
