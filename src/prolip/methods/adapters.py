"""Adapters trained after the frozen projection: CLIP-Adapter (original and the ProLIP paper's variant), TaskRes
and the regularised linear adapter.

- "clip-adapter" (Gao et al., IJCV 2023; github.com/gaopengcuhk/CLIP-Adapter, ``clip_adapter.py``):
  f' = r·MLP(f) + (1 − r)·f, MLP = D→D/4→D without biases, ReLU after both layers, r = 0.2, only the MLP
  trained, nn.Linear's default (seeded) init, so it does not start at zero-shot. The released trainer builds its
  optimiser and schedule from the Dassl/CoOp config it is run with (the repo ships none; its README says to run
  CoOp's commands), so the training defaults are CoOp's ``configs/trainers/CoOp/rn50.yaml``: SGD lr 2e-3,
  momentum 0.9, weight decay 5e-4 (Dassl's default), batch 32, 200 epochs, cosine per epoch after one warm-up
  epoch at 1e-5, last partial batch dropped (Dassl loader).
- "clip-adapter-prolip": CLIP-Adapter as the ProLIP paper trains it for its comparison (Fig. 4, Table 16;
  astra-vision/ProLIP ``methods/CLIP_ADAPTER.py``): h = α·f + (1 − α)·ReLU(ReLU(f·A1ᵀ)·A2ᵀ), f = zW0 + b — here α
  weights the *zero-shot* branch (α = 1 is zero-shot), the reverse of the original's ratio; reduction 4, no
  biases; CE only; Adam (eps 1e-4), 300 full-batch steps on cached view (t+1) mod V, cosine; the paper sweeps
  lr ∈ {1e-2, 1e-3, 1e-4, 1e-5} × α ∈ {0, .1, .3, .5, .7, .9} (configs ``CA_lr*_alpha_*.yaml``).
- "taskres" (Yu et al., CVPR 2023; github.com/geekyutao/TaskRes, ``trainers/taskres.py``,
  ``configs/trainers/TaskRes/adam_lr2e-3_B256_ep{100,200}.yaml``, ``train_regular.sh``): classifier t + α·x with
  a learnable residual x initialised at 0 (so it starts at zero-shot), α = 0.5 (1.0 for Flowers); Adam lr 2e-3
  (2e-4 for ImageNet), weight decay 5e-4 (Dassl's default, the configs do not override it), batch 256,
  100 epochs for 1/2/4 shots and 200 for 8/16, same Dassl warm-up + cosine. The base t is the *unnormalised*
  mean text embedding (``_get_base_text_features``: ``stack(...).mean(1)`` without normalising), taken from
  ``task.text_mean``.
- "linear-adapter", the paper's regularised linear adapter (RLA; ``methods/RegLinearAdapter.py``): an
  identity-initialised D×D matrix A after the frozen projection, logits s·normalize((zW0+b)Aᵀ)·Tᵀ, loss
  CE + λ‖A − I‖² (a sum) with λ = 1/N, trained like ProLIP (Adam eps 1e-4, cosine, full batch, view (t+1) mod V);
  the paper sweeps lr 1e-2…1e-5 (configs ``RLA_lr*_lambda_1_N.yaml``); ``grid=True`` runs the reference's 7×7
  (lr, λ) validation grid (``search_init_hp``, first best in loop order).

CLIP-Adapter and TaskRes re-augment every image every epoch in the originals; here epoch e uses cached view
e mod V (V = every cached view, 300 with the default cache, so each of the ≤ 300 epochs sees a fresh view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prolip.constraints import (
    FRACTION,
    LEARNING_RATE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    Flag,
    Lambda,
    Number,
    resolve_lambda,
)
from prolip.functional import accuracy, cosine_logits, proximal_penalty
from prolip.methods import register
from prolip.methods._common import cosine_head_logits, embed, fresh_view_per_epoch, text_mean, train_minibatch
from prolip.methods.base import Capabilities, Method, Support, Task, Validation
from prolip.methods.prolip import GRID_LAMS, GRID_LRS
from prolip.optim import train_full_batch, view_for_step


def residual_mlp(dim: int, reduction: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(), nn.Linear(dim // reduction, dim, bias=False), nn.ReLU()
    )


class _ResidualMLPMethod(Method):
    """Shared by both CLIP-Adapters: a seeded residual MLP after the frozen projection, scoring any classifier."""

    capabilities = Capabilities(accepts_classifier=True)
    reduction: int
    mlp: nn.Sequential | None = None

    def _adapt(self, e: Tensor) -> Tensor:
        raise NotImplementedError

    def _new_mlp(self, task: Task, seed: int) -> nn.Sequential:
        torch.manual_seed(seed)  # the MLP's init, as nn.Linear draws it
        return residual_mlp(task.classifier.shape[1], self.reduction)

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None
        return cosine_logits(self._adapt(embed(self.task, z)), classifier, self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.mlp is None else {f"mlp.{k}": v for k, v in self.mlp.state_dict().items()}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        D = task.classifier.shape[1]
        return {"mlp.0.weight": (D // self.reduction, D), "mlp.2.weight": (D, D // self.reduction)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.mlp = residual_mlp(task.classifier.shape[1], self.reduction)
        self.mlp.load_state_dict({k.removeprefix("mlp."): v for k, v in state.items()})
        self.mlp.requires_grad_(False)


@register
class CLIPAdapter(_ResidualMLPMethod):
    name = "clip-adapter"
    # Dassl's random_resized_crop (INPUT.RRCROP_SCALE 0.08–1) + random_flip
    capabilities = Capabilities(accepts_classifier=True, augmentation="dassl")
    constraints = {
        "ratio": FRACTION,
        "reduction": POSITIVE_INT,
        "lr": LEARNING_RATE,
        "epochs": NON_NEGATIVE_INT,
        "batch_size": POSITIVE_INT,
        "weight_decay": NON_NEGATIVE,
        "momentum": NON_NEGATIVE,
        "views": Number(low=1, integer=True, optional=True),
    }

    def __init__(
        self,
        ratio: float = 0.2,  # clip_adapter.py: ``ratio = 0.2`` in CustomCLIP.forward
        reduction: int = 4,  # clip_adapter.py: ``Adapter(1024, 4)``
        lr: float = 2e-3,  # CoOp rn50.yaml OPTIM.LR (the config the released Dassl trainer reads)
        epochs: int = 200,  # CoOp rn50.yaml OPTIM.MAX_EPOCH
        batch_size: int = 32,  # CoOp rn50.yaml DATALOADER.TRAIN_X.BATCH_SIZE
        weight_decay: float = 5e-4,  # Dassl defaults.py OPTIM.WEIGHT_DECAY (not overridden)
        momentum: float = 0.9,  # Dassl defaults.py OPTIM.MOMENTUM
        views: int | None = None,
    ):
        self.ratio, self.reduction, self.lr, self.epochs, self.batch_size = ratio, reduction, lr, epochs, batch_size
        self.weight_decay, self.momentum, self.views = weight_decay, momentum, views

    def _adapt(self, e: Tensor) -> Tensor:
        assert self.mlp is not None
        return self.ratio * self.mlp(e) + (1 - self.ratio) * e

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        self.mlp = self._new_mlp(task, seed)
        loss_fn = lambda x, y: F.cross_entropy(cosine_logits(self._adapt(x), task.classifier, task.logit_scale), y)
        train_minibatch(
            self.mlp.parameters(),
            loss_fn,
            fresh_view_per_epoch(task, support, self.views),
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="sgd",
            lr=self.lr,
            seed=seed,
            drop_last=True,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        self.mlp.requires_grad_(False)
        self.selected_ = {"how": "rule"}


@register
class CLIPAdapterProLIP(_ResidualMLPMethod):
    name = "clip-adapter-prolip"
    constraints = {
        "alpha": FRACTION,
        "reduction": POSITIVE_INT,
        "lr": LEARNING_RATE,
        "steps": Number(low=0, integer=True),
    }

    def __init__(
        self,
        alpha: float = 0.5,  # CLIP_ADAPTER.py ``alpha`` (configs CA_lr*_alpha_*.yaml: 0 … 0.9)
        lr: float = 1e-3,  # ``lr_adapter`` (configs: 1e-2 … 1e-5)
        steps: int = 300,  # ``train_epoch``: one full-batch step per cached view
        reduction: int = 4,
    ):  # CLIP_ADAPTER.py: ``Adapter(D, 4)``
        self.alpha, self.lr, self.steps, self.reduction = alpha, lr, steps, reduction

    def _adapt(self, e: Tensor) -> Tensor:
        assert self.mlp is not None
        return self.alpha * e + (1 - self.alpha) * self.mlp(e)

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        self.mlp = self._new_mlp(task, seed)
        params = list(self.mlp.parameters())

        def loss_at(t: int) -> Tensor:
            e = embed(task, support.views.view(view_for_step(t, support.views.num_views)))
            return F.cross_entropy(cosine_logits(self._adapt(e), task.classifier, task.logit_scale), support.labels)

        train_full_batch(params, loss_at, steps=self.steps, lr=self.lr)
        self.selected_ = {"how": "rule"}


def taskres_epochs(shots: int) -> int:
    """TaskRes's train_regular.sh: the ep100 config for 1/2/4 shots, ep200 for 8/16."""
    return 100 if shots <= 4 else 200


@register
class TaskRes(Method):
    name = "taskres"
    # Dassl's random_resized_crop (INPUT.RRCROP_SCALE 0.08–1) + random_flip
    capabilities = Capabilities(augmentation="dassl")
    # train_regular.sh: RESIDUAL_SCALE 1.0 for Flowers (0.5 elsewhere); the adam_lr2e-4 configs for ImageNet.
    dataset_defaults = {"OxfordFlowers": {"alpha": 1.0}, "ImageNet": {"lr": 2e-4}}
    constraints = {
        "alpha": NON_NEGATIVE,
        "lr": LEARNING_RATE,
        "epochs": Number(low=0, integer=True, optional=True),
        "batch_size": POSITIVE_INT,
        "weight_decay": NON_NEGATIVE,
        "views": Number(low=1, integer=True, optional=True),
    }

    def __init__(
        self,
        alpha: float = 0.5,  # train_regular.sh RESIDUAL_SCALE (1.0 only for Flowers)
        lr: float = 2e-3,  # adam_lr2e-3_B256_ep*.yaml OPTIM.LR (ImageNet: adam_lr2e-4)
        epochs: int | None = None,  # None = taskres_epochs(shots): 100 for ≤ 4 shots, else 200
        batch_size: int = 256,  # DATALOADER.TRAIN_X.BATCH_SIZE
        weight_decay: float = 5e-4,  # Dassl defaults.py OPTIM.WEIGHT_DECAY, passed to Adam
        views: int | None = None,
    ):
        self.alpha, self.lr, self.epochs, self.batch_size = alpha, lr, epochs, batch_size
        self.weight_decay, self.views = weight_decay, views
        self.base: Tensor | None = None
        self.residual: Tensor | None = None

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        base = text_mean(task, self.name)
        residual = torch.zeros_like(base, requires_grad=True)
        epochs = self.epochs if self.epochs is not None else taskres_epochs(task.shots)
        loss_fn = lambda x, y: F.cross_entropy(cosine_head_logits(x, base + self.alpha * residual, task.logit_scale), y)
        train_minibatch(
            [residual],
            loss_fn,
            fresh_view_per_epoch(task, support, self.views),
            epochs=epochs,
            batch_size=self.batch_size,
            optimizer="adam",
            lr=self.lr,
            seed=seed,
            drop_last=True,
            weight_decay=self.weight_decay,
        )
        self.base, self.residual = base, residual.detach()
        self.selected_ = {"epochs": epochs, "how": "rule"}

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None and self.base is not None and self.residual is not None
        return cosine_head_logits(embed(self.task, z), self.base + self.alpha * self.residual, self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.residual is None or self.base is None else {"base": self.base, "residual": self.residual}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        return {"base": tuple(task.classifier.shape), "residual": tuple(task.classifier.shape)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.base, self.residual = state["base"], state["residual"]


@register
class LinearAdapter(Method):
    name = "linear-adapter"
    capabilities = Capabilities(accepts_classifier=True, selects="lr and λ on the reference's 7×7 grid")
    validation_params = {"grid": True}
    constraints = {"lr": LEARNING_RATE, "lam": Lambda(), "steps": Number(low=0, integer=True), "grid": Flag()}

    def __init__(self, lr: float = 1e-3, lam: str | float = "1/N", steps: int = 300, grid: bool = False):
        self.lr, self.lam, self.steps, self.grid = lr, lam, steps, grid
        self.A: Tensor | None = None

    def _train(self, task: Task, support: Support, lr: float, lam: float) -> Tensor:
        eye = torch.eye(task.classifier.shape[1])
        A = eye.clone()

        def loss_at(t: int) -> Tensor:
            e = embed(task, support.views.view(view_for_step(t, support.views.num_views)))
            ce = F.cross_entropy(cosine_logits(e @ A.T, task.classifier, task.logit_scale), support.labels)
            return ce + lam * proximal_penalty(A, eye)

        train_full_batch([A], loss_at, steps=self.steps, lr=lr)
        return A

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        if not self.grid:
            lam = resolve_lambda(self.lam, task.shots)
            self.A = self._train(task, support, self.lr, lam)
            self.selected_ = {"lr": self.lr, "lam": lam, "how": "rule"}
            return
        if val is None:
            raise ValueError("linear-adapter grid search needs a few-shot validation set (CLI: --validate)")
        best: tuple[float, float, float, Tensor | None] = (-1.0, 0.0, 0.0, None)
        for lr in GRID_LRS:  # the reference's loop order; its strict ">" keeps the first best
            for lam in GRID_LAMS:
                A = self._train(task, support, lr, lam)
                e = embed(task, val.features)
                acc = accuracy(cosine_logits(e @ A.T, task.classifier, task.logit_scale), val.labels)
                if acc > best[0]:
                    best = (acc, lr, lam, A)
        self.A = best[3]
        self.selected_ = {"lr": best[1], "lam": best[2], "how": "validation", "val_accuracy": best[0]}

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None and self.A is not None
        return cosine_logits(embed(self.task, z) @ self.A.T, classifier, self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.A is None else {"A": self.A}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        D = task.classifier.shape[1]
        return {"A": (D, D)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.A = state["A"]
