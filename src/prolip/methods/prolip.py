"""ProLIP: fine-tune only CLIP's last visual projector W, pulled toward its pretrained value W0 (paper §3).

Loss ``CE(s·normalize(zW+b)·Tᵀ, y) + λ·Σ(W−W0)²`` (a sum, not a mean), full-batch Adam (eps 1e-4), cosine to 0
over the steps, step t on cached view (t+1) mod V (the reference's order). Everything is written batched over a
leading grid dim G (one (lr, λ) per slice), so the paper's 49-point validation grid is one computation: W is
[G, D_pre, D], the features are shared, Adam is elementwise. W's last ``Task.frozen_rows`` rows (a MAP head's
residual, 0 at every other site) stay W0's: only the rows above them get a gradient, Adam state and the pull (which
is then the whole-W pull, the frozen rows being at W0), so ProLIP at the MAP-head site trains exactly fc2.

Two numerics:
- "fp32" (default): float32 master weights and Adam state, analytic gradient (no autograd graph).
- "reference": what the reference code does by running everything in float16 (features, W, the forward and
  backward pass, Adam's state). Small Adam steps then round away (an update below half the float16 spacing of w
  leaves w unchanged), which is why it under-trains at lr 1e-5; kept to reproduce the paper's numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from prolip.constraints import (
    LEARNING_RATE,
    Choice,
    Lambda,
    Number,
    PointGrid,
    resolve_lambda,
)
from prolip.distributed import all_reduce_sum, broadcast, rank_world
from prolip.functional import clip_logits, project, proximal_penalty
from prolip.methods import register
from prolip.methods._common import join_rows, split_rows
from prolip.methods.base import Capabilities, Method, Support, Task, Validation, ViewSource
from prolip.optim import REFERENCE_EPS, adam_step, cosine_lr, fused_adam_step, view_for_step

GRID_LRS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
GRID_LAMS = (10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4, 0.0)
PRECISIONS = ("fp32", "reference")
TIE_RULES = ("first", "conservative")


# ----------------------------------------------------------------------------------------------- pure maths


def packed_loss_and_grad(
    z: Tensor,
    Wp: Tensor,
    bias: Tensor | None,
    classifier: Tensor,
    logit_scale: float,
    labels: Tensor,
    W0: Tensor,
    lam: Tensor,
) -> tuple[Tensor, Tensor]:
    """Loss [G] and gradient of the ProLIP loss for G projections packed side by side, Wp [D_pre, G, D].

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
    logp = (logit_scale * (u @ classifier.T)).log_softmax(-1)  # [N, G, C]
    rows = torch.arange(N)
    ce = -logp[rows, :, labels].mean(0)
    dlogits = logp.exp_()  # softmax, reusing the buffer
    dlogits[rows, :, labels] -= 1
    du = (dlogits @ classifier) * (logit_scale / N)  # [N, G, D]
    de = (du - u * (u * du).sum(-1, keepdim=True)) / norm
    diff = Wp - W0[:, None, :]
    grad = (z.T @ de.view(N, G * D)).view(D_pre, G, D) + (2 * lam)[:, None] * diff
    return ce + lam * diff.pow(2).sum(dim=(0, 2)), grad


def prolip_loss_and_grad(
    z: Tensor,
    W: Tensor,
    bias: Tensor | None,
    classifier: Tensor,
    logit_scale: float,
    labels: Tensor,
    W0: Tensor,
    lam: Tensor,
) -> tuple[Tensor, Tensor]:
    """Loss [G] and gradient [G, D_pre, D] for W [G, D_pre, D] (the unpacked layout of ``packed_loss_and_grad``)."""
    Wp = W.transpose(0, 1).contiguous()
    loss, grad = packed_loss_and_grad(z, Wp, bias, classifier, logit_scale, labels, W0, lam)
    return loss, grad.transpose(0, 1)


def train_projection(
    W0: Tensor,
    bias: Tensor | None,
    classifier: Tensor,
    logit_scale: float,
    views: ViewSource,
    labels: Tensor,
    lrs: Sequence[float] | Tensor,
    lams: Sequence[float] | Tensor,
    steps: int,
    precision: str = "fp32",
    frozen_rows: int = 0,
) -> Tensor:
    """Train G projections from W0 at once, config g with lr ``lrs[g]`` and λ ``lams[g]``: returns [G, D_pre, D].

    One configuration trains alone with torch's fused Adam kernel; several train as one packed computation (one
    GEMM per product for all of them), which is what amortises kernel launches on a GPU. W's last ``frozen_rows``
    rows (``Task.frozen_rows``) stay W0's: only the rows above them get a gradient, Adam state and the pull.
    """
    lrs = torch.as_tensor(lrs, dtype=torch.float64)
    lams = torch.as_tensor(lams, dtype=torch.float32)
    args = (W0, bias, classifier, logit_scale, views, labels)
    if precision == "reference":
        return _train_reference(*args, lrs, lams, steps, frozen_rows)
    if len(lrs) == 1:
        return _train_one(*args, float(lrs[0]), lams[0], steps, frozen_rows)[None]
    return _train_packed(*args, lrs, lams, steps, frozen_rows)


class StepBuffers:
    """The per-step intermediates of G packed configurations, allocated once per training run.

    Fresh [N, G, D] / [N, G, C] tensors every step were the batched grid's undoing on a CPU: each large one is a
    new mapping whose pages fault in again (72 s of system time in a 64 s grid, issue 14).
    """

    def __init__(self, n: int, configs: int, d: int, labels: Tensor, num_classes: int):
        dev = labels.device
        self.e = torch.empty(n, configs * d, device=dev, dtype=torch.float32)
        self.logits = torch.empty(n * configs, num_classes, device=dev, dtype=torch.float32)
        self.du = torch.empty(n * configs, d, device=dev, dtype=torch.float32)
        self.tmp = torch.empty(n, configs, d, device=dev, dtype=torch.float32)
        # Flat index of (image i, config g, class labels[i]) in logits: where the one-hot target is subtracted.
        rows = torch.arange(n, device=dev)[:, None] * configs + torch.arange(configs, device=dev)
        self.targets = (rows * num_classes + labels[:, None]).reshape(-1)
        self.minus_one = torch.full((n * configs,), -1.0, device=dev, dtype=torch.float32)


def embedding_grad(
    z: Tensor,
    Wp: Tensor,
    bias: Tensor | None,
    classifier: Tensor,
    logit_scale: float,
    buf: StepBuffers,
) -> Tensor:
    """d(mean CE)/d(zW + b), [N, G·D], for packed Wp [D_pre, G·D]; the same arithmetic, op for op, as
    ``packed_loss_and_grad`` (so the two agree to the last bit up to GEMM kernels), without its temporaries."""
    N, D = z.shape[0], buf.du.shape[1]
    G = Wp.shape[1] // D
    e = torch.mm(z, Wp, out=buf.e).view(N, G, D)
    if bias is not None:
        e.add_(bias)
    norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    u = e.div_(norm)
    logits = torch.mm(u.view(N * G, D), classifier.T, out=buf.logits).mul_(logit_scale)
    dlogits = torch._log_softmax(logits, -1, False, out=buf.logits).exp_()  # softmax as exp(log_softmax)
    dlogits.view(-1).index_add_(0, buf.targets, buf.minus_one)
    du = torch.mm(dlogits, classifier, out=buf.du).mul_(logit_scale / N).view(N, G, D)
    dot = torch.mul(u, du, out=buf.tmp).sum(-1, keepdim=True)
    return du.sub_(torch.mul(u, dot, out=buf.tmp)).div_(norm).view(N, G * D)


def _gradient_into(grad: Tensor, z: Tensor, de: Tensor, Wp: Tensor, W0p: Tensor, two_lam: Tensor | None) -> None:
    """grad (shaped as Wp) = zᵀ·de + 2λ(W − W0): the pull is written first and the GEMM accumulated onto it."""
    flat = grad.view(grad.shape[0], -1)
    if two_lam is None:  # λ = 0 everywhere: no pull
        torch.mm(z.T, de, out=flat)
        return
    torch.sub(Wp, W0p, out=grad).mul_(two_lam)
    flat.addmm_(z.T, de)


def _train_one(
    W0: Tensor,
    bias: Tensor | None,
    classifier: Tensor,
    logit_scale: float,
    views: ViewSource,
    labels: Tensor,
    lr: float,
    lam: Tensor,
    steps: int,
    frozen_rows: int = 0,
) -> Tensor:
    """One configuration: every buffer allocated once, Adam as one fused pass over W's trained rows (a view of W's
    first rows, so W is always their concatenation with the frozen ones) and their moments."""
    buf = StepBuffers(views.num_images, 1, W0.shape[1], labels, classifier.shape[0])
    W = W0.float().clone()
    (Wt, _), (W0t, _) = split_rows(W, frozen_rows), split_rows(W0, frozen_rows)
    n = Wt.shape[0]
    exp_avg, exp_avg_sq, grad = torch.zeros_like(Wt), torch.zeros_like(Wt), torch.empty_like(Wt)
    two_lam = 2 * lam.to(W.device) if lam != 0 else None
    for t in range(steps):
        z = views.view(view_for_step(t, views.num_views)).float()
        de = embedding_grad(z, W, bias, classifier, logit_scale, buf)
        _gradient_into(grad, z[:, :n], de, Wt, W0t, two_lam)
        fused_adam_step(Wt, grad, exp_avg, exp_avg_sq, t + 1, float(cosine_lr(lr, t, steps)), eps=REFERENCE_EPS)
    return W


def _train_packed(
    W0: Tensor,
    bias: Tensor | None,
    classifier: Tensor,
    logit_scale: float,
    views: ViewSource,
    labels: Tensor,
    lrs: Tensor,
    lams: Tensor,
    steps: int,
    frozen_rows: int = 0,
) -> Tensor:
    """G configurations packed side by side (W [D_pre, G, D]): each product one plain GEMM for all of them; Adam
    steps the trained rows (the first ``D_pre − frozen_rows``) alone, as in :func:`_train_one`."""
    (D_pre, D), G = W0.shape, len(lrs)
    buf = StepBuffers(views.num_images, G, D, labels, classifier.shape[0])
    W = W0[:, None, :].expand(-1, G, -1).clone(memory_format=torch.contiguous_format)
    Wt = W[: D_pre - frozen_rows]
    exp_avg, exp_avg_sq, grad = torch.zeros_like(Wt), torch.zeros_like(Wt), torch.empty_like(Wt)
    scratch = (torch.empty_like(Wt), torch.empty_like(Wt))
    W0p = W0[: Wt.shape[0], None, :].expand(-1, G, -1)
    two_lam = (2 * lams.to(W.device))[:, None] if bool((lams != 0).any()) else None
    for t in range(steps):
        z = views.view(view_for_step(t, views.num_views)).float()
        de = embedding_grad(z, W.view(D_pre, G * D), bias, classifier, logit_scale, buf)
        _gradient_into(grad, z[:, : Wt.shape[0]], de, Wt, W0p, two_lam)
        adam_step(
            Wt,
            grad,
            exp_avg,
            exp_avg_sq,
            t + 1,
            cosine_lr(lrs, t, steps),
            eps=REFERENCE_EPS,
            group_dim=1,
            scratch=scratch,
        )
    return W.transpose(0, 1).contiguous()


def _train_reference(W0, bias, classifier, logit_scale, views, labels, lrs, lams, steps, frozen_rows=0) -> Tensor:
    """float16 everything, as the reference runs: features, W, forward/backward and Adam's state (of W's trained
    rows: the last ``frozen_rows`` stay W0's)."""
    half = torch.float16
    W, W_frozen = split_rows(W0.to(half).expand(len(lrs), *W0.shape).clone(), frozen_rows)
    W0_, T = split_rows(W0.to(half), frozen_rows)[0], classifier.to(half)
    bias_ = None if bias is None else bias.to(half)
    exp_avg, exp_avg_sq = torch.zeros_like(W), torch.zeros_like(W)
    for t in range(steps):
        z = views.view(view_for_step(t, views.num_views)).to(half)
        grad = _reference_grad(z, W, W_frozen, bias_, T, logit_scale, labels, W0_, lams.to(half))
        adam_step(W, grad, exp_avg, exp_avg_sq, t + 1, cosine_lr(lrs, t, steps), eps=REFERENCE_EPS)
    return join_rows(W, W_frozen)


def _reference_grad(z, W, W_frozen, bias, classifier, logit_scale, labels, W0, lam) -> Tensor:
    """Gradient of W's trained rows as the reference computes it: autograd through the float16 forward pass."""
    W = W.detach().requires_grad_(True)
    e = project(z, join_rows(W, W_frozen), bias)
    logits = logit_scale * (e / e.norm(dim=-1, keepdim=True)) @ classifier.T
    ce = torch.stack([F.cross_entropy(lg, labels) for lg in logits])
    loss = (ce + lam * proximal_penalty(W, W0)).sum()
    (grad,) = torch.autograd.grad(loss, W)
    return grad


def grid_accuracies(W: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float, val: Validation) -> Tensor:
    """Validation accuracy (%) of each of G projections [G, D_pre, D]."""
    logits = clip_logits(val.features.float(), W.float(), bias, classifier, logit_scale)
    return (logits.argmax(-1) == val.labels).float().mean(-1) * 100


def grid_chunk_size(
    device: str, configs: int, n: int, d_pre: int, d: int, num_classes: int, free_bytes: int | None = None
) -> int:
    """How many of ``configs`` (lr, λ) configurations to train per batched computation, for N support images,
    W [d_pre, d] and ``num_classes`` classes.

    CPU: one. Measured (benchmarks/bench_grid.py --chunks; benchmarks/README.md, "49-point grid"): with the fused
    step, a batch of k configurations was slower per configuration than one at a time for every k > 1 tried, at
    4-shot × 10-class, 16 × 47 and 16 × 1000 (768 → 512): a CPU step has no launch cost to amortise, and k copies of
    W and its Adam state (6 MB each at 768 × 512) leave the caches. GPU: every configuration whose working set
    fits in half the free memory (``free_bytes``), since one batched step amortises kernel launches.
    """
    if device != "cuda" or free_bytes is None:
        return 1
    # Per configuration, float32: W, two Adam moments, the gradient and two scratch tensors ([d_pre, d] each), and
    # the step's intermediates (projections, their gradient and a temporary [n, d] each, logits [n, classes]).
    per_config = 4 * (6 * d_pre * d + n * (3 * d + num_classes))
    return max(1, min(configs, free_bytes // 2 // per_config))


def select_config(accuracies: Tensor, lrs: Sequence[float], lams: Sequence[float], tie_rule: str = "first") -> int:
    """Index of the best validation accuracy.

    "first" (the reference's rule): the first maximum in grid order, lr from 1e-2 down (outer), λ from 10 down
    (inner). "conservative": among tied configs the largest λ, then the smallest lr, so a flat validation set
    falls back toward zero-shot.
    """
    best = accuracies.max()
    tied = [g for g in range(len(lrs)) if accuracies[g] == best]
    if tie_rule == "first":
        return tied[0]
    return min(tied, key=lambda g: (-lams[g], lrs[g]))


# ----------------------------------------------------------------------------------------------- the Method


@register
class ProLIP(Method):
    """Fine-tune the last visual projector W with Adam and a pull λ·Σ(W−W0)² toward W0.

    lr (1e-5), lam ("1/N" | "1/N2" | number), steps (300), precision ("fp32" | "reference"), grid (False | True
    for the paper's 49-point (lr, λ) grid | a list of [lr, lam] pairs; selected on a validation set), grid_chunk
    (configs trained per batched computation; None = one at a time on a CPU, where a batch of weights and Adam
    states falls out of cache and measured up to 5× slower than one by one, and all at once on a GPU, where one
    batched step amortises kernel launches), tie_rule ("first" as the reference | "conservative").
    """

    name = "prolip"
    capabilities = Capabilities(
        accepts_classifier=True, exposes_projection=True, selects="lr and λ on the paper's 49-point grid"
    )
    validation_params = {"grid": True}
    constraints = {
        "lr": LEARNING_RATE,
        "lam": Lambda(),
        "steps": Number(low=0, integer=True),
        "precision": Choice(PRECISIONS),
        "grid": PointGrid(),
        "grid_chunk": Number(low=1, integer=True, optional=True),
        "tie_rule": Choice(TIE_RULES),
    }

    def __init__(
        self,
        lr: float = 1e-5,
        lam: str | float = "1/N",
        steps: int = 300,
        precision: str = "fp32",
        grid: bool | list = False,
        grid_chunk: int | None = None,
        tie_rule: str = "first",
    ):
        self.lr, self.lam, self.steps, self.precision = lr, lam, steps, precision
        self.grid, self.grid_chunk, self.tie_rule = grid, grid_chunk, tie_rule
        self.W: Tensor | None = None

    def grid_points(self) -> tuple[list[float], list[float]]:
        if self.grid is True:
            points = [(lr, lam) for lr in GRID_LRS for lam in GRID_LAMS]
        else:
            points = [(float(lr), float(lam)) for lr, lam in self.grid or []]
        return [p[0] for p in points], [p[1] for p in points]

    def _train(self, task: Task, support: Support, lrs: Sequence[float], lams: Sequence[float]) -> Tensor:
        return train_projection(
            task.W0,
            task.bias,
            task.classifier,
            task.logit_scale,
            support.views,
            support.labels,
            lrs,
            lams,
            self.steps,
            self.precision,
            frozen_rows=task.frozen_rows,
        )

    def _train_in_chunks(
        self, task: Task, support: Support, lrs: Sequence[float], lams: Sequence[float]
    ) -> Iterator[tuple[list[int], Tensor]]:
        """(indices, W [len(indices), D_pre, D]) for consecutive chunks of the configurations, each chunk one
        batched computation of ``grid_chunk`` configurations (None: :func:`grid_chunk_size`'s choice)."""
        device = task.W0.device
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        d_pre, d = task.W0.shape
        size = self.grid_chunk or grid_chunk_size(
            device.type, len(lrs), support.views.num_images, d_pre, d, task.num_classes, free_bytes=free
        )
        for start in range(0, len(lrs), size):
            chunk = list(range(start, min(start + size, len(lrs))))
            yield chunk, self._train(task, support, [lrs[i] for i in chunk], [lams[i] for i in chunk])

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        # Full-batch training on fixed views is deterministic: ``seed`` changes nothing (same seed, same W).
        if not self.grid:
            lam = resolve_lambda(self.lam, task.shots)
            self.W = self._train(task, support, [self.lr], [lam])[0].float()
            self.selected_ = {"lr": self.lr, "lam": lam, "lam_rule": str(self.lam), "how": "rule"}
            return
        if val is None:
            raise ValueError(
                "prolip grid search needs a few-shot validation set (CLI: --validate); or drop grid "
                "to use the validation-free λ = 1/N"
            )
        self._fit_grid(task, support, val)

    def _fit_grid(self, task: Task, support: Support, val: Validation) -> None:
        lrs, lams = self.grid_points()
        # Under torchrun each rank trains every world-th configuration; accuracies are summed across ranks and the
        # winner's W comes from the rank that trained it, so every rank ends with the same selection and W.
        rank, world = rank_world()
        mine = list(range(rank, len(lrs), world))
        accs = torch.zeros(len(lrs))
        trained: dict[int, Tensor] = {}
        with tqdm(total=len(mine), desc="validation grid", unit="config", disable=None, leave=False) as bar:
            for chunk, W in self._train_in_chunks(task, support, [lrs[g] for g in mine], [lams[g] for g in mine]):
                chunk = [mine[i] for i in chunk]
                accs[chunk] = grid_accuracies(W, task.bias, task.classifier, task.logit_scale, val).float().cpu()
                trained.update(zip(chunk, W, strict=True))
                bar.update(len(chunk))
        accs = all_reduce_sum(accs)
        best = select_config(accs, lrs, lams, self.tie_rule)
        # Retraining from W0 with the winner would redo exactly this computation (deterministic, same views),
        # so its W is kept from the grid instead of being trained a second time.
        winner = trained[best].float() if best in trained else torch.empty_like(task.W0, dtype=torch.float32)
        self.W = broadcast(winner, src=best % world)
        self.selected_ = {
            "lr": lrs[best],
            "lam": lams[best],
            "how": "validation",
            "val_accuracy": accs[best].item(),
            "tie_rule": self.tie_rule,
            "retrained": "winner's grid W reused (identical to retraining from W0)",
            "grid_ranks": world,
            "grid": [
                {"lr": lr, "lam": lam, "val_accuracy": a} for lr, lam, a in zip(lrs, lams, accs.tolist(), strict=True)
            ],
        }

    def fit_each(self, task: Task, support: Support, settings: Sequence[dict[str, Any]], seed: int = 0) -> list[Method]:
        """One fitted ProLIP per {lr, lam} setting, chunked as the validation grid is (:func:`grid_chunk_size`)."""
        if any(set(s) - {"lr", "lam"} for s in settings) or self.grid:
            return super().fit_each(task, support, settings, seed)
        methods = [ProLIP(**{**self.get_params(), **s}) for s in settings]
        for m in methods:
            m.check_params()
        lams = [resolve_lambda(m.lam, task.shots) for m in methods]
        Ws = [W for _, chunk in self._train_in_chunks(task, support, [m.lr for m in methods], lams) for W in chunk]
        for m, W, lam in zip(methods, Ws, lams, strict=True):
            m.task, m.W = task, W.float()
            m.selected_ = {"lr": m.lr, "lam": lam, "lam_rule": str(m.lam), "how": "rule"}
            m._check_finite("training")
        return list(methods)

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None and self.W is not None
        return clip_logits(z, self.W, self.task.bias, classifier, self.task.logit_scale)

    def projection(self) -> Tensor | None:
        return self.W

    def trainable_parameters(self) -> int:
        """W's trained rows: all of W but a site's frozen rows (``Task.frozen_rows``)."""
        if self.task is None or self.W is None:
            return 0
        return self.W.numel() - self.task.frozen_rows * self.W.shape[-1]

    def state_dict(self) -> dict[str, Tensor]:
        if self.task is None or self.W is None:
            return {}
        state = {"W": self.W, "W0": self.task.W0}
        if self.task.bias is not None:
            state["bias"] = self.task.bias
        return state

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        shapes = {"W": tuple(task.W0.shape), "W0": tuple(task.W0.shape)}
        if task.bias is not None:
            shapes["bias"] = tuple(task.bias.shape)
        return shapes

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.W = state["W"]
