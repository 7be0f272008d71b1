"""Linear probe (CLIP/CoOp): L2-regularised logistic regression on L2-normalised embeddings z·W0+b; ignores text.

C is searched on the few-shot validation set exactly as CoOp's ``lpclip/linear_probe.py`` does (it too selects on
validation): fit lbfgs logistic regression (max_iter 1000) for C ∈ {1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6}, take the
first best in that order, then ``search_steps`` (``--num_step``, 8) bisection rounds in log10 C starting from
[C/10, 10·C]: fit both ends, keep the right end if strictly better, else the left, and halve the interval toward
the winner. The chosen C is the last round's winner. Features: the un-augmented support features
(``support.center_features()``), as CoOp's ``feat_extractor.py`` uses the test transform.
One documented difference: CoOp's script feeds raw ``clip_model.visual`` features; here (as in LP++'s
re-implementation, ``methods/linear_probe.py``) they are L2-normalised, which makes C's scale dataset-independent.
Without validation, C = 1 (scikit-learn's default) — recorded as ``how: "rule"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from prolip.constraints import POSITIVE_INT, Number
from prolip.methods import register
from prolip.methods._common import embed
from prolip.methods.base import Capabilities, Method, Support, Task, Validation

COARSE_C = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


def _features(task: Task, z: Tensor) -> np.ndarray:
    return F.normalize(embed(task, z), dim=-1).numpy()


def fit_logreg(x: np.ndarray, y: np.ndarray, C: float, seed: int, max_iter: int) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(x, y)


def coop_c_search(val_score: Callable[[float], float], steps: int) -> float:
    """CoOp's search for C given ``val_score(C)`` (validation accuracy of the probe fitted with C)."""
    scores = [val_score(C) for C in COARSE_C]
    peak = COARSE_C[int(np.argmax(scores))]  # np.argmax: the first best in the list's order
    left, right = np.log10(peak) - 1, np.log10(peak) + 1
    chosen = peak
    for _ in range(steps):
        acc_left, acc_right = val_score(10**left), val_score(10**right)
        if acc_left < acc_right:
            chosen, left = 10**right, (left + right) / 2
        else:
            chosen, right = 10**left, (left + right) / 2
    return float(chosen)


@register
class LinearProbe(Method):
    name = "linear-probe"
    # trains on the center crops (CoOp's feat_extractor.py uses the test transform), none of the cached views
    capabilities = Capabilities(selects="the inverse regularisation C (CoOp's search)", reads_center=True)
    constraints = {
        "C": Number(low=0, open_low=True, optional=True),
        "search_steps": Number(low=0, integer=True),
        "max_iter": POSITIVE_INT,
    }

    def __init__(
        self,
        C: float | None = None,
        search_steps: int = 8,  # lpclip/linear_probe.py --num_step
        max_iter: int = 1000,
    ):  # lpclip/linear_probe.py LogisticRegression(max_iter=1000)
        self.C, self.search_steps, self.max_iter = C, search_steps, max_iter
        self.coef: Tensor | None = None
        self.intercept: Tensor | None = None

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        x, y = _features(task, support.center_features()), support.labels.numpy()
        if len(set(y.tolist())) != task.num_classes:
            raise ValueError(
                f"linear-probe: the support set has {len(set(y.tolist()))} distinct labels but the task "
                f"has {task.num_classes} classes; every class needs at least one support image"
            )
        if self.C is not None or val is None:
            C, how = (self.C if self.C is not None else 1.0), ("given" if self.C is not None else "rule")
        else:
            xv, yv = _features(task, val.features), val.labels.numpy()
            memo: dict[float, float] = {}  # the bisection revisits its ends; lbfgs is deterministic

            def val_score(C: float) -> float:
                if C not in memo:
                    memo[C] = fit_logreg(x, y, C, seed, self.max_iter).score(xv, yv)
                return memo[C]

            C, how = coop_c_search(val_score, self.search_steps), "validation"
        clf = fit_logreg(x, y, C, seed, self.max_iter)
        self.coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
        self.intercept = torch.as_tensor(clf.intercept_, dtype=torch.float32)
        self.selected_ = {"C": C, "how": how}

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None and self.coef is not None and self.intercept is not None
        return F.normalize(embed(self.task, z), dim=-1) @ self.coef.T + self.intercept

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.coef is None or self.intercept is None else {"coef": self.coef, "intercept": self.intercept}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        return {"coef": (task.num_classes, task.W0.shape[1]), "intercept": (task.num_classes,)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.coef, self.intercept = state["coef"], state["intercept"]
