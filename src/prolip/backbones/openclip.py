"""open_clip models (CLIP, CustomTextCLIP, CoCa's contrastive path): ViT, ModifiedResNet and timm image towers at
their native site where they have one (:mod:`prolip.backbones.sites`), the built-in or a custom text tower."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from timm.layers.attention_pool import AttentionPoolLatent
from torch import Tensor

from prolip.backbones.base import Backbone, BackboneInfo, Preprocessing, ProjectionSite, text_side_with_bias
from prolip.backbones.families import AttentionTower, Family, register_family
from prolip.backbones.loading import (
    HOW_TO_PASS_LOCAL,
    HOW_TO_PASS_TOKENIZER,
    MIN_VOCAB,
    TOKENIZER_FILES,
    BackboneLoadError,
    LabelledBackboneInfo,
    RandomWeightsWarning,
    check_vocab,
    declared_provenance,
    fingerprint,
    holds_tokenizer,
    hub_available,
    load_into,
    read_state_dict,
    tokenizer_unavailable,
)
from prolip.backbones.sites import NativeSite, map_head_features, map_head_site, native_site, tower_kind
from prolip.errors import ProlipError

TEXT_BATCH = 256
RANDOM_INIT_SEED = 0

# Tiny architectures for tests and demos ("test-vit-tiny", "test-rn-tiny"), registered with open_clip.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
if str(MODEL_CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
    open_clip.add_model_config(MODEL_CONFIG_DIR)


# The model classes whose image tower is ``.visual`` and whose ``encode_image`` / ``encode_text`` give the embeddings
# the zero-shot classifier compares (CoCa through its contrastive path).
MODEL_CLASSES = (open_clip.model.CLIP, open_clip.model.CustomTextCLIP, open_clip.coca_model.CoCa)


class OpenClipBackbone(Backbone):
    """A frozen open_clip model (``CLIP``, ``CustomTextCLIP``, CoCa); subclasses say where the visual projector sits."""

    model: open_clip.model.CLIP
    copy_shares = ("tokenizer",)

    def __init__(self, model: open_clip.model.CLIP, info: BackboneInfo, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.info = info
        self.tokenizer = _tokenizer(info.arch, info.tokenizer)
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
        """The backbone class matching the model's image tower, decided by inspecting it (see ``sites``)."""
        if not isinstance(model, MODEL_CLASSES):
            raise BackboneLoadError(
                f"{info.arch} builds a {type(model).__name__}; prolip adapts open_clip CLIP, CustomTextCLIP and "
                f"CoCa models and Hugging Face CLIPModel or SiglipModel (hf:<id>)"
            )
        site = native_site(model.visual)
        if site is None:
            return OpenClipOutputOnly(model, info, device)
        if isinstance(model.visual, VisionTransformer):
            return OpenClipViT(model, info, device)
        if isinstance(model.visual, ModifiedResNet):
            return OpenClipResNet(model, info, device)
        if site.residual:
            return OpenClipMapHead(model, info, device, site)
        return OpenClipLinearSite(model, info, device, site)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @property
    def logit_bias(self) -> float:
        bias = getattr(self.model, "logit_bias", None)  # SigLIP's (init_logit_bias); None for a CLIP
        return 0.0 if bias is None else float(bias.detach())

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images.to(self.device, torch.float32)).float()

    # --- text side -------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def special_token_ids(self) -> set[int]:
        inner = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        if inner is not None and hasattr(inner, "all_special_ids"):
            return set(inner.all_special_ids)
        return {self.tokenizer.sot_token_id, self.tokenizer.eot_token_id}

    def _text_tower(self) -> tuple[Any, str, int | None] | None:
        """The module holding the text transformer (token_embedding, ..., text_projection), its pooling and EOS
        id, when prolip can run it from token embeddings; None for towers that take token ids only."""
        m = self.model
        if isinstance(m, open_clip.model.CLIP):
            return m, m.text_pool_type, getattr(m, "text_eos_id", None)
        text = getattr(m, "text", None)
        if isinstance(text, TextTransformer) and text.cls_emb is None and not text.use_pad_mask:
            return text, str(text.pool_type), text.eos_id
        return None

    def _tower(self) -> tuple[Any, str, int | None]:
        tower = self._text_tower()
        if tower is None:
            raise TokenIdsOnlyError(
                f"{self.info.arch}: its text tower ({type(getattr(self.model, 'text', None)).__name__}) takes "
                f"token ids only, so methods that tune prompt embeddings (TPT) cannot use it"
            )
        return tower

    def _eot_index(self, tokens: Tensor) -> Tensor:
        _, pool, eos = self._tower()
        if pool == "argmax":  # the EOT token has the largest id
            return tokens.argmax(dim=-1)
        if pool == "eos":
            return (tokens == int(eos or 0)).int().argmax(dim=-1)
        if pool in ("first", "last"):
            return torch.full((tokens.shape[0],), 0 if pool == "first" else tokens.shape[1] - 1, device=tokens.device)
        raise BackboneLoadError(f"{self.info.arch}: unsupported text pooling {pool!r}")

    def prompt_embeddings(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token embeddings [C, L, W] of the tokenised texts (no positional embedding) and EOT indices [C]."""
        tokens = self.tokenize(texts)
        return self._tower()[0].token_embedding(tokens).detach(), self._eot_index(tokens)

    def _text_pre_from_embeddings(self, token_embeds: Tensor, eot_idx: Tensor) -> Tensor:
        t = self._tower()[0]
        x = token_embeds + t.positional_embedding.to(token_embeds.dtype)
        x = t.ln_final(t.transformer(x, attn_mask=t.attn_mask))
        return x[torch.arange(x.shape[0], device=x.device), eot_idx]

    def _projection_module(self) -> Any:
        """The text tower's final map: an nn.Linear, a right-layout Parameter, or nn.Identity / None (none). For a
        Hugging Face tower the last module of ``proj``: an MLP's earlier layers belong to the frozen encoder."""
        if self._text_tower() is not None:
            return self._tower()[0].text_projection
        text = getattr(self.model, "text", None)
        if isinstance(text, TextTransformer):
            return text.text_projection
        proj = getattr(text, "proj", None)  # open_clip's HFTextEncoder: Linear, Sequential(..., Linear) or Identity
        if isinstance(proj, torch.nn.Sequential):
            proj = proj[-1]
        if not isinstance(proj, torch.nn.Linear | torch.nn.Identity):
            raise TokenIdsOnlyError(
                f"{self.info.arch}: its text tower ({type(text).__name__}) has no final map prolip knows (a Linear, "
                f"an MLP ending in one, or none), so methods that need pre-projection text features cannot use it"
            )
        return proj

    def text_projection(self) -> Tensor:
        """The text projection in right layout [D_text_pre, D] (the identity for a tower without one)."""
        proj = self._projection_module()
        if isinstance(proj, torch.nn.Linear):
            return proj.weight.t()
        return proj if isinstance(proj, Tensor) else torch.eye(self.dim_embed, device=self.device)

    def encode_text_embeddings(self, token_embeds: Tensor, eot_idx: Tensor) -> Tensor:
        """Text embeddings [C, D] (unnormalised) from token embeddings [C, L, W]; differentiable in token_embeds."""
        x = self._text_pre_from_embeddings(token_embeds, eot_idx) @ self.text_projection()
        proj = self._projection_module()
        return x + proj.bias if isinstance(proj, torch.nn.Linear) and proj.bias is not None else x

    @torch.no_grad()
    def _text_pre(self, texts: list[str]) -> Tensor:
        by_embeddings = self._text_tower() is not None
        out = []
        for chunk in (texts[i : i + TEXT_BATCH] for i in range(0, len(texts), TEXT_BATCH)):
            if by_embeddings:
                pre = self._text_pre_from_embeddings(*self.prompt_embeddings(chunk))
            else:
                pre = self._text_pre_from_ids(self.tokenize(chunk))
            out.append(pre.float())
        return torch.cat(out)

    def _text_pre_from_ids(self, tokens: Tensor) -> Tensor:
        """A tower run from token ids only, up to its final map: a TextTransformer's own steps (its projection may
        be a Parameter, which no hook sees); a Hugging Face tower's forward, the final map's input caught by a
        forward pre-hook, so the pooler and any earlier MLP layers are the tower's own."""
        text = self.model.text
        if isinstance(text, TextTransformer):
            return pooled_before_projection(text, tokens)
        caught: list[Tensor] = []
        handle = self._projection_module().register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
        try:
            text(tokens)
        finally:
            handle.remove()
        return caught[0]

    def text_side(self, classnames: Sequence[str], templates: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Pre-projection text features [C, n_templates, D_text_pre] (the pooled token after ln_final; for a
        Hugging Face tower the input of its final map) and the text projection [D_text_pre, D] in right layout.
        Underscores in class names become spaces. A projection with a bias (SigLIP's) is carried as a last row over
        a constant 1 feature (:func:`text_side_with_bias`)."""
        proj = self._projection_module()
        bias = proj.bias if isinstance(proj, torch.nn.Linear) else None
        names = [c.replace("_", " ") for c in classnames]
        texts = [t.format(n) for n in names for t in templates]
        pre = self._text_pre(texts).reshape(len(names), len(templates), -1)
        return text_side_with_bias(pre.cpu(), self.text_projection().detach().float().cpu(), bias)

    @torch.no_grad()
    def encode_text_templates(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        texts = [t.format(c) for c in classnames for t in templates]
        by_embeddings = self._text_tower() is not None
        out = [
            (
                self.encode_text_embeddings(*self.prompt_embeddings(chunk))
                if by_embeddings
                else self.model.encode_text(self.tokenize(chunk))
            ).float()
            for chunk in (texts[i : i + TEXT_BATCH] for i in range(0, len(texts), TEXT_BATCH))
        ]
        return torch.cat(out).reshape(len(classnames), len(templates), -1).cpu()


class TokenIdsOnlyError(ProlipError, NotImplementedError):
    """A method needs to run a text tower from token embeddings, and this tower takes token ids only."""


def pooled_before_projection(t: TextTransformer, tokens: Tensor) -> Tensor:
    """``TextTransformer.forward`` (open_clip 3.3) up to its text projection: with CoCa's appended CLS token the
    last token is pooled, then normed; otherwise normed, then pooled by the tower's pool type."""
    x, attn_mask = t._embeds(tokens)
    x = t.transformer(x, attn_mask=attn_mask)
    if t.cls_emb is not None:
        return t.ln_final(text_global_pool(x, pool_type="last"))
    return text_global_pool(t.ln_final(x), tokens, pool_type=t.pool_type, eos_token_id=getattr(t, "eos_id", None))


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


class OpenClipLinearSite(OpenClipBackbone):
    """A tower whose last map is an nn.Linear (timm towers: ``visual.head.proj``, ``visual.trunk.head``, ...):
    z = that linear's input, caught by a forward pre-hook while the model runs its own ``encode_image``, so z is
    the tower's computation whatever the trunk; W = the linear's weight (nn.Linear layout), its bias frozen."""

    def __init__(self, model, info: BackboneInfo, device: torch.device | str, site: NativeSite):
        super().__init__(model, info, device)
        self.site = site
        self.linear = cast(torch.nn.Linear, self.model.get_submodule(site.module))

    @torch.no_grad()
    def encode_pre(self, images: Tensor) -> Tensor:
        caught: list[Tensor] = []
        handle = self.linear.register_forward_pre_hook(lambda _module, args: caught.append(args[0]))
        try:
            self.model.encode_image(images.to(self.device, torch.float32))
        finally:
            handle.remove()
        return caught[-1].float()

    def projection(self) -> ProjectionSite:
        bias = self.linear.bias
        return ProjectionSite(
            weight=self.linear.weight.detach().t(),
            bias=None if bias is None else bias.detach(),
            param_name=self.site.param_name,
            native_layout="linear",
        )


class OpenClipMapHead(OpenClipLinearSite):
    """A MAP head with no projection after it (SigLIP, SigLIP 2): the site is the head's last linear ``mlp.fc2``,
    whose output the head adds to its residual x (``x + mlp(norm(x))``) before pooling the latent tokens.

    z = [h, r]: h the input of fc2 and r = x (the input of the head's ``norm``), both caught by forward pre-hooks
    while the model runs its own ``encode_image`` and pooled as the head pools (token 0 or the mean: linear, so it
    commutes with the site). W0 = [fc2.weight^T; I] and b = fc2.bias, so ``z W0 + b`` is the tower's output; the last
    D rows of W carry the residual as a frozen per-image term (``ProjectionSite.residual_rows``). A feature cache
    keeps z per (image, view) as for any site, r inside it, so every feature method runs unchanged: those that read
    W0 (zero-shot, LP++, GDA, ProKeR, Tip-Adapter, linear probe, ...) see the tower's output exactly; those that
    train W (ProLIP, P0, the ProLIP complements, test-time ProLIP) train fc2's rows alone, the residual's rows frozen
    at the identity (``Task.frozen_rows``), so their W exports into fc2.weight exactly. Image-level training runs the
    same hooks with gradients on: h and r are the trained tower's own, and its W (``projection_parameters``) is
    fc2's rows, the parameter, over the residual's identity rows, constants, so ``z W + b`` is the tower's output."""

    def __init__(self, model, info: BackboneInfo, device: torch.device | str, site: NativeSite):
        super().__init__(model, info, device, site)
        self.pool = cast(AttentionPoolLatent, self.model.get_submodule(site.residual))

    @torch.no_grad()
    def encode_pre(self, images: Tensor) -> Tensor:
        x = images.to(self.device, torch.float32)
        return map_head_features(
            lambda: self.model.encode_image(x), self.linear, self.pool.norm, self.pool.pool
        ).float()

    def projection(self) -> ProjectionSite:
        return map_head_site(super().projection())


class OpenClipOutputOnly(OpenClipBackbone):
    """A tower with no native site prolip knows (it does not end in a linear map, nor in a MAP head with nothing
    after it): only its output site."""

    def _refuse(self) -> BackboneLoadError:
        return BackboneLoadError(
            f"{self.info.arch}: its image tower ({tower_kind(self.model.visual)}) has no native projection site "
            f"(it does not end in a linear map prolip adapts); adapt it at the output site "
            f"(load_backbone(..., site='output'))"
        )

    def encode_pre(self, images: Tensor) -> Tensor:
        raise self._refuse()

    def projection(self) -> ProjectionSite:
        raise self._refuse()


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
def available_models() -> list[str]:
    """open_clip architectures prolip can adapt: all of them, at a native site where the tower has one, else at the
    output site (``prolip.backbones.coverage()`` says which).

    Hugging Face CLIPModel and SiglipModel checkpoints are also accepted as ``hf:<hub id or local dir>``.
    """
    return list(open_clip.list_models())


def load_open_clip(
    model: str, pretrained: str, device: str | torch.device = "cpu", tokenizer: str | None = None
) -> OpenClipBackbone:
    """An open_clip architecture with ``pretrained`` weights: a tag (e.g. "openai"), a local checkpoint
    (.safetensors; .pt/.bin/.pth state dicts read with ``weights_only=True``), or "none" for a random init (seed 0:
    the same model every time). ``tokenizer``: a local folder for a model whose tokenizer is a Hugging Face one
    (SigLIP, multilingual CLIPs; :func:`tokenizer_folder`)."""
    if open_clip.get_model_config(model) is None:
        raise BackboneLoadError(
            f"unknown model {model!r}: use one of available_models() (e.g. ViT-B-16, RN50, "
            f"test-vit-tiny) or hf:<hub id or local dir> for a Hugging Face CLIPModel or SiglipModel"
        )
    path = None if pretrained.lower() == "none" else _checkpoint_path(model, pretrained)
    folder = tokenizer_folder(model, tokenizer, path)
    _tokenizer(model, folder)  # a tokenizer that cannot be had fails here, before the weights are read
    clip = _build(model)
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
        tokenizer=folder,
    )
    provenance = "" if path is None else declared_provenance(path)
    if provenance:
        info = LabelledBackboneInfo(**vars(info), provenance=provenance)
    return OpenClipBackbone.for_model(clip, info, device)


def _text_cfg(arch: str) -> dict:
    return (open_clip.get_model_config(arch) or {}).get("text_cfg", {})


def tokenizer_folder(arch: str, tokenizer: str | None, checkpoint: Path | None) -> str:
    """The local tokenizer folder ``arch`` is built with, as recorded in ``info.tokenizer``: ``tokenizer`` (checked to
    be one), else the checkpoint's own folder when it holds a tokenizer (open_clip's hub repos keep the tokenizer
    beside the weights), else "" (the bundled BPE, or the Hub's tokenizer from the local cache). Only a model whose
    config names a Hugging Face tokenizer (``hf_tokenizer_name``) reads one."""
    if not _text_cfg(arch).get("hf_tokenizer_name"):
        if tokenizer:
            raise BackboneLoadError(
                f"{arch} uses open_clip's bundled tokenizer, not a Hugging Face one: it takes no tokenizer folder",
                option="--tokenizer",
            )
        return ""
    if tokenizer:
        folder = Path(tokenizer).expanduser()
        if not folder.is_dir() or not holds_tokenizer(folder):
            raise BackboneLoadError(
                f"tokenizer folder {folder} does not exist or holds none of {', '.join(TOKENIZER_FILES)}",
                option="--tokenizer",
            )
        return str(folder.resolve())
    beside = None if checkpoint is None else checkpoint.parent
    if beside is not None and holds_tokenizer(beside):
        return str(beside.resolve())
    return ""


@lru_cache(maxsize=8)
def _tokenizer(arch: str, folder: str = ""):
    """open_clip's tokenizer for ``arch``: its bundled one, or its Hugging Face tokenizer (with the config's
    context length, cleaning and mode, as ``open_clip.get_tokenizer`` builds it) from ``folder`` or from the Hub's
    cache, never downloaded when the Hub is offline or unreachable (that fails at once, in one line). Memoised: the
    loader builds it before the weights (to fail fast), the backbone takes the same object."""
    text_cfg = _text_cfg(arch)
    hub_name = text_cfg.get("hf_tokenizer_name", "")
    if not hub_name:
        return open_clip.get_tokenizer(arch)
    source = folder or hub_name
    try:
        tokenizer = open_clip.tokenizer.HFTokenizer(
            source,
            context_length=text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH),
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            local_files_only=bool(folder) or not hub_available(),
            **text_cfg.get("tokenizer_kwargs", {}),
        )
    except (OSError, ImportError, ValueError) as e:  # not cached and not reachable, or an unreadable folder
        if folder:
            raise BackboneLoadError(
                f"cannot read {arch}'s tokenizer from {folder} ({str(e).splitlines()[0]}); {HOW_TO_PASS_TOKENIZER}",
                option="--tokenizer",
            ) from None
        raise tokenizer_unavailable(arch, hub_name, e) from None
    check_vocab(len(tokenizer.tokenizer), int(text_cfg.get("vocab_size", MIN_VOCAB)), folder or hub_name)
    return tokenizer


def _build(model: str) -> torch.nn.Module:
    """The architecture at its seeded random init (weights are loaded into it afterwards)."""
    with torch.random.fork_rng(devices=[]), _filling_uninitialised_memory():  # seeded; the caller's RNG untouched
        torch.manual_seed(RANDOM_INIT_SEED)
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly" before we load the weights
        try:
            # pretrained_text=False: a Hugging Face text tower is built from its config alone (open_clip would
            # otherwise read its base weights from the Hub, only for ours to replace them)
            clip = open_clip.create_model(model, pretrained=None, device="cpu", pretrained_text=False)
        except OSError as e:  # a Hugging Face text tower whose config is neither cached nor reachable
            raise BackboneLoadError(
                f"cannot build {model}: {str(e).splitlines()[0]} (its Hugging Face text tower's config is not in "
                f"the local cache and the Hub is offline or unreachable)"
            ) from None
        finally:
            logging.disable(logging.NOTSET)
    with torch.no_grad():  # what the architecture's own init left empty (filled with NaN above) starts at zero
        for tensor in clip.state_dict().values():
            if tensor.is_floating_point():
                tensor.nan_to_num_(0.0)
    return clip.eval()


@contextlib.contextmanager
def _filling_uninitialised_memory():
    """Tensors made with ``torch.empty`` and never initialised (open_clip CoCa's ``text_decoder.text_projection``)
    are filled with NaN while this holds, instead of holding whatever memory they got: so a random-init model, and
    its fingerprint, are the same on every build (a saved run rebuilds its backbone and compares fingerprints)."""
    deterministic, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]


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
    ViTs: the last transformer block (Last_Layer_FT.py:57-59); the projection stays W0. timm towers: the trunk's
    last block (or stage, for convolutional trunks)."""
    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        return "visual.attnpool."
    if isinstance(visual, VisionTransformer):
        return f"visual.transformer.resblocks.{len(visual.transformer.resblocks) - 1}."
    for name in ("blocks", "stages"):
        blocks = getattr(getattr(visual, "trunk", None), name, None)
        if isinstance(blocks, torch.nn.Sequential | torch.nn.ModuleList) and len(blocks):
            return f"visual.trunk.{name}.{len(blocks) - 1}."
    raise BackboneLoadError(f"last-layer fine-tuning: the image tower {tower_kind(visual)} has no last block known")


def _attention_towers(model, arch: str) -> dict[str, AttentionTower | str]:
    """CLIP-LoRA's towers (loralib/utils.py:108-135): the text transformer, and the image transformer of a ViT."""
    visual = model.visual
    vision: AttentionTower | str = (
        ("visual.transformer.resblocks", visual.transformer.resblocks, "attn")
        if isinstance(visual, VisionTransformer)
        else f"clip-lora adapts ViT image encoders only (loralib/utils.py INDEX_POSITIONS_VISION); {arch}'s image "
        f"tower is a {tower_kind(visual)}: use encoder: text"
    )
    if isinstance(model, open_clip.model.CLIP):
        text: AttentionTower | str = ("transformer.resblocks", model.transformer.resblocks, "attn")
    elif isinstance(getattr(model, "text", None), TextTransformer):
        text = ("text.transformer.resblocks", model.text.transformer.resblocks, "attn")
    else:
        text = f"clip-lora adapts open_clip text transformers only; {arch}'s text tower is {type(model.text).__name__}"
    return {"text": text, "vision": vision}


OPEN_CLIP = register_family(
    Family(
        name="open_clip",
        prefix="",
        load=load_open_clip,
        image_prefixes=("visual.",),
        last_image_block=_last_image_block,
        attention_towers=_attention_towers,
        export_format="open_clip",
        takes_tokenizer=True,
    )
)
