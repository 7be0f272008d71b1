"""Readers for the 11 few-shot benchmarks and the ImageNet variants in CoOp's layout (README "Data")."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from prolip.data.folder import (
    DataError,
    check_classnames,
    class_index,
    file_kind,
    inside,
    read_json,
    read_text,
)
from prolip.data.listing import Found, Listing
from prolip.data.types import DatasetSplits, ImageItem, LabeledImages, ListedItems

WHERE = "see CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md) for how to obtain it"

IMAGENET_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


@dataclass(frozen=True)
class Benchmark:
    name: str  # canonical name, e.g. "DescribableTextures"
    folder: str  # dataset folder under the root
    image_dir: str  # images folder inside it ("" = paths relative to the dataset folder)
    split_file: str | None  # split_zhou_*.json, None for folder-scanned datasets
    templates: tuple[str, ...]


def _b(name, folder, image_dir, split, template):
    templates = (template,) if isinstance(template, str) else tuple(template)
    return Benchmark(name, folder, image_dir, split, templates)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        _b("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}."),
        _b("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."),
        _b("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
        _b(
            "OxfordFlowers",
            "oxford_flowers",
            "jpg",
            "split_zhou_OxfordFlowers.json",
            "a photo of a {}, a type of flower.",
        ),
        _b("Food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
        _b("FGVCAircraft", "fgvc_aircraft", "images", None, "a photo of a {}, a type of aircraft."),
        _b("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
        _b("DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
        _b("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
        _b("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."),
        _b("ImageNet", "imagenet", "images", None, IMAGENET_TEMPLATES),
        _b("ImageNetV2", "imagenetv2", "", None, IMAGENET_TEMPLATES),
        _b("ImageNetSketch", "imagenet-sketch", "images", None, IMAGENET_TEMPLATES),
        _b("ImageNetA", "imagenet-adversarial", "imagenet-a", None, IMAGENET_TEMPLATES),
        _b("ImageNetR", "imagenet-rendition", "imagenet-r", None, IMAGENET_TEMPLATES),
    ]
}

ALIASES = {
    "caltech101": "Caltech101",
    "caltech-101": "Caltech101",
    "oxford_pets": "OxfordPets",
    "pets": "OxfordPets",
    "oxfordpets": "OxfordPets",
    "stanford_cars": "StanfordCars",
    "cars": "StanfordCars",
    "stanfordcars": "StanfordCars",
    "oxford_flowers": "OxfordFlowers",
    "flowers": "OxfordFlowers",
    "flowers102": "OxfordFlowers",
    "oxfordflowers": "OxfordFlowers",
    "food101": "Food101",
    "food-101": "Food101",
    "fgvc_aircraft": "FGVCAircraft",
    "aircraft": "FGVCAircraft",
    "fgvcaircraft": "FGVCAircraft",
    "sun397": "SUN397",
    "dtd": "DescribableTextures",
    "describabletextures": "DescribableTextures",
    "eurosat": "EuroSAT",
    "ucf101": "UCF101",
    "imagenet": "ImageNet",
    "imagenetv2": "ImageNetV2",
    "imagenet-v2": "ImageNetV2",
    "imagenet-sketch": "ImageNetSketch",
    "imagenetsketch": "ImageNetSketch",
    "imagenet-a": "ImageNetA",
    "imageneta": "ImageNetA",
    "imagenet-r": "ImageNetR",
    "imagenetr": "ImageNetR",
}

TEMPLATES: dict[str, list[str]] = {name: list(b.templates) for name, b in BENCHMARKS.items()}


def canonical_name(name: str) -> str:
    if name in BENCHMARKS:
        return name
    key = name.lower()
    if key not in ALIASES:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return ALIASES[key]


def _require(path: Path, what: str, bench: str) -> Path:
    if not path.exists():
        raise DataError(f"{bench}: {what} {path} is missing; {WHERE}")
    return path


def _image_path(image_root: Path, rel: str, where: str) -> Path:
    """An image named by a split or list file: inside the dataset, and never a FIFO, socket or device.

    A missing image is left to the decoder, which names it (or skips it with --on-bad-image skip): checking
    existence here would stat every image of the dataset twice.
    """
    path = inside(image_root, rel, where)
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return path
    if not stat.S_ISREG(mode):
        raise DataError(f"{where}: image {path} is {file_kind(mode)}, not a regular file")
    return path


def _split_entry(entry, where: str) -> tuple[str, int, str]:
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0]):
        raise DataError(f"{where}: expected [path, label, classname], got {str(entry)[:80]}")
    if not isinstance(entry[2], str) or not entry[2].strip():
        raise DataError(f"{where}: class name {entry[2]!r} is not a non-blank string")
    return entry[0], class_index(entry[1], where), entry[2]


def _from_split_json(b: Benchmark, ds_root: Path) -> DatasetSplits:
    assert b.split_file is not None, f"{b.name} is folder-scanned"  # only datasets with a split file come here
    split_path = _require(ds_root / b.split_file, "split file", b.name)
    split = read_json(split_path, "split file")
    if not isinstance(split, dict):
        raise DataError(
            f"{split_path}: expected a JSON object with 'train', 'val' and 'test' lists, "
            f"got a {type(split).__name__}; re-download it ({WHERE})"
        )
    image_root = ds_root / b.image_dir if b.image_dir else ds_root
    names: dict[int, str] = {}
    seen: dict[Path, tuple[str, int]] = {}  # image -> (where first listed, label)
    out = {}
    for part in ("train", "val", "test"):
        entries = split.get(part, [])
        if not isinstance(entries, list):
            raise DataError(
                f"{split_path}: '{part}' must be a list of [path, label, classname] entries, "
                f"got a {type(entries).__name__}"
            )
        items = []
        for i, entry in enumerate(entries):
            where = f"{split_path}: {part} entry {i}"
            rel, label, classname = _split_entry(entry, where)
            path = _image_path(image_root, rel, where)
            if names.setdefault(label, classname) != classname:  # one label, two names: a class silently merged
                raise DataError(f"{where}: label {label} is {classname!r} here but {names[label]!r} elsewhere")
            first, label0 = seen.setdefault(path, (f"{part} entry {i}", label))
            if label0 != label:
                raise DataError(
                    f"{split_path}: {first} and {part} entry {i} put the same image {path} in two "
                    f"classes ({names[label0]!r} and {classname!r}); an image belongs to one class"
                )
            items.append(ImageItem(path, label))
        out[part] = items
    # Labels are distinct and non-negative, so they cover 0..C-1 exactly when the largest is C-1.
    if not names or max(names) != len(names) - 1:
        missing = [i for i in range(min(max(names, default=0), len(names) + 5)) if i not in names][:5]
        raise DataError(f"{split_path}: labels must cover 0..C-1; no entries for label(s) {missing}")
    classnames = check_classnames([names[i] for i in range(len(names))], str(split_path))
    mk = lambda items: LabeledImages(items, classnames, list(b.templates), b.name) if items else None
    return DatasetSplits(b.name, classnames, list(b.templates), mk(out["train"]), mk(out["val"]), mk(out["test"]))


def _aircraft(b: Benchmark, ds_root: Path) -> DatasetSplits:
    variants_file = _require(ds_root / "variants.txt", "file", b.name)
    variants = [v.strip() for v in read_text(variants_file, "file").splitlines() if v.strip()]
    check_classnames(variants, str(variants_file))
    index = {v: i for i, v in enumerate(variants)}
    parts = {}
    for part in ("train", "val", "test"):
        f = _require(ds_root / f"images_variant_{part}.txt", "file", b.name)
        items = []
        for n, line in enumerate(read_text(f, "file").splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise DataError(f"{f}, line {n}: variant {variant!r} is not listed in {ds_root / 'variants.txt'}")
            items.append(
                ImageItem(_image_path(ds_root / b.image_dir, f"{image_id}.jpg", f"{f}, line {n}"), index[variant])
            )
        parts[part] = LabeledImages(items, variants, list(b.templates), b.name)
    return DatasetSplits(b.name, variants, list(b.templates), parts["train"], parts["val"], parts["test"])


def _imagenet_classnames(root: Path, bench: str) -> tuple[list[str], list[str]]:
    f = _require(root / "imagenet" / "classnames.txt", "ImageNet class names file", bench)
    wnids, names = [], []
    for n, line in enumerate(read_text(f, "ImageNet class names file").splitlines(), 1):
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            if not name.strip():
                raise DataError(f"{f}, line {n}: expected '<wnid> <class name>', got {line.strip()!r}")
            wnids.append(wnid)
            names.append(name)
    return wnids, check_classnames(names, str(f))


def _scan(folder: Path, classes: list[str], bench: str, cache_dir: Path | str | None) -> tuple[ListedItems, list[Path]]:
    """Images of each class folder, and the files left out: only regular files are images (a FIFO would hang).

    In ``sorted(class_folder.rglob("*"))``'s order, hidden sub-folders entered, symlinked ones not; the listing is
    remembered under ``cache_dir`` (:mod:`prolip.data.listing`), so a second run lists only what changed.
    """
    listing, found = Listing(folder, cache_dir), Found()
    for label, sub in enumerate(classes):
        _require(folder / sub, "class folder", bench)
        listing.collect(sub, label, found, enter_hidden=True, files_first=False)
    listing.save()
    return found.items(), found.ignored


def _images(
    scanned: tuple[ListedItems, list[Path]], names: list[str], templates: list[str], name: str
) -> LabeledImages:
    items, ignored = scanned
    return LabeledImages(items, names, templates, name, ignored)


def _imagenet_family(b: Benchmark, root: Path, cache_dir: Path | str | None) -> DatasetSplits:
    wnids, names = _imagenet_classnames(root, b.name)
    ds_root = _require(root / b.folder, "dataset folder", b.name)
    image_root = ds_root / b.image_dir if b.image_dir else ds_root
    t = list(b.templates)
    if b.name == "ImageNet":
        train = _scan(_require(image_root / "train", "folder", b.name), wnids, b.name, cache_dir)
        test = _scan(_require(image_root / "val", "folder", b.name), wnids, b.name, cache_dir)
        return DatasetSplits(b.name, names, t, _images(train, names, t, b.name), None, _images(test, names, t, b.name))
    if b.name == "ImageNetV2":
        # The matched-frequency release unpacks to a single folder holding 0..999.
        subdirs = [p for p in image_root.iterdir() if p.is_dir()]
        folder = image_root if (image_root / "0").is_dir() else (subdirs[0] if len(subdirs) == 1 else image_root)
        test = _scan(
            folder,
            [str(i) for i in range(1000)] if len(wnids) == 1000 else [str(i) for i in range(len(wnids))],
            b.name,
            cache_dir,
        )
        return DatasetSplits(b.name, names, t, test=_images(test, names, t, b.name))
    if b.name == "ImageNetSketch":
        test = _scan(image_root, wnids, b.name, cache_dir)
        return DatasetSplits(b.name, names, t, test=_images(test, names, t, b.name))
    # ImageNet-A / -R: 200-class subsets; classes in ImageNet order, with the map back to ImageNet labels.
    present = {p.name for p in _require(image_root, "folder", b.name).iterdir() if p.is_dir()}
    subset = [i for i, w in enumerate(wnids) if w in present]
    sub_names = [names[i] for i in subset]
    test = _scan(image_root, [wnids[i] for i in subset], b.name, cache_dir)
    splits = DatasetSplits(b.name, sub_names, t, test=_images(test, sub_names, t, b.name))
    splits.imagenet_indices = subset  # type: ignore[attr-defined]
    return splits


def load_benchmark(name: str, root: Path | str, *, cache_dir: Path | str | None = None) -> DatasetSplits:
    """Load benchmark ``name`` from ``root`` (the folder holding one sub-folder per dataset). ``cache_dir``: where
    the listings of folder-scanned datasets (the ImageNet family) are remembered (default: prolip's cache)."""
    b = BENCHMARKS[canonical_name(name)]
    root = Path(root)
    if b.name.startswith("ImageNet"):
        return _imagenet_family(b, root, cache_dir)
    ds_root = _require(root / b.folder, "dataset folder", b.name)
    return _aircraft(b, ds_root) if b.name == "FGVCAircraft" else _from_split_json(b, ds_root)


def load_benchmark_folder(ds_root: Path | str) -> DatasetSplits:
    """Load a single CoOp dataset folder given directly (e.g. ``…/dtd``), recognised by its split file."""
    ds_root = Path(ds_root)
    for b in BENCHMARKS.values():
        if b.split_file and (ds_root / b.split_file).is_file():
            return _from_split_json(b, ds_root)
    if (ds_root / "variants.txt").is_file():
        return _aircraft(BENCHMARKS["FGVCAircraft"], ds_root)
    raise DataError(f"{ds_root} is not a CoOp dataset folder (no split_zhou_*.json)")
