"""Few-shot accuracy per dataset × shots × seed × method (``fewshot``), and the same with a validation set on which
each method selects what it declares (``fewshot-val``; ProLIP: the paper's 49-point grid)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from prolip.bench.harness import NOTHING_TO_SCORE, Cell, Group, scores
from prolip.bench.protocols.base import Protocol, ReportLayout
from prolip.bench.spec import Experiment


class FewShot(Protocol):
    """Each method fitted on the group's episode and scored on its evaluation set."""

    name = "fewshot"
    layout = ReportLayout(shots_figure="accuracy_vs_shots.png")

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        assert group.seed is not None
        episode = self.b.episode(self.b.splits(group.dataset), group.shots, group.seed)
        for cell in cells:
            method, seconds = self.b.fit(cell.method, cell.record["hyperparameters"], episode, group.seed)
            found = scores(method, episode.evaluation)
            acc = found["accuracy"]
            cell.add(
                accuracy=acc,
                ece=found["ece"],
                selected=method.selected_,
                eval_images=len(episode.evaluation),
                eval_set=episode.images.eval_set,
                support_digest=episode.images.support_digest(),
                **self.b.cost(method),
                **self.b.identity(episode, evaluation=episode.evaluation.images),
            )
            if acc is None:
                cell.add(note=NOTHING_TO_SCORE)
            yield cell, seconds


class FewShotValidation(FewShot):
    """Few-shot with an N-shot validation set drawn beside the support (never from the evaluation images)."""

    name = "fewshot-val"
    layout = ReportLayout(shots_figure="accuracy_vs_shots_val.png")

    @classmethod
    def settle(cls, exp: Experiment) -> Experiment:
        return dataclasses.replace(exp, validation=True)
