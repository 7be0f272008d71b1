"""CLIP backbones seen through the pieces ProLIP needs: pre-projection features, the projector, the text side.

``load_backbone(model, pretrained)`` is the one front door: the registered family whose prefix the model string
starts with builds it (``prolip.backbones.families``): an open_clip architecture (+ pretrained tag, local
checkpoint file, or "none" for a seeded random init), or a Hugging Face ``CLIPModel`` or ``SiglipModel`` ("hf:<id
or dir>", told apart by its config's model_type), at its native projection site or at the output site (``site=``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from prolip.backbones.base import SITES, Backbone, BackboneInfo, Preprocessing, ProjectionSite, SiteExportError
from prolip.backbones.coverage import Coverage, coverage
from prolip.backbones.families import Family, families, family_for_model, family_named, register_family
from prolip.backbones.hf import HF_CLIP
from prolip.backbones.hf_siglip import HF_SIGLIP
from prolip.backbones.loading import (
    PROVENANCE_KEY,
    BackboneLoadError,
    LabelledBackboneInfo,
    RandomWeightsWarning,
)
from prolip.backbones.openclip import (
    MODEL_CONFIG_DIR,
    OPEN_CLIP,
    OpenClipBackbone,
    OpenClipResNet,
    OpenClipViT,
    available_models,
)
from prolip.backbones.output_site import OutputSiteBackbone, at_site

__all__ = [
    "Backbone",
    "BackboneInfo",
    "BackboneLoadError",
    "Family",
    "families",
    "family_named",
    "register_family",
    "load_backbone_for",
    "Preprocessing",
    "ProjectionSite",
    "SITES",
    "Coverage",
    "coverage",
    "SiteExportError",
    "OutputSiteBackbone",
    "OpenClipBackbone",
    "OpenClipViT",
    "OpenClipResNet",
    "RandomWeightsWarning",
    "available_models",
    "load_backbone",
    "MODEL_CONFIG_DIR",
    "PROVENANCE_KEY",
    "LabelledBackboneInfo",
    "HF_CLIP",
    "HF_SIGLIP",
    "OPEN_CLIP",
]


def load_backbone(
    model: str = "ViT-B-16",
    pretrained: str = "openai",
    *,
    device: str | torch.device = "cpu",
    site: str = "native",
    tokenizer: str | None = None,
) -> Backbone:
    """Build a frozen backbone.

    model: an open_clip architecture (see :func:`available_models`), "hf:<hub id or local dir>", or any model
    string a registered family's prefix claims. pretrained: an open_clip tag (e.g. "openai"), a local checkpoint
    (.safetensors; .pt/.bin/.pth state dicts are read with ``weights_only=True``), or "none" for a random init
    (seed 0: the same model every time); ignored for hf: models. site: where W sits (:data:`SITES`): "native", the
    tower's own last linear map, or "output", an identity map on the image embedding that every model has
    (:func:`coverage` says which models have a native site). Recorded in ``info.site``. tokenizer: a local
    tokenizer folder for models whose tokenizer comes from the Hugging Face Hub (SigLIP, multilingual CLIPs, hf:
    models), recorded in ``info.tokenizer``; by default the one beside the weights, else the Hub's from the cache.
    Raises :class:`BackboneLoadError` with a fix when the weights or tokenizer cannot be had or the model has no
    such site.
    """
    if site not in SITES:
        raise BackboneLoadError(f"unknown site {site!r}: use one of {', '.join(SITES)}", option="--site")
    try:
        family = family_for_model(model)
    except ValueError as e:
        raise BackboneLoadError(str(e)) from None
    if tokenizer and not family.takes_tokenizer:
        raise BackboneLoadError(f"{model} ({family.name} family) takes no tokenizer folder", option="--tokenizer")
    extra = {"tokenizer": str(tokenizer)} if tokenizer else {}
    backbone = family.load(model[len(family.prefix) :], pretrained, device, **extra)
    if site == "native":
        backbone.projection()  # a model with no native site says so here, in one line naming the output site
    return at_site(backbone, site)


def load_backbone_for(backbone: Mapping[str, Any], *, device: str | torch.device = "cpu") -> Backbone:
    """Rebuild the backbone a run manifest's ``backbone`` entry (or ``vars(BackboneInfo)``) describes: its family
    names the model again, its weights are loaded as recorded."""
    try:
        family = family_named(str(backbone["family"]))
    except ValueError as e:
        raise BackboneLoadError(str(e)) from None
    return load_backbone(
        family.model_for(str(backbone["arch"])),
        str(backbone["weights"]),
        device=device,
        site=str(backbone.get("site", "native")),
        tokenizer=str(backbone.get("tokenizer") or "") or None,
    )
