"""ProLIP: fine-tune only CLIP's last visual projector W, pulled toward its pretrained value W0 (SPEC §1).

Everything is written batched over a leading grid dim G (one (lr, λ) per slice), so the validation grid of 49
configurations is one computation: W is [G, D_pre, D], the features are shared, Adam is elementwise.

Two numerics:
- "fp32" (default): float32 master weights and Adam state, analytic gradient (no autograd graph).
- "reference": what the reference code does by running everything in float16 — features, W, the forward and
  backward pass, and Adam's state (torch.optim.Adam on a float16 parameter). Small Adam steps then round away
  (an update below half the float16 spacing of w leaves w unchanged), which is why it under-trains at lr 1e-5.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.distributed import all_reduce_sum, broadcast, rank_world
from prolip.functional import clip_logits, project
from prolip.methods import register
from prolip.methods.base import Method, Support, Task, Validation, ViewSource

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-4
GRID_LRS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
GRID_LAMS = (10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4, 0.0)
PRECISIONS = ("fp32", "reference")


# ----------------------------------------------------------------------------------------------- pure maths

def resolve_lambda(lam: str | float, shots: int) -> float:
    """λ from its spec: "1/N" (validation-free default), "1/N2" (variant) or a number."""
    if isinstance(lam, str):
        key = lam.replace(" ", "").upper()
        if key == "1/N":
            return 1.0 / shots
        if key in ("1/N2", "1/N^2", "1/N**2"):
            return 1.0 / shots**2
        try:
            return float(lam)
        except ValueError:
            raise ValueError(f"ProLIP lam={lam!r}: use '1/N', '1/N2' or a number") from None
    return float(lam)


def cosine_lr(base_lr: Tensor, step: int, total_steps: int) -> Tensor:
    """Learning rate at optimiser step ``step`` (0-based) of CosineAnnealingLR(T_max=total_steps, eta_min=0)."""
    return base_lr * (1 + math.cos(math.pi * step / total_steps)) / 2


def prolip_loss_and_grad(z: Tensor, W: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float,
                         labels: Tensor, W0: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """Loss [G] and gradient [G, D_pre, D] of CE(s·normalize(zW+b)·Tᵀ, y) + λ·Σ(W−W0)², by hand.

    z [N, D_pre]; W [G, D_pre, D]; lam [G]. (Training keeps W packed as [D_pre, G, D]: see ``packed_loss_and_grad``.)
    """
    loss, grad = packed_loss_and_grad(z, W.transpose(0, 1).contiguous(), bias, classifier, logit_scale, labels,
                                      W0, lam)
    return loss, grad.transpose(0, 1)


def packed_loss_and_grad(z: Tensor, Wp: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float,
                         labels: Tensor, W0: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """Same, with the G projections packed side by side, Wp [D_pre, G, D].

    Packing turns every product into one large plain GEMM (z @ [D_pre, G·D], zᵀ @ [N, G·D]) instead of G
    broadcast batched ones, which copy z G times. Hand-written rather than autograd (~40% slower, more memory):
    through the cosine, d/de of normalize(e) is (I − uuᵀ)/|e|.
    """
    N, (D_pre, G, D) = z.shape[0], Wp.shape
    e = (z @ Wp.view(D_pre, G * D)).view(N, G, D)
    if bias is not None:
        e = e + bias
    norm = e.norm(dim=-1, keepdim=True)
    u = e / norm
    logp = (logit_scale * (u @ classifier.T)).log_softmax(-1)     # [N, G, C]
    rows = torch.arange(N)
    ce = -logp[rows, :, labels].mean(0)
    dlogits = logp.exp_()                                         # softmax, reusing the buffer
    dlogits[rows, :, labels] -= 1
    du = (dlogits @ classifier) * (logit_scale / N)               # [N, G, D]
    de = (du - u * (u * du).sum(-1, keepdim=True)) / norm
    diff = Wp - W0[:, None, :]
    grad = (z.T @ de.view(N, G * D)).view(D_pre, G, D) + (2 * lam)[:, None] * diff
    return ce + lam * diff.pow(2).sum(dim=(0, 2)), grad


def adam_step(W: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: Tensor,
              betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS, group_dim: int = 0) -> None:
    """One torch.optim.Adam step (no weight decay, no amsgrad) for a batch of G parameters stacked along
    ``group_dim``, each with its own lr [G].

    In place, op for op as torch's single-tensor Adam so float16 tensors round where torch's do; ``step`` is
    1-based. The final update is computed in float32 and rounded once, like ``addcdiv_`` does.
    """
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    shape = [1] * W.dim()
    shape[group_dim] = -1
    step_size = (lr / (1 - beta1**step)).to(torch.float32).view(shape)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    if W.dtype == torch.float32:
        W.addcdiv_(exp_avg * step_size, denom, value=-1.0)
    else:
        W.copy_(W.float() - step_size * (exp_avg.float() / denom.float()))


def train_projection(W0: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float, views: ViewSource,
                     labels: Tensor, lrs: Sequence[float] | Tensor, lams: Sequence[float] | Tensor, steps: int,
                     precision: str = "fp32") -> Tensor:
    """Train G projections from W0 at once, config g with lr ``lrs[g]`` and λ ``lams[g]``: returns [G, D_pre, D].

    Full batch; step t sees view t of the support (mod the number of views), as the reference does.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"ProLIP precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    lrs = torch.as_tensor(lrs, dtype=torch.float64)
    lams = torch.as_tensor(lams, dtype=torch.float32)
    G = len(lrs)
    if precision == "reference":
        return _train_reference(W0, bias, classifier, logit_scale, views, labels, lrs, lams, steps)
    W = W0[:, None, :].expand(-1, G, -1).clone(memory_format=torch.contiguous_format)  # packed [D_pre, G, D]
    exp_avg, exp_avg_sq = torch.zeros_like(W), torch.zeros_like(W)
    for t in range(steps):
        z = views.view(t % views.num_views).float()
        _, grad = packed_loss_and_grad(z, W, bias, classifier, logit_scale, labels, W0, lams)
        adam_step(W, grad, exp_avg, exp_avg_sq, t + 1, cosine_lr(lrs, t, steps), group_dim=1)
    return W.transpose(0, 1).contiguous()


def _train_reference(W0, bias, classifier, logit_scale, views, labels, lrs, lams, steps) -> Tensor:
    """float16 everything, as the reference runs: features, W, forward/backward and Adam's state."""
    half = torch.float16
    W = W0.to(half).expand(len(lrs), *W0.shape).clone()
    W0_, T = W0.to(half), classifier.to(half)
    bias_ = None if bias is None else bias.to(half)
    exp_avg, exp_avg_sq = torch.zeros_like(W), torch.zeros_like(W)
    for t in range(steps):
        z = views.view(t % views.num_views).to(half)
        grad = _reference_grad(z, W, bias_, T, logit_scale, labels, W0_, lams.to(half))
        adam_step(W, grad, exp_avg, exp_avg_sq, t + 1, cosine_lr(lrs, t, steps))
    return W


def _reference_grad(z, W, bias, classifier, logit_scale, labels, W0, lam) -> Tensor:
    """Gradient as the reference computes it: autograd through the float16 forward pass."""
    W = W.detach().requires_grad_(True)
    e = project(z, W, bias)
    logits = logit_scale * (e / e.norm(dim=-1, keepdim=True)) @ classifier.T
    ce = torch.stack([F.cross_entropy(lg, labels) for lg in logits])
    loss = (ce + lam * (W - W0).pow(2).sum(dim=(1, 2))).sum()
    (grad,) = torch.autograd.grad(loss, W)
    return grad


def grid_accuracies(W: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float, val: Validation) -> Tensor:
    """Validation accuracy (%) of each of G projections [G, D_pre, D]."""
    logits = clip_logits(val.features.float(), W.float(), bias, classifier, logit_scale)
    return (logits.argmax(-1) == val.labels).float().mean(-1) * 100


def select_config(accuracies: Tensor, lrs: Sequence[float], lams: Sequence[float]) -> int:
    """Index of the best validation accuracy. Ties go to the most conservative config: the largest λ (strongest
    pull toward W0), then the smallest lr — so a flat validation set falls back toward zero-shot, never away."""
    best = accuracies.max()
    tied = [g for g in range(len(lrs)) if accuracies[g] == best]
    return min(tied, key=lambda g: (-lams[g], lrs[g]))


# ----------------------------------------------------------------------------------------------- the Method

@register
class ProLIP(Method):
    """Fine-tune the last visual projector W with Adam and a pull λ·Σ(W−W0)² toward W0.

    Hyperparameters: lr (1e-5), lam ("1/N" | "1/N2" | number), steps (300), precision ("fp32" | "reference"),
    grid (False | True for the paper's 49-point (lr, λ) grid | a list of [lr, lam] pairs; needs a Validation),
    grid_chunk (configs trained per batched chunk; memory is grid_chunk·N·max(D, C) floats).
    """

    name = "prolip"

    def __init__(self, lr: float = 1e-5, lam: str | float = "1/N", steps: int = 300, precision: str = "fp32",
                 grid: bool | list = False, grid_chunk: int = 49, **extra: Any):
        if extra:
            raise ValueError(f"ProLIP got unknown hyperparameters {sorted(extra)}; "
                             "known: lr, lam, steps, precision, grid, grid_chunk")
        if precision not in PRECISIONS:
            raise ValueError(f"ProLIP precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
        if steps < 0:
            raise ValueError(f"ProLIP steps={steps}: must be ≥ 0")
        super().__init__(lr=lr, lam=lam, steps=steps, precision=precision, grid=grid, grid_chunk=grid_chunk)
        self.lr, self.lam, self.steps, self.precision = float(lr), lam, int(steps), precision
        self.grid, self.grid_chunk = grid, int(grid_chunk)
        self.task: Task | None = None
        self.W: Tensor | None = None

    def _grid_points(self) -> tuple[list[float], list[float]]:
        if self.grid is True:
            points = [(lr, lam) for lr in GRID_LRS for lam in GRID_LAMS]
        else:
            points = [(float(lr), float(lam)) for lr, lam in self.grid]
        return [p[0] for p in points], [p[1] for p in points]

    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "ProLIP":
        # Full-batch training on fixed views is deterministic: ``seed`` changes nothing (same seed, same W).
        self.task = task
        train = lambda lrs, lams: train_projection(task.W0, task.bias, task.classifier, task.logit_scale,
                                                   support.views, support.labels, lrs, lams, self.steps,
                                                   self.precision)
        if not self.grid:
            lam = resolve_lambda(self.lam, task.shots)
            self.W = train([self.lr], [lam])[0].float()
            self.selected_ = {"lr": self.lr, "lam": lam, "lam_rule": str(self.lam), "how": "rule"}
            return self
        if val is None:
            raise ValueError("ProLIP grid search needs a few-shot validation set: pass a Validation "
                             "(--use-validation) or drop grid= to use the validation-free λ = 1/N")
        lrs, lams = self._grid_points()
        # Under torchrun each rank trains every world-th configuration; accuracies are summed across ranks and the
        # winner's W comes from the rank that trained it, so every rank ends with the same selection and W.
        rank, world = rank_world()
        mine = list(range(rank, len(lrs), world))
        accs = torch.zeros(len(lrs))
        Ws = {}
        for start in range(0, len(mine), self.grid_chunk):
            chunk = mine[start:start + self.grid_chunk]
            W = train([lrs[g] for g in chunk], [lams[g] for g in chunk])
            accs[chunk] = grid_accuracies(W, task.bias, task.classifier, task.logit_scale, val).float().cpu()
            Ws.update(zip(chunk, W))
        accs = all_reduce_sum(accs)
        best = select_config(accs, lrs, lams)
        # Retraining from W0 with the winner would redo exactly this computation (deterministic, same views),
        # so its W is kept from the grid instead of being trained a second time.
        winner = Ws[best].float() if best in Ws else torch.empty_like(task.W0, dtype=torch.float32)
        self.W = broadcast(winner, src=best % world)
        self.selected_ = {
            "lr": lrs[best], "lam": lams[best], "how": "validation",
            "val_accuracy": accs[best].item(), "tie_rule": "largest lam, then smallest lr",
            "retrained": "winner's grid W reused (identical to retraining from W0)", "grid_ranks": world,
            "grid": [{"lr": lr, "lam": lam, "val_accuracy": a} for lr, lam, a in zip(lrs, lams, accs.tolist())],
        }
        return self

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        if self.task is None or self.W is None:
            raise RuntimeError("ProLIP.logits called before fit() or load_state_dict()")
        T = self.task.classifier if classifier is None else classifier
        return clip_logits(z.float(), self.W, self.task.bias, T, self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        state = {"W": self.W, "W0": self.task.W0}
        if self.task.bias is not None:
            state["bias"] = self.task.bias
        return state

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "ProLIP":
        if "W" not in state:
            raise ValueError(f"ProLIP state has no 'W' (keys: {sorted(state)}); was it saved by another method?")
        if tuple(state["W"].shape) != tuple(task.W0.shape):
            raise ValueError(f"ProLIP state W has shape {tuple(state['W'].shape)} but this backbone's projector "
                             f"is {tuple(task.W0.shape)}: load it with the backbone it was fitted on")
        self.task, self.W = task, state["W"].float()
        return self

