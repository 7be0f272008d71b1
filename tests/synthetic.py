"""A synthetic few-shot problem with known structure, for tests and benchmarks (no images, no CLIP weights).

Classes are Gaussian clusters in pre-projection space whose projected means point *near but not at* their
text embeddings: zero-shot CLIP is decent but imperfect, and moving W (or the classifier) can fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.methods.base import Support, Task, TensorViews, Validation


@dataclass
class SyntheticProblem:
    task: Task
    support: Support
    val: Validation
    test: Validation
    class_means: Tensor  # [C, D_pre]


def make_problem(
    num_classes: int = 10,
    shots: int = 8,
    d_pre: int = 64,
    d: int = 32,
    views: int = 16,
    test_per_class: int = 50,
    text_offset: float = 4.0,
    noise: float = 1.2,
    view_noise: float = 0.3,
    w_scale: float = 0.03,
    bias: bool = False,
    seed: int = 0,
) -> SyntheticProblem:
    """``text_offset`` sets how far (relative to a unit text embedding) each class's true projected direction
    lies from its text embedding; ``noise`` the within-class spread (relative to the mean's norm)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    classifier = F.normalize(randn(num_classes, d), dim=-1)
    W0 = randn(d_pre, d) * w_scale
    b = randn(d) * 0.01 if bias else None
    # Pre-projection means whose projection is (text + offset): solvable exactly since d_pre > d.
    targets = classifier + text_offset * F.normalize(randn(num_classes, d), dim=-1) / d**0.5 * 2
    targets = targets - (b if b is not None else 0)
    means = targets @ torch.linalg.pinv(W0)
    means = means + randn(num_classes, d_pre) * means.norm(dim=-1, keepdim=True).mean() / d_pre**0.5
    scale = means.norm(dim=-1).mean()

    def sample(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        z = means[labels] + noise * scale / d_pre**0.5 * randn(len(labels), d_pre)
        return z, labels

    z_support, y_support = sample(shots)
    aug = z_support + view_noise * scale / d_pre**0.5 * randn(views, *z_support.shape)
    z_val, y_val = sample(shots)
    z_test, y_test = sample(test_per_class)
    # The unnormalised text mean: the classifier at a CLIP-like norm (~10), as TaskRes / ZS-LP / CLAP start there.
    task = Task(W0=W0, bias=b, classifier=classifier, logit_scale=100.0, shots=shots, text_mean=classifier * 10.0)
    return SyntheticProblem(
        task,
        Support(TensorViews(aug), y_support, center=z_support),
        Validation(z_val, y_val),
        Validation(z_test, y_test),
        means,
    )
