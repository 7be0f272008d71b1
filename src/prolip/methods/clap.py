"""ZS-LP and CLAP (Silva-Rodríguez et al., CVPR 2024; github.com/jusiro/CLAP, ``trainers/adapters.py``): a cosine
linear head over the embeddings, initialised with the zero-shot prototypes; CLAP adds a class-wise penalty
mean_c α_c‖w_c − t_c‖² pulling each prototype toward its text embedding, with α_c initialised from the zero-shot
model's support performance (per class, mean softmax probability of the true class over the augmented support
features: ``init_lagrangian_multipliers``). The multipliers stay fixed: the paper's runs use constraint "l2"
(``experiments/experiment_CLAP.txt``); ``adaptive=True`` gives the repo's "adaptative" variant, one PHR
augmented-Lagrangian outer step per epoch (``outer_step``: α ← max(0, α + ρ·h)'s gradient branch, ρ ← h).

Training, verified against ``configs/trainers/SGD_lr1e-1_B256_ep300.yaml`` and ``TrainerXCostume.run_epoch``:
SGD lr 0.1, momentum 0.9, weight decay 0, batch 256, 300 epochs, Dassl cosine per epoch after one warm-up epoch
at 1e-5. The support set is featurised once with 20 augmented passes (``epochs_aumentation = 20``), pooled
(20·N samples), and every epoch shuffles the pool and takes as many batches of 256 as the Dassl loader of the N
support images has (N // 256, at least 1): so an epoch mixes views and, below 256 images, draws 256 samples
from the pool. All of this is reproduced on the cached views (the first ``views`` = 20 of them).

The prototypes start at the *unnormalised* mean text embedding (``_get_base_text_features``: ``mean(1)`` of the
raw text-encoder outputs, one template or the ImageNet ensemble), ``task.text_mean``; the head is scale-invariant
but SGD and the penalty are not, so the norm matters. Validation-free by design: ``selected_``
records ``how: "rule"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.constraints import LEARNING_RATE, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT, Flag
from prolip.methods import register
from prolip.methods._common import (
    cosine_head_logits,
    dassl_batches_per_epoch,
    embed,
    text_mean,
    train_minibatch,
    view_embeddings,
)
from prolip.methods.base import Capabilities, Method, Support, Task, Validation


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
    # Dassl's random_resized_crop (INPUT.RRCROP_SCALE 0.08–1) + random_flip
    capabilities = Capabilities(augmentation="dassl")
    constrained = False
    constraints = {
        "lr": LEARNING_RATE,
        "epochs": NON_NEGATIVE_INT,
        "batch_size": POSITIVE_INT,
        "views": POSITIVE_INT,
        "momentum": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
    }

    def __init__(
        self,
        lr: float = 0.1,  # SGD_lr1e-1_B256_ep300.yaml OPTIM.LR
        epochs: int = 300,  # OPTIM.MAX_EPOCH
        batch_size: int = 256,  # DATALOADER.TRAIN_X.BATCH_SIZE
        views: int = 20,  # adapters.py AdapterMethod.epochs_aumentation
        momentum: float = 0.9,  # Dassl defaults.py OPTIM.MOMENTUM
        weight_decay: float = 0.0,
    ):  # OPTIM.WEIGHT_DECAY: 0.0 in the CLAP config
        self.lr, self.epochs, self.batch_size, self.views, self.momentum = lr, epochs, batch_size, views, momentum
        self.weight_decay = weight_decay
        self.adaptive = False
        self.prototypes: Tensor | None = None

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        data = view_embeddings(task, support, self.views)  # [V, N, D]: the original's 20 augmented passes
        pool = data.reshape(-1, data.shape[-1])
        pool_labels = support.labels.repeat(data.shape[0])
        anchor = text_mean(task, self.name)
        prototypes = anchor.clone().requires_grad_(True)
        alpha = torch.zeros(task.num_classes)
        if self.constrained:
            zs = cosine_head_logits(pool, anchor, task.logit_scale)
            alpha = zero_shot_class_performance(zs, pool_labels, task.num_classes)
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

        train_minibatch(
            [prototypes],
            loss_fn,
            lambda e: (pool, pool_labels),
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="sgd",
            lr=self.lr,
            seed=seed,
            batches_per_epoch=dassl_batches_per_epoch(support.labels.shape[0], self.batch_size),
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            on_epoch_end=outer_step,
        )
        self.prototypes = prototypes.detach()
        self.selected_ = {"how": "rule"}
        if self.constrained:
            self.selected_["multipliers_mean"] = state["alpha"].mean().item()

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None and self.prototypes is not None
        return cosine_head_logits(embed(self.task, z), self.prototypes, self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.prototypes is None else {"prototypes": self.prototypes}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        return {"prototypes": tuple(task.classifier.shape)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.prototypes = state["prototypes"]


@register
class CLAP(ZSLP):
    name = "clap"
    constrained = True
    constraints = {**ZSLP.constraints, "adaptive": Flag()}

    def __init__(
        self,
        lr: float = 0.1,
        epochs: int = 300,
        batch_size: int = 256,
        views: int = 20,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        adaptive: bool = False,
    ):
        super().__init__(lr, epochs, batch_size, views, momentum, weight_decay)
        self.adaptive = adaptive
