"""Plain data types shared by readers, samplers, the feature cache and the CLI."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

# What separates a container file from the image inside it in a member's path: "shard.tar::sample01.jpg".
MEMBER_SEPARATOR = "::"
# The files that hold images of their own (WebDataset tar shards, the parquet / arrow files of a Hugging Face
# dataset): each reader module registers how to read a member of its files, so decoding imports no reader.
_MEMBER_READERS: dict[str, Callable[[Member], bytes]] = {}


def register_container(suffixes: Sequence[str], read: Callable[[Member], bytes]) -> None:
    """Declare that files ending in ``suffixes`` hold images, read by ``read(member)``; a taken suffix is refused."""
    for suffix in suffixes:
        taken = _MEMBER_READERS.get(suffix.lower())
        if taken is not None and (taken.__module__, taken.__qualname__) != (read.__module__, read.__qualname__):
            raise ValueError(f"container suffix {suffix!r} is already read by {taken.__module__}.{taken.__qualname__}")
        _MEMBER_READERS[suffix.lower()] = read


def container_suffixes() -> tuple[str, ...]:
    return tuple(_MEMBER_READERS)


def member_reader(member: Member) -> Callable[[Member], bytes]:
    """How to read ``member``: its container kind's registered reader."""
    return _MEMBER_READERS[member.container.suffix.lower()]


@dataclass(frozen=True)
class Member:
    """An image that is not a file of its own: a member of a tar shard, or a row of a dataset file.

    Its ``path`` is ``<container>::<name>``, an ordinary path value, so it travels wherever an image path does
    (``ImageItem``, the feature cache, run manifests, ``prolip predict``), and ``load_image`` / ``image_key``
    find their way back to the container from it.
    """

    container: Path
    name: str  # the tar member's name, or the row number in the dataset file

    @property
    def path(self) -> Path:
        return Path(f"{self.container}{MEMBER_SEPARATOR}{self.name}")


def member_of(path: Path | str) -> Member | None:
    """The member a path names (``<shard>.tar::<member>``, ``<file>.parquet::<row>``), None for a plain path.

    The container is the first prefix ending in a container suffix, so neither a folder nor a member name
    holding the separator confuses it.
    """
    text = os.fspath(path)
    start = text.find(MEMBER_SEPARATOR)
    while start >= 0:
        name = text[start + len(MEMBER_SEPARATOR) :]
        if text[:start].lower().endswith(container_suffixes()) and name:
            return Member(Path(text[:start]), name)
        start = text.find(MEMBER_SEPARATOR, start + 1)
    return None


@dataclass(frozen=True)
class ImageItem:
    """One labelled image: a file, or a ``Member`` path. ``label`` indexes the owning dataset's ``classnames``."""

    path: Path
    label: int


class ListedItems(Sequence[ImageItem]):
    """The labelled images of listed folders, each built when it is read: item ``i`` is
    ``ImageItem(folders[at[i]] / names[i], labels[i])``.

    ImageNet's 1.3 M training files are kept as names and small integers: building a Path and an ImageItem for
    every one takes longer than listing them from memory, while a few-shot episode reads a few thousand. Equal to
    any sequence of the same items; ``+`` gives a list.
    """

    def __init__(self, folders: Sequence[Path], at: Sequence[int], names: Sequence[str], labels: Sequence[int]):
        if not len(at) == len(names) == len(labels):
            raise ValueError(f"{len(at)} folder indices, {len(names)} names and {len(labels)} labels")
        self._folders, self._at, self._names, self._labels = list(folders), at, names, labels

    def __len__(self) -> int:
        return len(self._names)

    @overload
    def __getitem__(self, i: int) -> ImageItem: ...

    @overload
    def __getitem__(self, i: slice) -> list[ImageItem]: ...

    def __getitem__(self, i: int | slice) -> ImageItem | list[ImageItem]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return ImageItem(self._folders[self._at[i]] / self._names[i], self._labels[i])

    def __iter__(self) -> Iterator[ImageItem]:
        folders = self._folders
        for at, name, label in zip(self._at, self._names, self._labels, strict=True):
            yield ImageItem(folders[at] / name, label)

    @property
    def labels(self) -> list[int]:
        return list(self._labels)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # a sequence, compared by its items

    def __add__(self, other: Sequence[ImageItem]) -> list[ImageItem]:
        return [*self, *other]

    def __radd__(self, other: Sequence[ImageItem]) -> list[ImageItem]:
        return [*other, *self]

    def __repr__(self) -> str:
        return f"ListedItems({len(self)} images in {len(set(self._folders))} folders)"


@dataclass
class LabeledImages:
    """A list of labelled images with the class names and prompt templates that describe them."""

    items: Sequence[ImageItem]  # a list, or the ListedItems of a scanned folder tree
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
        if isinstance(self.items, ListedItems):  # without building every item
            return self.items.labels
        return [it.label for it in self.items]

    def subset(self, indices: Sequence[int]) -> LabeledImages:
        # The files the reader left out stay listed: they were left out of the data a subset is taken from.
        return LabeledImages(
            [self.items[i] for i in indices],
            self.classnames,
            self.templates,
            self.name,
            self.ignored_files,
            class_ids=self.class_ids,
        )


@dataclass
class DatasetSplits:
    """A benchmark's train/val/test splits sharing one class list and template set."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: LabeledImages | None = None
    val: LabeledImages | None = None
    test: LabeledImages | None = None
