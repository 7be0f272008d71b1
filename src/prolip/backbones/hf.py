"""Hugging Face ``transformers.CLIPModel`` backbones (transformers is imported lazily, only for hf:<...> models)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from prolip.backbones.base import Backbone, BackboneInfo, Preprocessing, ProjectionSite
from prolip.backbones.families import AttentionTower, Family, register_family
from prolip.backbones.loading import (
    HOW_TO_PASS_LOCAL,
    HOW_TO_PASS_TOKENIZER,
    TOKENIZER_FILES,
    BackboneLoadError,
    check_vocab,
    fingerprint,
    holds_tokenizer,
    hub_available,
    refused_pickle,
    tokenizer_unavailable,
)

TEXT_BATCH = 256
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# The Hugging Face model types ``hf:<id or dir>`` builds besides "clip", each by the module of its family (its config's
# model_type says which, so one prefix serves every Hugging Face model prolip adapts): model_type -> load(source,
# device, tokenizer folder or None).
HF_MODEL_TYPES: dict[str, Callable[[str, Any, str | None], Backbone]] = {}

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

    def special_token_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids)

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


def hf_source(source: str) -> tuple[bool, str]:
    """(whether to read ``source`` from disk only, how to name it in messages): a local folder, or a hub id fetched
    only when the Hub is reachable (else from the cache)."""
    local = Path(source).expanduser().is_dir()
    return local or not hub_available(), f"local directory {source}" if local else f"Hugging Face Hub model {source!r}"


def _model_type(source: str, offline: bool) -> str:
    """The ``model_type`` of ``source``'s config.json ("clip", "siglip", ...); "" when it cannot be read here (then
    loading it says why)."""
    if Path(source).expanduser().is_dir():
        try:
            return str(json.loads((Path(source).expanduser() / "config.json").read_text()).get("model_type", ""))
        except (OSError, ValueError, AttributeError):
            return ""
    try:
        from transformers import AutoConfig

        return str(AutoConfig.from_pretrained(source, local_files_only=offline).model_type)
    except (OSError, ValueError):
        return ""


def load_hf(source: str, device: torch.device | str = "cpu", tokenizer: str | None = None) -> Backbone:
    """The backbone ``hf:<source>`` names: a ``CLIPModel``, or the model type another family registered in
    :data:`HF_MODEL_TYPES` (``SiglipModel``); any other model type is refused in one line."""
    model_type = _model_type(source, hf_source(source)[0])
    if model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type](source, device, tokenizer)
    if model_type not in ("", "clip"):
        known = ", ".join(["clip", *sorted(HF_MODEL_TYPES)])
        raise BackboneLoadError(
            f"hf:{source} is a {model_type!r} model; prolip adapts Hugging Face model types {known} (CLIPModel, "
            f"SiglipModel: SigLIP and the fixed-resolution SigLIP 2 checkpoints)"
        )
    return load_hf_backbone(source, device, tokenizer)


def load_hf_tokenizer(source: str, tokenizer: str | None, offline: bool, where: str, model_vocab: int):
    """The tokenizer of an hf: model: from ``tokenizer`` (a local folder) when given, else the model's own folder or
    hub id; a missing one fails at once with the offline message, a stub too small to be the model's is refused."""
    from transformers import AutoTokenizer

    folder = None if tokenizer is None else Path(tokenizer).expanduser()
    if folder is not None and not folder.is_dir():
        raise BackboneLoadError(f"tokenizer folder {folder} does not exist", option="--tokenizer")
    local = folder or (Path(source).expanduser() if Path(source).expanduser().is_dir() else None)
    if local is not None and not holds_tokenizer(local):
        # Said here, at once: transformers would build a stub of special tokens (CLIP) or search every tokenizer
        # class for seconds before failing (SigLIP).
        raise BackboneLoadError(
            f"the tokenizer of {folder or where} is missing (none of {', '.join(TOKENIZER_FILES)}), so it would "
            f"have only its special tokens; {HOW_TO_PASS_TOKENIZER}",
            option="--tokenizer",
        )
    try:
        tok = AutoTokenizer.from_pretrained(folder or source, local_files_only=offline or folder is not None)
    except (OSError, ValueError, ImportError) as e:  # ImportError: a SentencePiece tokenizer without sentencepiece
        if folder is not None or Path(source).expanduser().is_dir():
            raise BackboneLoadError(
                f"cannot read the tokenizer of {folder or where} ({str(e).splitlines()[0]}); {HOW_TO_PASS_TOKENIZER}",
                option="--tokenizer",
            ) from None
        raise tokenizer_unavailable(f"hf:{source}", source, e) from None
    check_vocab(len(tok), model_vocab, str(folder or where))
    return tok


def load_hf_backbone(source: str, device: torch.device | str = "cpu", tokenizer: str | None = None) -> HFClipBackbone:
    """``CLIPModel`` + tokenizer from a local save_pretrained directory or a hub id (hub only when reachable)."""
    try:
        from transformers import CLIPImageProcessor, CLIPModel
    except ImportError:
        raise BackboneLoadError("hf:<...> models need transformers: pip install 'prolip[hf]'") from None

    offline, where = hf_source(source)
    model = load_pretrained(CLIPModel, source, offline, where)
    vocab = cast("CLIPTextConfig", model.config.text_config).vocab_size
    parts = HFParts(source, offline, where, tokenizer, vocab, CLIPImageProcessor, _preprocessing)
    return assemble(HFClipBackbone, "hf", model, parts, device)


@dataclass(frozen=True)
class HFParts:
    """What a Hugging Face family reads beside its model: where from, its tokenizer, its image processor."""

    source: str
    offline: bool
    where: str
    tokenizer: str | None
    vocab_size: int
    processor_class: Any
    preprocessing: Callable[[Any, Any], Preprocessing]


def assemble(backbone_class, family: str, model, parts: HFParts, device: torch.device | str):
    """A Hugging Face family's backbone from its loaded model: tokenizer (checked against the model's vocabulary),
    image processor (its defaults when the folder has none), fingerprint and recorded tokenizer folder."""
    tok = load_hf_tokenizer(parts.source, parts.tokenizer, parts.offline, parts.where, parts.vocab_size)
    try:
        image_processor = parts.processor_class.from_pretrained(parts.source, local_files_only=parts.offline)
    except (OSError, ValueError):
        image_processor = None
    info = BackboneInfo(
        family=family,
        arch=parts.source,
        weights=parts.source,
        random_weights=False,
        fingerprint=fingerprint(_config_for_hash(model.config), model.state_dict()),
        tokenizer="" if parts.tokenizer is None else str(Path(parts.tokenizer).expanduser().resolve()),
    )
    prep = parts.preprocessing(model.config, image_processor)
    return backbone_class(model, tok, info, prep, device, image_processor)


def load_pretrained(model_class, source: str, offline: bool, where: str):
    """``model_class.from_pretrained(source)``, its failures as one line (a pickle refused, weights not found)."""
    try:
        return model_class.from_pretrained(source, local_files_only=offline)
    except pickle.UnpicklingError as e:  # transformers reads .bin weights with torch.load(weights_only=True)
        local = Path(source).expanduser().is_dir()
        pickles = sorted(str(f) for f in Path(source).glob("*") if f.suffix in (".bin", ".pt", ".pth")) if local else []
        raise refused_pickle(", ".join(pickles) or f"the weights of {where}", e) from None
    except (OSError, ValueError) as e:
        hint = (
            ""
            if Path(source).expanduser().is_dir()
            else (f"; the Hub is unreachable or offline (HF_HUB_OFFLINE), so {HOW_TO_PASS_LOCAL}")
        )
        raise BackboneLoadError(
            f"cannot load {model_class.__name__} from {where}: {str(e).splitlines()[0]}{hint}"
        ) from None


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


def _load(source: str, _pretrained: str, device, tokenizer: str | None = None) -> Backbone:
    return load_hf(source, device, tokenizer)  # hf: models carry their weights: pretrained is not read


HF_CLIP = register_family(
    Family(
        name="hf",
        prefix="hf:",
        load=_load,
        image_prefixes=("vision_model.", "visual_projection."),
        last_image_block=lambda model: f"vision_model.encoder.layers.{len(model.vision_model.encoder.layers) - 1}.",
        attention_towers=_attention_towers,
        export_format="hf",
        takes_tokenizer=True,
    )
)
