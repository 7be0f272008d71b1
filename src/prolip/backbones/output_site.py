"""The output site: an identity-initialised square map W on the final image embedding (W0 = I, z = the embedding).

Every model has an image embedding, so every model can be adapted here, whether or not its tower ends in a linear
map prolip knows (an open_clip attention pool with no projection has none). z is the model's own ``encode_image``
output, unnormalised, so at W = W0 the logits are the model's zero-shot logits exactly. The map is no tensor of the
checkpoint: export refuses it (:class:`~prolip.backbones.base.SiteExportError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from prolip.backbones.base import Backbone, ProjectionSite
from prolip.backbones.loading import fingerprint

OUTPUT_PARAM = "<output site: identity on the image embedding>"


class OutputSiteBackbone(Backbone):
    """``inner`` seen at its output site; the text side, model, device and preprocessing are ``inner``'s."""

    def __init__(self, inner: Backbone):
        self.inner = inner
        self.model = inner.model
        self.device = inner.device
        self.preprocessing = inner.preprocessing
        # z here is not the native site's z: feature caches keyed on the fingerprint must keep them apart.
        self.info = replace(
            inner.info, site="output", fingerprint=fingerprint({"output site of": inner.info.fingerprint}, {})
        )
        self._dim = int(self._probe_dim())

    def _probe_dim(self) -> int:
        size = self.preprocessing.image_size
        probe = torch.zeros(1, 3, size, size, device=self.device)
        return int(self.inner.encode_image(probe).shape[-1])

    @torch.no_grad()
    def encode_pre(self, images: Tensor) -> Tensor:
        return self.inner.encode_image(images).float()

    def encode_image(self, images: Tensor) -> Tensor:
        return self.inner.encode_image(images)

    def projection(self) -> ProjectionSite:
        return ProjectionSite(
            weight=torch.eye(self._dim, device=self.device),
            bias=None,
            param_name=OUTPUT_PARAM,
            native_layout="right",
            kind="output",
        )

    @property
    def logit_scale(self) -> float:
        return self.inner.logit_scale

    @property
    def logit_bias(self) -> float:
        return self.inner.logit_bias

    def encode_text_templates(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        return self.inner.encode_text_templates(classnames, templates)

    def text_side(self, classnames: Sequence[str], templates: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.inner.text_side(classnames, templates)

    def __getattr__(self, name: str) -> Any:
        # The family's own text helpers (tokenize, prompt_embeddings, ...) are the inner backbone's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def at_site(backbone: Backbone, site: str) -> Backbone:
    """``backbone`` at ``site`` ("native": as built, "output": :class:`OutputSiteBackbone`)."""
    return OutputSiteBackbone(backbone) if site == "output" else backbone
