"""Image sets, class names and prompts of the reference models, with fixed train/held-out splits.

Training, calibration and evaluation all read images through :func:`reference_dataset`, so they
agree on which images are held out. Training additionally decodes each split once into a uint8
tensor (:func:`load_tensor_split`) produced by open_clip's own eval transform minus ``Normalize``:
the pixels the model is trained and scored on are exactly those the stock open_clip preprocessing
gives, so anyone evaluating the checkpoint with ``create_model_and_transforms`` sees the same input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vlmpress.errors import ConfigError, DatasetError
from vlmpress.io import atomic_write
from vlmpress.io.resources import cache_dir, project_root

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")

# ---------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images, nothing to download)

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed: the held-out split does not move with the training seed
DIGIT_CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten digit {}.",
    "the number {}.",
    "a drawing of the digit {}.",
    "a blurry photo of the number {}.",
    "a low resolution image of the digit {}.",
    "a black and white photo of the number {}.",
    "the digit {}, written by hand.",
)

# ---------------------------------------------------------------------------------------------
# caltech101: the real image set with its fixed train.txt / test.txt lists (BACKGROUND dropped)

CALTECH_DIR = "caltech101"
CALTECH_IMAGES = "101_ObjectCategories"
CALTECH_BACKGROUND = "BACKGROUND_Google"
CALTECH_METADATA = "eval/metadata/caltech101.json"  # curated CLIP class names + templates, when present
# OpenAI CLIP's Caltech-101 prompt templates (used unless eval/metadata/caltech101.json has its own)
CALTECH_TEMPLATES = (
    "a photo of a {}.",
    "a painting of a {}.",
    "a plastic {}.",
    "a sculpture of a {}.",
    "a sketch of a {}.",
    "a tattoo of a {}.",
    "a toy {}.",
    "a rendition of a {}.",
    "a embroidered {}.",
    "a cartoon {}.",
    "a {} in a video game.",
    "a plushie {}.",
    "a origami {}.",
    "art of a {}.",
    "graffiti of a {}.",
    "a drawing of a {}.",
    "a doodle of a {}.",
    "a photo of the {}.",
    "a painting of the {}.",
    "the plastic {}.",
    "a sculpture of the {}.",
    "a sketch of the {}.",
    "a tattoo of the {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "the embroidered {}.",
    "the cartoon {}.",
    "the {} in a video game.",
    "the plushie {}.",
    "the origami {}.",
    "art of the {}.",
    "graffiti of the {}.",
    "a drawing of the {}.",
    "a doodle of the {}.",
)

DATASETS = ("digits", "caltech101")


class ReferenceImages(Dataset):
    """One split as RGB PIL images (or ``transform(image)``), in a fixed order.

    Items are in-memory images (digits) or file paths opened lazily (Caltech-101), so a split of
    thousands of photos costs nothing until it is read. Labels are kept alongside in ``labels``.
    """

    def __init__(self, items: Sequence[Image.Image | Path], labels: Sequence[int], transform: Callable | None = None):
        self.items = list(items)
        self.labels = [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int) -> Image.Image:
        item = self.items[index]
        if isinstance(item, Image.Image):
            return item
        with Image.open(item) as img:
            return img.convert("RGB")

    def __getitem__(self, index: int) -> Any:
        img = self.image(index)
        return self.transform(img) if self.transform is not None else img

    @property
    def paths(self) -> list[Path]:
        return [p for p in self.items if isinstance(p, Path)]


# ----------------------------------------------------------------------------------- digits


@lru_cache(maxsize=1)
def _digits_split() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        index, test_size=DIGITS_TEST_FRACTION, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    return digits.images, digits.target, {"train": np.sort(train_idx), "test": np.sort(test_idx)}


def _digits_images(split: str) -> ReferenceImages:
    images, target, splits = _digits_split()
    idx = splits[split]
    pixels = np.clip(np.round(images[idx] * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    pil = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
    return ReferenceImages(pil, target[idx].tolist())


# ----------------------------------------------------------------------------------- caltech


def caltech_root(data_root: str | os.PathLike | None = None) -> Path:
    """The Caltech-101 directory holding ``101_ObjectCategories/``, ``train.txt`` and ``test.txt``.

    Looked up in ``data_root`` (the dataset directory or its parent), ``$VLMPRESS_DATA/caltech101``,
    then ``<project root>/../shared/datasets/caltech101``.
    """
    candidates: list[Path] = []
    if data_root is not None:
        candidates += [Path(data_root), Path(data_root) / CALTECH_DIR]
    if os.environ.get("VLMPRESS_DATA"):
        candidates.append(Path(os.environ["VLMPRESS_DATA"]) / CALTECH_DIR)
    candidates.append(project_root().parent / "shared" / "datasets" / CALTECH_DIR)
    for root in candidates:
        if (root / CALTECH_IMAGES).is_dir() and (root / "train.txt").is_file() and (root / "test.txt").is_file():
            return root.resolve()
    searched = ", ".join(str(c) for c in candidates)
    raise DatasetError(
        f"Caltech-101 not found. Expected a directory with {CALTECH_IMAGES}/<class>/image_NNNN.jpg plus "
        f"train.txt and test.txt at one of: {searched} (pass data_root or set VLMPRESS_DATA)."
    )


def caltech_folders(root: Path) -> list[str]:
    """Class folders in torchvision's order (sorted, background clutter dropped)."""
    folders = sorted(p.name for p in (root / CALTECH_IMAGES).iterdir() if p.is_dir() and p.name != CALTECH_BACKGROUND)
    if len(folders) != 101:
        raise DatasetError(f"expected 101 class folders under {root / CALTECH_IMAGES}, found {len(folders)}")
    return folders


def _caltech_list(root: Path, split: str) -> list[str]:
    from vlmpress.data.splits import read_split_file

    return [ln for ln in read_split_file(root / f"{split}.txt") if not ln.startswith(CALTECH_BACKGROUND + "/")]


def _caltech_images(split: str, data_root: str | os.PathLike | None) -> ReferenceImages:
    root = caltech_root(data_root)
    folders = caltech_folders(root)
    label_of = {name: i for i, name in enumerate(folders)}
    entries = _caltech_list(root, split)
    missing = [e for e in entries[:5] + entries[-5:] if not (root / CALTECH_IMAGES / e).is_file()]
    if missing:
        raise DatasetError(f"Caltech-101 {split}.txt lists files that are missing under {root / CALTECH_IMAGES}: {missing}")
    try:
        labels = [label_of[e.split("/", 1)[0]] for e in entries]
    except KeyError as err:
        raise DatasetError(f"Caltech-101 {split}.txt names an unknown class folder {err}") from None
    return ReferenceImages([root / CALTECH_IMAGES / e for e in entries], labels)


def _load_caltech_metadata() -> dict[str, Any] | None:
    path = project_root() / CALTECH_METADATA
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON: {err}") from None


def caltech_text(folders: Sequence[str]) -> tuple[list[str], list[str], str]:
    """Class names and templates for Caltech-101, and where they came from.

    ``eval/metadata/caltech101.json`` (the curated CLIP names) wins when it exists; its class names
    may be a list in folder order or a ``{folder: name}`` mapping. Otherwise folder names are used
    with '_' -> ' ' and lower case, with OpenAI's Caltech-101 templates.
    """
    meta = _load_caltech_metadata()
    fallback = [f.replace("_", " ").lower() for f in folders]
    if meta is None:
        return fallback, list(CALTECH_TEMPLATES), "folder names"
    names = next((meta[k] for k in ("classnames", "class_names", "classes") if k in meta), None)
    templates = next((meta[k] for k in ("templates", "prompt_templates", "prompts") if k in meta), None)
    if isinstance(names, dict):
        names = [names.get(f, fb) for f, fb in zip(folders, fallback)]
    if names is None or len(names) != len(folders):
        raise DatasetError(f"{CALTECH_METADATA}: expected {len(folders)} class names, got {None if names is None else len(names)}")
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        templates = list(CALTECH_TEMPLATES)
    return [str(n) for n in names], list(templates), CALTECH_METADATA


# ----------------------------------------------------------------------------------- public


def _check(name: str, split: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"unknown reference data set '{name}'; known: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")


def dataset_text(name: str, data_root: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """``(classnames, templates)`` of a reference data set, label order = class index."""
    _check(name, "train")
    if name == "digits":
        return list(DIGIT_CLASSNAMES), list(DIGIT_TEMPLATES)
    classnames, templates, _ = caltech_text(caltech_folders(caltech_root(data_root)))
    return classnames, templates


def data_id(name: str, data_root: str | os.PathLike | None = None) -> str:
    """Identity of the images and split behind a data set (part of the cache key)."""
    _check(name, "train")
    if name == "digits":
        return f"sklearn-digits:n=1797:test={DIGITS_TEST_FRACTION}:split_seed={DIGITS_SPLIT_SEED}"
    root = caltech_root(data_root)
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update("\n".join(_caltech_list(root, split)).encode())
    return f"caltech101-lists:{digest.hexdigest()[:16]}"


def reference_dataset(
    name: str,
    split: str,
    *,
    transform: Callable | None = None,
    data_root: str | os.PathLike | None = None,
) -> tuple[ReferenceImages, list[int], list[str]]:
    """``(images, labels, classnames)`` of one split of a reference data set.

    ``name`` is a reference (``digits``, ``caltech101``); ``split`` is ``train`` or ``test`` (the
    held-out split the reference top-1 is measured on). Images are RGB PIL images, or
    ``transform(image)`` when a transform (e.g. open_clip's ``preprocess``) is given.
    """
    _check(name, split)
    images = _digits_images(split) if name == "digits" else _caltech_images(split, data_root)
    images.transform = transform
    classnames, _ = dataset_text(name, data_root)
    return images, list(images.labels), classnames


# ----------------------------------------------------------------------------------- tensors


@dataclass
class TensorSplit:
    """A split decoded once: un-normalised uint8 pixels ``[N, 3, S, S]`` and int64 labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def pixel_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval preprocessing at ``size`` (shortest-side bicubic resize, centre crop) minus Normalize."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose, Normalize

    full = image_transform_v2(PreprocessCfg(size=size), is_train=False)
    return Compose([t for t in full.transforms if not isinstance(t, Normalize)])


def subset_indices(n: int, limit: int | None) -> list[int]:
    """Evenly spaced indices (so a handful of images still spans the classes of a sorted list)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, limit)})


def _decode(images: ReferenceImages, indices: list[int], size: int, desc: str, progress: bool) -> TensorSplit:
    to_pixels = pixel_transform(size)
    out = torch.empty((len(indices), 3, size, size), dtype=torch.uint8)
    for row, i in enumerate(tqdm(indices, desc=desc, unit="img", disable=not progress, leave=False)):
        out[row] = (to_pixels(images.image(i)) * 255.0).round_().to(torch.uint8)
    return TensorSplit(out, torch.tensor([images.labels[i] for i in indices], dtype=torch.long))


def load_tensor_split(
    name: str,
    split: str,
    size: int,
    *,
    limit: int | None = None,
    data_root: str | os.PathLike | None = None,
    progress: bool = True,
) -> TensorSplit:
    """A split as a uint8 tensor at ``size`` px, decoded once and cached for photo data sets.

    Caltech-101 (thousands of JPEGs) is cached under ``cache_dir()/reference/data/`` keyed by the
    file lists and size, so retraining does not decode again; digits are re-made (well under 1 s).
    """
    _check(name, split)
    images, _, _ = reference_dataset(name, split, data_root=data_root)
    indices = subset_indices(len(images), limit)
    desc = f"decode {name}/{split} @{size}px"
    if name == "digits" or limit is not None:
        return _decode(images, indices, size, desc, progress)
    key = hashlib.sha256(f"{data_id(name, data_root)}:{split}:{size}:v1".encode()).hexdigest()[:16]
    path = cache_dir() / "reference" / "data" / f"{name}-{split}-{size}px-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            split_data = TensorSplit(blob["images"], blob["labels"])
            if len(split_data) == len(indices) and tuple(split_data.images.shape[1:]) == (3, size, size):
                logger.info("loaded decoded %s/%s images from %s", name, split, path)
                return split_data
        except Exception as err:  # a corrupt cache is rebuilt, not fatal
            logger.warning("ignoring unreadable image cache %s (%s)", path, err)
    logger.info("decoding %d %s/%s images at %d px (once; cached in %s)", len(indices), name, split, size, path)
    split_data = _decode(images, indices, size, desc, progress)
    atomic_write(path, lambda tmp: torch.save({"images": split_data.images, "labels": split_data.labels}, tmp))
    return split_data
