"""The view ensemble: test-time ProLIP's ablation without any update, the confident views' mean prediction."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prolip.tta.base import RATIO, PerImageMethod, Scene
from prolip.tta.functional import batched_logits, select_confident
from prolip.tta.registry import register


def view_ensemble_logits(
    z_views: Tensor, W: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float, ratio: float = 0.1
) -> Tensor:
    """Ablation without any update: log of the mean probability over the ``ratio`` lowest-entropy views ([B, C]);
    ``ratio=1`` averages all views."""
    logits = batched_logits(z_views, W, bias, classifier, logit_scale)
    chosen = select_confident(logits, ratio)
    sel = torch.gather(logits, 1, chosen[..., None].expand(-1, -1, logits.shape[-1]))
    return sel.log_softmax(-1).logsumexp(1) - math.log(sel.shape[1])


@register
class ViewEnsemble(PerImageMethod):
    """The "ensemble" row, from zero-shot CLIP's W0 with the ``tta`` section's ratio."""

    name = "ensemble"
    shared = ("ratio",)
    recorded_when_off = True
    constraints = {"ratio": RATIO}

    def __init__(self, ratio: float = 0.1) -> None:
        self.ratio = ratio

    def logits(self, z: Tensor, W: Tensor, scene: Scene) -> Tensor:
        return view_ensemble_logits(z, W, scene.bias, scene.classifier, scene.logit_scale, self.ratio)
