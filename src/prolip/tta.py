"""Test-time adaptation (paper §4.6, README "A short tour"): test-time ProLIP, batched across images, TPT as the
baseline, and the no-update view ensemble as an ablation.

Per test image: V views (view 0 = the original, center-cropped; views 1..V−1 = random-resized-crop + flip as in the
reference's test-time code, TPT's torchvision defaults: scale 0.08–1, bilinear); keep the
``ratio`` lowest-entropy views (judged at the starting W); minimise the entropy of their mean prediction with
``steps`` AdamW steps on W; predict view 0 with the adapted W; reset. B images adapt B independent copies of W in one
batched computation (W as [B, D_pre, D]); the per-image result is the same as adapting one image at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import transforms as T
from tqdm.auto import tqdm

from prolip.functional import cosine_logits, entropy, project
from prolip.optim import adam_step


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


# -- pure maths --------------------------------------------------------------------------------------------------
def select_confident(logits: Tensor, ratio: float) -> Tensor:
    """Indices [B, k] of the k = max(1, int(V·ratio)) lowest-entropy views of each image (logits [B, V, C])."""
    k = max(1, int(logits.shape[1] * ratio))
    return entropy(logits).argsort(dim=1)[:, :k]


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean prediction over views, per image: logits [B, k, C] → [B] (TPT's avg_entropy)."""
    logp = logits.log_softmax(dim=-1)
    mean_logp = logp.logsumexp(dim=1) - math.log(logits.shape[1])
    mean_logp = mean_logp.clamp(min=torch.finfo(mean_logp.dtype).min)
    return -(mean_logp.exp() * mean_logp).sum(dim=-1)


def batched_logits(z: Tensor, W: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float) -> Tensor:
    """z [B, V, D_pre] with per-image W [B, D_pre, D] → logits [B, V, C]."""
    return cosine_logits(project(z, W, bias), classifier, logit_scale)


def adapt_projection(
    z_views: Tensor,
    W_start: Tensor,
    bias: Tensor | None,
    classifier: Tensor,
    logit_scale: float,
    cfg: TTAConfig = TTAConfig(),
) -> tuple[Tensor, Tensor]:
    """Test-time ProLIP for B images at once: returns (logits of view 0 [B, C], adapted W [B, D_pre, D])."""
    B = z_views.shape[0]
    W_start = W_start.detach().float()
    with torch.no_grad():  # every image starts from the same W: one plain matmul, no per-image copies yet
        chosen = select_confident(batched_logits(z_views, W_start, bias, classifier, logit_scale), cfg.ratio)
    W = W_start.expand(B, *W_start.shape).clone()
    z_sel = torch.gather(z_views, 1, chosen[..., None].expand(-1, -1, z_views.shape[-1]))
    exp_avg, exp_avg_sq = torch.zeros_like(W), torch.zeros_like(W)
    for step in range(1, cfg.steps + 1):
        W.requires_grad_(True)
        # Each image's loss depends only on its own W, so the gradient of the sum is the per-image gradient.
        loss = marginal_entropy(batched_logits(z_sel, W, bias, classifier, logit_scale)).sum()
        (grad,) = torch.autograd.grad(loss, W)
        W = W.detach()
        adam_step(
            W, grad, exp_avg, exp_avg_sq, step, cfg.lr, eps=cfg.eps, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
    with torch.no_grad():
        logits = batched_logits(z_views[:, :1], W, bias, classifier, logit_scale)[:, 0]
    return logits, W


def view_ensemble_logits(
    z_views: Tensor, W: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float, ratio: float = 0.1
) -> Tensor:
    """Ablation without any update: log of the mean probability over the ``ratio`` lowest-entropy views ([B, C]);
    ``ratio=1`` averages all views."""
    logits = batched_logits(z_views, W, bias, classifier, logit_scale)
    chosen = select_confident(logits, ratio)
    sel = torch.gather(logits, 1, chosen[..., None].expand(-1, -1, logits.shape[-1]))
    return sel.log_softmax(-1).logsumexp(1) - math.log(sel.shape[1])


# -- images → views (I/O edge) ------------------------------------------------------------------------------------
def tta_view_transform(prep, scale: tuple[float, float] = (0.08, 1.0)):
    """The test-time views: RandomResizedCrop (bilinear, as torchvision's default in TPT and the reference) + flip."""
    from prolip.transforms import SeededCropFlip

    return SeededCropFlip(prep.image_size, scale, T.InterpolationMode.BILINEAR, prep.mean, prep.std)


def view_features(
    backbone, paths: Sequence[Path | str], views: int, seed: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0)
) -> Tensor:
    """Pre-projection features [B, V, D_pre]: view 0 center-cropped, the rest augmented views seeded per
    (seed, image, view), so an image gets the same views whatever batch it is in."""
    from prolip.features.extraction import Extractor, image_key, test_time_views

    prep = backbone.preprocessing
    make_view = test_time_views(prep, seed, tta_view_transform(prep, crop_scale))
    # One forward pass per image (its V views), in float32: the features of an image never depend on its batch.
    extractor = Extractor(backbone, batch_size=views, compute_dtype="fp32")
    return extractor.encode([(Path(p), image_key(p)) for p in paths], views, make_view).features


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
    out = []
    with tqdm(total=len(paths), desc="test-time adaptation", unit="image", disable=None, leave=False) as bar:
        for i in range(0, len(paths), batch_size):
            z = view_features(backbone, paths[i : i + batch_size], cfg.views, cfg.seed, cfg.crop_scale).to(device)
            out.append(adapt_projection(z, W, bias, classifier, logit_scale, cfg)[0].cpu())
            bar.update(z.shape[0])
    return torch.cat(out)


# -- TPT baseline --------------------------------------------------------------------------------------------------
def tpt_logits(
    backbone,
    z_views: Tensor,
    W: Tensor,
    bias: Tensor | None,
    classnames: Sequence[str],
    logit_scale: float,
    *,
    ctx_init: str = "a photo of a",
    lr: float = 5e-3,
    ratio: float = 0.1,
    steps: int = 1,
) -> Tensor:
    """TPT (Shu et al. 2022): tune the context token embeddings of ``ctx_init`` per image through the text encoder,
    same view selection and entropy objective, one image at a time; returns logits of view 0 [B, C]."""
    prompts = [f"{ctx_init} {c.replace('_', ' ')}." for c in classnames]
    embeds, eot = backbone.prompt_embeddings(prompts)
    n_ctx = int(backbone.prompt_embeddings([ctx_init])[1][0]) - 1  # tokens between start and end
    ctx_slice = slice(1, 1 + n_ctx)
    ctx0 = embeds[0, ctx_slice].detach().float().clone()  # tuned in fp32 whatever the text encoder runs in
    device = torch.device(backbone.device)  # the text encoder runs there, so the image side goes there too
    z_views, W = z_views.float().to(device), W.detach().float().to(device)
    bias = None if bias is None else bias.detach().float().to(device)
    results = []
    for b in range(z_views.shape[0]):
        image_emb = F.normalize(project(z_views[b], W, bias), dim=-1)  # [V, D], fixed
        ctx = ctx0.clone().requires_grad_(True)
        opt = torch.optim.AdamW([ctx], lr=lr)

        def classifier_for(ctx):
            e = embeds.clone()
            e[:, ctx_slice] = ctx.to(e.dtype)
            return F.normalize(backbone.encode_text_embeddings(e, eot).float(), dim=-1)

        with torch.no_grad():
            chosen = select_confident((logit_scale * image_emb @ classifier_for(ctx).T)[None], ratio)[0]
        for _ in range(steps):
            logits = logit_scale * image_emb[chosen] @ classifier_for(ctx).T
            loss = marginal_entropy(logits[None]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            results.append(logit_scale * image_emb[0] @ classifier_for(ctx).T)
    return torch.stack(results).cpu()
