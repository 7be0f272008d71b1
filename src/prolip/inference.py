"""A saved run applied to new images: its backbone and fitted method rebuilt from the manifest, predictions for image
files, and an evaluation on a dataset that never scores the run on its own support or validation images.

What ``prolip predict``, ``prolip eval`` and ``prolip export`` do, as library calls (``Run.predict``,
:func:`evaluate_run`, :func:`checkpoint_tensors`); the CLI only parses options and prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from prolip.backbones import load_backbone_for
from prolip.backbones.base import Backbone
from prolip.data.folder import DataError
from prolip.data.types import DatasetSplits, LabeledImages
from prolip.diagnostics import diagnose
from prolip.episode import EpisodeBuilder, method_logits, task_for
from prolip.errors import RunError
from prolip.features.extraction import encode_images
from prolip.functional import accuracy
from prolip.methods import Method, create
from prolip.methods.base import Task
from prolip.tta import TTAConfig, tta_logits

if TYPE_CHECKING:  # Run.predict calls this module: the type only, so the two never import each other
    from prolip.run import Run

SPLITS = ("train", "val", "test")


# ---- the run's model, rebuilt ------------------------------------------------------------------------------------


def backbone_for_run(run: Run, device: str = "cpu") -> Backbone:
    """The backbone a run was fitted on, rebuilt by its family from the manifest; other weights are a RunError."""
    backbone = load_backbone_for(run.manifest["backbone"], device=device)
    check_backbone_matches(backbone, run)
    return backbone


def check_backbone_matches(backbone: Backbone, run: Run) -> None:
    """Refuse to apply a run to other weights than it was fitted on: the adapted W would be meaningless."""
    expected = run.manifest["backbone"]["fingerprint"]
    if backbone.info.fingerprint != expected:
        raise RunError(
            f"run {run.path} was fitted on {run.manifest['backbone']['arch']} weights with fingerprint "
            f"{expected[:16]}…, but the loaded backbone ({backbone.info.describe()}) has "
            f"{backbone.info.fingerprint[:16]}…; pass the same --model/--pretrained as at fit time"
        )


def task_from_run(backbone: Backbone, run: Run) -> Task:
    """The Task a saved run was fitted on, rebuilt without re-encoding text (with the backbone itself, which
    methods that train inside the image encoder rebuild their encoder from)."""
    return task_for(backbone, run.classifier, int(run.manifest["fit"]["shots"]))


def method_from_run(backbone: Backbone, run: Run) -> Method:
    """The fitted method of a saved run; a run naming an unknown method or holding bad tensors is a RunError."""
    cfg = run.manifest["method"]
    where = run.path / "method.safetensors" if run.path is not None else "the run"
    try:
        method = create(cfg["method"], **cfg.get("hyperparameters", {}))
        return method.load_state_dict(task_from_run(backbone, run), run.method_state)
    except ValueError as e:  # HyperparameterError included: a tampered or foreign manifest
        raise RunError(f"{where}: {e}") from None


def adapted_projection(method: Method, run: Run) -> Tensor:
    """The projection W a run's method adapted: what test-time adaptation starts from."""
    W = method.projection() if method.capabilities.exposes_projection else None
    if W is None:
        raise RunError(
            f"run {run.path} used method {method.name!r}, whose predictions are not CLIP's with an adapted "
            "projection W: test-time adaptation needs one (prolip, zeroshot)"
        )
    return W


def checkpoint_tensors(method: Method, run: Run, backbone: Backbone) -> dict[str, Tensor]:
    """The model tensors a run's method changed, to merge into a checkpoint; a head of its own is refused."""
    tensors = method.checkpoint_tensors(backbone)
    if tensors is None:
        raise RunError(
            f"run {run.path} used method {method.name!r}, which learns a head of its own rather than changing the "
            "CLIP model: there is no checkpoint to export (export takes methods that adapt the model itself, "
            "e.g. prolip, full-ft, last-layer-ft)"
        )
    return tensors


def export_head(method: Method, run: Run) -> tuple[Tensor, list[str], list[str]]:
    """The classifier head written beside an exported checkpoint: (T [C, D], class names, templates). The run's
    zero-shot classifier, or the one its method predicts with instead (tuned text encoder, learned head), whose
    templates are the method's one prompt where it has one."""
    head = method.classifier_head()
    if head is None:
        return run.classifier, run.classnames, run.templates
    template = method.get_params().get("template")
    return head, run.classnames, [template] if isinstance(template, str) else []


# ---- predictions ---------------------------------------------------------------------------------------------------


def image_logits(
    run: Run, backbone: Backbone, method: Method, paths: Sequence[Path | str], tta: TTAConfig | None = None
) -> Tensor:
    """The run's logits [N, C] for image files: the fitted method on their center crops, or test-time ProLIP per
    image starting from the run's adapted W (``tta``). An unreadable image is its BadImageError."""
    if tta is not None:
        return tta_logits(
            backbone,
            adapted_projection(method, run),
            backbone.projection().bias,
            run.classifier,
            float(run.manifest["logit_scale"]),
            list(paths),
            **asdict(tta),
        )
    if method.capabilities.encodes_images:
        return method.image_logits(list(paths))
    return method.logits(encode_images(backbone, list(paths)))


def top_predictions(logits: Tensor, classnames: Sequence[str], paths: Sequence[Path | str], top_k: int) -> list[dict]:
    """Per image, its ``top_k`` classes with their softmax probabilities."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1 (got {top_k})")
    probs = logits.float().softmax(dim=-1)
    top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
    return [
        {
            "image": str(p),
            "predictions": [
                {"class": classnames[int(i)], "index": int(i), "probability": round(float(v), 6)}
                for v, i in zip(vals, idx, strict=True)
            ],
        }
        for p, vals, idx in zip(paths, top.values, top.indices, strict=True)
    ]


def predict(
    run: Run,
    paths: Sequence[Path | str],
    *,
    top_k: int = 5,
    tta: TTAConfig | None = None,
    backbone: Backbone | None = None,
    device: str = "cpu",
) -> list[dict]:
    """``prolip predict``: the top-k classes of each image file (``Run.predict``)."""
    backbone = backbone_for_run(run, device) if backbone is None else backbone
    method = method_from_run(backbone, run)
    return top_predictions(image_logits(run, backbone, method, paths, tta), run.classnames, paths, top_k)


# ---- evaluation ----------------------------------------------------------------------------------------------------


def in_run_classes(images: LabeledImages, run: Run) -> LabeledImages:
    """``images`` labelled with the run's class names: as they are, or through the names the run was fitted with
    (data still named by its folders after ``fit --classnames``); any other difference names the classes at fault."""
    names, ids = list(images.classnames), run.manifest["data"].get("class_ids")
    if names == list(run.classnames):
        return images
    if ids is not None and names == list(ids):
        return LabeledImages(images.items, list(run.classnames), images.templates, images.name, class_ids=ids)
    known = set(run.classnames) | set(ids or [])
    extra = [c for c in names if c not in known]
    missing = [
        c for c, i in zip(run.classnames, ids or run.classnames, strict=False) if c not in names and i not in names
    ]
    detail = (
        f"not in the run: {extra[:5]}; the run's classes missing here: {missing[:5]}"
        if extra or missing
        else "the same classes in another order"
    )
    raise DataError(
        f"the data ({images.name}): its {len(names)} classes differ from the run's {len(run.classnames)} "
        f"({run.path / 'classnames.json' if run.path else 'the run'}): {detail}",
        option="--data",
    )


def eval_images(run: Run, splits: DatasetSplits, split: str | None = None) -> tuple[LabeledImages, int, str]:
    """The images a run is evaluated on: the ``split`` asked for (default test; refused where the data has none),
    minus the run's support and validation images, so a run is never scored on what it trained or selected on.
    Returns them, how many of the run's own images were left out, and the evaluation set's name."""
    if split is not None and split not in SPLITS:
        raise DataError(f"split {split!r}: choose one of {', '.join(SPLITS)}", option="--split")
    available = {name: getattr(splits, name) for name in SPLITS if getattr(splits, name)}
    if split is not None and split != "train" and split not in available:
        raise DataError(
            f"split {split!r}: the data ({splits.name}) has no {split} split (it has: {', '.join(available)}); "
            "a plain folder or list is evaluated whole, without a split",
            option="--split",
        )
    wanted = split or "test"
    chosen = available.get(wanted) or splits.train
    if chosen is None:  # "train" asked of, or no split asked of, data with neither that split nor a train split
        raise DataError(
            f"split {wanted!r}: the data ({splits.name}) has no {wanted} split (it has: {', '.join(available)})",
            option="--split",
        )
    images = in_run_classes(chosen, run)
    seen = {p for key in ("support", "validation") for p, _ in run.manifest["data"].get(key, [])}
    keep = [i for i, it in enumerate(images.items) if str(it.path) not in seen]
    if not keep:
        raise DataError(
            f"the data ({splits.name}): every image is one of the run's support or validation images; nothing is "
            "left to evaluate",
            option="--data",
        )
    excluded = len(images) - len(keep)
    name = f"{wanted} split" if wanted in ("val", "test") and wanted in available else "images"
    if excluded:
        name = f"{name} ({excluded} support/validation images of the run left out)"
    return images.subset(keep), excluded, name


def evaluate_run(
    run: Run,
    splits: DatasetSplits,
    *,
    split: str | None = None,
    tta: TTAConfig | None = None,
    backbone: Backbone | None = None,
    cache=None,
    device: str = "cpu",
) -> dict[str, Any]:
    """``prolip eval``: the run's accuracy on a dataset (its own support and validation images left out), with its
    top-5 and mean per-class accuracy, per-class table, confusion matrix, worst classes and most confused pairs.

    ``cache`` (a FeatureCache of the same backbone) serves the center crops; without one (or with ``tta``, whose
    views are encoded directly) the images are encoded here."""
    images, excluded, eval_set = eval_images(run, splits, split)
    backbone = backbone_for_run(run, device) if backbone is None else backbone
    method = method_from_run(backbone, run)
    skipped: list = []
    if tta is not None or cache is None:
        logits = image_logits(run, backbone, method, [it.path for it in images.items], tta)
        labels = torch.tensor(images.labels)
    else:
        features = EpisodeBuilder(backbone, cache).center(images)
        logits, labels, skipped = method_logits(method, features), features.labels, features.skipped
    diagnosis = diagnose(logits, labels, run.classnames)
    diagnosis.pop("accuracy")  # the metrics' own, computed as everywhere else
    return {
        "backbone": backbone.info.describe(),
        "run": str(run.path),
        "accuracy": accuracy(logits, labels),
        "eval_images": int(len(labels)),
        "split": split or "test",
        "eval_set": eval_set,
        "excluded_run_images": excluded,
        "tta": tta is not None,
        **left_out([[str(p), r] for p, r in skipped], [images]),
        **diagnosis,
    }


def left_out(skipped: list[list], datasets: Sequence[LabeledImages | None]) -> dict[str, Any]:
    """What was left out of the data, counted and listed: the unreadable images skipped and the files the readers
    ignored (not images). Never a silent change of the data."""
    ignored = sorted({str(p) for d in datasets if d is not None for p in d.ignored_files})
    return {
        "skipped_images": skipped,
        "ignored_files": ignored,
        "skipped_count": len(skipped),
        "ignored_count": len(ignored),
    }
