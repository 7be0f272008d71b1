"""ZS-LP and CLAP (Silva-Rodríguez et al., CVPR 2024): a cosine linear head over the embeddings, initialised
with the zero-shot prototypes; CLAP adds a class-wise penalty Σ_c α_c‖w_c − t_c‖² (mean over classes) pulling
each prototype toward its text embedding, with α_c initialised from the zero-shot model's support performance
(mean softmax probability of the true class) and optionally updated per epoch as augmented-Lagrangian
multipliers (PHR; the original's "adaptative" variant).

Defaults follow the original (SGD lr 0.1, momentum 0.9, batch 256, 300 epochs, cosine per epoch, 20 augmented
views of the support). One difference, for speed on cached features: an epoch here is one pass over one view
(N samples, view e mod 20) instead of over all 20 views at once, so 20× fewer optimiser steps. The prototypes
start at the task's L2-normalised classifier (the original uses the unnormalised template mean), so the
penalty's scale is that of unit vectors. Validation-free by design: ``selected_`` records ``how: "rule"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.methods import register
from prolip.methods._common import cosine_head_logits, embed, no_classifier_swap, require_fitted, \
    train_minibatch, view_embeddings
from prolip.methods.base import Method, Support, Task, Validation


def zero_shot_class_performance(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """CLAP's multiplier init: per class, the mean zero-shot softmax probability of the true class."""
    p_true = logits.softmax(-1).gather(1, labels[:, None])[:, 0]
    sums = torch.zeros(num_classes).index_add_(0, labels, p_true)
    counts = torch.zeros(num_classes).index_add_(0, labels, torch.ones_like(p_true))
    return sums / counts.clamp(min=1)


def phr_update(violation: Tensor, multipliers: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """One outer step of the PHR augmented Lagrangian, as CLAP applies it: new multipliers = max(0, λ + ρ·h)'s
    gradient branch, new penalty parameters = the current constraint values."""
    x = multipliers + rho * violation
    return torch.where(x >= 0, x, torch.zeros_like(x)), violation.clone()


@register
class ZSLP(Method):
    name = "zs-lp"
    constrained = False

    def __init__(self, lr: float = 0.1, epochs: int = 300, batch_size: int = 256, views: int = 20,
                 momentum: float = 0.9, adaptive: bool = False):
        super().__init__(lr=lr, epochs=epochs, batch_size=batch_size, views=views, momentum=momentum,
                         **({"adaptive": adaptive} if self.constrained else {}))
        self.lr, self.epochs, self.batch_size, self.views, self.momentum = lr, epochs, batch_size, views, momentum
        self.adaptive = adaptive
        self.task = self.prototypes = None

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "ZSLP":
        self.task = task
        data = view_embeddings(task, support, self.views)
        prototypes = task.classifier.clone().requires_grad_(True)
        anchor = task.classifier
        alpha = torch.zeros(task.num_classes)
        if self.constrained:
            flat = data.reshape(-1, data.shape[-1])
            zs = cosine_head_logits(flat, anchor, task.logit_scale)
            alpha = zero_shot_class_performance(zs, support.labels.repeat(data.shape[0]), task.num_classes)
        state = {"alpha": alpha, "rho": torch.zeros_like(alpha)}

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            loss = F.cross_entropy(cosine_head_logits(x, prototypes, task.logit_scale), y)
            if self.constrained:
                loss = loss + (state["alpha"] * (prototypes - anchor).pow(2).sum(-1)).mean()
            return loss

        def outer_step(epoch: int) -> None:
            if self.constrained and self.adaptive:
                with torch.no_grad():
                    violation = (prototypes - anchor).pow(2).sum(-1)
                state["alpha"], state["rho"] = phr_update(violation, state["alpha"], state["rho"])

        train_minibatch([prototypes], loss_fn, data, support.labels, epochs=self.epochs,
                        batch_size=self.batch_size, optimizer="sgd", lr=self.lr, seed=seed,
                        momentum=self.momentum, on_epoch_end=outer_step)
        self.prototypes = prototypes.detach()
        self.selected_ = {"how": "rule"}
        if self.constrained:
            self.selected_["multipliers_mean"] = state["alpha"].mean().item()
        return self

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        no_classifier_swap(self.name, classifier)
        require_fitted(self, "prototypes")
        return cosine_head_logits(embed(self.task, z), self.prototypes, self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        return {"prototypes": self.prototypes}

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "ZSLP":
        self.task, self.prototypes = task, state["prototypes"]
        return self


@register
class CLAP(ZSLP):
    name = "clap"
    constrained = True
