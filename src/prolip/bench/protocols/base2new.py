"""Base-to-new generalisation: train on the base classes, score base and new classes, and their harmonic mean."""

from __future__ import annotations

from collections.abc import Iterator

from prolip.bench.harness import (
    Cell,
    Group,
    GroupRequests,
    episode_requests,
    fit_requests,
    image_paths,
    scores,
)
from prolip.bench.protocols.base import Protocol
from prolip.data.sampling import base_new_split
from prolip.episode import evaluation_images, restrict
from prolip.features.cache import Request
from prolip.functional import harmonic_mean


class BaseToNew(Protocol):
    """Train on the base classes (the first ⌈C/2⌉ labels; sampled over all classes, then restricted, as the
    reference); base accuracy with the base-only classifier on base test images, new accuracy with the new-only
    classifier on new test images (same adapted method), and their harmonic mean."""

    name = "base2new"
    metrics = ("accuracy", "base", "new", "hm", "ece", "new_ece")  # ece: on the base classes

    def requests(self, group: Group, cells: list[Cell]) -> GroupRequests:
        splits = self.b.splits(group.dataset)
        base, new = base_new_split(len(splits.classnames))
        out = GroupRequests()
        drawn, out.shared = episode_requests(self.b, splits, group.shots, group.seed, tuple(base))
        out.shared.append(Request(image_paths(restrict(evaluation_images(splits), new))))
        out.per_cell = [fit_requests(self.b, cell, drawn, out) for cell in cells]
        return out

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        assert group.seed is not None
        splits = self.b.splits(group.dataset)
        base, new = base_new_split(len(splits.classnames))
        episode = self.b.episode(splits, group.shots, group.seed, classes=tuple(base))
        new_images = restrict(evaluation_images(splits), new)
        new_features = self.b.builder.center(new_images)
        T_new = self.b.builder.classifier(new_images.classnames, self.b.templates(splits)[1])
        for cell in cells:
            method, seconds = self.b.fit(cell.method, cell.record["hyperparameters"], episode, group.seed)
            on_base = scores(method, episode.evaluation)
            on_new = (
                scores(method, new_features, T_new)
                if method.capabilities.accepts_classifier
                else {"accuracy": None, "ece": None}
            )
            base_acc, new_acc = on_base["accuracy"], on_new["accuracy"]
            hm = None if new_acc is None or base_acc is None else harmonic_mean(base_acc, new_acc)
            cell.add(
                base=base_acc,
                new=new_acc,
                hm=hm,
                accuracy=hm,
                ece=on_base["ece"],
                new_ece=on_new["ece"],
                selected=method.selected_,
                base_classes=len(base),
                new_classes=len(new),
                **self.b.cost(method),
                **self.b.identity(episode, evaluation=episode.evaluation.images, new=new_features.images),
            )
            if not method.capabilities.accepts_classifier:
                cell.add(note=f"{cell.method.name} cannot score classes it was not trained on")
            yield cell, seconds
