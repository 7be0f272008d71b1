"""A few-shot method written in one file, as ARCHITECTURE.md's "Where to add" says: registered by importing this
module, it runs through `prolip fit`, `prolip predict`, `prolip bench` and `prolip report` with nothing else changed
(tests/test_method_registry.py). Class centroids: each class's mean support embedding (all cached views, at the frozen
W0), blended with the zero-shot text classifier."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from prolip.constraints import Number
from prolip.functional import cosine_logits
from prolip.methods import Capabilities, Method, register
from prolip.methods._common import embed


@register
class Centroids(Method):
    name = "toy-centroids"
    capabilities = Capabilities(selects="")
    constraints = {"blend": Number(low=0.0, high=1.0)}

    def __init__(self, blend: float = 0.5):
        self.blend = blend
        self.centroids: Tensor | None = None

    def _fit(self, task, support, val, seed):
        views = [F.normalize(embed(task, support.views.view(t)), dim=-1) for t in range(support.views.num_views)]
        sums = sum(F.one_hot(support.labels, task.num_classes).float().T @ v for v in views)
        self.centroids = F.normalize(sums, dim=-1)
        self.selected_ = {"blend": self.blend, "how": "given"}

    def _logits(self, z, classifier):
        assert self.centroids is not None and self.task is not None
        e = embed(self.task, z)
        head = F.normalize(self.blend * self.centroids + (1 - self.blend) * classifier, dim=-1)
        return cosine_logits(e, head, self.task.logit_scale)

    def state_dict(self):
        return {} if self.centroids is None else {"centroids": self.centroids}

    def state_shapes(self, task):
        return {"centroids": (task.num_classes, task.W0.shape[1])}

    def _load(self, task, state):
        self.centroids = state["centroids"]
