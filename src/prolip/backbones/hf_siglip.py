"""Hugging Face ``transformers.SiglipModel`` backbones: SigLIP, and SigLIP 2 at fixed resolution (its checkpoints,
e.g. google/siglip2-base-patch16-224, are ``SiglipModel`` with a Gemma tokenizer).

A user names one as ``hf:<hub id or dir>`` like a CLIPModel (its config's ``model_type`` "siglip" picks this family,
:data:`prolip.backbones.hf.HF_MODEL_TYPES`), or ``hf-siglip:<hub id or dir>``, the name saved runs use. SigLIP 2's
NaFlex ``Siglip2Model`` (model_type "siglip2") is refused there: it takes patchified images of varying resolution.

- Image side: the vision tower ends in its MAP head (``SiglipMultiheadAttentionPoolingHead``: ``x + mlp(norm(x))``
  at the probe token, no projection after it), so the native site is the head's last linear
  ``vision_model.head.mlp.fc2`` with the residual x carried as frozen rows, exactly as the open_clip/timm MAP head
  (:func:`prolip.backbones.sites.map_head_features`, :func:`~prolip.backbones.sites.map_head_site`): z = [h, r],
  W0 = [fc2.weight^T; I], ``z W0 + b`` = ``get_image_features``' pooler_output.
- Text side: prompts canonicalised as SigLIP was trained (lower case, punctuation removed, open_clip's
  ``clean="canonicalize"``; SigLIP's own tokenizer does the same, the Gemma one of SigLIP 2 does not), padded to
  the model's fixed length (64, ``padding="max_length"`` as the model card says), the last token's state after
  ``final_layer_norm`` through ``text_model.head`` (a linear with a bias, in ``text_side`` a last row over a
  constant 1 feature).
- Logits: ``logit_scale.exp() · cos + logit_bias`` (:meth:`~prolip.backbones.base.Backbone.zero_shot_logits`).
- Export: ``save_pretrained`` of the model with fc2 merged (export format "hf", as a CLIPModel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
from open_clip.tokenizer import get_clean_fn
from torch import Tensor

from prolip.backbones.base import Preprocessing, ProjectionSite, text_side_with_bias
from prolip.backbones.families import AttentionTower, Family, register_family
from prolip.backbones.hf import (
    HF_MODEL_TYPES,
    HFClipBackbone,
    HFParts,
    assemble,
    hf_source,
    load_pretrained,
)
from prolip.backbones.loading import BackboneLoadError
from prolip.backbones.sites import map_head_features, map_head_site

if TYPE_CHECKING:  # transformers is imported lazily at run time
    from transformers import SiglipModel, SiglipTextConfig

FC2 = "vision_model.head.mlp.fc2"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# PIL resampling filters (SiglipImageProcessor.resample) by the name Preprocessing records.
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
canonicalize = get_clean_fn("canonicalize")


class HFSiglipBackbone(HFClipBackbone):
    """A frozen ``SiglipModel`` at its MAP head's fc2 (see the module docstring); the text side runs its own
    bidirectional text transformer from token embeddings (the prompt methods' path) as from token ids."""

    model: SiglipModel  # type: ignore[assignment]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        head = self.model.vision_model.head
        self.linear, self.norm = head.mlp.fc2, head.layernorm

    @property
    def logit_bias(self) -> float:
        return float(self.model.logit_bias.detach())

    @torch.no_grad()
    def encode_pre(self, images: Tensor) -> Tensor:
        x = images.to(self.device, torch.float32)
        return map_head_features(lambda: self.model.vision_model(pixel_values=x), self.linear, self.norm, "token")

    def projection(self) -> ProjectionSite:
        fc2 = ProjectionSite(
            weight=self.linear.weight.detach().t(),
            bias=self.linear.bias.detach(),
            param_name=f"{FC2}.weight",
            native_layout="linear",
        )
        return map_head_site(fc2)

    # --- text side -------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        length = cast("SiglipTextConfig", self.model.config.text_config).max_position_embeddings
        enc = self.tokenizer(
            [canonicalize(t) for t in texts],
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        )
        return enc["input_ids"].to(self.device)

    def _eot_index(self, tokens: Tensor) -> Tensor:
        # SiglipTextModel pools the last position (padding included), whatever the tokens.
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)

    def _text_pre_from_embeddings(self, token_embeds: Tensor, eot_idx: Tensor) -> Tensor:
        tm = self.model.text_model
        h = tm.embeddings(inputs_embeds=token_embeds)
        h = tm.encoder(inputs_embeds=h, attention_mask=None).last_hidden_state  # no mask: SigLIP attends to all
        h = tm.final_layer_norm(h)
        return h[torch.arange(h.shape[0], device=h.device), eot_idx]

    def text_projection(self) -> Tensor:
        return self.model.text_model.head.weight.t()

    def encode_text_embeddings(self, token_embeds: Tensor, eot_idx: Tensor) -> Tensor:
        return (
            self._text_pre_from_embeddings(token_embeds, eot_idx) @ self.text_projection()
            + self.model.text_model.head.bias
        )

    def text_side(self, classnames: Sequence[str], templates: Sequence[str]) -> tuple[Tensor, Tensor]:
        """As a CLIPModel's, with the head's bias carried as a last row over a constant 1 feature."""
        pre, proj = super().text_side(classnames, templates)
        return text_side_with_bias(pre, proj, self.model.text_model.head.bias)


def load_siglip(source: str, device: torch.device | str = "cpu", tokenizer: str | None = None) -> HFSiglipBackbone:
    """``SiglipModel`` + tokenizer (+ image processor) from a local save_pretrained directory or a hub id."""
    try:
        from transformers import AutoImageProcessor, SiglipModel
    except ImportError:
        raise BackboneLoadError("hf:<...> models need transformers: pip install 'prolip[hf]'") from None

    offline, where = hf_source(source)
    model = load_pretrained(SiglipModel, source, offline, where)
    if not model.config.vision_config.vision_use_head:
        raise BackboneLoadError(
            f"{where}: its vision tower has no MAP head (vision_use_head=False): no image embedding"
        )
    vocab = model.config.text_config.vocab_size
    parts = HFParts(source, offline, where, tokenizer, vocab, AutoImageProcessor, _preprocessing)
    return assemble(HFSiglipBackbone, "hf_siglip", model, parts, device)


def _preprocessing(config, image_processor) -> Preprocessing:
    """SiglipImageProcessor resizes to a square ``size`` (no crop), mean = std = 0.5."""
    size = config.vision_config.image_size
    if image_processor is None:
        return Preprocessing(image_size=size, mean=SIGLIP_MEAN, std=SIGLIP_STD)
    given = getattr(image_processor, "size", None)  # a dict or a SizeDict depending on the transformers version
    height = given.get("height") if isinstance(given, dict) else getattr(given, "height", None)
    resample = getattr(image_processor, "resample", 3)
    return Preprocessing(
        image_size=int(height or size),
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
        interpolation=RESAMPLE.get(int(getattr(resample, "value", resample)), "bicubic"),
    )


# -- the family ------------------------------------------------------------------------------------------------------
def _attention_towers(model, arch: str) -> dict[str, AttentionTower | str]:
    return {
        "text": ("text_model.encoder.layers", model.text_model.encoder.layers, "self_attn"),
        "vision": ("vision_model.encoder.layers", model.vision_model.encoder.layers, "self_attn"),
    }


def _last_image_block(model) -> str:
    """The last encoder layer, as for the same model in open_clip (the timm trunk's last block); the MAP head after
    it holds the site."""
    return f"vision_model.encoder.layers.{len(model.vision_model.encoder.layers) - 1}."


def _load(source: str, _pretrained: str, device, tokenizer: str | None = None) -> HFSiglipBackbone:
    return load_siglip(source, device, tokenizer)  # the weights are the folder's (or hub id's): pretrained unread


HF_SIGLIP = register_family(
    Family(
        name="hf_siglip",
        prefix="hf-siglip:",
        load=_load,
        image_prefixes=("vision_model.",),
        last_image_block=_last_image_block,
        attention_towers=_attention_towers,
        export_format="hf",
        takes_tokenizer=True,
    )
)
HF_MODEL_TYPES["siglip"] = load_siglip
