"""The datasets read by name (``--data dtd --data-root <root>``): one registry of :class:`Benchmark` classes.

A new dataset is one module, anywhere that is imported before the dataset is used: a ``Benchmark`` subclass that
says what the dataset is (its name and other names, its folder under the root, its prompt templates) and how to read
it, decorated with :func:`register_benchmark`. ``resolve_data``, ``load_benchmark``, the bench and the CLI find it
by name; the built-in benchmarks (``prolip.data.benchmarks``) are registered the same way. A second class under a
taken name or alias (any case) is refused, as it would silently replace the first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

from prolip.data.folder import DataError, check_template
from prolip.data.types import DatasetSplits
from prolip.registry import Registry


class Benchmark:
    """A dataset read by name from a root folder holding one folder per dataset.

    Say what it is in class attributes and how to read it in ``read_folder`` (its splits from its own folder) or,
    where it reads more of the root than its folder (ImageNet's variants read ImageNet's class names), in ``read``.
    ``recognises`` lets ``--data <its folder>`` find it without its name.
    """

    name: ClassVar[str]  # canonical name, e.g. "DescribableTextures"
    folder: ClassVar[str]  # its folder under the root
    templates: ClassVar[tuple[str, ...]]  # its prompt templates, each with one "{}"
    aliases: ClassVar[tuple[str, ...]] = ()  # other names it answers to (like its name, in any case)
    image_dir: ClassVar[str] = ""  # where its images are inside its folder ("" = the folder itself)
    split_file: ClassVar[str | None] = None  # the file that gives its splits, if one does (CoOp's split_zhou_*.json)
    also_reads: ClassVar[tuple[str, ...]] = ()  # other folders under the root it reads, which no output may overwrite
    where: ClassVar[str] = ""  # how to obtain it, said when it is missing

    @classmethod
    def read(cls, root: Path, cache_dir: Path | str | None = None) -> DatasetSplits:
        """Its splits, read from ``root``. ``cache_dir``: where folder listings are remembered
        (:mod:`prolip.data.listing`, for readers that scan folders)."""
        return cls.read_folder(cls.require(root / cls.folder, "dataset folder"), cache_dir)

    @classmethod
    def read_folder(cls, ds_root: Path, cache_dir: Path | str | None = None) -> DatasetSplits:
        """Its splits, read from its own folder ``ds_root``."""
        raise DataError(f"{cls.name} is read from the root holding its folder: pass --data {cls.name} --data-root")

    @classmethod
    def recognises(cls, ds_root: Path) -> bool:
        """Whether the folder ``ds_root`` is this dataset's own (by a file only it has)."""
        return False

    @classmethod
    def require(cls, path: Path, what: str) -> Path:
        """``path``, or a DataError naming the dataset, what is missing and where to get it."""
        if not path.exists():
            raise DataError(f"{cls.name}: {what} {path} is missing" + (f"; {cls.where}" if cls.where else ""))
        return path


_REGISTRY: Registry[type[Benchmark]] = Registry("benchmark", DataError)
_NAMES: Registry[type[Benchmark]] = Registry("benchmark", DataError)  # its names and aliases, lower-cased


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    """Make ``cls`` readable by its name and aliases (a class decorator). A name or alias another class has taken is
    refused (a ``ValueError``, before anything is registered); the same class again (its module reloaded) replaces
    itself."""
    if not all(isinstance(getattr(cls, a, None), str) and getattr(cls, a) for a in ("name", "folder")):
        raise ValueError(f"benchmark {cls.__qualname__} must declare its name and folder (non-empty strings)")
    if not isinstance(getattr(cls, "templates", None), tuple) or not cls.templates:
        raise ValueError(f"benchmark {cls.__qualname__} must declare its templates (a tuple of strings)")
    for i, template in enumerate(cls.templates):
        check_template(template, f"benchmark {cls.name}, template {i}")
    names = list(dict.fromkeys(n.lower() for n in (cls.name, *cls.aliases)))
    for name in names:
        if name in _NAMES:
            _NAMES.add(name, cls)  # raises when another class holds it
    _REGISTRY.add(cls.name, cls)
    for name in names:
        _NAMES.add(name, cls)
    return cls


class _Benchmarks(Mapping[str, type[Benchmark]]):
    """The registered benchmarks by canonical name, in the order registered (a live view)."""

    def __getitem__(self, name: str) -> type[Benchmark]:
        if name not in _REGISTRY:
            raise KeyError(name)
        return _REGISTRY.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY.names())

    def __len__(self) -> int:
        return len(_REGISTRY.names())


class _Templates(Mapping[str, list[str]]):
    """Each registered benchmark's prompt templates, by canonical name (a live view)."""

    def __getitem__(self, name: str) -> list[str]:
        return list(BENCHMARKS[name].templates)

    def __iter__(self) -> Iterator[str]:
        return iter(BENCHMARKS)

    def __len__(self) -> int:
        return len(BENCHMARKS)


BENCHMARKS: Mapping[str, type[Benchmark]] = _Benchmarks()
TEMPLATES: Mapping[str, list[str]] = _Templates()


def canonical_name(name: str) -> str:
    """The canonical name of the benchmark ``name`` names (itself, or an alias in any case)."""
    if name in _REGISTRY:
        return name
    if name.lower() not in _NAMES:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return _NAMES.get(name.lower()).name


def load_benchmark(name: str, root: Path | str, *, cache_dir: Path | str | None = None) -> DatasetSplits:
    """Load benchmark ``name`` from ``root`` (the folder holding one sub-folder per dataset). ``cache_dir``: where
    the listings of folder-scanned datasets (the ImageNet family) are remembered (default: prolip's cache)."""
    return BENCHMARKS[canonical_name(name)].read(Path(root), cache_dir)


def recognised(ds_root: Path | str) -> type[Benchmark] | None:
    """The registered benchmark whose own folder ``ds_root`` is, if one recognises it."""
    return next((b for b in BENCHMARKS.values() if b.recognises(Path(ds_root))), None)


def load_benchmark_folder(ds_root: Path | str, *, cache_dir: Path | str | None = None) -> DatasetSplits:
    """Load a single dataset folder given directly (e.g. ``…/dtd``), recognised by its own files (a split file)."""
    b = recognised(ds_root)
    if b is None:
        raise DataError(f"{ds_root} is not a CoOp dataset folder (no split_zhou_*.json)")
    return b.read_folder(Path(ds_root), cache_dir)
