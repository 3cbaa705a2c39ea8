"""Calibration inputs for CLIP-style models: a sample of images and a list of captions.

Images come from a folder (recursively; sub-folder names are class names when present) or from a
registered dataset's *train* split. Captions come from a text file (one per line) or, without one,
from the class names of the calibration images filled into prompt templates. The source of each
is recorded so reports say where the calibration data came from.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlmpress.errors import CalibrationError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}

# A few of OpenAI CLIP's ImageNet prompt templates: generic enough for any class list.
GENERIC_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a low resolution photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "itap of a {}.",
)


@dataclass
class CalibrationSet:
    """Images (PIL images or file paths) and captions for calibrating both towers."""

    images: Sequence[Any] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    image_source: str = ""
    caption_source: str = ""
    class_names: list[str] | None = None
    skipped_images: list[str] = field(default_factory=list)  # unreadable files left out
    #: class name of each calibration image (None where unknown); lets generative VLMs pair an image with a caption of its class
    image_classes: list[str | None] | None = None

    def describe(self) -> dict[str, Any]:
        out = {
            "n_images": len(self.images),
            "n_captions": len(self.captions),
            "image_source": self.image_source,
            "caption_source": self.caption_source,
        }
        if self.skipped_images:
            out["skipped_images"] = len(self.skipped_images)
            out["first_skipped_image"] = self.skipped_images[0]
        return out


class _ImageList(Dataset):
    """PIL images or paths -> model tensors through the adapter's preprocess."""

    def __init__(self, items: Sequence[Any], transform: Callable):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        if isinstance(item, (str, Path)):
            with Image.open(item) as img:
                item = img.convert("RGB")
        elif isinstance(item, Image.Image) and item.mode != "RGB":
            item = item.convert("RGB")
        return self.transform(item)


def image_batches(images: Sequence[Any], transform: Callable, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(_ImageList(images, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def caption_batches(captions: Sequence[str], batch_size: int) -> list[list[str]]:
    return [list(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)]


def scan_image_folder(folder: str | Path) -> tuple[list[Path], list[str | None]]:
    """All images under ``folder`` (sorted) and the class name of each (its top-level sub-folder)."""
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationError(f"calibration image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise CalibrationError(
            f"calibration image folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "point --calib-images at a folder of images (optionally one sub-folder per class)"
        )
    classes = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in paths]
    return paths, classes


def _sample(items: Sequence[Any], n: int, seed: int) -> list[Any]:
    if len(items) <= n:
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def _readable_class(name: str) -> str:
    return name.replace("_", " ").strip()


def image_is_readable(path: str | Path) -> bool:
    """Whether PIL can fully decode ``path`` (truncated, corrupt and non-image files, and
    decompression bombs above PIL's pixel limit, are not)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
        return True
    except (OSError, SyntaxError, ValueError, MemoryError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return False


def _sample_readable(items: list[tuple[Path, Any]], n: int, seed: int) -> tuple[list[tuple[Path, Any]], list[Path]]:
    """The seeded sample of ``n`` items, each unreadable image replaced by the next readable one."""
    chosen = _sample(items, n, seed)
    bad = [p for p, _ in chosen if not image_is_readable(p)]
    if not bad:
        return chosen, []
    bad_set = set(bad)
    kept = [item for item in chosen if item[0] not in bad_set]
    taken = {p for p, _ in chosen}
    rest = [item for item in items if item[0] not in taken]
    random.Random(seed + 1).shuffle(rest)
    for item in rest:
        if len(kept) >= n:
            break
        if image_is_readable(item[0]):
            kept.append(item)
        else:
            bad.append(item[0])
    order = {p: i for i, (p, _) in enumerate(items)}
    return sorted(kept, key=lambda item: order[item[0]]), bad


def load_calibration_images(
    source: str, n: int, seed: int = 0, data_root: str | None = None, split_file: str | None = None,
    skipped: list[str] | None = None,
) -> tuple[list[Any], list[str] | None, str]:
    """(images, class names or None, description) from a folder or a registered dataset's train split.

    Unreadable files in a folder are skipped with one warning (count and first file) and appended
    to ``skipped``; a folder without any readable image is an error.
    """
    images, _, names, description = load_labelled_calibration_images(source, n, seed, data_root, split_file, skipped)
    return images, names, description


def load_labelled_calibration_images(
    source: str, n: int, seed: int = 0, data_root: str | None = None, split_file: str | None = None,
    skipped: list[str] | None = None,
) -> tuple[list[Any], list[str | None], list[str] | None, str]:
    """As :func:`load_calibration_images`, plus the class name of every image (None where unknown)."""
    if Path(source).expanduser().is_dir():
        root = Path(source).expanduser()
        paths, classes = scan_image_folder(root)
        held_out = ""
        if split_file is not None:  # the test list: calibration never sees those images
            from vlmpress.data.splits import read_split_file

            test = set(read_split_file(split_file))
            keep = [i for i, p in enumerate(paths) if p.relative_to(root).as_posix() not in test]
            if len(keep) == len(paths):
                raise CalibrationError(
                    f"--calib-split-file {split_file} lists none of the images in {root} (paths relative to that folder, "
                    "e.g. cat/001.jpg); it would exclude nothing"
                )
            if not keep:
                raise CalibrationError(f"--calib-split-file {split_file} lists every image in {root}; nothing is left to calibrate on")
            held_out = f", {len(paths) - len(keep)} test images of {Path(split_file).name} excluded"
            paths, classes = [paths[i] for i in keep], [classes[i] for i in keep]
        chosen, bad = _sample_readable(list(zip(paths, classes)), n, seed)
        if bad:
            logger.warning(
                "skipped %d unreadable calibration image(s) in %s (first: %s)", len(bad), source, bad[0]
            )
            if skipped is not None:
                skipped.extend(str(p) for p in bad)
        if not chosen:
            raise CalibrationError(
                f"none of the {len(paths)} image files in {source} could be read (first: {bad[0]}); "
                "expected decodable images (jpg, png, ...)"
            )
        names = sorted({_readable_class(c) for _, c in chosen if c is not None}) or None
        note = (f", {len(bad)} unreadable skipped" if bad else "") + held_out
        per_image = [_readable_class(c) if c is not None else None for _, c in chosen]
        return [p for p, _ in chosen], per_image, names, f"folder {source} ({len(chosen)} of {len(paths)} images{note})"
    try:
        from vlmpress.data import datasets as registry
    except ImportError:  # pragma: no cover - dataset registry not available
        registry = None
    if registry is not None and source in getattr(registry, "DATASETS", {}):
        # the train part of the same split evaluation uses: calibration never sees a test image
        ds = registry.build_dataset(source, split="train", root=data_root, split_file=split_file)  # default split seed = eval default
        indices = _sample(list(range(len(ds))), n, seed)
        items = [ds[i] for i in indices]
        names = list(getattr(ds, "classnames", None) or [])
        per_image = [names[int(label)] if names else None for _, label in items]
        return [img for img, _ in items], per_image, names or None, f"dataset {source} train split {ds.split_id} ({len(items)} images)"
    known = sorted(getattr(registry, "DATASETS", {})) if registry is not None else []
    raise CalibrationError(
        f"calibration images '{source}' is neither an existing folder nor a registered dataset"
        + (f" (known datasets: {', '.join(known)})" if known else "")
    )


def read_utf8_text(path: Path, what: str) -> str:
    """A text file's content; binary or non-UTF-8 files are refused (no silent replacement characters)."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise CalibrationError(f"{what} {path} is binary (holds NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CalibrationError(
            f"{what} {path} is not valid UTF-8 (byte {err.start}: {data[err.start:err.start + 1]!r}); "
            "expected UTF-8 text (convert it, e.g. iconv -f latin1 -t utf-8)"
        ) from None


def load_captions(path: str | Path, n: int, seed: int = 0) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CalibrationError(f"caption file not found: {path} (expected a text file with one caption per line)")
    lines = [line.strip() for line in read_utf8_text(path, "caption file").splitlines()]
    captions = [line for line in lines if line]
    if not captions:
        raise CalibrationError(f"caption file {path} is empty (expected one caption per line)")
    return _sample(captions, n, seed)


def captions_from_classes(
    class_names: Sequence[str], n: int, seed: int = 0, templates: Sequence[str] = GENERIC_TEMPLATES
) -> list[str]:
    """``n`` captions cycling through classes, each with a seeded random template."""
    if not class_names:
        raise CalibrationError("no class names to build captions from")
    rng = random.Random(seed)
    names = list(class_names)
    rng.shuffle(names)
    return [rng.choice(list(templates)).format(names[i % len(names)]) for i in range(n)]


def build_calibration_set(
    images: str | None,
    captions: str | None,
    *,
    n_images: int = 256,
    n_captions: int = 256,
    seed: int = 0,
    data_root: str | None = None,
    need_images: bool = True,
    need_captions: bool = True,
    split_file: str | None = None,
) -> CalibrationSet:
    """Resolve the ``calib_images`` / ``calib_captions`` settings of a compression config."""
    out = CalibrationSet()
    if need_images or (need_captions and not captions):
        if not images:
            raise CalibrationError(
                "calibration images are required: pass --calib-images FOLDER (or a registered dataset name)"
            )
        out.images, out.image_classes, out.class_names, out.image_source = load_labelled_calibration_images(
            images, n_images, seed, data_root, split_file, skipped=out.skipped_images
        )
        if not need_images:
            out.images, out.image_classes = [], None
    if need_captions:
        if captions:
            out.captions = load_captions(captions, n_captions, seed)
            out.caption_source = f"file {captions}"
        elif out.class_names:
            out.captions = captions_from_classes(out.class_names, n_captions, seed)
            out.caption_source = (
                f"class names of the calibration images ({len(out.class_names)} classes) x "
                f"{len(GENERIC_TEMPLATES)} generic prompt templates"
            )
        else:
            raise CalibrationError(
                "no caption file given and the calibration images have no class sub-folders to build captions "
                "from; pass --calib-captions FILE (one caption per line)"
            )
    return out
