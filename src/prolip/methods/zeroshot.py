"""Zero-shot CLIP: nothing is trained; the classifier (single template or ensemble) is the one the task carries."""

from __future__ import annotations

from torch import Tensor

from prolip.functional import clip_logits
from prolip.methods import register
from prolip.methods.base import NO_CACHED_VIEWS, Capabilities, Method, Support, Task, Validation


@register
class ZeroShot(Method):
    name = "zeroshot"
    # it reads no support at all
    capabilities = Capabilities(
        accepts_classifier=True, exposes_projection=True, learns=False, augmentation=NO_CACHED_VIEWS
    )

    def __init__(self) -> None:
        pass

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        self.selected_ = {"how": "rule"}

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None
        return clip_logits(z, self.task.W0, self.task.bias, classifier, self.task.logit_scale)

    def projection(self) -> Tensor | None:
        return None if self.task is None else self.task.W0
