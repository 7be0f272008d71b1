"""Readers for the 11 few-shot benchmarks and the ImageNet variants in CoOp's layout (README "Data"), each a
:class:`~prolip.data.catalog.Benchmark` registered by name (``prolip.data.catalog``), as any other dataset is."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from prolip.data.catalog import (
    BENCHMARKS,
    TEMPLATES,
    Benchmark,
    canonical_name,
    load_benchmark,
    load_benchmark_folder,
    register_benchmark,
)
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

__all__ = ["BENCHMARKS", "TEMPLATES", "Benchmark", "canonical_name", "load_benchmark", "load_benchmark_folder"]

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


def _from_split_json(b: type[Benchmark], ds_root: Path) -> DatasetSplits:
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


def _aircraft(b: type[Benchmark], ds_root: Path) -> DatasetSplits:
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


class CoOpSplit(Benchmark):
    """A CoOp benchmark whose ``split_file`` (``split_zhou_<name>.json``) lists its train, val and test images."""

    where = WHERE

    @classmethod
    def read_folder(cls, ds_root: Path, cache_dir: Path | str | None = None) -> DatasetSplits:
        return _from_split_json(cls, ds_root)

    @classmethod
    def recognises(cls, ds_root: Path) -> bool:
        return cls.split_file is not None and (ds_root / cls.split_file).is_file()


def _split_benchmark(name: str, folder: str, image_dir: str, template: str, aliases=()) -> None:
    attrs = {"__module__": __name__, "__doc__": f"{name}, split by CoOp's split_zhou_{name}.json."}
    attrs |= {"name": name, "folder": folder, "image_dir": image_dir, "split_file": f"split_zhou_{name}.json"}
    register_benchmark(type(name, (CoOpSplit,), attrs | {"templates": (template,), "aliases": tuple(aliases)}))


# Registered in the order the papers' tables list them, which is the order ``--data`` errors name them in.
_split_benchmark("Caltech101", "caltech-101", "101_ObjectCategories", "a photo of a {}.", ["caltech-101"])
_split_benchmark("OxfordPets", "oxford_pets", "images", "a photo of a {}, a type of pet.", ["oxford_pets", "pets"])
_split_benchmark("StanfordCars", "stanford_cars", "", "a photo of a {}.", ["stanford_cars", "cars"])
_split_benchmark(
    "OxfordFlowers",
    "oxford_flowers",
    "jpg",
    "a photo of a {}, a type of flower.",
    ["oxford_flowers", "flowers", "flowers102"],
)
_split_benchmark("Food101", "food-101", "images", "a photo of {}, a type of food.", ["food-101"])


@register_benchmark
class FGVCAircraft(Benchmark):
    """FGVC-Aircraft in CoOp's layout: ``variants.txt`` names the classes, ``images_variant_<split>.txt`` the
    images of each split."""

    name, folder, image_dir, where = "FGVCAircraft", "fgvc_aircraft", "images", WHERE
    templates = ("a photo of a {}, a type of aircraft.",)
    aliases = ("fgvc_aircraft", "aircraft")

    @classmethod
    def read_folder(cls, ds_root: Path, cache_dir: Path | str | None = None) -> DatasetSplits:
        return _aircraft(cls, ds_root)

    @classmethod
    def recognises(cls, ds_root: Path) -> bool:
        return (ds_root / "variants.txt").is_file()


_split_benchmark("SUN397", "sun397", "SUN397", "a photo of a {}.")
_split_benchmark("DescribableTextures", "dtd", "images", "{} texture.", ["dtd"])
_split_benchmark("EuroSAT", "eurosat", "2750", "a centered satellite photo of {}.")
_split_benchmark("UCF101", "ucf101", "UCF-101-midframes", "a photo of a person doing {}.")


class ImageNetFamily(Benchmark):
    """ImageNet and its variants: the class names come from ImageNet's own folder (``imagenet/classnames.txt``),
    the images from one folder per class, scanned (the listing remembered, :mod:`prolip.data.listing`)."""

    templates = tuple(IMAGENET_TEMPLATES)
    also_reads = ("imagenet",)
    where = WHERE

    @classmethod
    def read(cls, root: Path, cache_dir: Path | str | None = None) -> DatasetSplits:
        wnids, names = _imagenet_classnames(root, cls.name)
        ds_root = _require(root / cls.folder, "dataset folder", cls.name)
        return cls.read_images(ds_root / cls.image_dir if cls.image_dir else ds_root, wnids, names, cache_dir)

    @classmethod
    def read_images(
        cls, image_root: Path, wnids: list[str], names: list[str], cache_dir: Path | str | None
    ) -> DatasetSplits:
        raise NotImplementedError

    @classmethod
    def splits(cls, names: list[str], train=None, test=None) -> DatasetSplits:
        """Its splits from ``_scan``'s (items, files left out) of the train and test folders."""
        t = list(cls.templates)
        made = [None if s is None else LabeledImages(s[0], names, t, cls.name, s[1]) for s in (train, test)]
        return DatasetSplits(cls.name, names, t, made[0], None, made[1])


@register_benchmark
class ImageNet(ImageNetFamily):
    name, folder, image_dir = "ImageNet", "imagenet", "images"

    @classmethod
    def read_images(cls, image_root, wnids, names, cache_dir):
        train = _scan(_require(image_root / "train", "folder", cls.name), wnids, cls.name, cache_dir)
        test = _scan(_require(image_root / "val", "folder", cls.name), wnids, cls.name, cache_dir)
        return cls.splits(names, train, test)


@register_benchmark
class ImageNetV2(ImageNetFamily):
    name, folder, aliases = "ImageNetV2", "imagenetv2", ("imagenet-v2",)

    @classmethod
    def read_images(cls, image_root, wnids, names, cache_dir):
        # The matched-frequency release unpacks to a single folder holding 0..999.
        subdirs = [p for p in image_root.iterdir() if p.is_dir()]
        folder = image_root if (image_root / "0").is_dir() else (subdirs[0] if len(subdirs) == 1 else image_root)
        classes = [str(i) for i in range(1000)] if len(wnids) == 1000 else [str(i) for i in range(len(wnids))]
        return cls.splits(names, test=_scan(folder, classes, cls.name, cache_dir))


@register_benchmark
class ImageNetSketch(ImageNetFamily):
    name, folder, image_dir, aliases = "ImageNetSketch", "imagenet-sketch", "images", ("imagenet-sketch",)

    @classmethod
    def read_images(cls, image_root, wnids, names, cache_dir):
        return cls.splits(names, test=_scan(image_root, wnids, cls.name, cache_dir))


class ImageNetSubset(ImageNetFamily):
    """ImageNet-A / -R: 200-class subsets; classes in ImageNet order, with the map back to ImageNet labels."""

    @classmethod
    def read_images(cls, image_root, wnids, names, cache_dir):
        present = {p.name for p in _require(image_root, "folder", cls.name).iterdir() if p.is_dir()}
        subset = [i for i, w in enumerate(wnids) if w in present]
        sub_names = [names[i] for i in subset]
        splits = cls.splits(sub_names, test=_scan(image_root, [wnids[i] for i in subset], cls.name, cache_dir))
        splits.imagenet_indices = subset  # type: ignore[attr-defined]
        return splits


@register_benchmark
class ImageNetA(ImageNetSubset):
    name, folder, image_dir, aliases = "ImageNetA", "imagenet-adversarial", "imagenet-a", ("imagenet-a",)


@register_benchmark
class ImageNetR(ImageNetSubset):
    name, folder, image_dir, aliases = "ImageNetR", "imagenet-rendition", "imagenet-r", ("imagenet-r",)
