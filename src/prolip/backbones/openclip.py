"""open_clip (and OpenAI-format) CLIP models: ViT and ModifiedResNet image towers, the standard text tower."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import Tensor

from prolip.backbones.base import Backbone, BackboneInfo, Preprocessing, ProjectionSite
from prolip.backbones.families import AttentionTower, Family, register_family
from prolip.backbones.loading import (
    HOW_TO_PASS_LOCAL,
    BackboneLoadError,
    LabelledBackboneInfo,
    RandomWeightsWarning,
    declared_provenance,
    fingerprint,
    hub_available,
    load_into,
    read_state_dict,
)

TEXT_BATCH = 256
RANDOM_INIT_SEED = 0

# Tiny architectures for tests and demos ("test-vit-tiny", "test-rn-tiny"), registered with open_clip.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
if str(MODEL_CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
    open_clip.add_model_config(MODEL_CONFIG_DIR)


class OpenClipBackbone(Backbone):
    """A frozen ``open_clip.model.CLIP``; subclasses say where the visual projector sits."""

    model: open_clip.model.CLIP

    def __init__(self, model: open_clip.model.CLIP, info: BackboneInfo, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.info = info
        self.tokenizer = open_clip.get_tokenizer(info.arch)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", model.visual.image_size)
        size = size if isinstance(size, int) else size[0]
        self.preprocessing = Preprocessing(
            image_size=int(size),
            mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
            interpolation=cfg.get("interpolation", "bicubic"),
        )

    @staticmethod
    def for_model(model: torch.nn.Module, info: BackboneInfo, device: torch.device | str = "cpu") -> OpenClipBackbone:
        """The backbone class matching the model's image tower, or a clear error for unsupported ones."""
        if type(model) is not open_clip.model.CLIP:
            raise BackboneLoadError(
                f"{info.arch} builds a {type(model).__name__}; prolip supports OpenAI-style open_clip CLIP models "
                f"(ViT-*, RN*) and Hugging Face CLIPModel (hf:<id>)"
            )
        if isinstance(model.visual, VisionTransformer) and model.visual.proj is not None:
            return OpenClipViT(model, info, device)
        if isinstance(model.visual, ModifiedResNet):
            return OpenClipResNet(model, info, device)
        raise BackboneLoadError(
            f"{info.arch}: image tower {type(model.visual).__name__} has no supported "
            f"last projection (need a ViT with visual.proj or a ModifiedResNet)"
        )

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    # --- text side -------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def _eot_index(self, tokens: Tensor) -> Tensor:
        pool = self.model.text_pool_type
        if pool == "argmax":  # the EOT token has the largest id
            return tokens.argmax(dim=-1)
        if pool == "eos":
            return (tokens == self.model.text_eos_id).int().argmax(dim=-1)
        if pool in ("first", "last"):
            return torch.full((tokens.shape[0],), 0 if pool == "first" else tokens.shape[1] - 1, device=tokens.device)
        raise BackboneLoadError(f"{self.info.arch}: unsupported text pooling {pool!r}")

    def prompt_embeddings(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token embeddings [C, L, W] of the tokenised texts (no positional embedding) and EOT indices [C]."""
        tokens = self.tokenize(texts)
        return self.model.token_embedding(tokens).detach(), self._eot_index(tokens)

    def _text_pre_from_embeddings(self, token_embeds: Tensor, eot_idx: Tensor) -> Tensor:
        m = self.model
        x = token_embeds + m.positional_embedding.to(token_embeds.dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        return x[torch.arange(x.shape[0], device=x.device), eot_idx]

    def text_projection(self) -> Tensor:
        """The text projection in right layout [D_text_pre, D]."""
        proj = self.model.text_projection
        return proj.weight.t() if isinstance(proj, torch.nn.Linear) else proj

    def encode_text_embeddings(self, token_embeds: Tensor, eot_idx: Tensor) -> Tensor:
        """Text embeddings [C, D] (unnormalised) from token embeddings [C, L, W]; differentiable in token_embeds."""
        x = self._text_pre_from_embeddings(token_embeds, eot_idx) @ self.text_projection()
        proj = self.model.text_projection
        return x + proj.bias if isinstance(proj, torch.nn.Linear) and proj.bias is not None else x

    @torch.no_grad()
    def _text_pre(self, texts: list[str]) -> Tensor:
        out = []
        for i in range(0, len(texts), TEXT_BATCH):
            embeds, eot = self.prompt_embeddings(texts[i : i + TEXT_BATCH])
            out.append(self._text_pre_from_embeddings(embeds, eot).float())
        return torch.cat(out)

    def text_side(self, classnames: Sequence[str], templates: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Pre-projection text features [C, n_templates, D_text_pre] (EOT token after ln_final) and the text
        projection [D_text_pre, D] in right layout. Underscores in class names become spaces."""
        if isinstance(self.model.text_projection, torch.nn.Linear) and self.model.text_projection.bias is not None:
            raise NotImplementedError(f"{self.info.arch}: text projection with a bias is not supported by text_side")
        names = [c.replace("_", " ") for c in classnames]
        texts = [t.format(n) for n in names for t in templates]
        pre = self._text_pre(texts).reshape(len(names), len(templates), -1)
        return pre.cpu(), self.text_projection().detach().float().cpu()

    @torch.no_grad()
    def encode_text_templates(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        texts = [t.format(c) for c in classnames for t in templates]
        out = [
            self.encode_text_embeddings(*self.prompt_embeddings(texts[i : i + TEXT_BATCH])).float()
            for i in range(0, len(texts), TEXT_BATCH)
        ]
        return torch.cat(out).reshape(len(classnames), len(templates), -1).cpu()


class OpenClipViT(OpenClipBackbone):
    """z = ln_post of the pooled (CLS) token; W = ``visual.proj`` stored in right layout."""

    @torch.no_grad()
    def encode_pre(self, images: Tensor) -> Tensor:
        v = self.model.visual
        x = v.transformer(v._embeds(images.to(self.device, torch.float32)))
        pooled, _ = v._pool(x)
        return pooled.float()

    def projection(self) -> ProjectionSite:
        return ProjectionSite(
            weight=self.model.visual.proj.detach(), bias=None, param_name="visual.proj", native_layout="right"
        )


class OpenClipResNet(OpenClipBackbone):
    """z = attention-pool output before ``attnpool.c_proj``; W = c_proj.weight (nn.Linear layout), bias frozen."""

    @torch.no_grad()
    def encode_pre(self, images: Tensor) -> Tensor:
        v = self.model.visual
        x = images.to(self.device, torch.float32)
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        return attention_pool_pre_projection(v.attnpool, x).float()

    def projection(self) -> ProjectionSite:
        c_proj = self.model.visual.attnpool.c_proj
        return ProjectionSite(
            weight=c_proj.weight.detach().t(),
            bias=c_proj.bias.detach(),
            param_name="visual.attnpool.c_proj.weight",
            native_layout="linear",
        )


def attention_pool_pre_projection(pool: torch.nn.Module, x: Tensor) -> Tensor:
    """open_clip's AttentionPool2d with the fused output projection replaced by identity and zero bias.

    open_clip applies c_proj inside ``F.multi_head_attention_forward``; running the same call with
    out_proj = (I, 0) yields the feature c_proj acts on, so ``z @ c_proj.weight.T + c_proj.bias`` is the output.
    """
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # the mean token is the query that gets pooled
    # ``pool`` is an AttentionPool2d, which open_clip leaves untyped: through nn.Module.__getattr__ every attribute
    # reads as ``Tensor | Module``, so name what AttentionPool2d.__init__ makes them.
    positional_embedding = cast(torch.nn.Parameter, pool.positional_embedding)
    num_heads = cast(int, pool.num_heads)
    q_proj, k_proj, v_proj = (cast(torch.nn.Linear, m) for m in (pool.q_proj, pool.k_proj, pool.v_proj))
    x = x + positional_embedding[:, None, :].to(x.dtype)
    dim = x.shape[-1]
    x, _ = F.multi_head_attention_forward(
        query=x,
        key=x,
        value=x,
        embed_dim_to_check=dim,
        num_heads=num_heads,
        q_proj_weight=q_proj.weight,
        k_proj_weight=k_proj.weight,
        v_proj_weight=v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([q_proj.bias, k_proj.bias, v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=torch.eye(dim, dtype=x.dtype, device=x.device),
        out_proj_bias=torch.zeros(dim, dtype=x.dtype, device=x.device),
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
    )
    return x[0]


# -- loading ---------------------------------------------------------------------------------------------------------
def _supported(cfg: dict) -> bool:
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    return not (
        cfg.get("custom_text")
        or "multimodal_cfg" in cfg
        or "timm_model_name" in vision
        or "hf_model_name" in text
        or "hf_tokenizer_name" in text
        or vision.get("attentional_pool")
        or vision.get("no_ln_pre")
        or text.get("embed_cls")
    )


def available_models() -> list[str]:
    """open_clip architectures prolip can adapt (OpenAI-style CLIP with a ViT or ModifiedResNet image tower).

    Hugging Face CLIPModel checkpoints are also accepted as ``hf:<hub id or local dir>``.
    """
    return [m for m in open_clip.list_models() if _supported(open_clip.get_model_config(m) or {})]


def load_open_clip(model: str, pretrained: str, device: str | torch.device = "cpu") -> OpenClipBackbone:
    """An open_clip architecture with ``pretrained`` weights: a tag (e.g. "openai"), a local checkpoint
    (.safetensors; .pt/.bin/.pth state dicts read with ``weights_only=True``), or "none" for a random init (seed 0:
    the same model every time)."""
    if open_clip.get_model_config(model) is None:
        raise BackboneLoadError(
            f"unknown model {model!r}: use one of available_models() (e.g. ViT-B-16, RN50, "
            f"test-vit-tiny) or hf:<hub id or local dir> for a Hugging Face CLIPModel"
        )
    if not _supported(open_clip.get_model_config(model)):
        raise BackboneLoadError(
            f"{model} is not an OpenAI-style CLIP architecture (it uses a timm/HF tower, "
            f"attentional pooling or a multimodal decoder); use one of available_models()"
        )
    path = None if pretrained.lower() == "none" else _checkpoint_path(model, pretrained)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG untouched
        torch.manual_seed(RANDOM_INIT_SEED)
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly" before we load the weights
        try:
            clip = open_clip.create_model(model, pretrained=None, device="cpu")
        finally:
            logging.disable(logging.NOTSET)
    clip.eval()
    if path is None:
        weights, random_weights = "none", True
        warnings.warn(
            f"{model} has RANDOM weights (pretrained='none', seed {RANDOM_INIT_SEED}); its features and "
            f"accuracies mean nothing",
            RandomWeightsWarning,
            stacklevel=3,
        )
    else:
        load_into(clip, read_state_dict(path), str(path))
        # a tag stays a tag; a file is recorded absolute so saved runs reload it from any directory
        is_tag = bool(open_clip.get_pretrained_cfg(model, pretrained)) and not Path(pretrained).exists()
        weights, random_weights = (pretrained if is_tag else str(path.resolve())), False
    cfg = {"arch": model, "config": open_clip.get_model_config(model)}
    info = BackboneInfo(
        family="open_clip",
        arch=model,
        weights=weights,
        random_weights=random_weights,
        fingerprint=fingerprint(cfg, clip.state_dict()),
    )
    provenance = "" if path is None else declared_provenance(path)
    if provenance:
        info = LabelledBackboneInfo(**vars(info), provenance=provenance)
    return OpenClipBackbone.for_model(clip, info, device)


def _checkpoint_path(model: str, pretrained: str) -> Path:
    """A local file for ``pretrained``: the path itself, or the tag's file from the Hub (cache first)."""
    if Path(pretrained).expanduser().exists() or any(s in pretrained for s in ("/", "\\", ".safetensors", ".pt")):
        return Path(pretrained).expanduser()
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        known = "known tags: " + ", ".join(tags) if tags else "it has no pretrained tags"
        raise BackboneLoadError(
            f"unknown pretrained tag {pretrained!r} for {model} ({known}); "
            f"use 'none' for random weights, or {HOW_TO_PASS_LOCAL}"
        )
    cached = _cached_hub_file(cfg.get("hf_hub", ""))
    if cached is not None:
        return cached
    if not hub_available():
        raise BackboneLoadError(
            f"cannot get {model}/{pretrained} weights: the Hugging Face Hub is offline (HF_HUB_OFFLINE) or "
            f"unreachable and they are not in the local cache; {HOW_TO_PASS_LOCAL}"
        )
    try:
        return Path(open_clip.download_pretrained(cfg))
    except Exception as e:  # network stacks raise many types; all mean the same thing here
        raise BackboneLoadError(f"downloading {model}/{pretrained} failed ({e}); {HOW_TO_PASS_LOCAL}") from None


def _cached_hub_file(hf_hub: str) -> Path | None:
    if not hf_hub:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = hf_hub.rstrip("/").rsplit("/", 1) if not hf_hub.endswith("/") else (hf_hub.rstrip("/"), "")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith(".bin"):
        names.insert(0, filename[:-4] + ".safetensors")
    for name in names:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str):
            return Path(hit)
    return None


# -- the family ------------------------------------------------------------------------------------------------------
def _last_image_block(model) -> str:
    """ResNets: the attention pool (positional embedding, q/k/v/c_proj weights and biases; Last_Layer_FT.py:53-55).
    ViTs: the last transformer block (Last_Layer_FT.py:57-59); the projection stays W0."""
    if isinstance(model.visual, ModifiedResNet):
        return "visual.attnpool."
    return f"visual.transformer.resblocks.{len(model.visual.transformer.resblocks) - 1}."


def _attention_towers(model, arch: str) -> dict[str, AttentionTower | str]:
    """CLIP-LoRA's towers (loralib/utils.py:108-135): the text transformer, and the image transformer of a ViT."""
    vision: AttentionTower | str = (
        ("visual.transformer.resblocks", model.visual.transformer.resblocks, "attn")
        if hasattr(model.visual, "transformer")
        else f"clip-lora adapts ViT image encoders only (loralib/utils.py INDEX_POSITIONS_VISION); {arch} is a "
        f"ResNet: use encoder: text"
    )
    return {"text": ("transformer.resblocks", model.transformer.resblocks, "attn"), "vision": vision}


OPEN_CLIP = register_family(
    Family(
        name="open_clip",
        prefix="",
        load=load_open_clip,
        image_prefixes=("visual.",),
        last_image_block=_last_image_block,
        attention_towers=_attention_towers,
        export_format="open_clip",
    )
)
