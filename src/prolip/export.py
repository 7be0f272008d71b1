"""Merge an adapted projection W back into a standard CLIP checkpoint, and save the zero-shot head beside it.

Only the projection tensor changes: everything else is the backbone's own state dict, so the export loads with
``open_clip.create_model(arch, pretrained=path)`` or ``CLIPModel.from_pretrained(dir)`` like any checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor

from prolip.backbones.base import Backbone

HEAD_WEIGHTS = "classifier_head.safetensors"
HEAD_META = "classifier_head.json"


def merged_state_dict(backbone: Backbone, W: Tensor) -> dict[str, Tensor]:
    """The backbone's state dict with its projector replaced by W (right layout [D_pre, D]), in native layout."""
    site = backbone.projection()
    W = torch.as_tensor(W)
    if W.shape != site.weight.shape:
        raise ValueError(f"adapted projection has shape {tuple(W.shape)}, but {backbone.info.describe()} expects "
                         f"{tuple(site.weight.shape)} (right layout [D_pre, D]); was it fitted on another backbone?")
    state = {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()}
    native = state[site.param_name]
    state[site.param_name] = site.to_native(W.detach().cpu()).to(native.dtype)
    return state


def _claim(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass force=True (CLI: --force) to overwrite it")


def export_open_clip(backbone: Backbone, W: Tensor, path: str | Path, *, force: bool = False) -> Path:
    """Write a full open_clip state dict (.safetensors) with W merged in; returns the path written."""
    if backbone.info.family != "open_clip":
        raise ValueError(f"open_clip export needs an open_clip backbone, got {backbone.info.describe()}; "
                         f"use export_hf (CLI: --format hf) for Hugging Face models")
    path = Path(path)
    _claim(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in merged_state_dict(backbone, W).items()}
    save_file(state, str(path), metadata={"format": "pt", "arch": backbone.info.arch,
                                          "adapted": backbone.projection().param_name})
    return path


def export_hf(backbone: Backbone, W: Tensor, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``save_pretrained`` output (weights, config, tokenizer, image processor) with W merged in."""
    if backbone.info.family != "hf":
        raise ValueError(f"Hugging Face export needs an HF backbone (--model hf:<id or dir>); "
                         f"{backbone.info.describe()} is an open_clip model: export it with format open_clip")
    out_dir = Path(out_dir)
    _claim(out_dir, force)
    backbone.model.save_pretrained(out_dir, state_dict=merged_state_dict(backbone, W))
    backbone.tokenizer.save_pretrained(out_dir)
    processor = getattr(backbone, "image_processor", None)
    if processor is not None:
        processor.save_pretrained(out_dir)
    return out_dir


def save_classifier_head(classifier: Tensor, classnames: Sequence[str], templates: Sequence[str],
                         out_dir: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Save the text classifier T [C, D] (safetensors) and its class names / templates (JSON) in out_dir."""
    out_dir = Path(out_dir)
    weights, meta = out_dir / HEAD_WEIGHTS, out_dir / HEAD_META
    for p in (weights, meta):
        _claim(p, force)
    if classifier.dim() != 2 or classifier.shape[0] != len(classnames):
        raise ValueError(f"classifier has shape {tuple(classifier.shape)} but there are {len(classnames)} "
                         f"class names; expected [C, D]")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"classifier": classifier.detach().float().cpu().contiguous()}, str(weights))
    meta.write_text(json.dumps({"classnames": list(classnames), "templates": list(templates),
                                "shape": list(classifier.shape)}, indent=2))
    return weights, meta


def load_classifier_head(out_dir: str | Path) -> tuple[Tensor, list[str], list[str]]:
    """Inverse of :func:`save_classifier_head`: (T [C, D], classnames, templates)."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / HEAD_META).read_text())
    return load_file(str(out_dir / HEAD_WEIGHTS))["classifier"], meta["classnames"], meta["templates"]
