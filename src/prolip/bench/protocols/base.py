"""What a protocol is: a class that declares everything about itself, and the one registry its name enters.

A :class:`Protocol` subclass with a ``name`` registers itself when its module is imported (a second class under a
taken name is refused). It says which experiment files it accepts (:meth:`check`, :meth:`settle`), the section of
the file it owns (:attr:`section`, :meth:`section_schema`, :meth:`parse_section`), how its cells group around
shared episodes (:meth:`groups`), what scoring a group asks of the image encoder (:meth:`requests`, which both the
run and ``prolip bench --plan`` call, so the plan is the run's own list), how it scores (:meth:`score`), the metrics
its records hold and how the report lays its section out (:class:`ReportLayout`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from prolip.bench.harness import Bench, Cell, Group, GroupRequests, episode_requests, fit_requests
from prolip.bench.spec import Experiment, ExperimentError
from prolip.constraints import Schema
from prolip.registry import Registry

if TYPE_CHECKING:
    from prolip.data.types import DatasetSplits


@dataclass(frozen=True)
class ReportLayout:
    """How the report lays out a protocol's section.

    ``source_apart``: records name a ``source`` they were trained on, shown first and left out of the averages
    (``average_title`` names them, e.g. "target average"), with ``note`` ({sources}: the source names) above the
    table; ``groups``: whether method entries sharing a ``group`` get an averaged row; ``sweep``: the two
    hyperparameters a section sweeps (a table and a heatmap per label and shots, instead of the shots table);
    ``shots_figure`` / ``sweep_figure``: the file of the accuracy-vs-shots figure / of the sweep's heatmaps, if the
    protocol draws one."""

    source_apart: bool = False
    average_title: str = "average"
    note: str | None = None
    groups: bool = True
    sweep: tuple[str, str] | None = None
    shots_figure: str | None = None
    sweep_figure: str | None = None


_REGISTRY: Registry[type[Protocol]] = Registry("protocol", ExperimentError)


class Protocol:
    """How one paper protocol lists its cells, what it asks of the encoder, and how it scores a group of them."""

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "ece")  # per-seed record fields the report averages
    layout: ClassVar[ReportLayout] = ReportLayout()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:
            register(cls)

    def __init__(self, bench: Bench):
        self.b, self.exp = bench, bench.exp

    # The experiment file's key of this protocol's own settings (None: it has none). Every registered protocol's
    # section may appear in any file; it is checked by :meth:`section_schema`, read by :meth:`parse_section` and
    # kept on the experiment under its name (``exp.sections[name]``, also ``exp.<name>``).
    section: ClassVar[str | None] = None

    # -- the experiment file ---------------------------------------------------------------------------------
    @classmethod
    def section_schema(cls) -> Schema:
        """The keys the section may hold, one constraint each (:mod:`prolip.constraints`)."""
        return Schema({})

    @classmethod
    def parse_section(cls, raw: dict[str, Any], where: str) -> Any:
        """The section as this protocol reads it, from a mapping that passed :meth:`section_schema` (``{}`` when the
        file has none: the defaults); ``where`` names the file and section in an ExperimentError."""
        return dict(raw)

    @classmethod
    def check(cls, exp: Experiment, where: str) -> None:
        """Refuse (ExperimentError, naming ``where``) what this protocol cannot run; every experiment is checked
        for its datasets, methods, shots and seeds before."""

    @classmethod
    def settle(cls, exp: Experiment) -> Experiment:
        """The experiment as this protocol runs it (e.g. with a validation set): called once it is checked."""
        return exp

    # -- cells -----------------------------------------------------------------------------------------------
    def groups(self) -> Iterator[Group]:
        """By default one cell per method for every dataset × shots × seed (the few-shot protocols' grid)."""
        return self._per_dataset_groups(self._method_cells)

    def _method_cells(self, splits: DatasetSplits, shots: int, seed: int) -> list[Cell]:
        t = self.b.templates(splits)
        return [
            Cell(m, self.b.record(m, dataset=splits.name, shots=shots, seed=seed, templates=t))
            for m in self.exp.methods
        ]

    def _per_dataset_groups(self, cells_for: Callable[[DatasetSplits, int, int], list[Cell]]) -> Iterator[Group]:
        for dataset in self.exp.datasets:
            splits = self.b.splits(dataset)
            for shots in self.exp.shots:
                for seed in self.exp.seeds:
                    yield Group(dataset, shots, seed, cells_for(splits, shots, seed))

    # -- what scoring asks of the encoder, and scoring -------------------------------------------------------
    def requests(self, group: Group, cells: list[Cell]) -> GroupRequests:
        """What :meth:`score` asks the cache for: by default the group's episode, then each cell's own fit."""
        out = GroupRequests()
        drawn, out.shared = episode_requests(self.b, self.b.splits(group.dataset), group.shots, group.seed)
        out.per_cell = [fit_requests(self.b, cell, drawn, out) for cell in cells]
        return out

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        raise NotImplementedError

    def progress(self, cell: Cell) -> str:
        """What the progress line says of a cell after its label (a sweep point); nothing by default."""
        return ""


def register(cls: type[Protocol]) -> type[Protocol]:
    """Enter ``cls`` under its name; a different class under a taken name is refused (the same class again, its
    module reloaded, replaces itself)."""
    return _REGISTRY.add(cls.name, cls)


def available() -> list[str]:
    """The registered protocol names, in the order registered."""
    return _REGISTRY.names()


def protocol_class(name: str) -> type[Protocol]:
    return _REGISTRY.get(name)


def metrics() -> tuple[str, ...]:
    """Every registered protocol's per-seed metrics, each once, in the order registered."""
    return tuple(dict.fromkeys(m for name in _REGISTRY.names() for m in _REGISTRY.get(name).metrics))


def layout_of(name: str) -> ReportLayout:
    """The report layout of a protocol; records of a protocol not registered here get the default one."""
    return _REGISTRY.get(name).layout if name in _REGISTRY else ReportLayout()
