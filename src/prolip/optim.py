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
    scratch: tuple[Tensor, Tensor] | None = None,
) -> None:
    """One torch.optim.Adam step, or AdamW's with ``weight_decay`` (decoupled), in place; ``step`` is 1-based.

    ``lr`` is a float, or a tensor [G] giving each slice of ``param`` along ``group_dim`` its own rate. With a float
    the arithmetic is torch's own, op for op, so results are bitwise torch's in any dtype. With a tensor the
    update is computed in float32 and rounded once, which is what torch does inside a float16 ``addcdiv_``.
    ``scratch``: two tensors shaped as ``param`` that a caller stepping many times lends for the temporaries (same
    arithmetic; a large fresh temporary per step costs page faults on a CPU).
    """
    beta1, beta2 = betas
    lr = _per_group(lr, param, group_dim)
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = torch.sqrt(exp_avg_sq, out=scratch[0]) if scratch is not None else exp_avg_sq.sqrt()
    denom.div_(math.sqrt(1 - beta2**step)).add_(eps)
    bias_correction = 1 - beta1**step
    if isinstance(lr, float):
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction)
        return
    step_size = (lr / bias_correction).to(torch.float32)
    if param.dtype == torch.float32:
        scaled = torch.mul(exp_avg, step_size, out=scratch[1]) if scratch is not None else exp_avg * step_size
        param.addcdiv_(scaled, denom, value=-1.0)
    else:
        param.copy_(param.float() - step_size * (exp_avg.float() / denom.float()))


def fused_adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    *,
    eps: float,
    betas: tuple[float, float] = ADAM_BETAS,
) -> None:
    """:func:`adam_step` (no weight decay, one float ``lr``) as torch's fused kernel, ``Adam(fused=True)``'s: one
    pass over the four tensors instead of about eight, which on a CPU is most of a small problem's step. Results
    equal the unfused step's to float32 rounding (a few ulp). Falls back to :func:`adam_step` where the kernel
    is missing (torch before 2.4 on a CPU) or cannot apply (non-contiguous tensors: it reads flat memory)."""
    tensors = (param, grad, exp_avg, exp_avg_sq)
    if not (_fused_adam_runs(param.device) and all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors)):
        adam_step(param, grad, exp_avg, exp_avg_sq, step, lr, eps=eps, betas=betas)
        return
    step_count = torch.tensor(float(step), device=param.device)
    torch._fused_adam_(
        [param],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],
        [step_count],
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        weight_decay=0.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )


def _fused_adam_runs(device: torch.device) -> bool:
    """Whether torch has a fused Adam kernel for this device (CUDA since 2.0, CPU since 2.4)."""
    if not hasattr(torch, "_fused_adam_"):
        return False
    return device.type == "cuda" or _torch_version() >= (2, 4)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


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
            for p, g, (m, v) in zip(params, grads, moments, strict=True):
                adam_step(p, g, m, v, t + 1, cosine_lr(lr, t, steps), eps=eps, weight_decay=weight_decay)
    for p in params:
        p.requires_grad_(False)
