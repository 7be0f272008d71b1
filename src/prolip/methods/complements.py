"""The ProLIP paper's complements (§5, Tables 7, 8, 13), as the reference code (github.com/astra-vision/ProLIP)
trains them: full batch, one cached view per step in the reference's order ((t+1) mod V), cosine to 0 over the
steps, λ = 1/N, eps 1e-4, float32 here (the reference ran float16: see ``prolip``'s ``precision``). Where W trains,
its last ``Task.frozen_rows`` rows (a MAP head's residual) stay W0's, out of the optimiser, as in ProLIP.

- "prolip+tip-adapter-f" (``methods/ProLIP_Tip.py``, ``configs/experiments/prolip_tip.yaml``): W and a Tip-Adapter
  cache trained jointly. Keys K0 = n(mean over ``augment_views`` views of n(f(W0, z))) (``methods/utils.py``
  ``build_cache_model``: features normalised per view before averaging, ``augment_epoch`` 1), values one-hot;
  logits = s·n(f(W, z))·Tᵀ + α·exp(−β(1 − a))·V with affinity a = n(f(W, z))·Kᵀ; loss CE + λ‖W − W0‖²; AdamW
  (eps 1e-4, PyTorch's default weight decay 0.01, applied to W and K) over W and K, lr 1e-4; α = β = 1, no
  search. Quirk (``ProLIP_Tip.py`` lines 90–91): the "frozen" projection that computes the affinity is built from
  the same tensor as W, so it follows the current W, without gradient. Kept as the default;
  ``affinity_projection="pretrained"`` computes the affinity with the true W0, as its name intends.
- "prolip+taskres" (``methods/ProLIP_TaskRes.py``): logits = s·n(f(W, z))·Tᵀ + 0.1·s·n(f(W0, z))·R, the residual
  R [D, C] starting at zero and scoring the frozen W0 projection (a real copy there); loss CE + λ‖W − W0‖², R
  unregularised; Adam over W and R, lr 1e-4.
- "prolip-text" (``methods/ProLIP_text.py``): the text projection P trains, the image side stays at W0. Quirk:
  the class weights are t_c = n(mean over templates of u_{c,k}·P) with u the *unnormalised* pre-projection text
  features (lines 175–177), so with several templates step 0 is not the usual template ensemble (which
  normalises each template first); ``normalise_templates=True`` uses the ensemble instead. Loss CE + λ‖P − P0‖².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.constraints import (
    LEARNING_RATE,
    NON_NEGATIVE,
    POSITIVE_INT,
    Choice,
    Flag,
    Lambda,
    Number,
    resolve_lambda,
)
from prolip.functional import cosine_logits, map_rows, proximal_penalty
from prolip.methods import register
from prolip.methods._common import embed, join_rows, split_rows
from prolip.methods.base import Capabilities, Method, Support, Task, Validation
from prolip.optim import train_full_batch, view_for_step

STEPS = Number(low=0, integer=True)


def _view(support: Support, t: int) -> Tensor:
    return support.views.view(view_for_step(t, support.views.num_views))


def tip_cache_keys(task: Task, W: Tensor, support: Support, augment_views: int) -> Tensor:
    """n(mean over the first ``augment_views`` cached views of n(f(W, z))): ``build_cache_model`` of the reference."""
    count = max(1, min(augment_views, support.views.num_views))
    per_view = [F.normalize(embed_with(task, W, support.views.view(v)), dim=-1) for v in range(count)]
    return F.normalize(torch.stack(per_view).mean(0), dim=-1)


def embed_with(task: Task, W: Tensor, z: Tensor) -> Tensor:
    out = z @ W
    return out if task.bias is None else out + task.bias


@register
class ProLIPTipAdapterF(Method):
    name = "prolip+tip-adapter-f"
    constraints = {
        "lr": LEARNING_RATE,
        "lam": Lambda(),
        "steps": STEPS,
        "alpha": NON_NEGATIVE,
        "beta": NON_NEGATIVE,
        "augment_views": POSITIVE_INT,
        "weight_decay": NON_NEGATIVE,
        "affinity_projection": Choice(("current", "pretrained")),
    }

    def __init__(
        self,
        lr: float = 1e-4,  # prolip_tip.yaml lr_v
        lam: str | float = "1/N",  # prolip_tip.yaml lambda_funct_1_N
        steps: int = 300,  # train_epoch
        alpha: float = 1.0,  # init_alpha
        beta: float = 1.0,  # init_beta
        augment_views: int = 1,  # augment_epoch
        weight_decay: float = 0.01,  # torch.optim.AdamW's default (ProLIP_Tip.py passes none)
        affinity_projection: str = "current",
    ):
        self.lr, self.lam, self.steps, self.alpha, self.beta = lr, lam, steps, alpha, beta
        self.augment_views, self.weight_decay, self.affinity_projection = (
            augment_views,
            weight_decay,
            affinity_projection,
        )
        self.W: Tensor | None = None
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def _blend(self, z: Tensor, W: Tensor, keys: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None and self.values is not None
        f = F.normalize(embed_with(self.task, W, z), dim=-1)
        W_affinity = self.task.W0 if self.affinity_projection == "pretrained" else W.detach()
        affinity = F.normalize(embed_with(self.task, W_affinity, z), dim=-1) @ keys.T
        cache = torch.exp(-self.beta * (1 - affinity)) @ self.values
        return self.task.logit_scale * f @ classifier.T + self.alpha * cache

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        lam = resolve_lambda(self.lam, task.shots)
        self.values = F.one_hot(support.labels, task.num_classes).float()
        W0t, W0_frozen = split_rows(task.W0, task.frozen_rows)
        Wt, keys = W0t.clone(), tip_cache_keys(task, task.W0, support, self.augment_views)

        def loss_at(t: int) -> Tensor:
            W = join_rows(Wt, W0_frozen)
            # The support × keys affinity a block of rows at a time, rebuilt in backward: at ImageNet size
            # (16,000 × 16,000) the whole one and its exponential would be kept for backward, 2 GB.
            logits = map_rows(
                lambda rows: self._blend(rows, W, keys, task.classifier),
                _view(support, t),
                keys.shape[0],
                recompute_in_backward=True,
            )
            return F.cross_entropy(logits, support.labels) + lam * proximal_penalty(Wt, W0t)

        train_full_batch([Wt, keys], loss_at, steps=self.steps, lr=self.lr, weight_decay=self.weight_decay)
        self.W, self.keys = join_rows(Wt, W0_frozen), keys
        self.selected_ = {"lr": self.lr, "lam": lam, "alpha": self.alpha, "beta": self.beta, "how": "rule"}

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.W is not None and self.keys is not None
        W, keys = self.W, self.keys
        # Test × support affinities a block of test rows at a time: the peak no longer grows with the test set.
        return map_rows(lambda rows: self._blend(rows, W, keys, classifier), z, keys.shape[0])

    def state_dict(self) -> dict[str, Tensor]:
        if self.W is None or self.keys is None or self.values is None:
            return {}
        return {"W": self.W, "keys": self.keys, "values": self.values}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        return {"W": tuple(task.W0.shape), "keys": (-1, task.W0.shape[1]), "values": (-1, task.num_classes)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.W, self.keys, self.values = state["W"], state["keys"], state["values"]


@register
class ProLIPTaskRes(Method):
    name = "prolip+taskres"
    constraints = {"lr": LEARNING_RATE, "lam": Lambda(), "steps": STEPS, "scale": NON_NEGATIVE}

    def __init__(
        self,
        lr: float = 1e-4,  # prolip_taskres.yaml lr_v
        lam: str | float = "1/N",
        steps: int = 300,
        scale: float = 0.1,
    ):  # ProLIP_TaskRes.py line 43: ``0.1 * 100 * ... @ R``
        self.lr, self.lam, self.steps, self.scale = lr, lam, steps, scale
        self.W: Tensor | None = None
        self.residual: Tensor | None = None

    def _blend(self, z: Tensor, W: Tensor, residual: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None
        s = self.task.logit_scale
        adapted = s * F.normalize(embed_with(self.task, W, z), dim=-1) @ classifier.T
        return adapted + self.scale * s * F.normalize(embed(self.task, z), dim=-1) @ residual

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        lam = resolve_lambda(self.lam, task.shots)
        W0t, W0_frozen = split_rows(task.W0, task.frozen_rows)
        Wt, residual = W0t.clone(), torch.zeros(task.W0.shape[1], task.num_classes)

        def loss_at(t: int) -> Tensor:
            W = join_rows(Wt, W0_frozen)
            ce = F.cross_entropy(self._blend(_view(support, t), W, residual, task.classifier), support.labels)
            return ce + lam * proximal_penalty(Wt, W0t)

        train_full_batch([Wt, residual], loss_at, steps=self.steps, lr=self.lr)
        self.W, self.residual = join_rows(Wt, W0_frozen), residual
        self.selected_ = {"lr": self.lr, "lam": lam, "how": "rule"}

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.W is not None and self.residual is not None
        return self._blend(z, self.W, self.residual, classifier)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.W is None or self.residual is None else {"W": self.W, "residual": self.residual}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        return {"W": tuple(task.W0.shape), "residual": (task.W0.shape[1], task.num_classes)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.W, self.residual = state["W"], state["residual"]


def text_classifier(text_pre: Tensor, text_proj: Tensor, normalise_templates: bool = False) -> Tensor:
    """Class weights [C, D] from pre-projection text features [C, n_t, Dt] and a text projection [Dt, D]:
    n(mean_k u_k·P) as the reference, or with ``normalise_templates`` the ensemble n(mean_k n(u_k·P))."""
    per_template = text_pre @ text_proj
    if normalise_templates:
        per_template = F.normalize(per_template, dim=-1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


@register
class ProLIPText(Method):
    name = "prolip-text"
    capabilities = Capabilities(uses_text_side=True)
    constraints = {"lr": LEARNING_RATE, "lam": Lambda(), "steps": STEPS, "normalise_templates": Flag()}

    def __init__(
        self,
        lr: float = 1e-5,  # prolip_text_lr{1e-2,1e-3,1e-4,1e-5}_lambda_1_N.yaml
        lam: str | float = "1/N",
        steps: int = 300,
        normalise_templates: bool = False,
    ):
        self.lr, self.lam, self.steps, self.normalise_templates = lr, lam, steps, normalise_templates
        self.P: Tensor | None = None
        self.class_weights: Tensor | None = None

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        assert task.text_pre is not None and task.text_proj is not None
        lam = resolve_lambda(self.lam, task.shots)
        text_pre, P0 = task.text_pre.float(), task.text_proj.float()
        P = P0.clone()

        def loss_at(t: int) -> Tensor:
            weights = text_classifier(text_pre, P, self.normalise_templates)
            logits = cosine_logits(embed(task, _view(support, t)), weights, task.logit_scale)
            return F.cross_entropy(logits, support.labels) + lam * proximal_penalty(P, P0)

        train_full_batch([P], loss_at, steps=self.steps, lr=self.lr)
        self.P, self.class_weights = P, text_classifier(text_pre, P, self.normalise_templates)
        self.selected_ = {"lr": self.lr, "lam": lam, "how": "rule"}

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None and self.class_weights is not None
        return cosine_logits(embed(self.task, z), self.class_weights, self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        # The adapted class weights are saved, so reloading needs no text encoder pass.
        if self.P is None or self.class_weights is None:
            return {}
        return {"text_proj": self.P, "classifier": self.class_weights}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        return {"text_proj": (-1, task.W0.shape[1]), "classifier": tuple(task.classifier.shape)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.P, self.class_weights = state["text_proj"], state["classifier"]
