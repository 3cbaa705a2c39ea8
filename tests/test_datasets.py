"""Dataset registry: tiny on-disk layouts in torchvision's exact form, curated names, splits, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from vlmpress.data import DATASETS, build_dataset, load_metadata, select_templates
from vlmpress.data.splits import hash_split, read_split_file, stratified_subset
from vlmpress.errors import DatasetError

SHARED_CALTECH = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "caltech101"


def jpg(path: Path, shade: int = 0, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = shade % 256 if mode == "L" else (shade % 256, 80, 160)
    Image.new(mode, (12, 10), color).save(path, format="JPEG")


# ---------------------------------------------------------------------------------------------- layouts
def make_caltech(root: Path, per_class: int = 5) -> Path:
    base = root / "caltech101" / "101_ObjectCategories"
    for c, cls in enumerate(["Faces_easy", "accordion", "yin_yang", "BACKGROUND_Google"]):
        for i in range(1, per_class + 1):
            jpg(base / cls / f"image_{i:04d}.jpg", 10 * c + i, mode="L" if cls == "accordion" else "RGB")
    return root


def make_food(root: Path) -> Path:
    base = root / "food-101"
    meta = {"test": {"apple_pie": ["apple_pie/101", "apple_pie/102"], "waffles": ["waffles/201"]},
            "train": {"apple_pie": ["apple_pie/103"], "waffles": ["waffles/202", "waffles/203"]}}
    for split, classes in meta.items():
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(classes))
        for items in classes.values():
            for item in items:
                jpg(base / "images" / f"{item}.jpg")
    return root


def make_pets(root: Path) -> Path:
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    test = [("Abyssinian_1", 1, 1, 1), ("american_bulldog_3", 2, 2, 1), ("yorkshire_terrier_5", 37, 2, 25),
            ("Abyssinian_2", 1, 1, 1)]
    trainval = [("Sphynx_7", 34, 1, 12), ("pug_9", 26, 2, 18)]
    for name, rows in (("test", test), ("trainval", trainval)):
        (base / "annotations" / f"{name}.txt").write_text("".join(f"{a} {b} {c} {d}\n" for a, b, c, d in rows))
        for image_id, *_ in rows:
            jpg(base / "images" / f"{image_id}.jpg")
    return root


def make_cars(root: Path) -> Path:
    import numpy as np
    import scipy.io as sio

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(load_metadata("stanford_cars").raw_classnames, dtype=object).reshape(1, -1)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]

    def annos(path: Path, rows, folder: Path):
        arr = np.zeros((len(rows),), dtype=fields)
        for i, (cls, fname) in enumerate(rows):
            arr[i] = (1, 1, 8, 8, cls, fname)
            jpg(folder / fname)
        sio.savemat(path, {"annotations": arr})

    annos(base / "cars_test_annos_withlabels.mat", [(1, "00001.jpg"), (196, "00002.jpg"), (14, "00003.jpg")],
          base / "cars_test")
    annos(base / "devkit" / "cars_train_annos.mat", [(2, "00001.jpg"), (3, "00002.jpg")], base / "cars_train")
    return root


def make_eurosat(root: Path, per_class: int = 6) -> Path:
    base = root / "eurosat" / "2750"
    for c, cls in enumerate(["AnnualCrop", "HerbaceousVegetation", "SeaLake"]):
        for i in range(1, per_class + 1):
            jpg(base / cls / f"{cls}_{i}.jpg", 20 * c + i)
    return root


def make_dtd(root: Path) -> Path:
    base = root / "dtd" / "dtd"
    files = {"banded": ["banded_0001.jpg", "banded_0002.jpg", "banded_0003.jpg"],
             "zigzagged": ["zigzagged_0010.jpg", "zigzagged_0011.jpg"]}
    for cls, names in files.items():
        for n in names:
            jpg(base / "images" / cls / n)
    (base / "labels").mkdir(parents=True)
    (base / "labels" / "test1.txt").write_text("banded/banded_0001.jpg\nbanded/banded_0002.jpg\nzigzagged/zigzagged_0010.jpg\n")
    (base / "labels" / "train1.txt").write_text("banded/banded_0003.jpg\nzigzagged/zigzagged_0011.jpg\n")
    return root


MAKERS = {
    "caltech101": make_caltech, "food101": make_food, "oxford_pets": make_pets,
    "stanford_cars": make_cars, "eurosat": make_eurosat, "dtd": make_dtd,
}

# dataset -> (test images, {relative path: expected curated class name}) for the layouts above
EXPECTED_TEST = {
    "food101": (3, {"apple_pie/101.jpg": "apple pie", "waffles/201.jpg": "waffles"}),
    "oxford_pets": (4, {"Abyssinian_1.jpg": "Abyssinian", "american_bulldog_3.jpg": "american bulldog",
                        "yorkshire_terrier_5.jpg": "yorkshire terrier"}),
    "stanford_cars": (3, {"00001.jpg": "AM General Hummer SUV 2000", "00002.jpg": "smart fortwo Convertible 2012",
                          "00003.jpg": "Audi TTS Coupe 2012"}),
    "dtd": (3, {"banded/banded_0001.jpg": "banded", "zigzagged/zigzagged_0010.jpg": "zigzagged"}),
}
N_CLASSES = {"caltech101": 101, "food101": 101, "oxford_pets": 37, "stanford_cars": 196, "eurosat": 10, "dtd": 47}


# ---------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("name", list(DATASETS))
def test_metadata_maps_every_raw_class_to_one_curated_name(name):
    meta = load_metadata(name)
    assert len(meta.classnames) == len(meta.raw_classnames) == N_CLASSES[name]
    index = meta.raw_to_index()
    assert sorted(index.values()) == list(range(N_CLASSES[name]))  # a bijection onto the labels
    assert len(set(meta.classnames)) == N_CLASSES[name]
    assert all("{}" in t for t in meta.templates) and "CLIP" in meta.source


def test_published_template_ensembles_and_single_mode():
    counts = {name: len(load_metadata(name).templates) for name in DATASETS}
    assert counts == {"caltech101": 34, "food101": 1, "oxford_pets": 1, "stanford_cars": 8, "eurosat": 3, "dtd": 8}
    assert load_metadata("food101").templates == ("a photo of {}, a type of food.",)
    assert load_metadata("oxford_pets").templates == ("a photo of a {}, a type of pet.",)
    assert load_metadata("eurosat").templates[0] == "a centered satellite photo of {}."
    assert select_templates(load_metadata("caltech101").templates, "single") == ["a photo of a {}."]
    with pytest.raises(DatasetError, match="ensemble, single"):
        select_templates(["a {}."], "many")


def test_curated_names_of_renamed_classes():
    def name_of(ds, raw):
        meta = load_metadata(ds)
        return meta.classnames[meta.raw_to_index()[raw.lower()]]

    assert name_of("caltech101", "Faces") == "off-center face"
    assert name_of("caltech101", "Faces_easy") == "centered face"
    assert name_of("caltech101", "car_side") == "side of a car"
    assert name_of("caltech101", "yin_yang") == "yin and yang symbol"
    assert name_of("eurosat", "HerbaceousVegetation") == "brushland or shrubland"
    assert name_of("eurosat", "SeaLake") == "lake or sea"
    # Pets follow the official class ids (case-insensitive alphabetical): torchvision label = id - 1
    pets = load_metadata("oxford_pets")
    assert pets.raw_classnames[:3] == ("Abyssinian", "american_bulldog", "american_pit_bull_terrier")
    assert pets.raw_classnames[25] == "pug" and pets.raw_classnames[36] == "yorkshire_terrier"


@pytest.mark.skipif(not SHARED_CALTECH.is_dir(), reason="../shared Caltech101 not available")
def test_caltech_metadata_covers_the_real_class_folders():
    folders = sorted(p.name for p in (SHARED_CALTECH / "101_ObjectCategories").iterdir() if p.is_dir())
    folders.remove("BACKGROUND_Google")
    assert list(load_metadata("caltech101").raw_classnames) == folders


# ---------------------------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("name", sorted(EXPECTED_TEST))
def test_official_split_loaders(tmp_path, name):
    root = MAKERS[name](tmp_path)
    ds = build_dataset(name, "test", root)
    n, expected = EXPECTED_TEST[name]
    assert len(ds) == n and ds.n_classes == N_CLASSES[name]
    assert ds.split_id.startswith("official-test")
    by_rel = {s.relpath: s.label for s in ds.samples}
    for rel, classname in expected.items():
        assert ds.classnames[by_rel[rel]] == classname
    image, label = ds[0]
    assert image.mode == "RGB" and label == ds.samples[0].label
    train = build_dataset(name, "train", root)
    assert len(train) >= 1 and not {s.path for s in train.samples} & {s.path for s in ds.samples}
    assert ds.templates == list(load_metadata(name).templates)


def test_dtd_uses_partition_1_and_pets_trainval(tmp_path):
    assert build_dataset("dtd", "test", make_dtd(tmp_path / "d")).split_id == "official-test1"
    pets = build_dataset("oxford_pets", "train", make_pets(tmp_path / "p"))
    assert pets.split_id == "official-trainval"
    assert sorted(pets.classnames[s.label] for s in pets.samples) == ["Sphynx", "pug"]


def test_caltech_labels_grayscale_and_background_dropped(tmp_path):
    root = make_caltech(tmp_path)
    ds = build_dataset("caltech101", "test", root)
    train = build_dataset("caltech101", "train", root)
    everything = {s.relpath: s for s in ds.samples + train.samples}
    assert len(everything) == 15 and not any(r.startswith("BACKGROUND") for r in everything)
    names = {r.split("/")[0]: ds.classnames[s.label] for r, s in everything.items()}
    assert names == {"Faces_easy": "centered face", "accordion": "accordion", "yin_yang": "yin and yang symbol"}
    gray = next(i for i, s in enumerate(train.samples) if s.relpath.startswith("accordion"))
    assert train[gray][0].mode == "RGB"  # source JPEG is grayscale
    assert ds.n_classes == 101 and len(ds.classes_present) == 3


def test_hash_split_is_stratified_disjoint_and_deterministic(tmp_path):
    root = make_eurosat(tmp_path, per_class=10)
    test = build_dataset("eurosat", "test", root)
    train = build_dataset("eurosat", "train", root)
    assert test.split_id == "hash(seed=0,test=0.3)-test" and train.split_id.endswith("-train")
    assert not set(test.relpaths) & set(train.relpaths) and len(test) + len(train) == 30
    assert sorted(test.labels) == sorted([0, 0, 0, 2, 2, 2, 9, 9, 9])  # 3 of 10 per class
    assert build_dataset("eurosat", "test", root).relpaths == test.relpaths
    other = build_dataset("eurosat", "test", root, seed=1)
    assert other.relpaths != test.relpaths and other.split_id == "hash(seed=1,test=0.3)-test"


def test_hash_split_does_not_depend_on_listing_order():
    rels = [f"c{i % 3}/img_{i}.jpg" for i in range(60)]
    labels = [i % 3 for i in range(60)]
    _, test = hash_split(rels, labels, test_fraction=0.25, seed=7)
    perm = list(range(60))
    random.Random(0).shuffle(perm)
    _, test_p = hash_split([rels[i] for i in perm], [labels[i] for i in perm], test_fraction=0.25, seed=7)
    assert {rels[i] for i in test} == {rels[perm[i]] for i in test_p}
    assert len(test) == 15
    # tiny classes keep at least one image on each side
    train, test = hash_split(["a/1", "a/2", "b/1"], [0, 0, 1], test_fraction=0.01)
    assert len(test) == 1 and train == [0, 2] or train == [1, 2]


def test_split_file_selects_test_and_train_is_complement(tmp_path):
    root = make_caltech(tmp_path)
    split = tmp_path / "test.txt"
    split.write_text("accordion/image_0001.jpg\nBACKGROUND_Google/image_0002.jpg\n\nyin_yang/image_0005.jpg\n")
    test = build_dataset("caltech101", "test", root, split_file=split)
    train = build_dataset("caltech101", "train", root, split_file=split)
    assert test.relpaths == ["accordion/image_0001.jpg", "yin_yang/image_0005.jpg"]
    assert len(train) == 13 and not set(train.relpaths) & set(test.relpaths)
    assert test.split_id.startswith("file(test.txt@") and test.split_detail["split_file_dropped_lines"] == 1
    split.write_text("accordion/image_0099.jpg\n")
    with pytest.raises(DatasetError, match="not under"):
        build_dataset("caltech101", "test", root, split_file=split)
    with pytest.raises(DatasetError, match="official test split"):
        build_dataset("food101", "test", make_food(tmp_path / "f"), split_file=split)


def test_limit_is_stratified_not_first_n(tmp_path):
    root = make_eurosat(tmp_path, per_class=10)
    full = build_dataset("eurosat", "train", root)  # 7 per class
    sub = build_dataset("eurosat", "train", root, limit=6)
    assert len(sub) == 6 and sorted(sub.labels) == [0, 0, 2, 2, 9, 9]
    assert set(sub.relpaths) <= set(full.relpaths) and sub.split_id.endswith("+limit6(seed=0)")
    assert build_dataset("eurosat", "train", root, limit=6).relpaths == sub.relpaths
    # fewer images than classes: spread over classes, still deterministic
    picks = stratified_subset([0] * 5 + [1] * 5 + [2] * 5 + [3] * 5, 2, seed=0)
    assert len({p // 5 for p in picks}) == 2


def test_imagefolder_hash_split_and_explicit_folders(tmp_path):
    for cls in ("golden_retriever", "tabby-cat"):
        for i in range(4):
            jpg(tmp_path / "mine" / cls / f"{i}.png")
            jpg(tmp_path / "split" / ("train" if i < 3 else "test") / cls / f"{i}.jpg")
    ds = build_dataset(f"imagefolder:{tmp_path / 'mine'}", "test")
    assert ds.classnames == ["golden retriever", "tabby cat"] and len(ds) == 2
    assert len(ds.templates) == 7  # the CLIP 7-template ImageNet subset
    test = build_dataset(f"imagefolder:{tmp_path / 'split'}", "test", templates="single")
    assert test.split_id == "folders-test" and len(test) == 2 and test.templates == ["a photo of a {}."]
    assert len(build_dataset(f"imagefolder:{tmp_path / 'split'}", "train")) == 6


def test_data_root_from_environment(tmp_path, monkeypatch):
    make_dtd(tmp_path)
    monkeypatch.setenv("VLMPRESS_DATA", str(tmp_path))
    assert len(build_dataset("dtd")) == 3
    monkeypatch.delenv("VLMPRESS_DATA")
    with pytest.raises(DatasetError, match="--data-root DIR or set VLMPRESS_DATA"):
        build_dataset("dtd")


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "name,layout_fragment,advice",
    [
        ("caltech101", "caltech101/101_ObjectCategories/<class>/image_0001.jpg", "internet"),
        ("food101", "food-101/meta/test.json", "internet"),
        ("oxford_pets", "oxford-iiit-pet/annotations/test.txt", "internet"),
        ("stanford_cars", "stanford_cars/cars_test_annos_withlabels.mat", "can no longer be downloaded"),
        ("eurosat", "eurosat/2750/<Class>/<Class>_<n>.jpg", "internet"),
        ("dtd", "dtd/dtd/labels/test1.txt", "internet"),
    ],
)
def test_missing_dataset_is_one_clear_error(tmp_path, name, layout_fragment, advice):
    with pytest.raises(DatasetError) as err:
        build_dataset(name, "test", tmp_path)
    text = str(err.value)
    assert layout_fragment in text and advice in text and str(tmp_path) in text
    assert list(tmp_path.iterdir()) == []  # nothing created under the data root


@pytest.mark.parametrize("name", ["caltech101", "food101", "oxford_pets", "stanford_cars", "dtd"])
def test_incomplete_dataset_names_the_missing_images(tmp_path, name):
    # EuroSAT is left out: torchvision lists its folders, so a deleted image is simply not there
    root = MAKERS[name](tmp_path)
    ds = build_dataset(name, "test", root)
    victim = max(s.path for s in ds.samples)  # Caltech101 numbers images 1..n: remove the last
    victim.unlink()
    with pytest.raises(DatasetError, match="missing or incomplete") as err:
        build_dataset(name, "test", root)
    assert victim.name in str(err.value) and "listed images" in str(err.value)


def test_unknown_dataset_and_stanford_cars_download(tmp_path):
    with pytest.raises(DatasetError, match="known datasets: caltech101"):
        build_dataset("imagenet", "test", tmp_path)
    with pytest.raises(DatasetError, match="official URL is gone"):
        build_dataset("stanford_cars", "test", tmp_path, download=True)


def test_read_split_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_split_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(DatasetError, match="lists no images"):
        read_split_file(tmp_path / "empty.txt")
