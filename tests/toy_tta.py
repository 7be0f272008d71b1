"""A test-time method defined in the test folder alone, as a new method's author would write it: one module that
registers a class. "mean-views" averages the projected embeddings of each image's first ``first`` views (all, by
default) and classifies the mean: no update, no selection. The bench, its plan and the report pick it up by name."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from prolip.constraints import Number
from prolip.functional import cosine_logits, project
from prolip.tta import PerImageMethod, Scene, register


def mean_view_logits(z: Tensor, W: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float) -> Tensor:
    """Logits [B, C] of the mean projected embedding of views z [B, V, D_pre]."""
    return cosine_logits(project(z, W, bias).mean(1), classifier, logit_scale)


@register
class MeanViews(PerImageMethod):
    name = "mean-views"
    constraints = {"first": Number(low=1, integer=True, optional=True)}
    record_fields = ("views_averaged",)

    def __init__(self, first: int | None = None) -> None:
        self.first = first

    def views_read(self, views: int, dataset: str) -> int:
        return views if self.first is None else min(self.first, views)

    def logits(self, z: Tensor, W: Tensor, scene: Scene) -> Tensor:
        kept = z[:, : self.views_read(z.shape[1], scene.dataset)]
        return mean_view_logits(kept, W, scene.bias, scene.classifier, scene.logit_scale)

    def finish(self, labels: Tensor) -> dict[str, Any]:
        return {"views_averaged": self.views_read(self.scene.views, self.scene.dataset)}
