"""Zero-shot harness: classifier math, image sources (dataset / cached pixels), CLI runs, real images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from test_datasets import make_caltech, make_dtd
from vlmpress.adapters.base import VisionLanguageAdapter
from vlmpress.cli import main
from vlmpress.data import build_dataset, format_prompt
from vlmpress.errors import ConfigError
from vlmpress.evaluation import (
    PreprocessedImages,
    build_text_classifier,
    evaluate_zeroshot,
    preprocess_images,
)
from vlmpress.testing import TINY_OPEN_CLIP_SPEC, tiny_open_clip

SHARED_CALTECH = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "caltech101"
COLORS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def _word_vector(word: str, dim: int = 8) -> torch.Tensor:
    seed = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class ColorAdapter(VisionLanguageAdapter):
    """Test double: an image embeds as its mean colour; a prompt as (colour word one-hot + template noise).

    A correct harness therefore classifies solid-colour images perfectly.
    """

    family = "color-test-double"

    def __init__(self, noise: float = 0.1):
        model = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.eye(3))
        super().__init__(model.eval(), "color:test")
        self.noise = noise
        self.preprocess = _mean_color

    def tokenize(self, texts):
        rows = []
        for text in texts:
            hot = torch.tensor([float(w in text) for w in COLORS])
            rows.append(hot + self.noise * _word_vector(text, 3))
        return torch.stack(rows)

    def encode_text(self, tokens):
        return tokens.to(self.device)

    def encode_image(self, pixels):
        return self.model(pixels.to(self.device))

    # the compression hooks are not needed by the harness
    @classmethod
    def accepts(cls, spec):
        return False

    @classmethod
    def load(cls, spec, *, device="cpu", **kwargs):
        return cls()

    def spec_config(self):
        return {}

    @classmethod
    def build_from_spec_config(cls, config, *, device="cpu"):
        return cls()

    def target_layers(self):
        return []

    def calibration_forward(self, group, batch, collector):
        raise NotImplementedError

    def export_dense(self, out_dir):
        raise NotImplementedError


def _mean_color(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.resize((1, 1)).getpixel((0, 0)), dtype=torch.float32) / 255.0


@pytest.fixture
def color_folder(tmp_path):
    root = tmp_path / "colors"
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 12), tuple(max(0, c - 10 * i) for c in rgb)).save(root / name / f"{i}.png")
    return root


def test_classifier_is_mean_of_normalised_prompt_embeddings():
    adapter = ColorAdapter(noise=0.5)
    classes, templates = ["red", "blue"], ["a photo of a {}.", "a {} thing.", "art of the {}."]
    weights = build_text_classifier(adapter, classes, templates, batch_size=2)  # batches split classes
    assert weights.shape == (3, 2)
    for j, c in enumerate(classes):
        emb = adapter.tokenize([format_prompt(t, c) for t in templates])
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        torch.testing.assert_close(weights[:, j], mean / mean.norm())
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(2))


def test_perfect_model_scores_100_percent(color_folder):
    ds = build_dataset(f"imagefolder:{color_folder}", "test", test_fraction=0.5)
    assert len(ds) == 6
    result = evaluate_zeroshot(ColorAdapter(), ds, batch_size=4, num_workers=0, show_progress=False)
    m = result.metrics
    assert (m.top1, m.top5, m.mean_per_class_recall) == (1.0, 1.0, 1.0)
    assert m.top5_k == 3 and result.n_images == 6 and result.n_templates == 7
    # swapping the class names makes every image wrong: the labels really are used
    ds.classnames = ["green", "red", "blue"]  # cyclic shift of (blue, green, red)
    assert evaluate_zeroshot(ColorAdapter(), ds, show_progress=False).metrics.top1 == 0.0


def test_cached_pixels_give_identical_metrics_and_check_preprocessing(tmp_path, color_folder):
    ds = build_dataset(f"imagefolder:{color_folder}", "test", test_fraction=0.5)
    adapter = ColorAdapter(noise=2.0)  # noisy prompts: accuracy below 1, so equality is informative
    direct = evaluate_zeroshot(adapter, ds, batch_size=2, show_progress=False)
    cached = preprocess_images(ds, adapter.preprocess, batch_size=4)
    assert cached.pixels.dtype == torch.float32 and len(cached) == 6 and cached.labels.tolist() == ds.labels
    path = cached.save(tmp_path / "cache" / "colors.pt")
    loaded = PreprocessedImages.load(path)
    for data in (cached, loaded):
        again = evaluate_zeroshot(adapter, data, batch_size=5, show_progress=False)
        assert again.metrics.as_dict() == direct.metrics.as_dict()
        assert again.metrics.per_class_recall == direct.metrics.per_class_recall
        assert again.split_id == ds.split_id
    other = ColorAdapter()
    other.preprocess = lambda img: _mean_color(img) * 0.5
    with pytest.raises(ConfigError, match="different preprocessing"):
        evaluate_zeroshot(other, loaded, show_progress=False)


def test_precision_options_on_cpu(color_folder):
    ds = build_dataset(f"imagefolder:{color_folder}", "test", test_fraction=0.5)
    with pytest.raises(ConfigError, match="fp16 autocast needs a CUDA device"):
        evaluate_zeroshot(ColorAdapter(), ds, device="cpu", precision="fp16", show_progress=False)
    with pytest.raises(ConfigError, match="precision must be one of"):
        evaluate_zeroshot(ColorAdapter(), ds, device="cpu", precision="int8", show_progress=False)
    bf16 = evaluate_zeroshot(ColorAdapter(), ds, device="cpu", precision="bf16", show_progress=False)
    assert bf16.metrics.top1 == 1.0 and bf16.precision == "bf16"


def test_tiny_open_clip_through_the_adapter_interface(tmp_path):
    ds = build_dataset("dtd", "test", make_dtd(tmp_path), templates="single")
    result = evaluate_zeroshot(tiny_open_clip(), ds, batch_size=2, num_workers=0, show_progress=False)
    m = result.metrics
    assert (m.n_images, m.n_classes, m.n_classes_present, m.top5_k) == (3, 47, 2, 5)
    assert 0.0 <= m.top1 <= m.top5 <= 1.0 and m.n_nonfinite == 0
    assert result.seconds >= result.seconds_images > 0


# ---------------------------------------------------------------------------------------------- CLI
def _eval_argv(out, *extra):
    return ["eval", "--model", TINY_OPEN_CLIP_SPEC, "--templates", "single", "--num-workers", "0",
            "--batch-size", "4", "--out", str(out), "--no-progress", "-q", *extra]


def test_cli_eval_writes_one_json_per_dataset_and_appends_jsonl(tmp_path, capsys):
    root = make_dtd(make_caltech(tmp_path / "data"))
    out = tmp_path / "results"
    assert main(_eval_argv(out, "--datasets", "caltech101,dtd", "--data-root", str(root))) == 0
    printed = capsys.readouterr().out
    assert "caltech101" in printed and "dtd" in printed and "top1" in printed
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads((out / "open_clip_vlmpress-tiny__caltech101__single.json").read_text())
    assert rec == json.loads(lines[0])
    assert rec["dataset"] == "caltech101" and rec["model"] == TINY_OPEN_CLIP_SPEC
    assert rec["split"] == "hash(seed=0,test=0.3)-test" and rec["split_detail"]["split_kind"] == "hash"
    assert rec["method"] == "base" and rec["reduction"] == 0.0 and rec["compression"] is None
    assert rec["n_images"] == 6 and rec["n_classes"] == 101 and rec["templates"] == "single"
    assert set(rec["metrics"]) == {"top1", "top5", "mean_per_class_recall"}
    assert rec["top1_stderr"] >= 0 and rec["seconds"] > 0
    assert {"torch", "torchvision", "open_clip_torch", "python"} <= set(rec["versions"])
    dtd = json.loads(lines[1])
    assert dtd["split"] == "official-test1" and dtd["n_classes"] == 47


def test_cli_eval_crash_keeps_earlier_results(tmp_path, monkeypatch):
    import vlmpress.evaluation.zeroshot as zs

    root = make_dtd(make_caltech(tmp_path / "data"))
    real, calls = zs.evaluate_zeroshot, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(zs, "evaluate_zeroshot", flaky)
    out = tmp_path / "results"
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_eval_argv(out, "--datasets", "caltech101,dtd", "--data-root", str(root)))
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["dataset"] == "caltech101"
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_vlmpress-tiny__caltech101__single.json", "results.jsonl"]


def test_cli_eval_cache_dir_reuses_preprocessed_images(tmp_path):
    root = make_dtd(tmp_path / "data")
    out, cache = tmp_path / "results", tmp_path / "cache"
    argv = _eval_argv(out, "--datasets", "dtd", "--data-root", str(root), "--cache-dir", str(cache))
    argv.insert(argv.index(TINY_OPEN_CLIP_SPEC), TINY_OPEN_CLIP_SPEC)  # --model A A: two models, one preprocess
    assert main(argv) == 0
    files = list(cache.glob("dtd__official-test1__*.pt"))
    assert len(files) == 1
    cached = PreprocessedImages.load(files[0])
    assert len(cached) == 3 and cached.split_id == "official-test1"
    recs = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [r["n_images"] for r in recs] == [3, 3] and recs[0]["split"] == recs[1]["split"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--datasets", "imagenet"], "unknown dataset(s): imagenet"),
        (["--datasets", "food101", "--data-root", "MISSING"], "food-101/meta/test.json"),
        (["--datasets", "dtd", "--precision", "fp16", "--device", "cpu"], "fp16 autocast needs a CUDA device"),
        (["--datasets", "caltech101,dtd", "--split-file", "x.txt"], "give split files as DATASET=FILE"),
        (["--datasets", "dtd", "--limit", "0"], "--limit must be a positive"),
    ],
)
def test_cli_eval_user_errors_exit_2(tmp_path, capsys, extra, message):
    extra = [str(tmp_path / "nothing") if e == "MISSING" else e for e in extra]
    assert main(_eval_argv(tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.skipif(not SHARED_CALTECH.is_dir(), reason="../shared/datasets/caltech101 not available")
def test_real_caltech101_subset(tmp_path, capsys):
    out = tmp_path / "results"
    argv = _eval_argv(out, "--datasets", "caltech101", "--data-root", str(SHARED_CALTECH.parent),
                      "--split-file", str(SHARED_CALTECH / "test.txt"), "--limit", "50")
    assert main(argv) == 0
    rec = json.loads((out / "open_clip_vlmpress-tiny__caltech101__single.json").read_text())
    assert rec["n_images"] == 50 and rec["n_classes"] == 101
    assert rec["split"].startswith("file(test.txt@") and rec["split"].endswith("-test+limit50(seed=0)")
    detail = rec["split_detail"]
    assert detail["split_file_dropped_lines"] == 156 and detail["limit"] == 50  # BACKGROUND_Google lines
    assert rec["n_classes_present"] >= 30  # stratified, not the first 50 files (= 1 class)
    assert 0.0 <= rec["metrics"]["top1"] <= rec["metrics"]["top5"] <= 1.0  # random weights: chance level
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
