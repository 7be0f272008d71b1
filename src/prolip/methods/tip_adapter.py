"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a key-value cache of the support set.

logits = s·f·Tᵀ + α · exp(−β(1 − f·Kᵀ)) · onehot(y), f and K L2-normalised embeddings. The keys are the
normalised mean over ``augment_views`` (10) augmented views, as the original builds its cache. α, β are searched
on the few-shot validation set over the original grid (β: 200 steps in [0.1, 7), α: 20 steps in [0.1, 3);
first best in β-major order wins, as in the original); without validation the initial α = β = 1 are kept.
Tip-Adapter-F also trains the keys: AdamW lr 1e-3, eps 1e-4, batch 256, 20 epochs (one augmented view each),
cosine per iteration; the original keeps the epoch with the best *test* accuracy — here the best validation
accuracy when a validation set is given, otherwise the last epoch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.functional import cosine_logits
from prolip.methods import register
from prolip.methods._common import embed, mean_view_embedding, no_classifier_swap, require_fitted, \
    train_minibatch, val_accuracy, view_embeddings
from prolip.methods.base import Method, Support, Task, Validation

BETA_GRID = tuple(0.1 + i * (7 - 0.1) / 200 for i in range(200))
ALPHA_GRID = tuple(0.1 + i * (3 - 0.1) / 20 for i in range(20))


def cache_logits(f_norm: Tensor, keys: Tensor, values: Tensor, beta: float | Tensor) -> Tensor:
    """Tip-Adapter's cache term exp(−β(1 − f·Kᵀ))·V for normalised f [N, D], keys [M, D], values [M, C]."""
    return torch.exp(-beta * (1 - f_norm @ keys.T)) @ values


def search_alpha_beta(zs_logits: Tensor, affinity: Tensor, values: Tensor, labels: Tensor) -> tuple[float, float, float]:
    """Grid search of (α, β) by accuracy, vectorised over α; returns (alpha, beta, accuracy %)."""
    alphas = torch.tensor(ALPHA_GRID)
    best = (-1.0, ALPHA_GRID[0], BETA_GRID[0])
    for beta in BETA_GRID:
        cache = torch.exp(-beta * (1 - affinity)) @ values
        logits = zs_logits + alphas[:, None, None] * cache
        accs = (logits.argmax(-1) == labels).float().mean(-1) * 100
        i = int(accs.argmax())  # first maximum = smallest α, as the original's strict ">" keeps the first
        if accs[i] > best[0]:
            best = (accs[i].item(), ALPHA_GRID[i], beta)
    return best[1], best[2], best[0]


@register
class TipAdapter(Method):
    name = "tip-adapter"
    finetune = False

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, search: bool = True, augment_views: int = 10,
                 lr: float = 1e-3, epochs: int = 20, batch_size: int = 256):
        hp = dict(alpha=alpha, beta=beta, search=search, augment_views=augment_views)
        if self.finetune:
            hp.update(lr=lr, epochs=epochs, batch_size=batch_size)
        super().__init__(**hp)
        self.alpha, self.beta, self.search, self.augment_views = alpha, beta, search, augment_views
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.task = self.keys = self.values = None

    def _logits(self, e: Tensor, keys: Tensor, alpha: float, beta: float) -> Tensor:
        f = F.normalize(e, dim=-1)
        zs = cosine_logits(e, self.task.classifier, self.task.logit_scale)
        return zs + alpha * cache_logits(f, keys, self.values, beta)

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "TipAdapter":
        self.task = task
        self.keys = F.normalize(mean_view_embedding(task, support, self.augment_views), dim=-1)
        self.values = F.one_hot(support.labels, task.num_classes).float()
        self.selected_ = {"alpha": self.alpha, "beta": self.beta, "how": "rule"}
        if self.finetune:
            self._train_keys(support, val, seed)
        if val is not None and self.search:
            e = embed(task, val.features)
            affinity = F.normalize(e, dim=-1) @ self.keys.T
            zs = cosine_logits(e, task.classifier, task.logit_scale)
            alpha, beta, acc = search_alpha_beta(zs, affinity, self.values, val.labels)
            self.selected_.update(alpha=alpha, beta=beta, how="validation", val_accuracy=acc)
        return self

    def _train_keys(self, support: Support, val: Validation | None, seed: int) -> None:
        keys = self.keys.clone().requires_grad_(True)
        data = view_embeddings(self.task, support, self.epochs)
        best = {"acc": -1.0, "keys": keys.detach().clone(), "epoch": -1}
        val_e = None if val is None else embed(self.task, val.features)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(self._logits(x, keys, self.alpha, self.beta), y)

        def keep_best(epoch: int) -> None:
            if val_e is not None:
                with torch.no_grad():
                    acc = val_accuracy(self._logits(val_e, keys, self.alpha, self.beta), val)
                if acc > best["acc"]:
                    best.update(acc=acc, keys=keys.detach().clone(), epoch=epoch)

        train_minibatch([keys], loss_fn, data, support.labels, epochs=self.epochs, batch_size=self.batch_size,
                        optimizer="adamw", lr=self.lr, seed=seed, schedule="iteration", eps=1e-4,
                        on_epoch_end=keep_best)
        if val_e is None:
            self.keys = keys.detach()
            self.selected_["epoch"] = {"value": self.epochs - 1, "how": "last"}
        else:
            self.keys = best["keys"]
            self.selected_["epoch"] = {"value": best["epoch"], "how": "validation"}

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        no_classifier_swap(self.name, classifier)
        require_fitted(self, "keys")
        return self._logits(embed(self.task, z), self.keys, self.selected_["alpha"], self.selected_["beta"])

    def state_dict(self) -> dict[str, Tensor]:
        return {"keys": self.keys, "values": self.values,
                "alpha_beta": torch.tensor([self.selected_["alpha"], self.selected_["beta"]])}

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "TipAdapter":
        self.task, self.keys, self.values = task, state["keys"], state["values"]
        alpha, beta = state["alpha_beta"].tolist()
        self.selected_ = {"alpha": alpha, "beta": beta, "how": "loaded"}
        return self


@register
class TipAdapterF(TipAdapter):
    name = "tip-adapter-f"
    finetune = True
