"""Linear probe (CLIP/CoOp): L2-regularised logistic regression on L2-normalised embeddings z·W0+b; ignores text.

Features: the un-augmented support features (``support.center``; view 0 if the cache holds none), as CoOp's
linear probe does. C is searched on the few-shot validation set the way CoOp's script does: a coarse sweep over
C ∈ {1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6}, then ``search_steps`` refinements of ±1, ±½, … decades around the best (ties → smaller C).
Without validation, C = 1 (scikit-learn's default) — recorded as ``how: "rule"``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from prolip.methods import register
from prolip.methods._common import embed, no_classifier_swap, require_fitted
from prolip.methods.base import Method, Support, Task, Validation

COARSE_C = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


def _features(task: Task, z: Tensor) -> np.ndarray:
    return F.normalize(embed(task, z), dim=-1).numpy()


def fit_logreg(x: np.ndarray, y: np.ndarray, C: float, seed: int, max_iter: int) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(x, y)


def _best_c(acc: dict[float, float]) -> float:
    """Best validation accuracy; ties → the smallest C (strongest regularisation)."""
    return min(acc, key=lambda C: (-acc[C], C))


@register
class LinearProbe(Method):
    name = "linear-probe"

    def __init__(self, C: float | None = None, search_steps: int = 4, max_iter: int = 1000):
        super().__init__(C=C, search_steps=search_steps, max_iter=max_iter)
        self.C, self.search_steps, self.max_iter = C, search_steps, max_iter
        self.task = self.coef = self.intercept = None

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "LinearProbe":
        self.task = task
        z = support.center if support.center is not None else support.views.view(0)
        x, y = _features(task, z), support.labels.numpy()
        if self.C is not None or val is None:
            C, how = (self.C if self.C is not None else 1.0), ("given" if self.C is not None else "rule")
            clf = fit_logreg(x, y, C, seed, self.max_iter)
        else:
            xv, yv = _features(task, val.features), val.labels.numpy()
            acc: dict[float, float] = {}
            for C in COARSE_C:
                acc[C] = fit_logreg(x, y, C, seed, self.max_iter).score(xv, yv)
            best = _best_c(acc)
            step = 1.0  # decades: the coarse grid is 2 apart, so refine ±1, then ±0.5, ...
            for _ in range(self.search_steps):
                for C in (best * 10 ** -step, best * 10 ** step):
                    if C not in acc:
                        acc[C] = fit_logreg(x, y, C, seed, self.max_iter).score(xv, yv)
                best = _best_c(acc)
                step /= 2
            C, how = best, "validation"
            clf = fit_logreg(x, y, C, seed, self.max_iter)
        self.coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
        self.intercept = torch.as_tensor(clf.intercept_, dtype=torch.float32)
        if self.coef.shape[0] != task.num_classes:
            raise ValueError(f"linear-probe: the support set has {self.coef.shape[0]} distinct labels but the task "
                             f"has {task.num_classes} classes; every class needs at least one support image")
        self.selected_ = {"C": C, "how": how}
        return self

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        no_classifier_swap(self.name, classifier)
        require_fitted(self, "coef")
        return F.normalize(embed(self.task, z), dim=-1) @ self.coef.T + self.intercept

    def state_dict(self) -> dict[str, Tensor]:
        return {"coef": self.coef, "intercept": self.intercept}

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "LinearProbe":
        self.task, self.coef, self.intercept = task, state["coef"], state["intercept"]
        return self
