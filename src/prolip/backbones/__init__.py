"""CLIP backbones seen through the pieces ProLIP needs: pre-projection features, the projector, the text side.

``load_backbone(model, pretrained)`` builds one from an open_clip architecture (+ pretrained tag, local
checkpoint file, or "none" for a seeded random init) or from a Hugging Face ``CLIPModel`` ("hf:<id or dir>").
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from prolip.backbones.base import Backbone, BackboneInfo, Preprocessing, ProjectionSite
from prolip.backbones.loading import (
    HOW_TO_PASS_LOCAL,
    BackboneLoadError,
    fingerprint,
    hub_available,
    load_into,
    read_state_dict,
)
from prolip.backbones.openclip import OpenClipBackbone, OpenClipResNet, OpenClipViT

__all__ = [
    "Backbone",
    "BackboneInfo",
    "BackboneLoadError",
    "Preprocessing",
    "ProjectionSite",
    "OpenClipBackbone",
    "OpenClipViT",
    "OpenClipResNet",
    "RandomWeightsWarning",
    "available_models",
    "load_backbone",
    "MODEL_CONFIG_DIR",
    "PROVENANCE_KEY",
    "LabelledBackboneInfo",
]

# Tiny architectures for tests and demos ("test-vit-tiny", "test-rn-tiny"), registered with open_clip.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
if str(MODEL_CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
    open_clip.add_model_config(MODEL_CONFIG_DIR)

RANDOM_INIT_SEED = 0

# A safetensors file may say what its weights are in this metadata entry (prolip's in-house tiny CLIP does), so that
# every description of the backbone, run manifest and report carries it next to the file's path.
PROVENANCE_KEY = "prolip.provenance"


@dataclass
class LabelledBackboneInfo(BackboneInfo):
    """BackboneInfo for weights whose file declares its provenance; ``describe()`` says it beside the path."""

    provenance: str = ""

    def describe(self) -> str:
        return f"{self.family}:{self.arch} [{self.provenance}: {self.weights}]"


def declared_provenance(path: Path) -> str:
    """The provenance a .safetensors checkpoint declares in its metadata ("" when none or not safetensors)."""
    if path.suffix != ".safetensors":
        return ""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(PROVENANCE_KEY, "")


class RandomWeightsWarning(UserWarning):
    """A backbone was built with random weights: its features and accuracies mean nothing.

    A warning class of its own, so a caller that reports random weights itself (the CLI does, on every command)
    can silence this one and the user reads the message once.
    """


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


def load_backbone(
    model: str = "ViT-B-16", pretrained: str = "openai", *, device: str | torch.device = "cpu"
) -> Backbone:
    """Build a frozen backbone.

    model: an open_clip architecture (see :func:`available_models`), or "hf:<hub id or local dir>".
    pretrained: an open_clip tag (e.g. "openai"), a local checkpoint (.safetensors; .pt/.bin/.pth state dicts
    are read with ``weights_only=True``), or "none" for a random init (seed 0: the same model every time).
    Ignored for hf: models. Raises :class:`BackboneLoadError` with a fix when the weights cannot be had.
    """
    if model.startswith("hf:"):
        from prolip.backbones.hf import load_hf_backbone

        return load_hf_backbone(model[3:], device)
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
            stacklevel=2,
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
