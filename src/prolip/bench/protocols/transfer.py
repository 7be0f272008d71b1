"""Cross-dataset transfer and domain generalisation: train on one source, score the source and each target."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import ClassVar

from prolip.bench.harness import (
    NOT_SCORED,
    Cell,
    Group,
    GroupRequests,
    episode_requests,
    fit_requests,
    image_paths,
    scores,
)
from prolip.bench.protocols.base import Protocol, ReportLayout
from prolip.bench.spec import DOMAIN_TARGETS, Experiment, ExperimentError
from prolip.episode import evaluation_images
from prolip.features.cache import Request
from prolip.methods import Method

_LAYOUT = ReportLayout(
    source_apart=True,
    average_title="target average",
    note="Trained on {sources}; the other columns use each target's own classifier, and the target "
    "average leaves the source out.",
)


class CrossDataset(Protocol):
    """Train on the one source dataset, evaluate the adapted method on the source's evaluation set and on each
    target with the target's own classifier (its classes and templates; ImageNet-A/-R thus get the 200-way
    classifier of their class subsets)."""

    name = "cross-dataset"
    layout = _LAYOUT
    default_targets: ClassVar[list[str] | None] = None  # None: the experiment must name its targets

    @classmethod
    def check(cls, exp: Experiment, where: str) -> None:
        if cls.default_targets is None and not exp.targets:
            raise ExperimentError(f"{where}: protocol {cls.name} needs 'targets' (the datasets to evaluate on)")
        if len(exp.datasets) != 1:
            raise ExperimentError(
                f"{where}: protocol {cls.name} trains on one source dataset; 'datasets' has {len(exp.datasets)}"
            )

    def groups(self) -> Iterator[Group]:
        source = self.b.splits(self.exp.datasets[0])
        specs = [None, *(self.exp.targets or self.default_targets or [])]  # None: the source itself
        targets = [source if spec is None else self.b.splits(spec) for spec in specs]
        for shots in self.exp.shots:
            for seed in self.exp.seeds:
                cells = [
                    Cell(
                        m,
                        self.b.record(
                            m,
                            dataset=target.name,
                            source=source.name,
                            shots=shots,
                            seed=seed,
                            templates=self.b.templates(target),
                        ),
                        target=spec,
                    )
                    for m in self.exp.methods
                    for spec, target in zip(specs, targets, strict=True)
                ]
                yield Group(source.name, shots, seed, cells)

    def requests(self, group: Group, cells: list[Cell]) -> GroupRequests:
        """The source's episode, each method's fit once, and each target's evaluation images."""
        out = GroupRequests()
        drawn, out.shared = episode_requests(self.b, self.b.splits(group.dataset), group.shots, group.seed)
        fitted: set[str] = set()
        for cell in cells:
            own = [] if cell.method.label in fitted else fit_requests(self.b, cell, drawn, out)
            fitted.add(cell.method.label)
            if cell.target is not None:
                own.append(Request(image_paths(evaluation_images(self.b.splits(cell.target)))))
            out.per_cell.append(own)
        return out

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        assert group.seed is not None
        source = self.b.splits(self.exp.datasets[0])
        episode = self.b.episode(source, group.shots, group.seed)
        fitted: dict[int, tuple[Method, float]] = {}
        for cell in cells:
            if id(cell.method) not in fitted:
                fitted[id(cell.method)] = self.b.fit(cell.method, cell.record["hyperparameters"], episode, group.seed)
            method, seconds = fitted[id(cell.method)]
            started = time.perf_counter()
            found = dict(NOT_SCORED)
            if cell.target is None:
                features = episode.evaluation
                found = scores(method, features)
            else:
                target = self.b.splits(cell.target)
                features = self.b.builder.center(evaluation_images(target))
                T = self.b.builder.classifier(target.classnames, self.b.templates(target)[1])
                if method.capabilities.accepts_classifier:
                    found = scores(method, features, T)
                else:
                    cell.add(note=f"{cell.method.name} cannot score another dataset's classes")
            cell.add(
                **found,
                selected=method.selected_,
                eval_images=len(features),
                num_classes=len(self.b.splits(cell.target or source.name).classnames),
                **self.b.cost(method),
                **self.b.identity(episode, evaluation=features.images),
            )
            yield cell, seconds + time.perf_counter() - started


class DomainGeneralisation(CrossDataset):
    """Transfer from ImageNet to its variants (the experiment's ``targets``, by default the four of the paper)."""

    name = "domain-generalisation"
    default_targets = DOMAIN_TARGETS
