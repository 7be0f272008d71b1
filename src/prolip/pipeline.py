"""Glue between backbones, data, the feature cache and methods: the pieces the CLI and the bench share."""
from __future__ import annotations

from typing import Sequence

from prolip.backbones.base import Backbone
from prolip.methods.base import Task


def build_task(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], shots: int,
               *, with_text_side: bool = False) -> Task:
    """Freeze what every method needs from CLIP for one classification task."""
    site = backbone.projection()
    text_pre = text_proj = None
    if with_text_side:
        text_pre, text_proj = backbone.text_side(list(classnames), list(templates))
    return Task(
        W0=site.weight.detach().float().cpu(),
        bias=None if site.bias is None else site.bias.detach().float().cpu(),
        classifier=backbone.encode_text(list(classnames), list(templates)).detach().float().cpu(),
        logit_scale=float(backbone.logit_scale),
        shots=shots,
        text_pre=text_pre,
        text_proj=text_proj,
    )
