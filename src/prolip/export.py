"""Merge what a method adapted back into a standard CLIP checkpoint, and save the zero-shot head beside it.

What is merged is either an adapted projection W (ProLIP, right layout [D_pre, D]) or the checkpoint tensors a
method changed, by their state-dict names in the model's native layout (``Method.checkpoint_tensors``: ProLIP's
projection, a fine-tuning's trained parameters). Only those tensors change: everything else is the backbone's own
state dict, so the export loads with ``open_clip.create_model(arch, pretrained=path)`` or
``CLIPModel.from_pretrained(dir)`` like any checkpoint.
Every writer here goes through :mod:`prolip.outputs`: it never overwrites what prolip did not write, and an export
folder carries a ``prolip-export.json`` marker listing its files so a later ``--force`` may replace them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors.torch import save_file
from torch import Tensor

from prolip.backbones.base import Backbone
from prolip.outputs import (
    EXPORT_FORMAT,
    EXPORT_MARKER,
    HEAD_FILES,
    RUN_CARD,
    OutputExistsError,
    check_writable,
    is_exported_checkpoint,
    output_lock,
    replace_atomically,
    write_directory,
    write_file,
    writing,
)

if TYPE_CHECKING:
    from prolip.backbones.hf import HFClipBackbone

HEAD_WEIGHTS, HEAD_META = HEAD_FILES


# An adapted projection W (right layout [D_pre, D]), or checkpoint tensors by state-dict name (native layout).
Adapted = Tensor | Mapping[str, Tensor]


def checkpoint_changes(backbone: Backbone, adapted: Adapted) -> dict[str, Tensor]:
    """What ``adapted`` replaces in the backbone's state dict, by name, in the model's native layout."""
    if isinstance(adapted, Mapping):
        return dict(adapted)
    site = backbone.projection()
    W = torch.as_tensor(adapted)
    if W.shape != site.weight.shape:
        raise ValueError(
            f"adapted projection has shape {tuple(W.shape)}, but {backbone.info.describe()} expects "
            f"{tuple(site.weight.shape)} (right layout [D_pre, D]); was it fitted on another backbone?"
        )
    return {site.param_name: site.to_native(W.detach().cpu())}


def merged_state_dict(backbone: Backbone, adapted: Adapted) -> dict[str, Tensor]:
    """The backbone's state dict with the adapted tensors merged in, each in the dtype the model stores it in."""
    state = {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()}
    for name, value in checkpoint_changes(backbone, adapted).items():
        if name not in state:
            raise ValueError(
                f"{name!r} is not a tensor of {backbone.info.describe()}'s checkpoint; was the run fitted "
                "on another backbone?"
            )
        if tuple(value.shape) != tuple(state[name].shape):
            raise ValueError(
                f"adapted tensor {name!r} has shape {tuple(value.shape)}, but "
                f"{backbone.info.describe()} stores {tuple(state[name].shape)}; was it fitted on another "
                "backbone?"
            )
        state[name] = value.detach().cpu().to(state[name].dtype)
    return state


def _adapted_names(backbone: Backbone, adapted: Adapted) -> str:
    """The checkpoint metadata's ``adapted``: the tensor name(s), summarised when there are many."""
    names = [backbone.projection().param_name] if not isinstance(adapted, Mapping) else sorted(adapted)
    return ", ".join(names) if len(names) <= 2 else f"{len(names)} tensors ({names[0]} … {names[-1]})"


def _write_marker(folder: Path, files: Iterable[str]) -> None:
    """The export marker: how :mod:`prolip.outputs` recognises this folder as one prolip may overwrite."""
    listed = sorted((set(files) | _listed(folder)) - {EXPORT_MARKER})
    replace_atomically(
        folder / EXPORT_MARKER, _text_writer(json.dumps({"format": EXPORT_FORMAT, "files": listed}, indent=2) + "\n")
    )


def _listed(folder: Path) -> set[str]:
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8"))
        return (
            {f for f in marker.get("files", []) if isinstance(f, str)}
            if marker.get("format") == EXPORT_FORMAT
            else set()
        )
    except (OSError, ValueError, AttributeError):
        return set()


def export_open_clip(
    backbone: Backbone,
    adapted: Adapted,
    path: str | Path,
    *,
    force: bool = False,
    data_paths: Iterable[str | Path] = (),
) -> Path:
    """Write a full open_clip state dict (.safetensors) with ``adapted`` merged in; returns the path written.

    An existing file is replaced only with ``force`` and only if it is an earlier prolip export.
    """
    return write_file(
        path, _open_clip_writer(backbone, adapted), force=force, is_ours=is_exported_checkpoint, data_paths=data_paths
    )


def _check_open_clip(backbone: Backbone) -> None:
    if backbone.family.export_format != "open_clip":
        raise ValueError(
            f"open_clip export needs an open_clip backbone, got {backbone.info.describe()}; "
            f"use export_hf (CLI: --format hf) for Hugging Face models"
        )


def _open_clip_writer(backbone: Backbone, adapted: Adapted) -> Callable[[Path], None]:
    """A ``fill`` writing the merged open_clip state dict to the path it is given."""
    _check_open_clip(backbone)
    state = {k: v.contiguous() for k, v in merged_state_dict(backbone, adapted).items()}
    metadata = {
        "format": "pt",
        "arch": backbone.info.arch,
        "adapted": _adapted_names(backbone, adapted),
        "exported_by": "prolip",
    }
    return lambda tmp: save_file(state, str(tmp), metadata=metadata)


def export_hf(
    backbone: Backbone,
    adapted: Adapted,
    out_dir: str | Path,
    *,
    force: bool = False,
    data_paths: Iterable[str | Path] = (),
) -> Path:
    """Write ``save_pretrained`` output (weights, config, tokenizer, image processor) with ``adapted`` merged in.

    The directory is written whole and atomically; an existing one is replaced only with ``force`` and only if it
    is empty or an earlier prolip export.
    """
    write_hf = _hf_writer(backbone, adapted)

    def fill(folder: Path) -> None:
        write_hf(folder)
        _write_marker(folder, [p.name for p in folder.iterdir()])

    return write_directory(out_dir, fill, force=force, data_paths=data_paths, kind="export")


def _hf_writer(backbone: Backbone, adapted: Adapted) -> Callable[[Path], None]:
    """A ``fill`` writing the ``save_pretrained`` files, with ``adapted`` merged in, into the folder it is given."""
    if backbone.family.export_format != "hf":
        raise ValueError(
            f"Hugging Face export needs an HF backbone (--model hf:<id or dir>); "
            f"{backbone.info.describe()} is an open_clip model: export it with format open_clip"
        )
    state = merged_state_dict(backbone, adapted)
    # An "hf" export format means a Hugging Face backbone: a transformers CLIPModel or SiglipModel (a subclass of
    # HFClipBackbone) and its tokenizer; a SigLIP's fc2 (its MAP-head site) is merged like any native tensor.
    hf = cast("HFClipBackbone", backbone)

    def fill(folder: Path) -> None:
        hf.model.save_pretrained(folder, state_dict=state)
        hf.tokenizer.save_pretrained(folder)
        processor = getattr(backbone, "image_processor", None)
        if processor is not None:
            processor.save_pretrained(folder)

    return fill


OPEN_CLIP_CHECKPOINT = "open_clip_model.safetensors"


def export_folder(
    backbone: Backbone,
    adapted: Adapted,
    out_dir: str | Path,
    *,
    fmt: str,
    head: tuple[Tensor, Sequence[str], Sequence[str]],
    card: str | None = None,
    force: bool = False,
    data_paths: Iterable[str | Path] = (),
) -> Path:
    """A whole export folder (``prolip export``): the checkpoint (``fmt`` "open_clip": one state-dict file,
    "hf": ``save_pretrained``'s), the classifier ``head`` (T, classnames, templates), the model ``card`` and the
    marker, written as one directory, so a failed export leaves the earlier folder (or none) and nothing half-done.
    Returns the checkpoint written: the file for open_clip, the folder for hf."""
    write_checkpoint = _hf_writer(backbone, adapted) if fmt == "hf" else _open_clip_writer(backbone, adapted)
    classifier, classnames, templates = head
    _check_head(classifier, classnames)

    def fill(folder: Path) -> None:
        write_checkpoint(folder if fmt == "hf" else folder / OPEN_CLIP_CHECKPOINT)
        _write_head(folder, classifier, classnames, templates)
        if card is not None:
            (folder / RUN_CARD).write_text(card, encoding="utf-8")
        _write_marker(folder, [p.name for p in folder.iterdir()])

    out_dir = write_directory(out_dir, fill, force=force, data_paths=data_paths, kind="export")
    return out_dir if fmt == "hf" else out_dir / OPEN_CLIP_CHECKPOINT


def _text_writer(text: str, encoding: str | None = None) -> Callable[[Path], None]:
    """A ``fill`` for :func:`replace_atomically` that writes ``text`` (``Path.write_text`` returns a count)."""

    def fill(tmp: Path) -> None:
        tmp.write_text(text, encoding=encoding)

    return fill


def save_classifier_head(
    classifier: Tensor,
    classnames: Sequence[str],
    templates: Sequence[str],
    out_dir: str | Path,
    *,
    force: bool = False,
    data_paths: Iterable[str | Path] = (),
) -> tuple[Path, Path]:
    """Save the text classifier T [C, D] (safetensors) and its class names / templates (JSON) in out_dir.

    ``out_dir`` may be new, empty or an export folder (typically the one just written); existing head files
    there are replaced only with ``force``.
    """
    out_dir = Path(out_dir)
    _check_head(classifier, classnames)
    weights, meta = out_dir / HEAD_WEIGHTS, out_dir / HEAD_META
    with output_lock(out_dir):
        check_writable(out_dir, force, data_paths, kind="export", update=True)
        for p in (weights, meta):
            if p.exists() and not force:
                raise OutputExistsError(f"{p} already exists; pass force=True (CLI: --force) to overwrite it")
        with writing(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
        _write_head(out_dir, classifier, classnames, templates)
        _write_marker(out_dir, [HEAD_WEIGHTS, HEAD_META])
    return weights, meta


def _check_head(classifier: Tensor, classnames: Sequence[str]) -> None:
    if classifier.dim() != 2 or classifier.shape[0] != len(classnames):
        raise ValueError(
            f"classifier has shape {tuple(classifier.shape)} but there are {len(classnames)} "
            f"class names; expected [C, D]"
        )


def _write_head(folder: Path, classifier: Tensor, classnames: Sequence[str], templates: Sequence[str]) -> None:
    tensor = {"classifier": classifier.detach().float().cpu().contiguous()}
    replace_atomically(folder / HEAD_WEIGHTS, lambda tmp: save_file(tensor, str(tmp)))
    text = json.dumps(
        {"classnames": list(classnames), "templates": list(templates), "shape": list(classifier.shape)}, indent=2
    )
    replace_atomically(folder / HEAD_META, _text_writer(text))


def save_model_card(card: str, out_dir: str | Path, *, force: bool = False) -> Path:
    """The run's card as the export's README.md (its model card), listed in the export marker like the head."""
    out_dir = Path(out_dir)
    path = out_dir / RUN_CARD
    with output_lock(out_dir):
        check_writable(out_dir, force, kind="export", update=True)
        if path.exists() and not force:
            raise OutputExistsError(f"{path} already exists; pass force=True (CLI: --force) to overwrite it")
        with writing(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, _text_writer(card, encoding="utf-8"))
        _write_marker(out_dir, [RUN_CARD])
    return path


def load_classifier_head(out_dir: str | Path) -> tuple[Tensor, list[str], list[str]]:
    """Inverse of :func:`save_classifier_head`: (T [C, D], classnames, templates)."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / HEAD_META).read_text())
    return load_file(str(out_dir / HEAD_WEIGHTS))["classifier"], meta["classnames"], meta["templates"]
