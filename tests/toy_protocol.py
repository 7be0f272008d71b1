"""A bench protocol defined in the test folder alone, as a new protocol's author would write it: one module with one
class. "support-accuracy" is few-shot with a second number: each method's accuracy on the very support images it
was fitted on (how far it fits them), beside its accuracy on the evaluation set. Its name registers it; the
experiment parser, the run, ``prolip bench --plan`` and ``prolip report`` pick it up from what it declares."""

from __future__ import annotations

from collections.abc import Iterator

from prolip.bench.harness import Cell, Group, GroupRequests, image_paths, score
from prolip.bench.protocols import Protocol, ReportLayout
from prolip.bench.spec import Experiment, ExperimentError
from prolip.episode import draw_images
from prolip.features.cache import Request
from prolip.methods import method_class


class SupportAccuracy(Protocol):
    name = "support-accuracy"
    metrics = ("accuracy", "support_accuracy")
    layout = ReportLayout(note="Accuracy on the evaluation set; support_accuracy in results.json.")

    @classmethod
    def check(cls, exp: Experiment, where: str) -> None:
        if exp.validation:
            raise ExperimentError(f"{where}: protocol {cls.name} scores methods fitted without a validation set")
        for i, m in enumerate(exp.methods):
            if method_class(m.name).capabilities.encodes_images:
                raise ExperimentError(f"{where}: methods[{i}]: {cls.name} scores cached features only")

    def requests(self, group: Group, cells: list[Cell]) -> GroupRequests:
        """The default (the episode, each cell's fit), then the support's center crops it is scored on."""
        out = super().requests(group, cells)
        assert group.seed is not None
        drawn = draw_images(self.b.splits(group.dataset), self.b.spec(group.shots, group.seed))
        out.shared.append(Request(image_paths(drawn.support)))
        return out

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        assert group.seed is not None
        episode = self.b.episode(self.b.splits(group.dataset), group.shots, group.seed)
        support = self.b.builder.center(episode.images.support)
        for cell in cells:
            method, seconds = self.b.fit(cell.method, cell.record["hyperparameters"], episode, group.seed)
            cell.add(
                accuracy=score(method, episode.evaluation),
                support_accuracy=score(method, support),
                eval_images=len(episode.evaluation),
                **self.b.cost(method),
            )
            yield cell, seconds
