"""Reference CLIP training: learns, is reproducible, round-trips through stock open_clip, caches."""

from __future__ import annotations

import json

import pytest
import torch

from vlmpress.errors import ConfigError, DatasetError
from vlmpress.reference import (
    get_config,
    get_reference,
    load_tensor_split,
    reference_dataset,
    save_reference,
    train_reference,
)
from vlmpress.reference import data as ref_data
from vlmpress.reference import store


QUICK = dict(progress=False, threads=1)  # tiny models: one thread avoids OpenMP stalls on shared cores


@pytest.fixture(scope="module")
def quick_result():
    return train_reference(get_config("digits", quick=True), **QUICK)


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, y_train, classes = reference_dataset("digits", "train")
    test, y_test, _ = reference_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert classes == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert sorted(set(y_test)) == list(range(10)) and min(y_test.count(c) for c in range(10)) >= 35
    assert train[0].mode == "RGB" and train[0].size == (8, 8)
    train_idx, test_idx = (set(ref_data._digits_split()[2][s].tolist()) for s in ("train", "test"))
    assert not train_idx & test_idx and len(train_idx | test_idx) == 1797


def test_quick_training_lowers_loss_and_records_metadata(quick_result):
    meta = quick_result.metadata
    assert meta["probe_loss_after"] < meta["probe_loss_before"] - 0.1
    assert meta["train_loss_per_epoch"][-1] < meta["train_loss_per_epoch"][0]
    for key in ("model_name", "dataset", "classnames", "templates", "seed", "epochs", "final_train_loss",
                "heldout_top1", "wall_time_s", "torch_version", "config_hash"):
        assert key in meta, key
    assert meta["n_train"] == 16 and 0.0 <= meta["heldout_top1"] <= 1.0


def test_same_seed_gives_identical_weights_other_seed_does_not(quick_result):
    again = train_reference(get_config("digits", quick=True), **QUICK)
    a, b = quick_result.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train_reference(get_config("digits", quick=True, seed=1, epochs=1), **QUICK)
    assert not torch.equal(a["visual.conv1.weight"], other.model.state_dict()["visual.conv1.weight"])


def test_checkpoint_reloads_in_stock_open_clip_with_same_features(quick_result, tmp_path):
    import open_clip

    ref = save_reference(quick_result, tmp_path / "ref")
    assert ref.checkpoint.suffix == ".safetensors" and ref.spec == f"open_clip:{ref.model_name}/{ref.checkpoint}"
    assert ref.spec.split(":", 1)[1].split("/", 1)[1] == str(ref.checkpoint)  # adapter convention: after first '/'
    sidecar = json.loads((tmp_path / "ref" / "reference.json").read_text())
    assert sidecar["heldout_top1"] == quick_result.metadata["heldout_top1"]

    model, _, preprocess = open_clip.create_model_and_transforms(ref.model_name, pretrained=str(ref.checkpoint))
    model.eval()
    images, _, classnames = reference_dataset("digits", "test", transform=preprocess)
    x = torch.stack([images[i] for i in range(8)])
    tokens = open_clip.get_tokenizer(ref.model_name)([t.format(classnames[3]) for t in ref.templates])
    with torch.no_grad():
        trained = quick_result.model.eval()
        assert torch.equal(model.encode_image(x), trained.encode_image(x))
        assert torch.equal(model.encode_text(tokens), trained.encode_text(tokens))

    # the pixels training/evaluation use are exactly stock open_clip preprocessing (minus Normalize)
    pixels = load_tensor_split("digits", "test", 32, limit=None, progress=False).images[:8].float() / 255
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close((pixels - mean) / std, x, atol=1e-5, rtol=0)


def test_get_reference_caches_and_retrains_on_config_change(monkeypatch, tmp_path):
    monkeypatch.setenv("VLMPRESS_CACHE", str(tmp_path / "cache"))
    first = get_reference("digits", quick=True, epochs=2, **QUICK)
    assert first.checkpoint.is_file() and str(tmp_path / "cache" / "reference" / "digits") in str(first.checkpoint)
    assert not list(first.checkpoint.parent.glob(".*tmp*"))  # atomic writes leave no temp files

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(store, "train_reference", no_training)
    again = get_reference("digits", quick=True, epochs=2, **QUICK)
    assert again.checkpoint == first.checkpoint and again.metadata == first.metadata
    with pytest.raises(AssertionError, match="trained again"):
        get_reference("digits", quick=True, epochs=2, seed=7, **QUICK)  # another recipe -> another key
    with pytest.raises(AssertionError, match="trained again"):
        get_reference("digits", quick=True, epochs=2, retrain=True, **QUICK)


def test_adapter_loads_reference_spec(quick_result, tmp_path):
    pytest.importorskip("vlmpress.adapters.open_clip")
    from vlmpress.pipeline.loading import load_model

    ref = save_reference(quick_result, tmp_path / "ref")
    adapter = load_model(ref.spec)
    model = getattr(adapter, "model", adapter)
    state = model.state_dict()
    for key, value in quick_result.model.state_dict().items():
        assert torch.equal(state[key].cpu(), value), key


def test_cli_quick_writes_checkpoint(tmp_path, capsys):
    from vlmpress.cli import main

    rc = main(["train-reference", "--name", "digits", "--quick", "--epochs", "1", "--no-progress", "--threads", "1", "--out", str(tmp_path / "out")])
    assert rc == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "reference.json").is_file()
    assert "held-out top-1" in capsys.readouterr().out


def test_bad_names_and_missing_caltech_are_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="unknown reference model"):
        get_config("imagenet")
    with pytest.raises(ConfigError, match="unknown split"):
        reference_dataset("digits", "val")
    monkeypatch.setenv("VLMPRESS_HOME", str(tmp_path))  # no ../shared next to this "project"
    monkeypatch.delenv("VLMPRESS_DATA", raising=False)
    with pytest.raises(DatasetError, match="Caltech-101 not found.*train.txt"):
        ref_data.caltech_root(tmp_path / "nowhere")


def test_caltech_names_come_from_metadata_when_present(monkeypatch, tmp_path):
    folders = ["Faces", "Faces_easy", "Leopards", "airplanes"]
    monkeypatch.setenv("VLMPRESS_HOME", str(tmp_path))
    names, templates, source = ref_data.caltech_text(folders)
    assert names == ["faces", "faces easy", "leopards", "airplanes"] and source == "folder names"
    assert "a photo of a {}." in templates
    meta = tmp_path / "eval" / "metadata"
    meta.mkdir(parents=True)
    (meta / "caltech101.json").write_text(json.dumps({
        "classnames": {"Faces": "off-center face", "Faces_easy": "centered face", "Leopards": "leopard"},
        "templates": ["a photo of a {}.", "a sketch of a {}."],
    }))
    names, templates, source = ref_data.caltech_text(folders)
    assert names == ["off-center face", "centered face", "leopard", "airplanes"]
    assert templates == ["a photo of a {}.", "a sketch of a {}."] and source.endswith("caltech101.json")


def test_caltech_lists_when_available():
    try:
        images, labels, classnames = reference_dataset("caltech101", "test")
    except DatasetError:
        pytest.skip("Caltech-101 not on this machine")
    assert len(images) == 2893 and len(classnames) == 101
    assert sorted(set(labels)) == list(range(101))
    assert all("BACKGROUND_Google" not in str(p) for p in images.paths)
    train, _, _ = reference_dataset("caltech101", "train")
    assert len(train) == 5784 and not set(train.paths) & set(images.paths)
