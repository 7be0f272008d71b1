"""The ProLIP paper's complements: ProLIP stacked under another method, and ProLIP on the text projection.

- "prolip+tip-adapter-f" / "prolip+taskres": fit ProLIP, then fit the second method on a task whose projector
  is the adapted W (its zero-shot part, cache keys and embeddings all use the adapted W). Hyperparameters:
  ``prolip={...}`` and ``head={...}`` (dicts passed to each). With a validation set, ProLIP stays
  validation-free unless ``prolip`` asks for a grid; the head uses validation as it does alone.
- "prolip-text": the same loss and pull as ProLIP, but on the text projection P [Dt_pre, D]:
  T(P) = ensemble of normalize(text_pre_t · P) over templates; image side frozen at W0. Needs
  ``task.text_pre`` and ``task.text_proj`` (the pipeline builds them for this method).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.functional import ensemble_classifier
from prolip.methods import create, register
from prolip.methods._common import embed, no_classifier_swap, require_fitted
from prolip.methods.base import Method, Support, Task, Validation
from prolip.methods.prolip import ADAM_BETAS, ADAM_EPS, ProLIP, resolve_lambda


class _ProLIPThen(Method):
    head_name: str

    def __init__(self, prolip: dict[str, Any] | None = None, head: dict[str, Any] | None = None):
        super().__init__(prolip=dict(prolip or {}), head=dict(head or {}))
        self.prolip = ProLIP(**(prolip or {}))
        self.head = create(self.head_name, **(head or {}))

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "_ProLIPThen":
        self.prolip.fit(task, support, val if self.prolip.grid else None, seed)
        self.head.fit(replace(task, W0=self.prolip.W), support, val, seed)
        self.selected_ = {"prolip": self.prolip.selected_, "head": self.head.selected_}
        return self

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        return self.head.logits(z, classifier)

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"prolip.{k}": v for k, v in self.prolip.state_dict().items()}
        return state | {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "_ProLIPThen":
        pick = lambda prefix: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        self.prolip.load_state_dict(task, pick("prolip."))
        self.head.load_state_dict(replace(task, W0=self.prolip.W), pick("head."))
        return self


@register
class ProLIPTipAdapterF(_ProLIPThen):
    name = "prolip+tip-adapter-f"
    head_name = "tip-adapter-f"


@register
class ProLIPTaskRes(_ProLIPThen):
    name = "prolip+taskres"
    head_name = "taskres"


def text_classifier(text_pre: Tensor, text_proj: Tensor) -> Tensor:
    """Text classifier [C, D] from per-template pre-projection text features [C, n_t, Dt] and a projection."""
    return ensemble_classifier(text_pre @ text_proj)


@register
class ProLIPText(Method):
    name = "prolip-text"

    def __init__(self, lr: float = 1e-5, lam: str | float = "1/N", steps: int = 300):
        super().__init__(lr=lr, lam=lam, steps=steps)
        self.lr, self.lam, self.steps = lr, lam, steps
        self.task = self.P = None

    def _check(self, task: Task) -> None:
        if task.text_pre is None or task.text_proj is None:
            raise ValueError("prolip-text needs the text side (task.text_pre, task.text_proj): build the task with "
                             "pipeline.build_task(..., with_text_side=True)")

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "ProLIPText":
        self._check(task)
        self.task = task
        lam = resolve_lambda(self.lam, task.shots)
        text_pre, P0 = task.text_pre.float(), task.text_proj.float()
        P = P0.clone().requires_grad_(True)
        opt = torch.optim.Adam([P], lr=self.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.steps))
        for t in range(self.steps):
            f = F.normalize(embed(task, support.views.view(t % support.views.num_views)), dim=-1)
            logits = task.logit_scale * f @ text_classifier(text_pre, P).T
            loss = F.cross_entropy(logits, support.labels) + lam * (P - P0).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        self.P = P.detach()
        self.classifier_ = text_classifier(text_pre, self.P)
        self.selected_ = {"lr": self.lr, "lam": lam, "how": "rule"}
        return self

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        no_classifier_swap(self.name, classifier)
        require_fitted(self, "P")
        return self.task.logit_scale * F.normalize(embed(self.task, z), dim=-1) @ self.classifier_.T

    def state_dict(self) -> dict[str, Tensor]:
        return {"text_proj": self.P, "classifier": self.classifier_}

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "ProLIPText":
        # The adapted classifier is saved, so reloading needs no text encoder pass.
        self.task, self.P, self.classifier_ = task, state["text_proj"], state["classifier"]
        return self
