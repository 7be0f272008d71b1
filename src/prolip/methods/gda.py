"""GDA (Wang et al., ICLR 2024, "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation";
github.com/mrflogs/ICLR24, ``main_few_shots.py`` lines 40-85, ``configs/few_shots/*.yaml``): Gaussian discriminant
analysis on the L2-normalised image embeddings, fused with the zero-shot logits.

Every support image contributes ``augment_views`` (10, ``augment_epoch`` in every ``configs/few_shots/*.yaml``)
augmented views (RandomResizedCrop 0.5-1 bicubic + flip, ``train_tranform`` at main_few_shots.py:25-30: the
"prolip" cached views), each embedded and L2-normalised (main_few_shots.py:48-49). From these M vectors f:

- class means μ_c, and the deviations f − μ_y, whose scatter S = Σ (f − μ_y)(f − μ_y)ᵀ equals (M − 1)·cov (the
  deviations sum to zero, so ``center_vecs.T.cov()`` subtracts nothing more);
- the shrunk precision ``P = D · pinv(S + tr(S / (M − 1)) · I)`` (the "KS estimator", main_few_shots.py:59-60);
- a uniform prior: weights ``W = μ P`` and biases ``b_c = log(1/C) − ½ μ_c P μ_cᵀ`` (:62-64).

Logits: ``s · f·Tᵀ + α · (f·Wᵀ + b)`` with f the normalised embedding of the test image and s the model's logit
scale (the original writes 100, OpenAI CLIP's). α is searched on the validation set over
{1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100} (:70), the first strict improvement kept (its ``>`` from a best accuracy of
0, so ties keep the smaller α); the original starts from α = 0.1 (:69), which is what it keeps when no α scores
above 0 % and what is used here without validation (``how: "rule"``). The original's validation set is the
dataset's full val split, and on ImageNet its test set (main_few_shots.py:137: ``val_features = test_features``);
here it is the episode's N-shot validation set, never test images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.constraints import NON_NEGATIVE, POSITIVE_INT, Flag
from prolip.functional import accuracy, cosine_logits, map_rows
from prolip.methods import register
from prolip.methods._common import embed
from prolip.methods.base import Capabilities, Method, Support, Task, Validation

ALPHA_GRID = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)  # main_few_shots.py:70


def normalised_view_embeddings(task: Task, support: Support, views: int) -> list[Tensor]:
    """The L2-normalised embeddings of the first ``views`` cached views (fewer if the cache holds fewer), in float64
    so the covariance and its pseudo-inverse do not lose the small eigenvalues."""
    count = max(1, min(views, support.views.num_views))
    return [F.normalize(embed(task, support.views.view(t)), dim=-1).double() for t in range(count)]


def class_means(embeddings: list[Tensor], labels: Tensor, num_classes: int) -> Tensor:
    """μ_c over every view of every support image of class c [C, D]."""
    sums = torch.zeros(num_classes, embeddings[0].shape[1], dtype=torch.float64)
    for f in embeddings:
        sums.index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes).double() * len(embeddings)
    return sums / counts.clamp(min=1)[:, None]


def shrunk_precision(embeddings: list[Tensor], labels: Tensor, means: Tensor) -> Tensor:
    """``D · pinv(S + tr(S / (M − 1)) · I)`` with S the within-class scatter (main_few_shots.py:59-60)."""
    dim = means.shape[1]
    scatter = torch.zeros(dim, dim, dtype=torch.float64)
    for f in embeddings:
        deviations = f - means[labels]
        scatter += deviations.T @ deviations
    samples = sum(f.shape[0] for f in embeddings)
    covariance_trace = scatter.trace() / max(samples - 1, 1)
    return dim * torch.linalg.pinv(scatter + covariance_trace * torch.eye(dim, dtype=torch.float64), hermitian=True)


def gda_classifier(embeddings: list[Tensor], labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(weights [C, D], biases [C]) of the linear discriminant with a shared covariance and a uniform prior."""
    means = class_means(embeddings, labels, num_classes)
    precision = shrunk_precision(embeddings, labels, means)
    weights = means @ precision
    biases = math.log(1.0 / num_classes) - 0.5 * (weights * means).sum(dim=-1)
    return weights.float(), biases.float()


def search_alpha(zero_shot: Tensor, gda: Tensor, labels: Tensor) -> tuple[float, float]:
    """(α, validation accuracy %): the original's loop, the first strict improvement over 0 % kept."""
    best_alpha, best_acc = 0.1, 0.0  # main_few_shots.py:68-69
    for alpha in ALPHA_GRID:
        acc = accuracy(zero_shot + alpha * gda, labels)
        if acc > best_acc:
            best_alpha, best_acc = alpha, acc
    return best_alpha, best_acc


@register
class GDA(Method):
    """Gaussian discriminant analysis on the image embeddings, fused with zero-shot CLIP (training-free).

    alpha (0.1: main_few_shots.py:69, kept without validation), search (True: α searched on the validation set
    over main_few_shots.py:70's grid), augment_views (10: configs/few_shots/*.yaml augment_epoch).
    """

    name = "gda"
    capabilities = Capabilities(selects="α, the weight of the GDA logits (main_few_shots.py:70's 7-point grid)")
    constraints = {"alpha": NON_NEGATIVE, "search": Flag(), "augment_views": POSITIVE_INT}

    def __init__(
        self,
        alpha: float = 0.1,  # main_few_shots.py:69 best_alpha's starting value
        search: bool = True,  # main_few_shots.py:67-76: α is always searched
        augment_views: int = 10,
    ):  # configs/few_shots/*.yaml augment_epoch
        self.alpha, self.search, self.augment_views = alpha, search, augment_views
        self.weights: Tensor | None = None
        self.biases: Tensor | None = None

    def _parts(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(zero-shot logits, GDA logits) of pre-projection features z."""
        assert self.task is not None and self.weights is not None and self.biases is not None
        f = F.normalize(embed(self.task, z), dim=-1)
        return cosine_logits(f, self.task.classifier, self.task.logit_scale), f @ self.weights.T + self.biases

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        # Closed form on fixed views: ``seed`` changes nothing.
        embeddings = normalised_view_embeddings(task, support, self.augment_views)
        self.weights, self.biases = gda_classifier(embeddings, support.labels, task.num_classes)
        self.selected_ = {"alpha": self.alpha, "how": "rule", "views": len(embeddings)}
        if val is not None and self.search:
            alpha, acc = search_alpha(*self._parts(val.features.float()), val.labels)
            self.selected_.update(alpha=alpha, how="validation", val_accuracy=acc)

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        def blend(rows: Tensor) -> Tensor:  # a block of rows at a time: no [N, C] temporaries beside the output
            zero_shot, gda = self._parts(rows)
            return zero_shot + self.selected_["alpha"] * gda

        return map_rows(blend, z, classifier.shape[0])

    def trainable_parameters(self) -> int:
        """What the fit estimates: the discriminant's weights and biases (nothing is trained by gradient)."""
        return 0 if self.weights is None or self.biases is None else self.weights.numel() + self.biases.numel()

    def state_dict(self) -> dict[str, Tensor]:
        if self.weights is None or self.biases is None:
            return {}
        return {"weights": self.weights, "biases": self.biases, "alpha": torch.tensor([self.selected_["alpha"]])}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        return {"weights": (task.num_classes, task.W0.shape[1]), "biases": (task.num_classes,), "alpha": (1,)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.weights, self.biases = state["weights"], state["biases"]
        self.selected_ = {"alpha": float(state["alpha"][0]), "how": "loaded"}
