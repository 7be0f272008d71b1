"""The plain zero-shot row beside the adapted ones: view 0 (the center crop) through W0, no adaptation."""

from __future__ import annotations

from torch import Tensor

from prolip.functional import clip_logits
from prolip.tta.base import PerImageMethod, Scene
from prolip.tta.registry import register


@register
class ZeroShotRow(PerImageMethod):
    name = "zeroshot"

    def __init__(self) -> None:
        pass

    def views_read(self, views: int, dataset: str) -> int:
        return 1

    def logits(self, z: Tensor, W: Tensor, scene: Scene) -> Tensor:
        return clip_logits(z[:, 0], W, scene.bias, scene.classifier, scene.logit_scale)
