"""`vlmpress compress` CLI: every bad input exits 2 with a one-line message; a good run saves a model."""

import json

import pytest
import torch
from PIL import Image

import toy_adapter  # noqa: F401  (registers the "toy" adapter family)
from vlmpress.cli import main


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 100, 200)).save(root / cls / f"{i}.png")
    return root


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--eps", "1.5"], "eps must be a relative error in [0, 1]"),
        (["--eps-v", "-0.2", "--eps-t", "0.3"], "eps-v must be a relative error in [0, 1]"),
        (["--method", "svd_als", "--ratio", "1.0"], "ratio must be a fraction strictly between 0 and 1"),
        (["--method", "svd_als", "--ratio", "0"], "ratio must be a fraction strictly between 0 and 1"),
        (["--eps", "0.3", "--model", "nosuch:thing"], "no adapter accepts model spec 'nosuch:thing'. Known adapters:"),
        (["--eps", "0.3", "--calib-images", "/does/not/exist"], "neither an existing folder nor a registered dataset"),
        (["--eps", "0.3", "--calib-images", "EMPTY"], "holds no images"),
        (["--eps", "0.3", "--targets", "zzz"], "no layer matched"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, image_folder, extra, message):
    (tmp_path / "empty").mkdir()
    argv = ["compress", "--model", "toy:0", "--calib-images", str(image_folder), "--out", str(tmp_path / "out")]
    extra = [str(tmp_path / "empty") if e == "EMPTY" else e for e in extra]
    # later flags win in argparse, so appended --model/--calib-images override the defaults above
    code, out, err = run_cli(argv + extra, capsys)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_output_dir_with_another_model_needs_overwrite(tmp_path, capsys, image_folder):
    out = tmp_path / "out"
    base = ["compress", "--calib-images", str(image_folder), "--out", str(out), "--eps", "0.7", "--als-iters", "1", "-q"]
    assert main(base + ["--model", "toy:1"]) == 0
    code, _, err = run_cli(base + ["--model", "toy:2"], capsys)
    assert code == 2 and "already holds a different compressed model" in err
    assert main(base + ["--model", "toy:2", "--overwrite"]) == 0
    assert json.loads((out / "vlmpress_config.json").read_text())["model_spec"] == "toy:2"


def test_compress_with_yaml_config_and_flag_override(tmp_path, capsys, image_folder):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: toy:3\nmethod: pgsvd\neps_v: 0.5\neps_t: 0.5\nals_iters: 2\ncalib_images: {image_folder}\n")
    code, out, err = run_cli(["compress", "--config", str(recipe), "--eps-t", "0.8", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "o" / "vlmpress_config.json").read_text())
    assert cfg["tolerances"] == {"vision": 0.5, "text": 0.8}
    assert "captions" in cfg["compression"]["calibration"]["caption_source"] or "class names" in cfg["compression"]["calibration"]["caption_source"]
    assert "whole model" in out and "targeted layers" in out


def test_calibration_from_registered_dataset_never_uses_test_images(tmp_path):
    """With the same split file as evaluation, calibration images come only from the train part."""
    from vlmpress.data.calibration import load_calibration_images
    from vlmpress.data.datasets import build_dataset

    root = tmp_path / "data" / "caltech101" / "101_ObjectCategories"
    (root / "BACKGROUND_Google").mkdir(parents=True)
    for c, cls in enumerate(("accordion", "airplanes", "anchor")):
        (root / cls).mkdir(parents=True)
        for i in range(4):  # a unique colour per image identifies it after loading
            Image.new("RGB", (8, 8), (c * 100, i * 60, 100)).save(root / cls / f"image_{i + 1:04d}.jpg")
    split = tmp_path / "test.txt"
    split.write_text("accordion/image_0001.jpg\nairplanes/image_0002.jpg\nanchor/image_0003.jpg\n")
    test = build_dataset("caltech101", "test", tmp_path / "data", split_file=split)
    key = lambda img: tuple(round(v / 20) for v in img.getpixel((4, 4)))
    test_keys = {key(test[i][0]) for i in range(len(test))}
    assert len(test) == 3 and len(test_keys) == 3
    images, names, source = load_calibration_images("caltech101", 100, seed=5, data_root=str(tmp_path / "data"), split_file=str(split))
    assert len(images) == 12 - 3 and "train" in source
    assert not test_keys & {key(img) for img in images}
    assert names and "accordion" in names  # the dataset's curated class names feed the captions
