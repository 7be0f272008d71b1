"""Adapters trained after the frozen projection: CLIP-Adapter, TaskRes and the regularised linear adapter.

- "clip-adapter" (Gao et al., IJCV 2023): f' = r·MLP(f) + (1 − r)·f, MLP = D→D/4→D, no bias, ReLU after both
  layers, r = 0.2; CoOp-style training: SGD lr 2e-3, momentum 0.9, weight decay 5e-4, batch 32, 200 epochs
  (one augmented view each, 20 views cycled), cosine per epoch. The MLP is seeded-random, so it does not start
  at zero-shot.
- "taskres" (Yu et al., CVPR 2023): classifier T + α·R with a learnable residual R initialised at 0 (so it
  starts at zero-shot), α = 0.5; Adam lr 2e-3, batch 256, 100 epochs (20 views cycled), cosine per epoch.
- "linear-adapter" (ProLIP paper's complement): an identity-initialised D×D matrix A after the projection,
  logits s·normalize((zW0+b)A)·Tᵀ, loss CE + λ‖A − I‖²_F with λ = 1/N; trained exactly like ProLIP (Adam
  eps 1e-4, cosine, full batch, step t on view t), lr 1e-3 by default since A's entries are O(1).
All three are validation-free: ``selected_`` records ``how: "rule"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prolip.functional import cosine_logits
from prolip.methods import register
from prolip.methods._common import cosine_head_logits, embed, no_classifier_swap, require_fitted, \
    train_minibatch, view_embeddings
from prolip.methods.base import Method, Support, Task, Validation
from prolip.methods.prolip import ADAM_BETAS, ADAM_EPS, resolve_lambda


def residual_mlp(dim: int, reduction: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                         nn.Linear(dim // reduction, dim, bias=False), nn.ReLU())


@register
class CLIPAdapter(Method):
    name = "clip-adapter"

    def __init__(self, ratio: float = 0.2, lr: float = 2e-3, epochs: int = 200, batch_size: int = 32,
                 views: int = 20, weight_decay: float = 5e-4):
        super().__init__(ratio=ratio, lr=lr, epochs=epochs, batch_size=batch_size, views=views,
                         weight_decay=weight_decay)
        self.ratio, self.lr, self.epochs, self.batch_size = ratio, lr, epochs, batch_size
        self.views, self.weight_decay = views, weight_decay
        self.task = self.mlp = None

    def _adapt(self, e: Tensor) -> Tensor:
        return self.ratio * self.mlp(e) + (1 - self.ratio) * e

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "CLIPAdapter":
        self.task = task
        torch.manual_seed(seed)  # the MLP's init, as nn.Linear draws it
        self.mlp = residual_mlp(task.classifier.shape[1])
        data = view_embeddings(task, support, self.views)
        loss_fn = lambda x, y: F.cross_entropy(cosine_logits(self._adapt(x), task.classifier, task.logit_scale), y)
        train_minibatch(self.mlp.parameters(), loss_fn, data, support.labels, epochs=self.epochs,
                        batch_size=self.batch_size, optimizer="sgd", lr=self.lr, seed=seed, momentum=0.9,
                        weight_decay=self.weight_decay)
        self.mlp.requires_grad_(False)
        self.selected_ = {"how": "rule"}
        return self

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        require_fitted(self, "mlp")
        T = self.task.classifier if classifier is None else classifier
        return cosine_logits(self._adapt(embed(self.task, z)), T, self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"mlp.{k}": v for k, v in self.mlp.state_dict().items()}

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "CLIPAdapter":
        self.task, self.mlp = task, residual_mlp(task.classifier.shape[1])
        self.mlp.load_state_dict({k.removeprefix("mlp."): v for k, v in state.items()})
        self.mlp.requires_grad_(False)
        return self


@register
class TaskRes(Method):
    name = "taskres"

    def __init__(self, alpha: float = 0.5, lr: float = 2e-3, epochs: int = 100, batch_size: int = 256,
                 views: int = 20):
        super().__init__(alpha=alpha, lr=lr, epochs=epochs, batch_size=batch_size, views=views)
        self.alpha, self.lr, self.epochs, self.batch_size, self.views = alpha, lr, epochs, batch_size, views
        self.task = self.residual = None

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "TaskRes":
        self.task = task
        residual = torch.zeros_like(task.classifier, requires_grad=True)
        data = view_embeddings(task, support, self.views)
        loss_fn = lambda x, y: F.cross_entropy(
            cosine_head_logits(x, task.classifier + self.alpha * residual, task.logit_scale), y)
        train_minibatch([residual], loss_fn, data, support.labels, epochs=self.epochs, batch_size=self.batch_size,
                        optimizer="adam", lr=self.lr, seed=seed)
        self.residual = residual.detach()
        self.selected_ = {"how": "rule"}
        return self

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        no_classifier_swap(self.name, classifier)
        require_fitted(self, "residual")
        return cosine_head_logits(embed(self.task, z), self.task.classifier + self.alpha * self.residual,
                                  self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        return {"residual": self.residual}

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "TaskRes":
        self.task, self.residual = task, state["residual"]
        return self


@register
class LinearAdapter(Method):
    name = "linear-adapter"

    def __init__(self, lr: float = 1e-3, lam: str | float = "1/N", steps: int = 300):
        super().__init__(lr=lr, lam=lam, steps=steps)
        self.lr, self.lam, self.steps = lr, lam, steps
        self.task = self.A = None

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "LinearAdapter":
        self.task = task
        lam = resolve_lambda(self.lam, task.shots)
        eye = torch.eye(task.classifier.shape[1])
        A = eye.clone().requires_grad_(True)
        opt = torch.optim.Adam([A], lr=self.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.steps))
        for t in range(self.steps):
            e = embed(task, support.views.view(t % support.views.num_views))
            loss = F.cross_entropy(cosine_logits(e @ A, task.classifier, task.logit_scale), support.labels)
            loss = loss + lam * (A - eye).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        self.A = A.detach()
        self.selected_ = {"lr": self.lr, "lam": lam, "how": "rule"}
        return self

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        require_fitted(self, "A")
        T = self.task.classifier if classifier is None else classifier
        return cosine_logits(embed(self.task, z) @ self.A, T, self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        return {"A": self.A}

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "LinearAdapter":
        self.task, self.A = task, state["A"]
        return self
