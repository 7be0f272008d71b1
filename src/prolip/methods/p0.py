"""P0, task-text coordinates (github.com/xyycyc/task-text-coordinates-resources, ``src/tasktext/adapters.py``,
``geometry.py``, ``training.py``, ``implementation.md``): ProLIP with its update restricted to the span of the
centred class-text embeddings, ``W = W0 + A·Qᵀ``, only A trained (D_pre × r parameters, r ≤ C − 1).

Q [D, r]: the class texts (unit rows of the task's classifier), transposed and centred over classes, promoted to
float64, reduced SVD; the left singular vectors with σ > max(D, C)·ε₆₄·σ₁ are kept, each signed so that its
largest-magnitude entry is positive (``text_geometry``). The loss is ProLIP's (``CE(s·normalize(zW + b)·Tᵀ, y)``)
plus ``λ‖A‖²_F`` (= ``λ‖W − W0‖²``: Q's columns are orthonormal); 300 full-batch Adam steps (eps 1e-4), cosine to 0,
step t on cached view (t + 1) mod V (``fit_and_select``: the same as ProLIP's reference order), A from zero. A
spans W's trained rows only: the last ``Task.frozen_rows`` (a MAP head's residual) stay W0's, as in ProLIP.

Validation-free: the original's preferred point, lr 1e-3 and λ = 1/N (``selection_key`` prefers it among ties).
``grid=True`` runs its nine candidates (lr 1e-3 × λ ∈ {1/N, 0, 0.01, 0.1, 1, 10, 100}, then (1e-4, 1/N) and
(1e-2, 1/N); ``candidate_grid``) and keeps the most correct on the validation set, ties to (1e-3, 1/N), then the
smaller lr, then the larger λ. Differences from the original: its class texts are one prompt per class, here the
task's classifier (the experiment's templates: ``templates: single`` for one), and its fp32 autograd step is the
analytic gradient ProLIP uses (equal to float32 rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prolip.constraints import LEARNING_RATE, Flag, Lambda, Number, resolve_lambda
from prolip.functional import clip_logits
from prolip.methods import register
from prolip.methods._common import join_rows, split_rows
from prolip.methods.base import Capabilities, Method, Support, Task, Validation
from prolip.methods.prolip import StepBuffers, embedding_grad, grid_accuracies
from prolip.optim import REFERENCE_EPS, cosine_lr, fused_adam_step, view_for_step


def text_basis(classifier: Tensor) -> Tensor:
    """Q [D, r]: the orthonormal basis of the centred class-text span, signed as the original does."""
    text = classifier.detach().double().T
    centred = text - text.mean(dim=1, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    rank = int((s > max(centred.shape) * torch.finfo(torch.float64).eps * s[0]).sum())
    if rank == 0:
        raise ValueError("p0: the class texts span nothing once centred (every class has the same text embedding)")
    q = u[:, :rank]
    return (q * q[q.abs().argmax(dim=0), torch.arange(rank)].sign()).float()


def train_coordinates(
    task: Task, support: Support, Q: Tensor, lr: float, lam: float, steps: int
) -> tuple[Tensor, Tensor]:
    """(A [n, r], W = W0 + A·Qᵀ on W's n trained rows) after ``steps`` Adam steps on ProLIP's loss with W restricted
    to the span; W's last ``task.frozen_rows`` rows stay W0's."""
    views, W0 = support.views, task.W0.float()
    buf = StepBuffers(views.num_images, 1, W0.shape[1], support.labels, task.classifier.shape[0])
    W0t, W0_frozen = split_rows(W0, task.frozen_rows)
    n = W0t.shape[0]
    A = torch.zeros(n, Q.shape[1])
    exp_avg, exp_avg_sq = torch.zeros_like(A), torch.zeros_like(A)
    for t in range(steps):
        z = views.view(view_for_step(t, views.num_views)).float()
        W = join_rows(W0t + A @ Q.T, W0_frozen)
        de = embedding_grad(z, W, task.bias, task.classifier, task.logit_scale, buf)
        grad = (z[:, :n].T @ de) @ Q + 2 * lam * A  # dL/dA = (dL/dW)·Q
        fused_adam_step(A, grad, exp_avg, exp_avg_sq, t + 1, float(cosine_lr(lr, t, steps)), eps=REFERENCE_EPS)
    return A, join_rows(W0t + A @ Q.T, W0_frozen)


def candidates(shots: int) -> list[tuple[float, float]]:
    """The original's nine (lr, λ) candidates (``candidate_grid``)."""
    return [(1e-3, lam) for lam in (1 / shots, 0.0, 0.01, 0.1, 1.0, 10.0, 100.0)] + [
        (1e-4, 1 / shots),
        (1e-2, 1 / shots),
    ]


def preference(correct: float, lr: float, lam: float, shots: int) -> tuple:
    """``selection_key``: most correct, then (1e-3, 1/N), then the smaller lr, then the larger λ."""
    return correct, (lr == 1e-3 and lam == 1 / shots), -lr, lam


@register
class P0(Method):
    """ProLIP in task-text coordinates: W = W0 + A·Qᵀ, Q the centred class-text span, only A trained."""

    name = "p0"
    capabilities = Capabilities(exposes_projection=True, selects="lr and λ among the original's nine candidates")
    validation_params = {"grid": True}
    constraints = {"lr": LEARNING_RATE, "lam": Lambda(), "steps": Number(low=0, integer=True), "grid": Flag()}

    def __init__(self, lr: float = 1e-3, lam: str | float = "1/N", steps: int = 300, grid: bool = False):
        self.lr, self.lam, self.steps, self.grid = lr, lam, steps, grid
        self.A: Tensor | None = None
        self.Q: Tensor | None = None
        self.W: Tensor | None = None

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        # Full-batch training on fixed views from A = 0 is deterministic: ``seed`` changes nothing.
        self.Q = text_basis(task.classifier)
        if not self.grid:
            lam = resolve_lambda(self.lam, task.shots)
            self.A, self.W = train_coordinates(task, support, self.Q, self.lr, lam, self.steps)
            self.selected_ = {"lr": self.lr, "lam": lam, "rank": self.Q.shape[1], "how": "rule"}
            return
        if val is None:
            raise ValueError("p0 grid search needs a few-shot validation set (CLI: --validate); or drop grid")
        best: tuple | None = None
        rows = []
        for lr, lam in candidates(task.shots):
            A, W = train_coordinates(task, support, self.Q, lr, lam, self.steps)
            accuracy = float(grid_accuracies(W[None], task.bias, task.classifier, task.logit_scale, val)[0])
            rows.append({"lr": lr, "lam": lam, "val_accuracy": accuracy})
            key = preference(accuracy, lr, lam, task.shots)
            if best is None or key > best[0]:
                best = (key, A, W, lr, lam, accuracy)
        assert best is not None
        _, self.A, self.W, lr, lam, accuracy = best
        self.selected_ = {"lr": lr, "lam": lam, "rank": self.Q.shape[1], "how": "validation", "val_accuracy": accuracy}
        self.selected_["grid"] = rows

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None and self.W is not None
        return clip_logits(z, self.W, self.task.bias, classifier, self.task.logit_scale)

    def projection(self) -> Tensor | None:
        return self.W

    def state_dict(self) -> dict[str, Tensor]:
        if self.A is None or self.Q is None:
            return {}
        return {"A": self.A, "Q": self.Q}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        return {"A": (task.W0.shape[0] - task.frozen_rows, -1), "Q": (task.W0.shape[1], -1)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.A, self.Q = state["A"], state["Q"]
        W0t, W0_frozen = split_rows(task.W0.float(), task.frozen_rows)
        self.W = join_rows(W0t + self.A @ self.Q.T, W0_frozen)

    def trainable_parameters(self) -> int:
        """A alone: Q is fixed by the class texts, and W follows from both."""
        return 0 if self.A is None else self.A.numel()
