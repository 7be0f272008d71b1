"""TPT (Shu et al. 2022), test-time ProLIP's baseline: tune the prompt's context token embeddings per image through
the text encoder, with the same view selection and entropy objective, one image at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.constraints import NON_NEGATIVE, NON_NEGATIVE_INT
from prolip.functional import project
from prolip.tta.base import RATIO, PerImageMethod, Scene
from prolip.tta.functional import marginal_entropy, select_confident
from prolip.tta.registry import register


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
    ctx_slice = backbone.context_positions(ctx_init)  # CLIP: after the start token; SigLIP: from the first
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


@dataclass(frozen=True)
class Text:
    """A non-empty string."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, str) and value.strip() else f"must be a non-empty string, got {value!r}"


@register
class TPT(PerImageMethod):
    """The "tpt" row: TPT from zero-shot CLIP's W0 on the same views; the ``tta`` section's ratio and steps."""

    name = "tpt"
    shared = ("ratio", "steps")
    recorded_when_off = True
    constraints = {"ratio": RATIO, "steps": NON_NEGATIVE_INT, "lr": NON_NEGATIVE, "ctx_init": Text()}

    def __init__(self, ratio: float = 0.1, steps: int = 1, lr: float = 5e-3, ctx_init: str = "a photo of a") -> None:
        self.ratio, self.steps, self.lr, self.ctx_init = ratio, steps, lr, ctx_init

    def adapted_per_image(self, scene: Scene, W: Tensor) -> int:
        """Its context token embeddings: the tokens of ``ctx_init`` × the text encoder's width."""
        embeds, _ = scene.backbone.prompt_embeddings([self.ctx_init])
        ctx = scene.backbone.context_positions(self.ctx_init)
        return (ctx.stop - ctx.start) * embeds.shape[-1]

    def text_passes_per_image(self, scene: Scene) -> int:
        """One classifier per step, plus the view selection's and the final prediction's."""
        return (self.steps + 2) * len(scene.classnames)

    def logits(self, z: Tensor, W: Tensor, scene: Scene) -> Tensor:
        return tpt_logits(
            scene.backbone,
            z,
            W,
            scene.bias,
            scene.classnames,
            scene.logit_scale,
            ctx_init=self.ctx_init,
            lr=self.lr,
            ratio=self.ratio,
            steps=self.steps,
        )
