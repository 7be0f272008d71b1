"""Datasets: image decoding, folders and lists, CoOp benchmark readers, few-shot samplers."""
from __future__ import annotations

from pathlib import Path

from prolip.data.benchmarks import BENCHMARKS, TEMPLATES, load_benchmark, load_benchmark_folder
from prolip.data.folder import DataError, is_image_file, read_image_folder, read_image_list, read_templates
from prolip.data.images import BadImageError, load_image
from prolip.data.sampling import FewShotSplit, NotEnoughImagesError, base_new_split, relabel, sample_few_shot
from prolip.data.types import DatasetSplits, ImageItem, LabeledImages


def resolve_data(spec: str, *, root: Path | str | None = None, classnames_file=None,
                 templates_file=None) -> DatasetSplits:
    """What ``--data`` names: a CoOp dataset folder, an image folder, a CSV/JSON list, or a benchmark name."""
    path = Path(spec)
    if path.is_dir():
        if any(path.glob("split_zhou_*.json")) or (path / "variants.txt").is_file():
            splits = load_benchmark_folder(path)
        else:
            images = read_image_folder(path, classnames_file, templates_file)
            return DatasetSplits(images.name, images.classnames, images.templates, train=images)
    elif path.is_file():
        images = read_image_list(path, templates_file=templates_file)
        return DatasetSplits(images.name, images.classnames, images.templates, train=images)
    else:
        try:
            from prolip.data.benchmarks import canonical_name

            canonical_name(spec)
        except DataError:
            raise DataError(f"--data {spec}: no such file or folder, and not a benchmark name "
                            f"({', '.join(BENCHMARKS)})") from None
        if root is None:
            raise DataError(f"--data {spec} names a benchmark: pass --data-root, the folder holding the datasets")
        splits = load_benchmark(spec, root)
    if templates_file:
        splits.templates = read_templates(templates_file)
        for part in (splits.train, splits.val, splits.test):
            if part is not None:
                part.templates = splits.templates
    return splits


__all__ = ["BENCHMARKS", "TEMPLATES", "BadImageError", "DataError", "DatasetSplits", "FewShotSplit", "ImageItem",
           "LabeledImages", "NotEnoughImagesError", "base_new_split", "is_image_file", "load_benchmark",
           "load_image", "read_image_folder", "read_image_list", "read_templates", "relabel", "resolve_data",
           "sample_few_shot"]
