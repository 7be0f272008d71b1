"""The small interface every CLIP backbone exposes to the rest of prolip."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from prolip.backbones.families import Family, family_named
from prolip.errors import RunError

# Where W sits: "native", the model's own last linear map (merged back into its checkpoint on export), or "output",
# an identity-initialised square map on the final image embedding that every model has (prolip.backbones.output_site).
SITES = ("native", "output")


class SiteExportError(RunError):
    """A run adapted at a site that is no tensor of the checkpoint, so there is nothing to merge it into."""


class SiteTrainingError(RunError):
    """Training inside the image encoder at a site whose W is not the model's parameter alone."""


@dataclass(frozen=True)
class ProjectionSite:
    """Where the last visual projector lives in the model, and its pretrained value.

    ``weight`` is always in right layout [D_pre, D] (``z @ W + b``). ``native_layout`` says how the model
    stores it: "right" (open_clip ViT ``visual.proj``) or "linear" (nn.Linear weight [D, D_pre]: ResNet
    ``attnpool.c_proj``, timm head projections, HF ``visual_projection``). ``bias`` is frozen. ``kind`` is the
    site (:data:`SITES`); an "output" site is W0 = I on the image embedding, with no parameter in the model
    (``param_name`` says so instead of naming one).

    ``residual_rows`` > 0 (a MAP head's fc2, :mod:`prolip.backbones.sites`): the linear's output is added to a
    per-image residual r, carried in z's last ``residual_rows`` coordinates (z = [h, r]) and in W's last rows, which
    are the identity at W0 (``z W0 + b = h W_fc2 + b + r``). Those rows are no part of the checkpoint's tensor:
    the residual is a frozen term, so :meth:`to_native` merges the rows above them and refuses a W whose residual
    rows left the identity (the checkpoint cannot hold a map on the residual). Every method that trains W keeps
    them frozen (an episode's ``Task.frozen_rows``; test-time ProLIP reads them here), so its W merges exactly.
    """

    weight: Tensor
    bias: Tensor | None
    param_name: str
    native_layout: Literal["right", "linear"]
    kind: Literal["native", "output"] = "native"
    residual_rows: int = 0

    def to_native(self, W: Tensor) -> Tensor:
        if self.kind != "native":
            raise SiteExportError(
                f"this run adapted the {self.kind} site ({self.param_name}), which is no tensor of the model's "
                "checkpoint: exporting it is not supported; use the run itself (prolip predict), or refit at the "
                "native site"
            )
        W = self._without_residual(W)
        return W if self.native_layout == "right" else W.t().contiguous()

    def _without_residual(self, W: Tensor) -> Tensor:
        """W's rows that are the checkpoint's tensor: all of them, or those above the frozen residual's rows."""
        k = self.residual_rows
        if not k:
            return W
        if not torch.equal(W[-k:], torch.eye(k, dtype=W.dtype, device=W.device)):
            raise SiteExportError(
                f"this run changed the last {k} rows of W, which carry the frozen residual that {self.param_name}'s "
                f"output is added to (the identity at W0, no tensor of the checkpoint): only W's first "
                f"{W.shape[0] - k} rows (the linear itself) can be merged; export a method that keeps those rows at "
                "W0, or use the run itself (prolip predict)"
            )
        return W[:-k]

    @staticmethod
    def from_native(weight: Tensor, layout: str) -> Tensor:
        return weight if layout == "right" else weight.t().contiguous()


def text_side_with_bias(pre: Tensor, proj: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """A text projection with a bias (SigLIP's) as a linear map on [u, 1]: ``[u, 1] [P; b] = u P + b`` exactly, so
    ``text_side``'s ``pre @ proj`` is the text embedding and a method adapting the projection (prolip-text) adapts
    its bias as the last row. Without a bias, ``(pre, proj)`` unchanged."""
    if bias is None:
        return pre, proj
    ones = torch.ones(*pre.shape[:-1], 1, dtype=pre.dtype, device=pre.device)
    return torch.cat([pre, ones], dim=-1), torch.cat([proj, bias.detach().to(proj).reshape(1, -1)])


@dataclass(frozen=True)
class Preprocessing:
    """What the image transforms need to know about a backbone (also part of feature-cache keys)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


@dataclass
class BackboneInfo:
    """Provenance of a loaded backbone: printed in reports, written in manifests, hashed into cache keys."""

    family: str  # the name of a registered family (prolip.backbones.families)
    arch: str  # e.g. "ViT-B-16", "RN50", hub id or directory for HF
    weights: str  # pretrained tag, file path, or "none"
    random_weights: bool
    fingerprint: str  # content hash of the weights + architecture (+ the site, when not native)
    site: str = "native"  # where W sits (SITES); manifests written before sites existed read as native
    # The local tokenizer folder the text side was built from (--tokenizer, or the one found beside the weights); ""
    # for a model's own (open_clip's bundled BPE, a hub tokenizer from the cache). Saved runs rebuild it from here.
    tokenizer: str = ""

    def describe(self) -> str:
        w = "RANDOM INIT (not pretrained)" if self.random_weights else self.weights
        return f"{self.family}:{self.arch} [{w}]" + ("" if self.site == "native" else f" @{self.site} site")


class Backbone(ABC):
    """A frozen CLIP model seen through the pieces ProLIP needs."""

    info: BackboneInfo
    preprocessing: Preprocessing
    device: torch.device
    # The wrapped model; its parameter names are the checkpoint's (fine-tuning and export address them by name).
    # Each family's subclass narrows it to its own model class.
    model: torch.nn.Module
    # Attributes a trainable copy (``prolip.image_training.trainable_copy``) shares with this backbone instead of
    # copying: helpers that hold no torch state (a tokenizer, an image processor). Every other attribute is deep-copied
    # with the model, so a module it references (a site's linear, a wrapped backbone) is the copy's own.
    copy_shares: tuple[str, ...] = ()

    @abstractmethod
    def encode_pre(self, images: Tensor) -> Tensor:
        """Pre-projection image features z [B, D_pre] (float32) for preprocessed images [B, 3, H, W]."""

    @abstractmethod
    def projection(self) -> ProjectionSite:
        """The pretrained projector W0 (right layout) and its frozen bias."""

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """The model's own image embedding [B, D] (float32, not normalised), as its ``encode_image`` gives it."""
        site = self.projection()
        z = self.encode_pre(images)
        out = z @ site.weight.to(z)
        return out if site.bias is None else out + site.bias.to(z)

    @property
    @abstractmethod
    def logit_scale(self) -> float:
        """exp(logit_scale) of the model (100 for OpenAI CLIP)."""

    @property
    def logit_bias(self) -> float:
        """The model's learned logit bias (SigLIP's sigmoid loss trains one); 0 for a CLIP, which has none."""
        return 0.0

    def zero_shot_logits(self, z: Tensor, classifier: Tensor, W: Tensor | None = None) -> Tensor:
        """The model's own zero-shot logits [N, C] for pre-projection features z (through the site at W, W0 by
        default) against a classifier with normalised rows: ``logit_scale · cos + logit_bias``, as the model's
        forward scores an image against its prompts. The bias is one scalar added to every class, so softmax,
        argmax, cross-entropy and ECE are the same without it: prolip's methods and reports, which read only those,
        leave it out; here it is, for logits that must be the model's own."""
        from prolip.functional import clip_logits

        site = self.projection()
        weight = site.weight if W is None else W
        bias = None if site.bias is None else site.bias.to(z)
        return clip_logits(z, weight.to(z), bias, classifier.to(z), self.logit_scale) + self.logit_bias

    @abstractmethod
    def encode_text_templates(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Per-template text embeddings [C, n_templates, D] (not normalised): template.format(classname)."""

    @abstractmethod
    def text_side(self, classnames: Sequence[str], templates: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Pre-projection text features [C, n_templates, D_text_pre] and the text projection [D_text_pre, D]."""

    def special_token_ids(self) -> set[int]:
        """The token ids that are not text (start, end, padding), for :meth:`context_positions`; families whose text
        side runs from token embeddings (``prompt_embeddings``) say which."""
        raise NotImplementedError(f"{self.info.arch}: its text tower is not run from token embeddings")

    def context_positions(self, text: str) -> slice:
        """Where ``text``'s own tokens sit when it begins a prompt: the first run of tokens that are not special
        (what TPT tunes). The start token, end token and padding differ by family: CLIP's ``[SOT] a photo of a
        [EOT] 0…``, SigLIP's ``a photo of a </s> <pad>…`` (no start token; the last position is pooled)."""
        ids = [int(t) for t in self.tokenize([text])[0]]  # type: ignore[attr-defined]
        special = self.special_token_ids()
        start = next((i for i, t in enumerate(ids) if t not in special), len(ids))
        stop = next((i for i in range(start, len(ids)) if ids[i] in special), len(ids))
        return slice(start, stop)

    def encode_text(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Text classifier T [C, D] as CLIP builds it (paper §3): underscores → spaces, templates ensembled, normed."""
        from prolip.functional import ensemble_classifier

        names = [c.replace("_", " ") for c in classnames]
        return ensemble_classifier(self.encode_text_templates(names, templates))

    @property
    def family(self) -> Family:
        """What this backbone's family can do (its projection site, trainable blocks, export format)."""
        return family_named(self.info.family)

    @property
    def dim_pre(self) -> int:
        return self.projection().weight.shape[0]

    @property
    def dim_embed(self) -> int:
        return self.projection().weight.shape[1]
