"""Zero-shot benchmark datasets: a registry over torchvision's dataset classes.

``build_dataset(name, split="test"|"train", root=...)`` returns a :class:`ZeroShotDataset`: the
image files and labels of one split, the curated class names used for prompting and the
dataset's prompt-template ensemble (both from ``eval/metadata/<name>.json``, copied from the lists
published with OpenAI's CLIP). Labels index the *curated* class list: each sample's raw torchvision
class name (folder name, devkit name, file-name prefix) is looked up in the metadata's
``raw_classnames``, so a partial copy of a dataset still gets the right label for every image.

torchvision parses each dataset's own metadata (split lists, label files, .mat annotations); images
are then read here (always converted to RGB: Caltech101 holds grayscale JPEGs, which torchvision
returns unconverted). Before torchvision is called, the files it needs are checked, so a missing
or incomplete dataset is one :class:`~vlmpress.errors.DatasetError` naming the expected layout,
instead of a bare ``RuntimeError`` (or an empty directory created under the data root).

Splits: Food101, OxfordPets, StanfordCars and DTD (partition 1) have official splits. Caltech101,
EuroSAT and user folders (``imagefolder:<path>``) do not: they use the deterministic hash split of
:mod:`vlmpress.data.splits`, or an explicit list of test files (``split_file``; *train* is then the
complement, so calibration data never overlaps the test list).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from vlmpress.data.splits import (
    DEFAULT_TEST_FRACTION,
    file_digest,
    hash_split,
    read_split_file,
    stratified_subset,
)
from vlmpress.errors import DatasetError
from vlmpress.io.resources import resource_path

logger = logging.getLogger(__name__)

#: environment variable naming the data root when ``--data-root`` is not given
DATA_ENV = "VLMPRESS_DATA"
#: the template of ``--templates single`` (CLIP's default prompt), for ablations
SINGLE_TEMPLATE = "a photo of a {}."
TEMPLATE_MODES = ("ensemble", "single")
IMAGEFOLDER_PREFIX = "imagefolder:"


# ---------------------------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class DatasetMetadata:
    """Curated class names (label order), the raw torchvision name of each, and prompt templates."""

    name: str
    title: str
    classnames: tuple[str, ...]
    raw_classnames: tuple[str, ...]
    templates: tuple[str, ...]
    source: str

    def raw_to_index(self) -> dict[str, int]:
        """Normalised raw class name -> label (index into ``classnames``)."""
        return {_norm(raw): i for i, raw in enumerate(self.raw_classnames)}


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name).strip().lower()


@lru_cache(maxsize=None)
def load_metadata(name: str) -> DatasetMetadata:
    """Read ``eval/metadata/<name>.json`` (checked: aligned, unique raw names, templates with ``{}``)."""
    path = resource_path(f"eval/metadata/{name}.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    meta = DatasetMetadata(
        name=data["dataset"],
        title=data.get("title", name),
        classnames=tuple(data["classnames"]),
        raw_classnames=tuple(data["raw_classnames"]),
        templates=tuple(data["templates"]),
        source=data.get("source", ""),
    )
    if len(meta.classnames) != len(meta.raw_classnames):
        raise DatasetError(f"{path}: {len(meta.classnames)} class names but {len(meta.raw_classnames)} raw names")
    if len(set(map(_norm, meta.raw_classnames))) != len(meta.raw_classnames):
        raise DatasetError(f"{path}: raw class names are not unique")
    if not meta.templates or not all(("{}" in t or "{c}" in t) for t in meta.templates):
        raise DatasetError(f"{path}: every template needs a '{{}}' placeholder")
    return meta


def format_prompt(template: str, classname: str) -> str:
    """Fill a template's ``{}`` (CLIP style) or ``{c}`` (CLIP_benchmark style) with a class name."""
    return template.replace("{c}", classname).replace("{}", classname)


def select_templates(templates: Sequence[str], mode: str = "ensemble") -> list[str]:
    """The dataset's published ensemble, or CLIP's single default prompt for ablations."""
    if mode == "ensemble":
        return list(templates)
    if mode == "single":
        return [SINGLE_TEMPLATE]
    raise DatasetError(f"templates must be one of {', '.join(TEMPLATE_MODES)}, got '{mode}'")


# ---------------------------------------------------------------------------------------------- dataset
@dataclass
class Sample:
    path: Path
    label: int
    relpath: str  # relative to the dataset's image folder; the key of splits and split files


@dataclass(repr=False)
class ZeroShotDataset(Dataset):
    """One split of a benchmark: image files, labels (curated order), class names and templates.

    ``dataset[i]`` is ``(image, label)``: an RGB PIL image, passed through ``transform`` when set
    (use :meth:`with_transform` to get a copy bound to a model's preprocess).
    """

    name: str
    split: str  # "train" | "test"
    split_id: str  # e.g. "official-test", "hash(seed=0,test=0.3)-test", "file(test.txt@ab12..)-test"
    classnames: list[str] = field(repr=False)
    templates: list[str] = field(repr=False)
    samples: list[Sample] = field(repr=False)
    root: Path
    split_detail: dict[str, Any] = field(default_factory=dict, repr=False)
    transform: Callable | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (
            f"ZeroShotDataset({self.name!r}, split={self.split_id!r}, images={len(self.samples)}, "
            f"classes={len(self.classnames)}, root={str(self.root)!r})"
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = load_rgb(sample.path)
        if self.transform is not None:
            image = self.transform(image)
        return image, sample.label

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    @property
    def relpaths(self) -> list[str]:
        return [s.relpath for s in self.samples]

    @property
    def n_classes(self) -> int:
        """Size of the classification problem (all curated classes, present or not)."""
        return len(self.classnames)

    @property
    def classes_present(self) -> list[int]:
        return sorted({s.label for s in self.samples})

    def with_transform(self, transform: Callable | None) -> "ZeroShotDataset":
        out = copy.copy(self)
        out.transform = transform
        return out

    def subset(self, indices: Sequence[int], tag: str, **detail: Any) -> "ZeroShotDataset":
        out = copy.copy(self)
        out.samples = [self.samples[i] for i in indices]
        out.split_id = f"{self.split_id}+{tag}"
        out.split_detail = {**self.split_detail, **detail}
        return out

    def limit(self, n: int, seed: int = 0) -> "ZeroShotDataset":
        """Stratified, deterministic subset of ``n`` images (not the first ``n``: those are one class)."""
        if n >= len(self):
            return self
        idx = stratified_subset(self.labels, n, seed=seed, keys=self.relpaths)
        return self.subset(idx, f"limit{n}(seed={seed})", limit=n, limit_seed=seed, limit_policy="stratified")

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.name,
            "split": self.split_id,
            "n_images": len(self),
            "n_classes": self.n_classes,
            "n_classes_present": len(self.classes_present),
            "root": str(self.root),
            **self.split_detail,
        }


def load_rgb(path: str | Path) -> Image.Image:
    """Decoded RGB image; an RGB file is returned as decoded (no extra full-size copy).

    Undecodable files (truncated, not an image) and decompression bombs (more pixels than PIL's
    ``Image.MAX_IMAGE_PIXELS``, which PIL itself only warns about up to twice that) raise one
    :class:`DatasetError` naming the file, also from inside data loader workers.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img if img.mode == "RGB" else img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DatasetError(f"image {path} is refused as a decompression bomb ({str(err).splitlines()[0][:160]})") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as err:
        raise DatasetError(f"image {path} cannot be decoded ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})") from None


# ---------------------------------------------------------------------------------------------- registry
RawSample = tuple[Path, str, str]  # (absolute path, raw class name, relative path)


@dataclass(frozen=True)
class DatasetSpec:
    """How one benchmark is found on disk and read through its torchvision class."""

    name: str
    title: str
    torchvision_class: str
    official_split: bool
    layout: str  # the directory layout torchvision expects, for error messages and docs
    download_help: str
    required: Callable[[str], list[str]]  # split -> paths (relative to the root) that must exist
    collect: Callable[[Path, str, bool], tuple[list[RawSample], Path]]  # (root, split, download)
    split_names: dict[str, str] = field(default_factory=dict)  # our split -> official split name

    def missing_error(self, root: Path, missing: Sequence[str], extra: str = "", problem: str = "not found") -> DatasetError:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        return DatasetError(
            f"dataset '{self.name}' is missing or incomplete under data root {root}: {shown} {problem}.{extra}\n"
            f"torchvision.datasets.{self.torchvision_class} expects this layout under the data root:\n"
            f"{self.layout}\n{self.download_help}\n"
            f"Point --data-root (or ${DATA_ENV}) at the directory that holds the dataset folder."
        )


def _tv():
    import torchvision.datasets as tvd

    return tvd


def _attr(obj: Any, name: str) -> Any:
    if not hasattr(obj, name):
        import torchvision

        raise DatasetError(
            f"torchvision {torchvision.__version__}: {type(obj).__name__} has no '{name}' attribute; "
            "this vlmpress release reads it to list the images without decoding them (torchvision >= 0.16 works)"
        )
    return getattr(obj, name)


def _rel(path: Path, base: Path) -> str:
    return Path(path).relative_to(base).as_posix()


# --- Caltech101 -----------------------------------------------------------------------------------
def _caltech_collect(root: Path, split: str, download: bool) -> tuple[list[RawSample], Path]:
    ds = _tv().Caltech101(str(root), target_type="category", download=download)
    base = Path(ds.root) / "101_ObjectCategories"
    cats = _attr(ds, "categories")
    out = []
    for idx, y in zip(_attr(ds, "index"), _attr(ds, "y")):
        rel = f"{cats[y]}/image_{idx:04d}.jpg"
        out.append((base / rel, cats[y], rel))
    return out, base


# --- Food101 ----------------------------------------------------------------------------------------
def _food_collect(root: Path, split: str, download: bool) -> tuple[list[RawSample], Path]:
    ds = _tv().Food101(str(root), split=split, download=download)
    base = Path(ds.root) / "food-101" / "images"
    classes = ds.classes
    files, labels = _attr(ds, "_image_files"), _attr(ds, "_labels")
    return [(Path(f), classes[y], _rel(Path(f), base)) for f, y in zip(files, labels)], base


# --- Oxford-IIIT Pet ----------------------------------------------------------------------------------
def _pets_collect(root: Path, split: str, download: bool) -> tuple[list[RawSample], Path]:
    ds = _tv().OxfordIIITPet(str(root), split=split, target_types="category", download=download)
    base = Path(ds.root) / "oxford-iiit-pet" / "images"
    out = []
    for f in _attr(ds, "_images"):
        f = Path(f)
        # the breed is the file-name prefix ("american_bulldog_12.jpg"); torchvision's own .classes
        # is title-cased and only lists breeds present in the split, so it is not used for labels
        out.append((f, f.stem.rsplit("_", 1)[0], _rel(f, base)))
    return out, base


# --- Stanford Cars ---------------------------------------------------------------------------------
def _cars_collect(root: Path, split: str, download: bool) -> tuple[list[RawSample], Path]:
    try:
        import scipy.io  # noqa: F401  (torchvision reads the devkit's .mat files with it)
    except ImportError:
        raise DatasetError("StanfordCars needs scipy to read its .mat annotations: pip install scipy") from None
    if download:
        raise DatasetError(
            "StanfordCars cannot be downloaded: the official URL is gone and torchvision refuses download=True. "
            "Obtain the archives from a mirror and place them as described below.\n"
            + DATASETS["stanford_cars"].layout
        )
    ds = _tv().StanfordCars(str(root), split=split)
    base = Path(root) / "stanford_cars" / ("cars_test" if split == "test" else "cars_train")
    classes = ds.classes
    return [(Path(p), classes[y], _rel(Path(p), base)) for p, y in _attr(ds, "_samples")], base


# --- EuroSAT ------------------------------------------------------------------------------------------
def _eurosat_collect(root: Path, split: str, download: bool) -> tuple[list[RawSample], Path]:
    ds = _tv().EuroSAT(str(root), download=download)
    base = Path(root).expanduser() / "eurosat" / "2750"
    return [(Path(p), ds.classes[y], _rel(Path(p), base)) for p, y in ds.samples], base


# --- DTD -------------------------------------------------------------------------------------------------
def _dtd_collect(root: Path, split: str, download: bool) -> tuple[list[RawSample], Path]:
    ds = _tv().DTD(str(root), split=split, partition=1, download=download)
    base = Path(ds.root) / "dtd" / "dtd" / "images"
    classes = ds.classes
    files, labels = _attr(ds, "_image_files"), _attr(ds, "_labels")
    return [(Path(f), classes[y], _rel(Path(f), base)) for f, y in zip(files, labels)], base


_NEEDS_INTERNET = "Downloading needs internet access: pass --download on a machine that has it"

DATASETS: dict[str, DatasetSpec] = {
    "caltech101": DatasetSpec(
        name="caltech101",
        title="Caltech101",
        torchvision_class="Caltech101",
        official_split=False,
        layout=(
            "  <root>/caltech101/101_ObjectCategories/<class>/image_0001.jpg, image_0002.jpg, ...\n"
            "  (101 class folders such as accordion/, Faces_easy/; BACKGROUND_Google/ must exist -- torchvision\n"
            "  checks for it -- but its images are not used)"
        ),
        download_help=_NEEDS_INTERNET + " (torchvision fetches caltech-101.zip from data.caltech.edu, ~130 MB).",
        required=lambda split: ["caltech101/101_ObjectCategories", "caltech101/101_ObjectCategories/BACKGROUND_Google"],
        collect=_caltech_collect,
    ),
    "food101": DatasetSpec(
        name="food101",
        title="Food101",
        torchvision_class="Food101",
        official_split=True,
        layout=(
            "  <root>/food-101/images/<class>/<id>.jpg   (101 folders such as apple_pie/)\n"
            "  <root>/food-101/meta/test.json, train.json (class -> list of '<class>/<id>')"
        ),
        download_help=_NEEDS_INTERNET + " (torchvision fetches food-101.tar.gz from ETH Zurich, ~5 GB).",
        required=lambda split: ["food-101/images", f"food-101/meta/{split}.json"],
        collect=_food_collect,
        split_names={"train": "train", "test": "test"},
    ),
    "oxford_pets": DatasetSpec(
        name="oxford_pets",
        title="OxfordPets",
        torchvision_class="OxfordIIITPet",
        official_split=True,
        layout=(
            "  <root>/oxford-iiit-pet/images/<Breed>_<n>.jpg   (e.g. Abyssinian_1.jpg, american_bulldog_10.jpg)\n"
            "  <root>/oxford-iiit-pet/annotations/test.txt, trainval.txt ('<image id> <class id> <species> <breed id>')"
        ),
        download_help=_NEEDS_INTERNET + " (torchvision fetches images.tar.gz and annotations.tar.gz from robots.ox.ac.uk, ~800 MB).",
        required=lambda split: ["oxford-iiit-pet/images", f"oxford-iiit-pet/annotations/{split}.txt"],
        collect=_pets_collect,
        split_names={"train": "trainval", "test": "test"},
    ),
    "stanford_cars": DatasetSpec(
        name="stanford_cars",
        title="StanfordCars",
        torchvision_class="StanfordCars",
        official_split=True,
        layout=(
            "  <root>/stanford_cars/cars_test/00001.jpg, ...            (test images)\n"
            "  <root>/stanford_cars/cars_test_annos_withlabels.mat       (test labels)\n"
            "  <root>/stanford_cars/devkit/cars_meta.mat                 (196 class names)\n"
            "  <root>/stanford_cars/devkit/cars_train_annos.mat + <root>/stanford_cars/cars_train/ (train split)"
        ),
        download_help=(
            "Stanford Cars can no longer be downloaded automatically (the official URL is gone; torchvision "
            "raises on download=True). Get cars_test.tgz, cars_train.tgz, car_devkit.tgz and "
            "cars_test_annos_withlabels.mat from a mirror, extract them and place the files exactly as above."
        ),
        required=lambda split: (
            ["stanford_cars/devkit/cars_meta.mat"]
            + (
                ["stanford_cars/cars_test", "stanford_cars/cars_test_annos_withlabels.mat"]
                if split == "test"
                else ["stanford_cars/cars_train", "stanford_cars/devkit/cars_train_annos.mat"]
            )
        ),
        collect=_cars_collect,
        split_names={"train": "train", "test": "test"},
    ),
    "eurosat": DatasetSpec(
        name="eurosat",
        title="EuroSAT",
        torchvision_class="EuroSAT",
        official_split=False,
        layout=(
            "  <root>/eurosat/2750/<Class>/<Class>_<n>.jpg\n"
            "  (10 folders: AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop "
            "Residential River SeaLake)"
        ),
        download_help=_NEEDS_INTERNET + " (torchvision fetches EuroSAT.zip, ~90 MB).",
        required=lambda split: ["eurosat/2750"],
        collect=_eurosat_collect,
    ),
    "dtd": DatasetSpec(
        name="dtd",
        title="DTD",
        torchvision_class="DTD",
        official_split=True,
        layout=(
            "  <root>/dtd/dtd/images/<class>/<class>_<nnnn>.jpg   (47 folders such as banded/)\n"
            "  <root>/dtd/dtd/labels/test1.txt, train1.txt ('<class>/<file>' per line; partition 1 is used)"
        ),
        download_help=_NEEDS_INTERNET + " (torchvision fetches dtd-r1.0.1.tar.gz from robots.ox.ac.uk, ~600 MB).",
        required=lambda split: ["dtd/dtd/images", f"dtd/dtd/labels/{split}1.txt"],
        collect=_dtd_collect,
        split_names={"train": "train", "test": "test"},
    ),
}


def list_datasets() -> list[str]:
    """Registered benchmark names (plus ``imagefolder:<path>`` for a user's labelled folder)."""
    return list(DATASETS)


def dataset_title(name: str) -> str:
    """Display name used in tables (``Caltech101``, ``OxfordPets``...)."""
    if name in DATASETS:
        return DATASETS[name].title
    if name.startswith(IMAGEFOLDER_PREFIX):
        return Path(name[len(IMAGEFOLDER_PREFIX) :]).name or name
    return name


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """``root``, else ``$VLMPRESS_DATA``; a clear error when neither is set."""
    value = root if root not in (None, "") else os.environ.get(DATA_ENV)
    if not value:
        raise DatasetError(
            f"no data root given: pass --data-root DIR or set {DATA_ENV}=DIR (the directory holding "
            "caltech101/, food-101/, oxford-iiit-pet/, stanford_cars/, eurosat/, dtd/)"
        )
    return Path(value).expanduser().resolve()


# ---------------------------------------------------------------------------------------------- building
def build_dataset(
    name: str,
    split: str = "test",
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    split_file: str | os.PathLike | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    templates: str = "ensemble",
    limit: int | None = None,
    transform: Callable | None = None,
) -> ZeroShotDataset:
    """One split of a registered benchmark (or ``imagefolder:<path>``) with its curated names/templates.

    ``split_file`` (datasets without an official split only) lists the *test* images, one path per
    line relative to the image folder (e.g. ``accordion/image_0001.jpg``); lines naming folders that
    are not classes of the dataset (``BACKGROUND_Google``) are dropped. ``split="train"`` is then
    every other image. ``limit`` takes a stratified, deterministic subset.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got '{split}'")
    if name.startswith(IMAGEFOLDER_PREFIX):
        ds = _build_imagefolder(name, split, split_file=split_file, test_fraction=test_fraction, seed=seed)
        ds.templates = select_templates(ds.templates, templates)
        ds.split_detail["templates"] = templates
    else:
        spec = DATASETS.get(name)
        if spec is None:
            raise DatasetError(
                f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)} or imagefolder:<path>"
            )
        data_root = resolve_data_root(root)
        meta = load_metadata(name)
        if spec.official_split:
            if split_file is not None:
                raise DatasetError(
                    f"{spec.title} has an official {split} split; --split-file only applies to datasets without "
                    "one (caltech101, eurosat, imagefolder:<path>)"
                )
            raws, base = _collect(spec, data_root, spec.split_names[split], download)
            samples = _label(raws, meta, spec, data_root)
            official = spec.split_names[split] + ("1" if name == "dtd" else "")
            ds = ZeroShotDataset(
                name, split, f"official-{official}", list(meta.classnames), [], samples, base,
                {"split_kind": "official", "official_split": official},
            )
        else:
            raws, base = _collect(spec, data_root, "all", download)
            samples = _label(raws, meta, spec, data_root)
            ds = _split_unofficial(name, split, samples, base, list(meta.classnames), split_file, test_fraction, seed)
        ds.templates = select_templates(meta.templates, templates)
        ds.split_detail["templates"] = templates
    if len(ds) == 0:
        raise DatasetError(f"dataset '{name}' {split} split ({ds.split_id}) holds no images under {ds.root}")
    if limit is not None:
        ds = ds.limit(limit, seed=seed)
    ds.transform = transform
    logger.info("dataset %s: %d images, %d classes, split %s", name, len(ds), ds.n_classes, ds.split_id)
    return ds


def _collect(spec: DatasetSpec, root: Path, split: str, download: bool) -> tuple[list[RawSample], Path]:
    if not download:
        missing = [p for p in spec.required(split) if not (root / p).exists()]
        if missing:
            raise spec.missing_error(root, missing)
    try:
        raws, base = spec.collect(root, split, download)
    except DatasetError:
        raise
    except ImportError as err:
        raise DatasetError(f"reading {spec.title} needs a missing package: {err}") from None
    except (RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise spec.missing_error(
            root, list(spec.required(split)), f" torchvision reported: {err}", problem="could not be read"
        ) from None
    missing_files = [rel for path, _, rel in raws if not os.path.isfile(path)]
    if missing_files:
        raise spec.missing_error(
            root, [str(base / m) for m in missing_files], f" ({len(missing_files)} of {len(raws)} listed images)"
        )
    return raws, base


def _label(raws: list[RawSample], meta: DatasetMetadata, spec: DatasetSpec, root: Path) -> list[Sample]:
    index = meta.raw_to_index()
    unknown = sorted({raw for _, raw, _ in raws if _norm(raw) not in index})
    if unknown:
        raise DatasetError(
            f"{spec.title} under {root} has classes with no curated name in eval/metadata/{meta.name}.json: "
            f"{', '.join(unknown[:10])}. Is this the right dataset / torchvision layout?"
        )
    samples = [Sample(Path(path), index[_norm(raw)], rel) for path, raw, rel in raws]
    present = len({s.label for s in samples})
    if present < len(meta.classnames):
        logger.warning(
            "%s under %s: only %d of %d classes have images (evaluation still uses all %d class prompts)",
            spec.title, root, present, len(meta.classnames), len(meta.classnames),
        )
    return samples


def _split_unofficial(
    name: str,
    split: str,
    samples: list[Sample],
    base: Path,
    classnames: list[str],
    split_file: str | os.PathLike | None,
    test_fraction: float,
    seed: int,
) -> ZeroShotDataset:
    rels = [s.relpath for s in samples]
    if split_file is None:
        train, test = hash_split(rels, [s.label for s in samples], test_fraction=test_fraction, seed=seed)
        kind = f"hash(seed={seed},test={test_fraction:g})"
        detail = {
            "split_kind": "hash",
            "split_seed": seed,
            "test_fraction": test_fraction,
            "split_policy": "per class: files sorted by sha256('<seed>:<relative path>'), first round(f*n) -> test",
        }
    else:
        path = Path(split_file).expanduser().resolve()
        listed = read_split_file(path)
        by_rel = {r: i for i, r in enumerate(rels)}
        class_dirs = {r.split("/", 1)[0] for r in rels if "/" in r}
        test_set: set[int] = set()
        dropped: list[str] = []
        absent: list[str] = []
        for line in listed:
            if line in by_rel:
                test_set.add(by_rel[line])
            elif "/" in line and line.split("/", 1)[0] not in class_dirs:
                dropped.append(line)  # e.g. BACKGROUND_Google: not a class of this dataset
            else:
                absent.append(line)
        if absent:
            raise DatasetError(
                f"split file {path} names {len(absent)} images of {name} that are not under {base} "
                f"(e.g. {', '.join(absent[:3])}); the dataset copy is incomplete or the file is for another layout"
            )
        if dropped:
            logger.info("split file %s: dropped %d lines outside the dataset's classes (e.g. %s)", path.name, len(dropped), dropped[0])
        test = sorted(test_set)
        train = [i for i in range(len(samples)) if i not in test_set]
        digest = file_digest(path)
        kind = f"file({path.name}@{digest})"
        detail = {
            "split_kind": "file",
            "split_file": str(path),
            "split_file_sha256": digest,
            "split_file_role": "lists the test images; train = every other image",
            "split_file_dropped_lines": len(dropped),
        }
    chosen = test if split == "test" else train
    return ZeroShotDataset(
        name, split, f"{kind}-{split}", classnames, [], [samples[i] for i in chosen], base, detail
    )


def _readable(folder: str) -> str:
    return re.sub(r"\s+", " ", folder.replace("_", " ").replace("-", " ")).strip()


def scan_class_folders(directory: Path, extensions: tuple[str, ...]) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, class index)]) of ``directory/<class>/**/<image>``, links followed safely.

    Symbolic links are followed, but every real directory is entered once (a link loop cannot
    multiply the images) and every real file is counted once; a file reachable under two classes
    is refused instead of being given one of the labels at random.
    """
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir()) if directory.is_dir() else []
    samples: list[tuple[str, int]] = []
    owner: dict[str, str] = {}
    duplicates = 0
    for index, cls in enumerate(classes):
        seen_dirs: set[tuple[int, int]] = set()
        for base, dirs, files in os.walk(directory / cls, followlinks=True):
            st = os.stat(base)
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirs[:] = []  # a link back into a folder already walked (a loop)
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(base, name)
                if not name.lower().endswith(extensions) or not os.path.isfile(path):
                    continue
                real = os.path.realpath(path)
                if real in owner:
                    if owner[real] != cls:
                        raise DatasetError(
                            f"image {real} is reachable under two classes ({owner[real]} and {cls}) through symbolic "
                            "links; a file can have one label only"
                        )
                    duplicates += 1
                    continue
                owner[real] = cls
                samples.append((path, index))
    if duplicates:
        logger.warning("%s: %d links to images already counted were skipped (each file counts once)", directory, duplicates)
    present = {label for _, label in samples}
    empty = [c for i, c in enumerate(classes) if i not in present]
    if samples and empty:
        raise DatasetError(f"class folder(s) {', '.join(empty[:5])} in {directory} hold no images ({', '.join(extensions)})")
    return classes, samples


def _build_imagefolder(
    name: str, split: str, *, split_file, test_fraction: float, seed: int
) -> ZeroShotDataset:
    """``imagefolder:<path>``: class sub-folders, or ``train/`` + ``test/`` each holding class sub-folders."""
    folder = Path(name[len(IMAGEFOLDER_PREFIX) :]).expanduser().resolve()
    layout = (
        f"  {folder}/<class>/<image>.jpg ...                (hash split, or --split-file)\n"
        f"  or {folder}/train/<class>/... and {folder}/test/<class>/...   (explicit split)"
    )
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist; expected:\n{layout}")
    meta_templates = list(load_metadata("imagefolder").templates)
    tvd = _tv()

    def scan(directory: Path) -> tuple[list[str], list[tuple[str, int]]]:
        classes, samples = scan_class_folders(directory, tuple(tvd.folder.IMG_EXTENSIONS))
        if not samples:
            raise DatasetError(f"no labelled images found in {directory}; expected:\n{layout}")
        return classes, samples

    explicit = (folder / "test").is_dir() and (folder / "train").is_dir()
    if explicit:
        if split_file is not None:
            raise DatasetError(f"{folder} has train/ and test/ folders; --split-file does not apply to it")
        classes, _ = scan(folder / "test")
        train_classes, _ = scan(folder / "train")
        classes = sorted(set(classes) | set(train_classes))
        index = {c: i for i, c in enumerate(classes)}
        base = folder / split
        sub_classes, raw = scan(base)
        samples = [Sample(Path(p), index[sub_classes[y]], _rel(Path(p), base)) for p, y in raw]
        return ZeroShotDataset(
            name, split, f"folders-{split}", [_readable(c) for c in classes], meta_templates, samples, base,
            {"split_kind": "folders"},
        )
    classes, raw = scan(folder)
    samples = [Sample(Path(p), y, _rel(Path(p), folder)) for p, y in raw]
    ds = _split_unofficial(
        name, split, samples, folder, [_readable(c) for c in classes], split_file, test_fraction, seed
    )
    ds.templates = meta_templates
    return ds
