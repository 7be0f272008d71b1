"""Pieces the baselines share: post-projection embeddings of the cached views, a mini-batch trainer, checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.functional import project
from prolip.methods.base import Support, Task
from prolip.optim import cosine_lr


def embed(task: Task, z: Tensor) -> Tensor:
    """Post-projection (joint-space, unnormalised) image embeddings with the frozen pretrained W0."""
    return project(z.float(), task.W0, task.bias)


def split_rows(W: Tensor, frozen: int) -> tuple[Tensor, Tensor]:
    """W [..., D_pre, D] as (its trained rows, its last ``frozen`` rows), both views of W.

    A method that trains W trains the first part only and rebuilds W with :func:`join_rows`: the frozen rows
    (``Task.frozen_rows``: a MAP head's residual, the identity at W0) get no gradient, no optimiser state and no
    weight decay, and the pull toward W0 over the trained rows is the whole-W pull (the frozen rows stay at W0).
    With ``frozen`` = 0 the trained part is W itself, shape and strides, and the frozen part is empty."""
    n = W.shape[-2] - frozen
    return W[..., :n, :], W[..., n:, :]


def join_rows(trained: Tensor, frozen: Tensor) -> Tensor:
    """W from :func:`split_rows`' parts: ``trained`` [..., n, D] over ``frozen`` [k, D] (broadcast over trained's
    leading dims); ``trained`` itself when nothing is frozen."""
    if frozen.shape[-2] == 0:
        return trained
    return torch.cat([trained, frozen.expand(*trained.shape[:-2], *frozen.shape[-2:])], dim=-2)


def text_mean(task: Task, method: str) -> Tensor:
    """The unnormalised mean text embedding the originals of TaskRes, ZS-LP and CLAP start from."""
    if task.text_mean is None:
        raise ValueError(
            f"{method} starts from the unnormalised mean text embedding: build the task with "
            "text_mean (the episode always does)"
        )
    return task.text_mean


def view_embeddings(task: Task, support: Support, num_views: int) -> Tensor:
    """Embeddings of the first ``num_views`` augmented views [V', N, D] (fewer if the cache holds fewer)."""
    count = max(1, min(num_views, support.views.num_views))
    return torch.stack([embed(task, support.views.view(t)) for t in range(count)])


def mean_view_embedding(task: Task, support: Support, num_views: int) -> Tensor:
    """Mean over views of the unnormalised embeddings (= embedding of the mean feature, the map being affine)."""
    count = max(1, min(num_views, support.views.num_views))
    mean_z = torch.stack([support.views.view(t) for t in range(count)]).mean(0)
    return embed(task, mean_z)


def fresh_view_per_epoch(
    task: Task, support: Support, num_views: int | None = None
) -> Callable[[int], tuple[Tensor, Tensor]]:
    """Epoch e trains on view e mod V of every support image (V = all cached views, or ``num_views``): the
    cached stand-in for a data loader that re-augments each image every epoch. Embedded lazily, one view per
    epoch, so memory stays at one view whatever the cache holds."""
    count = support.views.num_views if num_views is None else max(1, min(num_views, support.views.num_views))
    return lambda e: (embed(task, support.views.view(e % count)), support.labels)


def dassl_batches_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimiser steps per epoch of a Dassl training loader (CoOp, CLIP-Adapter, TaskRes, CLAP): it drops the
    last partial batch when there is at least one full batch (``drop_last = len(data) >= batch_size``)."""
    return num_samples // batch_size if num_samples >= batch_size else 1


def dassl_lr(base_lr: float, epoch: int, epochs: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """Learning rate of epoch ``epoch`` under Dassl's ``cosine`` scheduler with a constant warm-up, as every
    Dassl config of these baselines sets it (WARMUP_EPOCH 1, WARMUP_CONS_LR 1e-5): warm-up epochs at
    ``warmup_lr``, then the cosine over ``epochs`` restarted at the base lr (so the last epoch never reaches 0)."""
    if epoch < warmup_epochs:
        return warmup_lr
    return float(cosine_lr(base_lr, epoch - warmup_epochs, epochs))


def train_minibatch(
    params: Iterable[Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    epoch_data: Callable[[int], tuple[Tensor, Tensor]],
    *,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    seed: int,
    schedule: str = "dassl",
    drop_last: bool = False,
    batches_per_epoch: int | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    **optimizer_kwargs,
) -> None:
    """Shuffled mini-batch training. ``epoch_data(e)`` gives the (samples, labels) epoch e draws from.

    Per epoch: ``batches_per_epoch`` batches if given (CLAP draws a loader's worth of batches from a larger
    pool), else all of them, the last partial one dropped when ``drop_last`` and one full batch exists (Dassl).
    ``schedule``: "dassl" (per-epoch lr from :func:`dassl_lr`) or "iteration" (cosine to 0 over all
    iterations, stepped per batch, as Tip-Adapter-F).
    """
    params = list(params)
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = opt_cls(params, lr=lr, **optimizer_kwargs)
    g = torch.Generator().manual_seed(seed)
    iteration, total = 0, None
    for e in range(epochs):
        x, y = epoch_data(e)
        n = y.shape[0]
        count = batches_per_epoch or (dassl_batches_per_epoch(n, batch_size) if drop_last else -(-n // batch_size))
        total = total or max(1, epochs * count)  # the iteration schedule's length, fixed by the first epoch
        order = torch.randperm(n, generator=g)
        for b in range(count):
            rate = dassl_lr(lr, e, epochs) if schedule == "dassl" else cosine_lr(lr, iteration, total)
            for group in opt.param_groups:
                group["lr"] = rate
            idx = order[b * batch_size : (b + 1) * batch_size]
            loss = loss_fn(x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            iteration += 1
        if on_epoch_end is not None:
            on_epoch_end(e)


def cosine_head_logits(e: Tensor, prototypes: Tensor, logit_scale: float) -> Tensor:
    """``s · normalize(e) · normalize(P)ᵀ``: the head of ZS-LP, CLAP and TaskRes."""
    return logit_scale * F.normalize(e, dim=-1) @ F.normalize(prototypes, dim=-1).T
