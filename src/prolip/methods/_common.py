"""Pieces the baselines share: post-projection embeddings of the cached views, a mini-batch trainer, checks."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.functional import project
from prolip.methods.base import Support, Task, Validation


def embed(task: Task, z: Tensor) -> Tensor:
    """Post-projection (joint-space, unnormalised) image embeddings with the frozen pretrained W0."""
    return project(z.float(), task.W0, task.bias)


def view_embeddings(task: Task, support: Support, num_views: int) -> Tensor:
    """Embeddings of the first ``num_views`` augmented views [V', N, D] (fewer if the cache holds fewer)."""
    count = max(1, min(num_views, support.views.num_views))
    return torch.stack([embed(task, support.views.view(t)) for t in range(count)])


def mean_view_embedding(task: Task, support: Support, num_views: int) -> Tensor:
    """Mean over views of the unnormalised embeddings (= embedding of the mean feature, the map being affine)."""
    count = max(1, min(num_views, support.views.num_views))
    mean_z = sum(support.views.view(t) for t in range(count)) / count
    return embed(task, mean_z)


def no_classifier_swap(name: str, classifier: Tensor | None) -> None:
    if classifier is not None:
        raise ValueError(f"{name} learns class-specific weights from the support set; it cannot be applied with "
                         "another text classifier (use prolip, zeroshot, clip-adapter or linear-adapter for that)")


def require_fitted(method, *attrs: str) -> None:
    if any(getattr(method, a, None) is None for a in attrs):
        raise RuntimeError(f"{method.name}: call fit() or load_state_dict() before logits()")


def train_minibatch(params: Iterable[Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor], data: Tensor,
                    labels: Tensor, *, epochs: int, batch_size: int, optimizer: str, lr: float, seed: int,
                    schedule: str = "epoch", on_epoch_end: Callable[[int], None] | None = None,
                    **optimizer_kwargs) -> None:
    """Shuffled mini-batch training; epoch e draws its samples from ``data[e % V]`` (data: [V, N, D]), so each
    epoch sees a fresh augmented view as the originals do when they re-augment images every epoch.

    Cosine schedule to 0, stepped per epoch (Dassl/CoOp trainers) or per iteration (Tip-Adapter-F).
    """
    params = list(params)
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = opt_cls(params, lr=lr, **optimizer_kwargs)
    n = labels.shape[0]
    per_epoch = -(-n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * (per_epoch if schedule ==
                                                                                    "iteration" else 1)))
    g = torch.Generator().manual_seed(seed)
    for e in range(epochs):
        x = data[e % data.shape[0]]
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = loss_fn(x[idx], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if schedule == "iteration":
                sched.step()
        if schedule == "epoch":
            sched.step()
        if on_epoch_end is not None:
            on_epoch_end(e)


def val_accuracy(logits: Tensor, val: Validation) -> float:
    return (logits.argmax(-1) == val.labels).float().mean().item() * 100.0


def cosine_head_logits(e: Tensor, prototypes: Tensor, logit_scale: float) -> Tensor:
    """``s · normalize(e) · normalize(P)ᵀ``: the head of ZS-LP, CLAP and TaskRes."""
    return logit_scale * F.normalize(e, dim=-1) @ F.normalize(prototypes, dim=-1).T

