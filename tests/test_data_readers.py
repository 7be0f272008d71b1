"""Benchmark readers on generated miniatures of each real layout, and on the real CoOp split files."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prolip.data import BENCHMARKS, TEMPLATES, DataError, load_benchmark, resolve_data
from prolip.data.benchmarks import load_benchmark_folder


def jpg(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)
    return path


def write_split(ds_root: Path, b, image_dir: Path, classes: list[str], sizes=(3, 2, 1)) -> dict:
    """A split file in CoOp's format with ``sizes`` images per class per part, and the images."""
    split = {}
    for part, n in zip(("train", "val", "test"), sizes, strict=True):
        rows = []
        for label, name in enumerate(classes):
            for i in range(n):
                rel = f"{name.replace(' ', '_')}/{part}_{i}.jpg"
                jpg(image_dir / rel)
                rows.append([rel, label, name])
        split[part] = rows
    (ds_root / b.split_file).write_text(json.dumps(split))
    return split


SPLIT_BENCHMARKS = [n for n, b in BENCHMARKS.items() if b.split_file]


@pytest.mark.parametrize("name", SPLIT_BENCHMARKS)
def test_split_json_benchmarks(tmp_path, name):
    b = BENCHMARKS[name]
    ds_root = tmp_path / b.folder
    image_dir = ds_root / b.image_dir if b.image_dir else ds_root
    classes = ["alpha", "beta two", "gamma"]
    write_split(ds_root, b, image_dir, classes)
    splits = load_benchmark(name, tmp_path)
    assert splits.name == name and splits.classnames == classes
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 6, 3)
    assert splits.train.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert splits.templates == TEMPLATES[name] == list(b.templates)
    assert all(it.path.is_file() and it.path.is_relative_to(image_dir.resolve()) for it in splits.test.items)
    # The same folder given directly, as --data does.
    again = resolve_data(str(ds_root))
    assert again.name == name and [it.path for it in again.val.items] == [it.path for it in splits.val.items]


def test_dataset_templates_match_spec():
    assert TEMPLATES["DescribableTextures"] == ["{} texture."]
    assert TEMPLATES["EuroSAT"] == ["a centered satellite photo of {}."]
    assert TEMPLATES["OxfordPets"] == ["a photo of a {}, a type of pet."]
    assert len(TEMPLATES["ImageNet"]) == 7 and all("{}" in t for t in TEMPLATES["ImageNet"])
    assert all("{}" in t for ts in TEMPLATES.values() for t in ts)


def test_fgvc_aircraft_txt_layout(tmp_path):
    ds = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "Cessna 172", "A300B4"]
    ds.mkdir()
    (ds / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for part, k in (("train", 2), ("val", 1), ("test", 3)):
        lines = []
        for v in variants:
            for _ in range(k):
                lines.append(f"{1000000 + n} {v}")
                jpg(ds / "images" / f"{1000000 + n}.jpg")
                n += 1
        (ds / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    splits = load_benchmark("aircraft", tmp_path)
    assert splits.classnames == variants
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 9)
    assert splits.train.labels == [0, 0, 1, 1, 2, 2]
    assert all(it.path.is_file() for it in splits.test.items)
    assert splits.templates == ["a photo of a {}, a type of aircraft."]
    (ds / "images_variant_val.txt").write_text("1000001 Boeing 999\n")
    with pytest.raises(DataError, match=r"images_variant_val.txt, line 1.*'Boeing 999'.*variants.txt"):
        load_benchmark("fgvcaircraft", tmp_path)


WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]


@pytest.fixture
def imagenet_root(tmp_path):
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text(
        "".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES, strict=True))
    )
    return tmp_path


def test_imagenet_folder_scan(imagenet_root):
    for part, k in (("train", 3), ("val", 2)):
        for w in WNIDS:
            for i in range(k):
                jpg(imagenet_root / "imagenet" / "images" / part / w / f"{w}_{i}.JPEG")
    splits = load_benchmark("imagenet", imagenet_root)
    assert splits.classnames == NAMES and splits.val is None
    assert (len(splits.train), len(splits.test)) == (15, 10)
    assert splits.test.labels == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert splits.train.items[3].path.parent.name == WNIDS[1]
    assert len(splits.templates) == 7


def test_imagenet_v2_numbered_folders(imagenet_root):
    base = imagenet_root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for c in range(len(WNIDS)):
        for i in range(2):
            jpg(base / str(c) / f"{i}.jpeg")
    splits = load_benchmark("imagenet-v2", imagenet_root)
    assert splits.classnames == NAMES and splits.train is None
    assert splits.test.labels == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_imagenet_sketch(imagenet_root):
    for w in WNIDS:
        jpg(imagenet_root / "imagenet-sketch" / "images" / w / "sketch_1.JPEG")
    splits = load_benchmark("imagenet-sketch", imagenet_root)
    assert splits.test.labels == [0, 1, 2, 3, 4] and splits.classnames == NAMES


@pytest.mark.parametrize(
    "name,folder,sub",
    [("imagenet-a", "imagenet-adversarial", "imagenet-a"), ("imagenet-r", "imagenet-rendition", "imagenet-r")],
)
def test_imagenet_a_r_class_subsets(imagenet_root, name, folder, sub):
    present = [WNIDS[4], WNIDS[0], WNIDS[2]]  # created out of order: the reader must use ImageNet order
    for w in present:
        for i in range(2):
            jpg(imagenet_root / folder / sub / w / f"{i}.jpg")
    (imagenet_root / folder / sub / "README.txt").write_text("not a class")
    splits = load_benchmark(name, imagenet_root)
    assert splits.classnames == [NAMES[0], NAMES[2], NAMES[4]]
    assert splits.imagenet_indices == [0, 2, 4]
    assert splits.test.labels == [0, 0, 1, 1, 2, 2]
    assert splits.test.items[2].path.parent.name == WNIDS[2]


def test_missing_files_name_what_and_where(tmp_path, imagenet_root):
    with pytest.raises(DataError, match=r"dataset folder .*eurosat is missing.*DATASETS.md"):
        load_benchmark("eurosat", tmp_path)
    (tmp_path / "fgvc_aircraft").mkdir()
    with pytest.raises(DataError, match=r"variants.txt is missing"):
        load_benchmark("aircraft", tmp_path)
    with pytest.raises(DataError, match=r"imagenet.classnames.txt is missing"):
        load_benchmark("imagenet-sketch", tmp_path / "elsewhere")
    with pytest.raises(DataError, match=r"imagenet-sketch.*missing"):
        load_benchmark("imagenet-sketch", imagenet_root)
    with pytest.raises(DataError, match="unknown benchmark 'cifar11'"):
        load_benchmark("cifar11", tmp_path)
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text("{not json")
    with pytest.raises(DataError, match="split_zhou_DescribableTextures.json: not valid JSON"):
        load_benchmark("dtd", tmp_path)


# README table of ../shared/data: (train, val, test, classes)
COOP_SIZES = {
    "Caltech101": (4128, 1649, 2465, 100),
    "OxfordPets": (2944, 736, 3669, 37),
    "StanfordCars": (6509, 1635, 8041, 196),
    "OxfordFlowers": (4093, 1633, 2463, 102),
    "DescribableTextures": (2820, 1128, 1692, 47),
    "EuroSAT": (13500, 5400, 8100, 10),
    "UCF101": (7639, 1898, 3783, 101),
}


@pytest.mark.parametrize("name", sorted(COOP_SIZES))
def test_real_coop_split_files(shared_data, tmp_path, name):
    b = BENCHMARKS[name]
    src = shared_data / "coop-splits" / b.split_file
    (tmp_path / b.folder).mkdir()
    (tmp_path / b.folder / b.split_file).symlink_to(src)  # the readers only resolve image paths
    splits = load_benchmark(name, tmp_path)
    got = (len(splits.train), len(splits.val), len(splits.test), len(splits.classnames))
    assert got == COOP_SIZES[name]
    raw = json.loads(src.read_text())
    assert all(splits.classnames[label] == cname for _, label, cname in raw["test"])
    assert set(splits.train.labels) == set(range(len(splits.classnames)))


def test_dtd10_as_is(shared_data):
    splits = load_benchmark_folder(shared_data / "dtd10" / "dtd")
    assert (len(splits.train), len(splits.val), len(splits.test), len(splits.classnames)) == (600, 240, 360, 10)
    assert splits.classnames[0] == "banded" and splits.templates == ["{} texture."]
    for part in (splits.train, splits.val, splits.test):
        assert sorted(set(part.labels)) == list(range(10))
        assert all(it.path.is_file() for it in part.items)


def test_resolve_data_kinds(tmp_path):
    b = BENCHMARKS["EuroSAT"]
    write_split(tmp_path / b.folder, b, tmp_path / b.folder / b.image_dir, ["Forest", "River"], sizes=(2, 1, 1))
    (tmp_path / "t.txt").write_text("satellite view of {}.\n")
    by_name = resolve_data("eurosat", root=tmp_path, templates_file=tmp_path / "t.txt")
    assert by_name.templates == by_name.test.templates == ["satellite view of {}."]
    assert len(by_name.train) == 4
    image_folder = resolve_data(str(tmp_path / b.folder / b.image_dir))
    assert image_folder.classnames == ["Forest", "River"] and image_folder.val is None
    assert len(image_folder.train) == 8  # every image in the folders, the split ignored
    (tmp_path / "l.csv").write_text("path,label,classname\neurosat/2750/Forest/train_0.jpg,0,Forest\n")
    as_list = resolve_data(str(tmp_path / "l.csv"))
    assert as_list.classnames == ["Forest"] and len(as_list.train) == 1
