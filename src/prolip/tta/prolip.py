"""Test-time ProLIP (paper §4.6, README "A short tour"), batched across images.

Per test image: V views (view 0 = the original, center-cropped; views 1..V−1 = random-resized-crop + flip as in the
reference's test-time code, TPT's torchvision defaults: scale 0.08–1, bilinear); keep the
``ratio`` lowest-entropy views (judged at the starting W); minimise the entropy of their mean prediction with
``steps`` AdamW steps on W; predict view 0 with the adapted W; reset. B images adapt B independent copies of W in one
batched computation (W as [B, D_pre, D]); the per-image result is the same as adapting one image at a time. At a
site whose last rows of W are frozen (a MAP head's residual, ``ProjectionSite.residual_rows``) the rows above them
adapt and the frozen ones stay the start's, as in every method that trains W.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from prolip.constraints import FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, Pair
from prolip.methods._common import join_rows, split_rows
from prolip.optim import adam_step
from prolip.tta.base import RATIO, PerImageMethod, Scene
from prolip.tta.functional import batched_logits, marginal_entropy, select_confident
from prolip.tta.registry import register
from prolip.tta.views import view_features


@dataclass(frozen=True)
class TTAConfig:
    views: int = 64
    ratio: float = 0.1
    steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01  # torch.optim.AdamW's default
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)  # TPT's RandomResizedCrop(224) default, used by the reference


def adapt_projection(
    z_views: Tensor,
    W_start: Tensor,
    bias: Tensor | None,
    classifier: Tensor,
    logit_scale: float,
    cfg: TTAConfig = TTAConfig(),
    frozen_rows: int = 0,
) -> tuple[Tensor, Tensor]:
    """Test-time ProLIP for B images at once: returns (logits of view 0 [B, C], adapted W [B, D_pre, D]). W's last
    ``frozen_rows`` rows stay W_start's (no gradient, no AdamW state, no weight decay)."""
    B = z_views.shape[0]
    W_start = W_start.detach().float()
    with torch.no_grad():  # every image starts from the same W: one plain matmul, no per-image copies yet
        chosen = select_confident(batched_logits(z_views, W_start, bias, classifier, logit_scale), cfg.ratio)
    W_trained, W_frozen = split_rows(W_start, frozen_rows)
    W = W_trained.expand(B, *W_trained.shape).clone()
    z_sel = torch.gather(z_views, 1, chosen[..., None].expand(-1, -1, z_views.shape[-1]))
    exp_avg, exp_avg_sq = torch.zeros_like(W), torch.zeros_like(W)
    for step in range(1, cfg.steps + 1):
        W.requires_grad_(True)
        # Each image's loss depends only on its own W, so the gradient of the sum is the per-image gradient.
        loss = marginal_entropy(batched_logits(z_sel, join_rows(W, W_frozen), bias, classifier, logit_scale)).sum()
        (grad,) = torch.autograd.grad(loss, W)
        W = W.detach()
        adam_step(
            W, grad, exp_avg, exp_avg_sq, step, cfg.lr, eps=cfg.eps, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
    with torch.no_grad():
        W = join_rows(W, W_frozen)
        logits = batched_logits(z_views[:, :1], W, bias, classifier, logit_scale)[:, 0]
    return logits, W


def frozen_rows(backbone) -> int:
    """The rows of W no method trains at ``backbone``'s site (``ProjectionSite.residual_rows``; 0 without one)."""
    return 0 if backbone is None else int(backbone.projection().residual_rows)


def tta_logits(
    backbone,
    W: Tensor,
    bias: Tensor | None,
    classifier: Tensor,
    logit_scale: float,
    paths: Sequence[Path | str],
    *,
    views: int = 64,
    ratio: float = 0.1,
    steps: int = 1,
    lr: float = 1e-4,
    seed: int = 0,
    batch_size: int | None = None,
    **options,
) -> Tensor:
    """Test-time ProLIP logits [N, C] for image files, starting from W (W0 or a few-shot ProLIP W).

    ``views`` per image (view 0 the center crop), the ``ratio`` lowest-entropy of them kept, ``steps`` AdamW steps
    at ``lr``, augmentations seeded by ``seed``; ``options`` are the other TTAConfig fields (weight_decay, betas,
    eps, crop_scale). ``batch_size`` images adapt together, on the backbone's device; the default is 1 on CPU,
    where B copies of W fall out of cache and batching measured ~0.55x as fast (benchmarks/bench_tta.py), and 32
    on GPU, where one batched step amortises kernel launches. Results do not depend on it.
    """
    if views < 1 or not 0 < ratio <= 1 or steps < 0 or lr < 0:
        raise ValueError(
            f"test-time adaptation: need views >= 1, ratio in (0, 1], steps >= 0 and lr >= 0 "
            f"(got views={views}, ratio={ratio}, steps={steps}, lr={lr})"
        )
    cfg = TTAConfig(views=views, ratio=ratio, steps=steps, lr=lr, seed=seed, **options)
    device = torch.device(backbone.device)
    if batch_size is None:
        batch_size = 1 if device.type == "cpu" else 32
    W, classifier = W.detach().float().to(device), classifier.detach().float().to(device)
    bias = None if bias is None else bias.detach().float().to(device)
    frozen, out = frozen_rows(backbone), []
    with tqdm(total=len(paths), desc="test-time adaptation", unit="image", disable=None, leave=False) as bar:
        for i in range(0, len(paths), batch_size):
            z = view_features(backbone, paths[i : i + batch_size], cfg.views, cfg.seed, cfg.crop_scale).to(device)
            out.append(adapt_projection(z, W, bias, classifier, logit_scale, cfg, frozen)[0].cpu())
            bar.update(z.shape[0])
    return torch.cat(out)


@register
class TestTimeProLIP(PerImageMethod):
    """The tta protocol's own rows ("tta+<method>"): test-time ProLIP from each method's W (zero-shot's W0, a
    few-shot method's adapted W); its ratio, steps and lr are the ``tta`` section's."""

    name = "tta"
    starts_from_fit = True
    shared = ("ratio", "steps", "lr")
    constraints = {
        "ratio": RATIO,
        "steps": NON_NEGATIVE_INT,
        "lr": NON_NEGATIVE,  # lr 0: no adaptation, the start's own predictions
        "weight_decay": NON_NEGATIVE,
        "betas": Pair(FRACTION),
        "eps": POSITIVE,
    }

    def __init__(
        self,
        ratio: float = 0.1,
        steps: int = 1,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.ratio, self.steps, self.lr = ratio, steps, lr
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps

    def config(self, scene: Scene) -> TTAConfig:
        return TTAConfig(
            views=scene.views,
            ratio=self.ratio,
            steps=self.steps,
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=(self.betas[0], self.betas[1]),
            eps=self.eps,
            seed=scene.view_seed,
        )

    def adapted_per_image(self, scene: Scene, W: Tensor) -> int:
        return W.numel() - frozen_rows(scene.backbone) * W.shape[-1]

    def logits(self, z: Tensor, W: Tensor, scene: Scene) -> Tensor:
        frozen = frozen_rows(scene.backbone)
        return adapt_projection(z, W, scene.bias, scene.classifier, scene.logit_scale, self.config(scene), frozen)[0]
