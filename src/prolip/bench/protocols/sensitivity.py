"""A method's lr × λ sweep, validation-free, test accuracy for each point (the paper's sensitivity figure)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prolip.bench.harness import Cell, Group, GroupRequests, episode_requests, fit_requests, scores
from prolip.bench.protocols.base import Protocol, ReportLayout
from prolip.bench.spec import Experiment, ExperimentError
from prolip.constraints import ListOf, Number, Schema
from prolip.methods import create, method_class

if TYPE_CHECKING:
    from prolip.data.types import DatasetSplits

SWEPT = ("lr", "lam")
_VALUES = ListOf(Number(), "a list of numbers")


@dataclass
class Sweep:
    """The lr × λ sweep of the paper's sensitivity figure (the file's ``sensitivity`` section), trained batched (one
    computation per support set); steps and precision come from each prolip entry of ``methods``."""

    lrs: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    lams: list[float] = field(default_factory=lambda: [0.0, 1e-2, 1e-1, 1.0])


class Sensitivity(Protocol):
    """Methods that can (ProLIP) train every point of one support set in one batched computation (``fit_each``)."""

    name = "sensitivity"
    # A group there would mix sweep points, so none is formed.
    layout = ReportLayout(groups=False, sweep=SWEPT, sweep_figure="sensitivity_heatmap.png")

    section = "sensitivity"

    @classmethod
    def section_schema(cls) -> Schema:
        return Schema({"lrs": _VALUES, "lams": _VALUES})

    @classmethod
    def parse_section(cls, raw: dict[str, Any], where: str) -> Sweep:
        return Sweep(**raw)

    @classmethod
    def check(cls, exp: Experiment, where: str) -> None:
        if not exp.sensitivity.lrs or not exp.sensitivity.lams:
            raise ExperimentError(f"{where}: sensitivity: 'lrs' and 'lams' must not be empty")
        for i, m in enumerate(exp.methods):
            swept = set(SWEPT)
            if not swept <= set(method_class(m.name).param_names()) or (swept | {"grid"}) & set(m.hyperparameters):
                raise ExperimentError(
                    f"{where}: methods[{i}] ({m.label}): the sensitivity protocol sweeps a "
                    f"method's lr and lam (set them under 'sensitivity'): list methods that have "
                    f"both, without setting them or a grid"
                )

    def groups(self) -> Iterator[Group]:
        sweep = self.exp.sensitivity

        def cells(splits: DatasetSplits, shots: int, seed: int) -> list[Cell]:
            t, out = self.b.templates(splits), []
            for m in self.exp.methods:
                base_hp = self.b.method(m, splits.name).get_params()
                for lr in sweep.lrs:
                    for lam in sweep.lams:
                        hp = {**base_hp, "lr": float(lr), "lam": float(lam)}
                        rec = self.b.record(
                            m, dataset=splits.name, shots=shots, seed=seed, templates=t, hyperparameters=hp
                        )
                        out.append(Cell(m, rec, extra={"lr": float(lr), "lam": float(lam)}))
            return out

        return self._per_dataset_groups(cells)

    def requests(self, group: Group, cells: list[Cell]) -> GroupRequests:
        """Every point of a method is fitted in one computation: its fit's requests once."""
        out = GroupRequests()
        drawn, out.shared = episode_requests(self.b, self.b.splits(group.dataset), group.shots, group.seed)
        first = {
            id(m): next(c for c in cells if c.method is m)
            for m in self.exp.methods
            if any(c.method is m for c in cells)
        }
        out.per_cell = [fit_requests(self.b, c, drawn, out) if first[id(c.method)] is c else [] for c in cells]
        return out

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        assert group.seed is not None
        episode = self.b.episode(self.b.splits(group.dataset), group.shots, group.seed)
        for m in self.exp.methods:
            mine = [c for c in cells if c.method is m]
            if not mine:
                continue
            started = time.perf_counter()
            method = create(m.name, **mine[0].record["hyperparameters"])
            fitted = method.fit_each(episode.task, episode.support_for(method), [c.extra for c in mine], group.seed)
            seconds = (time.perf_counter() - started) / len(mine)
            for cell, method in zip(mine, fitted, strict=True):
                cell.add(
                    **scores(method, episode.evaluation),
                    selected=method.selected_,
                    eval_images=len(episode.evaluation),
                    eval_set=episode.images.eval_set,
                    **self.b.identity(episode, evaluation=episode.evaluation.images),
                )
                yield cell, seconds

    def progress(self, cell: Cell) -> str:
        hp = cell.record["hyperparameters"]
        return f" lr {hp['lr']:g} λ {hp['lam']}"
