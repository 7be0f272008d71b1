"""Plain data types shared by readers, samplers, the feature cache and the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class ImageItem:
    """One labelled image on disk. ``label`` indexes the owning dataset's ``classnames``."""

    path: Path
    label: int


@dataclass
class LabeledImages:
    """A list of labelled images with the class names and prompt templates that describe them."""

    items: list[ImageItem]
    classnames: list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    name: str = "custom"
    # Files a reader skipped on purpose (non-image extensions), so callers can report them.
    ignored_files: list[Path] = field(default_factory=list)
    # What the data itself calls each class (folder names, a list's class names) when --classnames renamed them;
    # a run keeps them, so the same data later maps onto the run's names without the names file.
    class_ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    def subset(self, indices: Sequence[int]) -> "LabeledImages":
        # The files the reader left out stay listed: they were left out of the data a subset is taken from.
        return LabeledImages([self.items[i] for i in indices], self.classnames, self.templates, self.name,
                             self.ignored_files, class_ids=self.class_ids)


@dataclass
class DatasetSplits:
    """A benchmark's train/val/test splits sharing one class list and template set."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: LabeledImages | None = None
    val: LabeledImages | None = None
    test: LabeledImages | None = None
