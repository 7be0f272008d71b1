"""Zero-shot CLIP: nothing is trained; the classifier (single template or ensemble) is the one the task carries."""
from __future__ import annotations

from torch import Tensor

from prolip.functional import clip_logits
from prolip.methods import register
from prolip.methods.base import Method, Support, Task, Validation


@register
class ZeroShot(Method):
    name = "zeroshot"

    def fit(self, task: Task, support: Support | None = None, val: Validation | None = None,
            seed: int = 0) -> "ZeroShot":
        self.task = task
        return self

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        T = self.task.classifier if classifier is None else classifier
        return clip_logits(z.float(), self.task.W0, self.task.bias, T, self.task.logit_scale)

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "ZeroShot":
        return self.fit(task)
