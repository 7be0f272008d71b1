"""A benchmark dataset defined in the test folder alone, as a new dataset's author would write it: one module that
registers a class. "ToyShapes" is three colours of noisy squares in ``toy_shapes/{train,test}/<colour>/<i>.png``
beside a ``toy_shapes.txt`` marker; ``--data toy-shapes --data-root <root>`` (or ``--data <root>/toy_shapes``)
reads it, and nothing else in prolip names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from prolip.data import Benchmark, read_image_folder, register_benchmark
from prolip.data.types import DatasetSplits

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


@register_benchmark
class ToyShapes(Benchmark):
    name = "ToyShapes"
    folder = "toy_shapes"
    templates = ("a toy photo of a {} square.",)
    aliases = ("toy-shapes",)

    @classmethod
    def read_folder(cls, ds_root: Path, cache_dir: Path | str | None = None) -> DatasetSplits:
        parts = [read_image_folder(cls.require(ds_root / p, "folder"), cache_dir=cache_dir) for p in ("train", "test")]
        for part in parts:
            part.templates, part.name = list(cls.templates), cls.name
        return DatasetSplits(cls.name, parts[0].classnames, list(cls.templates), train=parts[0], test=parts[1])

    @classmethod
    def recognises(cls, ds_root: Path) -> bool:
        return (ds_root / "toy_shapes.txt").is_file()


def write_toy_shapes(root: Path, train: int = 3, test: int = 2) -> Path:
    """The dataset under ``root`` (its folder, ``root/toy_shapes``, returned)."""
    rng = np.random.default_rng(0)
    folder = root / ToyShapes.folder
    for part, count in (("train", train), ("test", test)):
        for colour, rgb in COLOURS.items():
            (folder / part / colour).mkdir(parents=True)
            for i in range(count):
                pixels = np.asarray(rgb) + rng.integers(-30, 30, (24, 24, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / part / colour / f"{i}.png")
    (folder / "toy_shapes.txt").write_text("ToyShapes: a toy benchmark for prolip's tests\n")
    return folder
