"""Adapters trained after the frozen projection: CLIP-Adapter, TaskRes and the regularised linear adapter.

- "clip-adapter" (Gao et al., IJCV 2023; github.com/gaopengcuhk/CLIP-Adapter, ``clip_adapter.py``):
  f' = r·MLP(f) + (1 − r)·f, MLP = D→D/4→D without biases, ReLU after both layers, r = 0.2, only the MLP
  trained, nn.Linear's default (seeded) init, so it does not start at zero-shot. The released trainer builds its
  optimiser and schedule from the Dassl/CoOp config it is run with (the repo ships none; its README says to run
  CoOp's commands), so the training defaults are CoOp's ``configs/trainers/CoOp/rn50.yaml``: SGD lr 2e-3,
  momentum 0.9, weight decay 5e-4 (Dassl's default), batch 32, 200 epochs, cosine per epoch after one warm-up
  epoch at 1e-5, last partial batch dropped (Dassl loader). Not verifiable here: the paper's own lr/epochs.
- "taskres" (Yu et al., CVPR 2023; github.com/geekyutao/TaskRes, ``trainers/taskres.py``,
  ``configs/trainers/TaskRes/adam_lr2e-3_B256_ep{100,200}.yaml``, ``train_regular.sh``): classifier t + α·x with
  a learnable residual x initialised at 0 (so it starts at zero-shot), α = 0.5 (1.0 for Flowers); Adam lr 2e-3
  (2e-4 for ImageNet), weight decay 5e-4 (Dassl's default, the configs do not override it), batch 256,
  100 epochs for 1/2/4 shots and 200 for 8/16, same Dassl warm-up + cosine.
- "linear-adapter" (ProLIP paper's complement): an identity-initialised D×D matrix A after the projection,
  logits s·normalize((zW0+b)A)·Tᵀ, loss CE + λ‖A − I‖²_F with λ = 1/N; trained exactly like ProLIP (Adam
  eps 1e-4, cosine, full batch, step t on view t), lr 1e-3 by default since A's entries are O(1).

CLIP-Adapter and TaskRes re-augment every image every epoch in the originals; here epoch e uses cached view
e mod V (V = every cached view, 300 with the default cache, so each of the ≤ 300 epochs sees a fresh view).
TaskRes's base classifier in the original is the *unnormalised* mean text embedding, and Adam's steps are
absolute, so the residual's relative effect depends on that norm; ``text_norm`` scales the task's unit-norm
classifier to it (None = 1, since the cache holds only the normalised classifier).
All three are validation-free: ``selected_`` records ``how: "rule"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prolip.functional import cosine_logits
from prolip.methods import register
from prolip.methods._common import cosine_head_logits, embed, fresh_view_per_epoch, no_classifier_swap, \
    require_fitted, train_minibatch
from prolip.methods.base import Method, Support, Task, Validation
from prolip.methods.prolip import ADAM_BETAS, ADAM_EPS, resolve_lambda


def residual_mlp(dim: int, reduction: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                         nn.Linear(dim // reduction, dim, bias=False), nn.ReLU())


@register
class CLIPAdapter(Method):
    name = "clip-adapter"

    def __init__(self, ratio: float = 0.2,  # clip_adapter.py: ``ratio = 0.2`` in CustomCLIP.forward
                 reduction: int = 4,  # clip_adapter.py: ``Adapter(1024, 4)``
                 lr: float = 2e-3,  # CoOp rn50.yaml OPTIM.LR (the config the released Dassl trainer reads)
                 epochs: int = 200,  # CoOp rn50.yaml OPTIM.MAX_EPOCH
                 batch_size: int = 32,  # CoOp rn50.yaml DATALOADER.TRAIN_X.BATCH_SIZE
                 weight_decay: float = 5e-4,  # Dassl defaults.py OPTIM.WEIGHT_DECAY (not overridden)
                 momentum: float = 0.9,  # Dassl defaults.py OPTIM.MOMENTUM
                 views: int | None = None):
        super().__init__(ratio=ratio, reduction=reduction, lr=lr, epochs=epochs, batch_size=batch_size,
                         weight_decay=weight_decay, momentum=momentum, views=views)
        self.ratio, self.reduction, self.lr, self.epochs, self.batch_size = ratio, reduction, lr, epochs, batch_size
        self.weight_decay, self.momentum, self.views = weight_decay, momentum, views
        self.task = self.mlp = None

    def _adapt(self, e: Tensor) -> Tensor:
        return self.ratio * self.mlp(e) + (1 - self.ratio) * e

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "CLIPAdapter":
        self.task = task
        torch.manual_seed(seed)  # the MLP's init, as nn.Linear draws it
        self.mlp = residual_mlp(task.classifier.shape[1], self.reduction)
        loss_fn = lambda x, y: F.cross_entropy(cosine_logits(self._adapt(x), task.classifier, task.logit_scale), y)
        train_minibatch(self.mlp.parameters(), loss_fn, fresh_view_per_epoch(task, support, self.views),
                        epochs=self.epochs, batch_size=self.batch_size, optimizer="sgd", lr=self.lr, seed=seed,
                        drop_last=True, momentum=self.momentum, weight_decay=self.weight_decay)
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
        self.task, self.mlp = task, residual_mlp(task.classifier.shape[1], self.reduction)
        self.mlp.load_state_dict({k.removeprefix("mlp."): v for k, v in state.items()})
        self.mlp.requires_grad_(False)
        return self


def taskres_epochs(shots: int) -> int:
    """TaskRes's train_regular.sh: the ep100 config for 1/2/4 shots, ep200 for 8/16."""
    return 100 if shots <= 4 else 200


@register
class TaskRes(Method):
    name = "taskres"

    def __init__(self, alpha: float = 0.5,  # train_regular.sh RESIDUAL_SCALE (1.0 only for Flowers)
                 lr: float = 2e-3,  # adam_lr2e-3_B256_ep*.yaml OPTIM.LR (ImageNet: adam_lr2e-4)
                 epochs: int | None = None,  # None = taskres_epochs(shots): 100 for ≤ 4 shots, else 200
                 batch_size: int = 256,  # DATALOADER.TRAIN_X.BATCH_SIZE
                 weight_decay: float = 5e-4,  # Dassl defaults.py OPTIM.WEIGHT_DECAY, passed to Adam
                 text_norm: float | None = None, views: int | None = None):
        super().__init__(alpha=alpha, lr=lr, epochs=epochs, batch_size=batch_size, weight_decay=weight_decay,
                         text_norm=text_norm, views=views)
        self.alpha, self.lr, self.epochs, self.batch_size = alpha, lr, epochs, batch_size
        self.weight_decay, self.text_norm, self.views = weight_decay, text_norm, views
        self.task = self.residual = None

    def _base(self) -> Tensor:
        return self.task.classifier * (1.0 if self.text_norm is None else self.text_norm)

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "TaskRes":
        self.task = task
        base = self._base()
        residual = torch.zeros_like(base, requires_grad=True)
        epochs = self.epochs if self.epochs is not None else taskres_epochs(task.shots)
        loss_fn = lambda x, y: F.cross_entropy(cosine_head_logits(x, base + self.alpha * residual,
                                                                  task.logit_scale), y)
        train_minibatch([residual], loss_fn, fresh_view_per_epoch(task, support, self.views), epochs=epochs,
                        batch_size=self.batch_size, optimizer="adam", lr=self.lr, seed=seed, drop_last=True,
                        weight_decay=self.weight_decay)
        self.residual = residual.detach()
        self.selected_ = {"epochs": epochs, "how": "rule"}
        return self

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        no_classifier_swap(self.name, classifier)
        require_fitted(self, "residual")
        return cosine_head_logits(embed(self.task, z), self._base() + self.alpha * self.residual,
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
