"""Datasets: image decoding, folders and lists, CoOp benchmark readers, few-shot samplers."""

from __future__ import annotations

from pathlib import Path

from prolip.data import benchmarks as _built_in  # noqa: F401  (registers the built-in benchmarks)
from prolip.data.catalog import (
    BENCHMARKS,
    TEMPLATES,
    Benchmark,
    canonical_name,
    load_benchmark,
    load_benchmark_folder,
    recognised,
    register_benchmark,
)
from prolip.data.folder import (
    DataError,
    is_image_file,
    read_classnames,
    read_image_folder,
    read_image_list,
    read_templates,
)
from prolip.data.hf_datasets import hf_read, is_hf_spec, load_hf
from prolip.data.images import BadImageError, load_image
from prolip.data.sampling import FewShotSplit, NotEnoughImagesError, base_new_split, relabel, sample_few_shot
from prolip.data.types import DatasetSplits, ImageItem, LabeledImages, Member, member_of
from prolip.data.webdataset import is_shard_spec, load_shards, shards_read


def resolve_data(
    spec: str,
    *,
    root: Path | str | None = None,
    classnames_file=None,
    templates_file=None,
    split: str | None = None,
    label_key: str | None = None,
    image_key: str | None = None,
    cache_dir: Path | str | None = None,
) -> DatasetSplits:
    """What ``--data`` names: a CoOp dataset folder, an image folder, a CSV/JSON list, a benchmark name,
    WebDataset tar shards (``shards/train-{000000..000009}.tar`` or a folder of them) or a Hugging Face dataset
    on disk (``hf:/path``).

    ``classnames_file`` renames the classes of every kind of source (in class order, or a JSON {class: name}
    object); ``templates_file`` replaces the prompt templates. ``split`` (hf: datasets) names the split to train
    on; ``label_key`` the shards' label member (default ``cls``) or the dataset's label column; ``image_key``
    the shards' image member (its extension) or the dataset's image column, where a sample holds several.
    ``cache_dir``: where the listings of scanned folders are remembered (``prolip.data.listing``; default
    ``$PROLIP_CACHE_DIR`` or ``~/.cache/prolip``), so a second run on an unchanged ImageNet lists nothing again.
    """
    if is_hf_spec(spec):
        return load_hf(
            spec,
            split=split,
            label_key=label_key,
            image_key=image_key,
            classnames_file=classnames_file,
            templates_file=templates_file,
        )
    if split is not None:
        raise DataError(
            f"--split {split}: only a Hugging Face dataset (--data hf:...) has named splits to choose "
            "from; other data keeps its splits by its layout"
        )
    if is_shard_spec(spec):
        return load_shards(
            spec,
            label_key=label_key,
            image_key=image_key,
            classnames_file=classnames_file,
            templates_file=templates_file,
        )
    for option, value, what in (("--label-key", label_key, "label"), ("--image-key", image_key, "image")):
        if value is not None:
            raise DataError(
                f"{option} {value}: only tar shards and hf: datasets have {what} keys; --data {spec} is neither",
                option=option,
            )
    path = Path(spec)
    if path.is_dir():
        if recognised(path) is not None or any(path.glob("split_zhou_*.json")):
            splits = load_benchmark_folder(path, cache_dir=cache_dir)
        else:
            images = read_image_folder(path, classnames_file, templates_file, cache_dir=cache_dir)
            return DatasetSplits(images.name, images.classnames, images.templates, train=images)
    elif path.exists():
        images = read_image_list(path, templates_file=templates_file, classnames_file=classnames_file)
        return DatasetSplits(images.name, images.classnames, images.templates, train=images)
    else:
        splits = load_benchmark(spec, _require_benchmark(spec, root), cache_dir=cache_dir)
    if classnames_file:
        _rename_classes(splits, read_classnames(classnames_file, splits.classnames))
    if templates_file:
        splits.templates = read_templates(templates_file)
        for part in _parts(splits):
            part.templates = splits.templates
    return splits


def _require_benchmark(spec: str, root: Path | str | None) -> Path | str:
    try:
        canonical_name(spec)
    except DataError:
        raise DataError(
            f"--data {spec}: no such file or folder, and not a benchmark name ({', '.join(BENCHMARKS)})"
        ) from None
    if root is None:
        raise DataError(f"--data {spec} names a benchmark: pass --data-root, the folder holding the datasets")
    return root


def _parts(splits: DatasetSplits) -> list[LabeledImages]:
    return [part for part in (splits.train, splits.val, splits.test) if part is not None]


def _rename_classes(splits: DatasetSplits, names: list[str]) -> None:
    original = list(splits.classnames)
    splits.classnames = names
    for part in _parts(splits):
        part.classnames, part.class_ids = names, (original if names != original else None)


def paths_read(spec: str, *, root: Path | str | None = None, classnames_file=None, templates_file=None) -> list[Path]:
    """The files and folders ``resolve_data`` with these arguments reads: what no output may overwrite.

    A benchmark name stands for its own dataset folder under ``root`` (and those it also reads: ImageNet's), not
    for all of ``root``, so outputs may live beside the datasets.
    """
    paths = [Path(p) for p in (classnames_file, templates_file) if p]
    if is_hf_spec(spec):
        return [*hf_read(spec), *paths]
    if is_shard_spec(spec):
        return [*shards_read(spec), *paths]
    path = Path(spec)
    if path.exists() or path.is_symlink():
        return [path, *paths]
    try:
        b = BENCHMARKS[canonical_name(spec)]
    except DataError:
        return paths
    if root is not None:
        paths += [Path(root) / folder for folder in dict.fromkeys((b.folder, *b.also_reads))]
    return paths


__all__ = [
    "BENCHMARKS",
    "TEMPLATES",
    "BadImageError",
    "Benchmark",
    "DataError",
    "DatasetSplits",
    "FewShotSplit",
    "ImageItem",
    "LabeledImages",
    "Member",
    "NotEnoughImagesError",
    "base_new_split",
    "is_image_file",
    "load_benchmark",
    "load_image",
    "member_of",
    "paths_read",
    "read_image_folder",
    "read_image_list",
    "read_templates",
    "register_benchmark",
    "relabel",
    "resolve_data",
    "sample_few_shot",
]
