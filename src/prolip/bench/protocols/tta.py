"""Test-time adaptation (:mod:`prolip.tta`) on the very same views of a class-balanced (optionally capped)
evaluation set; the scoring itself is :mod:`prolip.bench.tta`'s."""

from __future__ import annotations

from collections.abc import Iterator

from prolip.bench.harness import Cell, Group, GroupRequests, episode_requests, fit_requests
from prolip.bench.protocols.base import Protocol
from prolip.bench.spec import TTA, Experiment, ExperimentError, MethodSpec, TestTimeSpec
from prolip.bench.tta import ZERO_SHOT, balanced_subset, run_tta_group, starts_from_fit
from prolip.episode import evaluation_images
from prolip.features.cache import Request
from prolip.methods import method_class
from prolip.tta import create as create_test_time
from prolip.tta import method_class as test_time_class


class TestTime(Protocol):
    """Test-time ProLIP from every method's projection (W0 for methods that learn nothing, zero-shot; a few-shot
    method's adapted W, fitted on ``tta.train_on`` or the dataset itself), and each other test-time method the
    experiment lists (TPT, ZERO, TDA, the no-update view ensemble, plain zero-shot), from W0."""

    name = "tta"
    metrics = ("accuracy", "start_accuracy", "accuracy_worst", "ece")

    @classmethod
    def check(cls, exp: Experiment, where: str) -> None:
        if exp.tta.views < 1 or not 0 < exp.tta.ratio <= 1:
            raise ExperimentError(f"{where}: tta: 'views' must be ≥ 1 and 'ratio' in (0, 1]")
        _check_test_time_settings(exp.tta, f"{where}: tta")
        for i, m in enumerate(exp.methods):
            if not method_class(m.name).exposes_projection:
                raise ExperimentError(
                    f"{where}: methods[{i}]: the tta protocol adapts a projection W, so it starts "
                    f"from a method that exposes one (zeroshot's W0, prolip's W), not {m.name!r}"
                )

    def groups(self) -> Iterator[Group]:
        t = self.exp.tta
        setting = {"tta": t.setting()}
        for dataset in self.exp.datasets:
            splits = self.b.splits(dataset)
            templates = self.b.templates(splits)
            cells = []
            for row in t.rows():
                from_fit = test_time_class(row.name).starts_from_fit
                for m, shots, seed in self._starts(row, from_fit):
                    spec = MethodSpec(m.name, f"{row.name}+{m.label}" if from_fit else m.label, m.hyperparameters)
                    rec = self.b.record(
                        spec, dataset=splits.name, shots=shots, seed=seed, templates=templates, setting=setting
                    )
                    cells.append(Cell(m, rec, extra={"test_time": row, "shots": shots, "seed": seed}))
            yield Group(dataset, 0, None, cells)

    def _starts(self, row: TestTimeSpec, from_fit: bool) -> list[tuple[MethodSpec, int, int | None]]:
        """Where a row's W comes from: for a method that ``starts_from_fit``, each method's own, per shots and seed
        when it learns (once, at 0 shots, when it does not); for any other, zero-shot CLIP's W0, once."""
        if not from_fit:
            return [(MethodSpec(ZERO_SHOT, row.name), 0, None)]
        return [
            (m, shots, seed)
            for m in self.exp.methods
            for shots, seed in (
                [(s, seed) for s in self.exp.shots for seed in self.exp.seeds]
                if method_class(m.name).learns
                else [(0, None)]
            )
        ]

    def requests(self, group: Group, cells: list[Cell]) -> GroupRequests:
        """Cells that start from a fit fit on (``tta.train_on`` or the dataset, shots, seed); the ``tta.views``
        views of each evaluation image are then encoded once, directly, and shared by every cell, of which each
        reads the views its test-time method declares (what each would encode alone)."""
        t = self.exp.tta
        splits = self.b.splits(group.dataset)
        images = balanced_subset(evaluation_images(splits), t.max_images)
        out = GroupRequests(direct=[])
        for cell in cells:
            own: list[Request] = []
            if starts_from_fit(cell):
                train_on = self.b.splits(t.train_on or group.dataset)
                drawn, own = episode_requests(self.b, train_on, cell.extra["shots"], cell.extra["seed"])
                own = own + fit_requests(self.b, cell, drawn, out)
            out.per_cell.append(own)
            method = create_test_time(cell.extra["test_time"].name, **t.settings_for(cell.extra["test_time"]))
            assert out.direct is not None
            out.direct.append(len(images) * method.views_read(t.views, splits.name))
        out.direct_passes = len(images) * t.views
        out.direct_paths = [it.path for it in images.items]
        return out

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        yield from run_tta_group(self.b, group, cells)


def _check_test_time_settings(tta: TTA, where: str) -> None:
    """Each test-time method's settings (the section's it shares, its entry's own), by its constraints."""
    for spec in tta.rows():
        try:
            create_test_time(spec.name, **tta.settings_for(spec))
        except ValueError as e:
            raise ExperimentError(f"{where}: {spec.name}: bad settings: {e}") from None
