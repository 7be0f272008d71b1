"""The training pieces every full-batch trainer shares: one Adam/AdamW step, the cosine schedule, the reference's
view order, and the full-batch training loop (ProLIP's variants, the adapters, test-time ProLIP).

Pure tensor code: no I/O, no globals. ``adam_step`` is elementwise, so one call updates a whole batch of
independent parameters (ProLIP's validation grid, one W per test image).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

ADAM_BETAS = (0.9, 0.999)
REFERENCE_EPS = 1e-4  # the ProLIP reference passes eps=1e-4 to every Adam/AdamW it builds


def cosine_lr(base_lr: float | Tensor, step: int, total_steps: int) -> float | Tensor:
    """Learning rate at 0-based ``step`` of CosineAnnealingLR(T_max=total_steps, eta_min=0)."""
    return base_lr * (1 + math.cos(math.pi * step / total_steps)) / 2


def view_for_step(step: int, num_views: int) -> int:
    """The cached augmented view that 0-based step ``step`` trains on.

    The reference increments its view counter before reading it, so steps see views 1, 2, ..., V-1, 0, ...;
    following it makes identical caches give identical weights.
    """
    return (step + 1) % num_views


def _per_group(lr: float | Tensor, param: Tensor, group_dim: int) -> float | Tensor:
    if not isinstance(lr, Tensor):
        return float(lr)
    shape = [1] * param.dim()
    shape[group_dim] = -1
    return lr.view(shape)


def adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float | Tensor,
    *,
    eps: float,
    betas: tuple[float, float] = ADAM_BETAS,
    weight_decay: float = 0.0,
    group_dim: int = 0,
) -> None:
    """One torch.optim.Adam step, or AdamW's with ``weight_decay`` (decoupled), in place; ``step`` is 1-based.

    ``lr`` is a float, or a tensor [G] giving each slice of ``param`` along ``group_dim`` its own rate. With a float
    the arithmetic is torch's own, op for op, so results are bitwise torch's in any dtype. With a tensor the
    update is computed in float32 and rounded once, which is what torch does inside a float16 ``addcdiv_``.
    """
    beta1, beta2 = betas
    lr = _per_group(lr, param, group_dim)
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**step)).add_(eps)
    bias_correction = 1 - beta1**step
    if isinstance(lr, float):
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction)
        return
    step_size = (lr / bias_correction).to(torch.float32)
    if param.dtype == torch.float32:
        param.addcdiv_(exp_avg * step_size, denom, value=-1.0)
    else:
        param.copy_(param.float() - step_size * (exp_avg.float() / denom.float()))


def train_full_batch(
    params: Sequence[Tensor],
    loss_at: Callable[[int], Tensor],
    *,
    steps: int,
    lr: float,
    eps: float = REFERENCE_EPS,
    weight_decay: float = 0.0,
) -> None:
    """Full-batch Adam (AdamW with ``weight_decay``) on ``params`` in place, cosine to zero over ``steps``.

    ``loss_at(t)`` is the loss at 0-based step t, computed from the current ``params`` (the caller picks the view
    with :func:`view_for_step`). Gradients come from autograd; the update is :func:`adam_step`.
    """
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for t in range(steps):
        for p in params:
            p.requires_grad_(True)
        grads = torch.autograd.grad(loss_at(t), list(params))
        with torch.no_grad():
            for p, g, (m, v) in zip(params, grads, moments):
                adam_step(p, g, m, v, t + 1, cosine_lr(lr, t, steps), eps=eps, weight_decay=weight_decay)
    for p in params:
        p.requires_grad_(False)
