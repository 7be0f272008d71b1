"""Where an open_clip image tower's last linear map sits, found by inspecting the built tower (never its name).

The native site is the map whose output is the tower's image embedding, so that ``z @ W + b`` with W = W0 is
exactly what ``encode_image`` returns:

- a ViT (``VisionTransformer``) with ``visual.proj``: right layout, z = the pooled token before it;
- a ``ModifiedResNet``: ``attnpool.c_proj`` (nn.Linear layout, bias frozen);
- a timm tower (``TimmModel``) whose last map is an ``nn.Linear``: open_clip's own head projection
  (``visual.head.proj``, or ``visual.head.mlp.fc2`` for an MLP head), else the timm trunk's classifier
  (``visual.trunk.head`` as in EVA, PE-Core and MobileCLIP-B, or ``visual.trunk.head.fc`` as in MobileCLIP-S*);
  z = the input of that linear, read by a forward pre-hook so it is the tower's own computation.

- a timm ViT whose tower ends in its MAP head (``AttentionPoolLatent``) with no projection after it (SigLIP,
  SigLIP 2): the head's last linear ``visual.trunk.attn_pool.mlp.fc2``, whose output is added to the head's residual
  ``x`` (``x + mlp(norm(x))``) and then only pooled (token 0 or the mean over latents: linear), with no norm or map
  after it (``fc_norm`` and the classifier are identities). The residual is a frozen per-image term: z = [h, r]
  (h the input of fc2, r the residual), W0 = [fc2.weight^T; I], so ``z W0 + b`` is the tower's output. ``residual``
  names the attention pool; :class:`~prolip.backbones.base.ProjectionSite` counts the residual rows.

Towers that end in something else (an attention pool followed by a norm or by nothing linear) have no native site:
they are adapted at the output site (:mod:`prolip.backbones.output_site`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.layers.attention_pool import AttentionPoolLatent
from timm.layers.mlp import Mlp
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import Tensor

from prolip.backbones.base import ProjectionSite


@dataclass(frozen=True)
class NativeSite:
    """A native projection site of an image tower, named as in the whole model's state dict."""

    param_name: str  # the weight: "visual.proj", "visual.head.proj.weight", ...
    module: str  # the nn.Linear holding it ("" for the bare ``visual.proj`` parameter)
    layout: Literal["right", "linear"]
    tower: str  # what kind of tower it is, for listings
    # A MAP-head site: the attention pool whose residual the linear's output is added to ("" for other sites).
    residual: str = ""


def native_site(visual: torch.nn.Module) -> NativeSite | None:
    """The native site of an open_clip image tower ``visual`` (the model's ``.visual``), or None."""
    if isinstance(visual, VisionTransformer):
        return NativeSite("visual.proj", "", "right", "ViT") if visual.proj is not None else None
    if isinstance(visual, ModifiedResNet):
        return NativeSite("visual.attnpool.c_proj.weight", "visual.attnpool.c_proj", "linear", "ModifiedResNet")
    if isinstance(visual, TimmModel):
        module = _timm_linear(visual)
        tower = f"timm {type(visual.trunk).__name__}"
        if module is not None:
            return NativeSite(f"visual.{module}.weight", f"visual.{module}", "linear", tower)
        if _ends_in_map_head(visual):
            fc2 = "visual.trunk.attn_pool.mlp.fc2"
            return NativeSite(f"{fc2}.weight", fc2, "linear", f"{tower} MAP", residual="visual.trunk.attn_pool")
        return None
    return None


def tower_kind(visual: torch.nn.Module) -> str:
    """A short description of the tower (for ``coverage()``), with or without a native site."""
    site = native_site(visual)
    if site is not None:
        return site.tower
    if isinstance(visual, TimmModel):
        return f"timm {type(visual.trunk).__name__}"
    return type(visual).__name__


def _timm_linear(visual: TimmModel) -> str | None:
    """The module path (under ``visual``) of a timm tower's last linear map, when its last map is one.

    open_clip's ``head`` runs after the trunk: when it holds a map, that map is the last one; when it is empty the
    trunk's own classifier head (built with ``num_classes=embed_dim``) is the projection.
    """
    head = dict(visual.head.named_children())
    if isinstance(head.get("proj"), torch.nn.Linear):
        return "head.proj"
    if isinstance(getattr(head.get("mlp"), "fc2", None), torch.nn.Linear):
        return "head.mlp.fc2"
    if head:  # an attention pool ends the tower
        return None
    trunk_head = getattr(visual.trunk, "head", None)
    if isinstance(trunk_head, torch.nn.Linear):
        return "trunk.head"
    if isinstance(getattr(trunk_head, "fc", None), torch.nn.Linear):
        return "trunk.head.fc"
    return None


def _ends_in_map_head(visual: TimmModel) -> bool:
    """Whether the tower's output is its MAP head's ``x + fc2(...)``, only pooled: timm's own ViT forward_head and
    attention pool (not a subclass that changes them), an MLP ending in fc2, token or mean pooling, and nothing
    after it (no ``fc_norm``, no classifier, no open_clip head). A norm after fc2 would make it no linear site."""
    trunk, pool = visual.trunk, getattr(visual.trunk, "attn_pool", None)
    if len(visual.head) or not isinstance(trunk, TimmVisionTransformer) or not isinstance(pool, AttentionPoolLatent):
        return False
    if type(trunk).forward_head is not TimmVisionTransformer.forward_head:
        return False
    if type(pool).forward is not AttentionPoolLatent.forward or pool.pool not in ("token", "avg"):
        return False
    mlp = pool.mlp
    return (
        isinstance(mlp, Mlp)
        and type(mlp).forward is Mlp.forward
        and isinstance(mlp.fc2, torch.nn.Linear)
        and isinstance(mlp.drop2, torch.nn.Dropout | torch.nn.Identity)
        and all(isinstance(m, torch.nn.Identity) for m in (trunk.fc_norm, trunk.head))
    )


# -- a MAP head's fc2 as the site: what every family with such a head shares (open_clip/timm, Hugging Face SigLIP) --
def map_head_features(run: Callable[[], object], fc2: torch.nn.Module, norm: torch.nn.Module, pool: str) -> Tensor:
    """z = [h, r] of a MAP head ``x + fc2(act(fc1(norm(x))))``: h the input of ``fc2`` and r = x the input of the
    head's ``norm``, both caught by forward pre-hooks while ``run()`` runs the model's own forward (so z is the
    tower's computation, with gradients when ``run`` has them), then pooled as the head pools its latent tokens
    ("token": the first, "avg": the mean; linear, so it commutes with the site). [B, D_h + D]."""
    caught: dict[str, Tensor] = {}
    hooks = [
        fc2.register_forward_pre_hook(lambda _m, args: caught.__setitem__("h", args[0])),
        norm.register_forward_pre_hook(lambda _m, args: caught.__setitem__("r", args[0])),
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    z = torch.cat([caught["h"], caught["r"]], dim=-1)  # [B, latent_len, D_h + D]
    return z[:, 0] if pool == "token" else z.mean(dim=1)


def map_head_site(fc2_site: ProjectionSite) -> ProjectionSite:
    """The MAP-head site from its fc2's: W0 = [fc2.weight^T; I], the last D rows carrying the residual as a frozen
    per-image term (``ProjectionSite.residual_rows``), so ``z W0 + b = h fc2.weight^T + fc2.bias + r``."""
    d = fc2_site.weight.shape[1]
    residual = torch.eye(d, dtype=fc2_site.weight.dtype, device=fc2_site.weight.device)
    return replace(fc2_site, weight=torch.cat([fc2_site.weight, residual]), residual_rows=d)
