"""Hugging Face ``transformers.CLIPModel`` backbones (transformers is imported lazily, only for hf:<...> models)."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from prolip.backbones.base import Backbone, BackboneInfo, Preprocessing, ProjectionSite
from prolip.backbones.families import AttentionTower, Family, register_family
from prolip.backbones.loading import HOW_TO_PASS_LOCAL, BackboneLoadError, fingerprint, hub_available, refused_pickle

TEXT_BATCH = 256
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# A real CLIP BPE vocabulary has ~49k entries; transformers offline can hand back a 2-token stub instead.
MIN_VOCAB = 1000

if TYPE_CHECKING:  # transformers is imported lazily at run time
    from transformers import CLIPModel, CLIPTextConfig


class HFClipBackbone(Backbone):
    """A frozen ``CLIPModel``: z = vision pooler_output (post_layernorm CLS); W = visual_projection.weight (no bias)."""

    model: CLIPModel
    copy_shares = ("tokenizer", "image_processor")

    def __init__(
        self,
        model,
        tokenizer,
        info: BackboneInfo,
        preprocessing: Preprocessing,
        device: torch.device | str = "cpu",
        image_processor=None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.info = info
        self.preprocessing = preprocessing

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @torch.no_grad()
    def encode_pre(self, images: Tensor) -> Tensor:
        out = self.model.vision_model(pixel_values=images.to(self.device, torch.float32))
        return out.pooler_output.float()

    def projection(self) -> ProjectionSite:
        return ProjectionSite(
            weight=self.model.visual_projection.weight.detach().t(),
            bias=None,
            param_name="visual_projection.weight",
            native_layout="linear",
        )

    # --- text side -------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        # CLIPConfig types text_config as what its constructor accepts (dict | CLIPTextConfig | None); a built
        # config always holds a CLIPTextConfig.
        length = cast("CLIPTextConfig", self.model.config.text_config).max_position_embeddings
        enc = self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return enc["input_ids"].to(self.device)

    def _eot_index(self, tokens: Tensor) -> Tensor:
        eos = self.model.text_model.eos_token_id
        if eos == 2:  # legacy configs: the EOT token has the largest id (as in CLIPTextTransformer)
            return tokens.argmax(dim=-1)
        return (tokens == eos).int().argmax(dim=-1)

    def prompt_embeddings(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token embeddings [C, L, W] of the tokenised texts (no positional embedding) and EOT indices [C]."""
        tokens = self.tokenize(texts)
        embeds = self.model.text_model.embeddings.token_embedding(tokens)
        return embeds.detach(), self._eot_index(tokens)

    def _text_pre_from_embeddings(self, token_embeds: Tensor, eot_idx: Tensor) -> Tensor:
        from transformers.masking_utils import create_causal_mask

        tm = self.model.text_model
        h = tm.embeddings(inputs_embeds=token_embeds)
        mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=None, cache=None)
        h = tm.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True).last_hidden_state
        h = tm.final_layer_norm(h)
        return h[torch.arange(h.shape[0], device=h.device), eot_idx]

    def text_projection(self) -> Tensor:
        """The text projection in right layout [D_text_pre, D]."""
        return self.model.text_projection.weight.t()

    def encode_text_embeddings(self, token_embeds: Tensor, eot_idx: Tensor) -> Tensor:
        """Text embeddings [C, D] (unnormalised) from token embeddings [C, L, W]; differentiable in token_embeds."""
        return self._text_pre_from_embeddings(token_embeds, eot_idx) @ self.text_projection()

    def text_side(self, classnames: Sequence[str], templates: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Pre-projection text features [C, n_templates, D_text_pre] (EOS token after final_layer_norm) and the
        text projection [D_text_pre, D] in right layout. Underscores in class names become spaces."""
        names = [c.replace("_", " ") for c in classnames]
        texts = [t.format(n) for n in names for t in templates]
        with torch.no_grad():
            pre = torch.cat(
                [
                    self._text_pre_from_embeddings(*self.prompt_embeddings(texts[i : i + TEXT_BATCH])).float()
                    for i in range(0, len(texts), TEXT_BATCH)
                ]
            )
        return pre.reshape(len(names), len(templates), -1).cpu(), self.text_projection().detach().float().cpu()

    @torch.no_grad()
    def encode_text_templates(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        texts = [t.format(c) for c in classnames for t in templates]
        out = [
            self.encode_text_embeddings(*self.prompt_embeddings(texts[i : i + TEXT_BATCH])).float()
            for i in range(0, len(texts), TEXT_BATCH)
        ]
        return torch.cat(out).reshape(len(classnames), len(templates), -1).cpu()


def load_hf_backbone(source: str, device: torch.device | str = "cpu") -> HFClipBackbone:
    """``CLIPModel`` + tokenizer from a local save_pretrained directory or a hub id (hub only when reachable)."""
    try:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    except ImportError:
        raise BackboneLoadError("hf:<...> models need transformers: pip install 'prolip[hf]'") from None

    local = Path(source).expanduser().is_dir()
    offline = local or not hub_available()
    where = f"local directory {source}" if local else f"Hugging Face Hub model {source!r}"
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except pickle.UnpicklingError as e:  # transformers reads .bin weights with torch.load(weights_only=True)
        pickles = sorted(str(f) for f in Path(source).glob("*") if f.suffix in (".bin", ".pt", ".pth")) if local else []
        raise refused_pickle(", ".join(pickles) or f"the weights of {where}", e) from None
    except (OSError, ValueError) as e:
        hint = "" if local else f"; the Hub is unreachable or offline (HF_HUB_OFFLINE), so {HOW_TO_PASS_LOCAL}"
        raise BackboneLoadError(f"cannot load CLIPModel from {where}: {str(e).splitlines()[0]}{hint}") from None
    if len(tokenizer) < MIN_VOCAB:
        raise BackboneLoadError(
            f"the tokenizer of {where} has only {len(tokenizer)} tokens (a real CLIP tokenizer has ~49k): its "
            f"vocab.json/merges.txt are missing or were not found offline; save the tokenizer next to the model"
        )
    try:
        image_processor = CLIPImageProcessor.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError):
        image_processor = None
    info = BackboneInfo(
        family="hf",
        arch=source,
        weights=source,
        random_weights=False,
        fingerprint=fingerprint(_config_for_hash(model.config), model.state_dict()),
    )
    return HFClipBackbone(
        model, tokenizer, info, _preprocessing(model.config, image_processor), device, image_processor
    )


def _config_for_hash(config) -> dict:
    volatile = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")
    return {k: v for k, v in config.to_dict().items() if k not in volatile and not k.startswith("_")}


def _preprocessing(config, image_processor) -> Preprocessing:
    if image_processor is None:
        return Preprocessing(image_size=config.vision_config.image_size, mean=OPENAI_MEAN, std=OPENAI_STD)
    crop = image_processor.crop_size  # a dict, a SizeDict or an int depending on the transformers version
    size = crop if isinstance(crop, int) else (crop["height"] if isinstance(crop, dict) else crop.height)
    return Preprocessing(
        image_size=int(size), mean=tuple(image_processor.image_mean), std=tuple(image_processor.image_std)
    )


# -- the family ------------------------------------------------------------------------------------------------------
def _attention_towers(model, arch: str) -> dict[str, AttentionTower | str]:
    return {
        "text": ("text_model.encoder.layers", model.text_model.encoder.layers, "self_attn"),
        "vision": ("vision_model.encoder.layers", model.vision_model.encoder.layers, "self_attn"),
    }


HF_CLIP = register_family(
    Family(
        name="hf",
        prefix="hf:",
        load=lambda source, pretrained, device: load_hf_backbone(source, device),
        image_prefixes=("vision_model.", "visual_projection."),
        last_image_block=lambda model: f"vision_model.encoder.layers.{len(model.vision_model.encoder.layers) - 1}.",
        attention_towers=_attention_towers,
        export_format="hf",
    )
)
