"""Glue between backbones, data, the feature cache and methods: the pieces the CLI, the demo and the bench share.

``fit`` is the whole product path: sample a few-shot support set, cache its features, train a method, evaluate it
and return a :class:`~prolip.run.Run` ready to save.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from prolip import __version__
from prolip.backbones.base import Backbone
from prolip.data.types import DatasetSplits, LabeledImages
from prolip.functional import accuracy, clip_logits
from prolip.methods.base import Method, Support, Task, Validation
from prolip.run import Run

# Methods whose hyperparameters are chosen on a few-shot validation set; the others never see one.
NEEDS_VALIDATION_KEYS = ("grid",)


def build_task(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], shots: int,
               *, with_text_side: bool = False, classifier: torch.Tensor | None = None) -> Task:
    """Freeze what every method needs from CLIP for one classification task."""
    site = backbone.projection()
    text_pre = text_proj = None
    if with_text_side:
        text_pre, text_proj = backbone.text_side(list(classnames), list(templates))
    if classifier is None:
        classifier = backbone.encode_text(list(classnames), list(templates))
    return Task(
        W0=site.weight.detach().float().cpu(),
        bias=None if site.bias is None else site.bias.detach().float().cpu(),
        classifier=classifier.detach().float().cpu(),
        logit_scale=float(backbone.logit_scale),
        shots=shots,
        text_pre=text_pre,
        text_proj=text_proj,
    )


@dataclass
class FitConfig:
    """Everything that defines one adaptation besides the model and the data (recorded in the run manifest)."""

    shots: int = 16
    seed: int = 1
    method: str = "prolip"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    views: int = 300
    aug_seed: int = 0
    sampler: str = "lpp"
    allow_fewer: bool = False
    use_validation: bool = False


@dataclass
class FitResult:
    run: Run
    method: Method
    metrics: dict[str, Any]


def _paths(images: LabeledImages) -> list[Path]:
    return [it.path for it in images.items]


def _labels(images: LabeledImages, keep: Sequence[int] | None = None) -> torch.Tensor:
    labels = torch.tensor(images.labels, dtype=torch.long)
    return labels if keep is None else labels[torch.as_tensor(list(keep), dtype=torch.long)]


def center_features(cache, images: LabeledImages) -> tuple[torch.Tensor, torch.Tensor]:
    """Center-crop features and labels of a labelled set, dropping images the cache skipped as bad."""
    z = cache.center(_paths(images))
    keep = getattr(cache, "last_kept", None)
    return z, _labels(images, keep)


def held_out(train: LabeledImages, used: Sequence[int]) -> LabeledImages:
    """The images of ``train`` not used for support or validation: the evaluation set of a plain image folder."""
    used_set = set(used)
    return train.subset([i for i in range(len(train)) if i not in used_set])


def fit(backbone: Backbone, splits: DatasetSplits, cache, config: FitConfig, *,
        eval_images: LabeledImages | None = None, data_spec: str | None = None) -> FitResult:
    """Sample, cache, train and evaluate one adaptation; returns the run (not yet saved) and its metrics."""
    from prolip.data import sample_few_shot
    from prolip.methods import create

    if splits.train is None or len(splits.train) == 0:
        raise ValueError(f"dataset {splits.name!r} has no training images to sample shots from")
    train = splits.train
    val_split = splits.val if (config.use_validation and splits.val is not None) else None
    few = sample_few_shot(train.labels, config.shots, config.seed, convention=config.sampler,
                          allow_fewer=config.allow_fewer,
                          val_labels=val_split.labels if val_split is not None else None)
    support_images = train.subset(few.train_indices)

    started = time.perf_counter()
    views = cache.views(_paths(support_images), config.views, aug_seed=config.aug_seed)
    support_labels = _labels(support_images, getattr(views, "kept", None))
    support = Support(views=views, labels=support_labels)

    validation = None
    if config.use_validation:
        val_source = val_split if val_split is not None else train
        val_images = val_source.subset(few.val_indices)
        z_val, y_val = center_features(cache, val_images)
        validation = Validation(z_val, y_val)

    if eval_images is None:
        if splits.test is not None and len(splits.test):
            eval_images = splits.test
        else:
            used = list(few.train_indices) + (list(few.val_indices) if val_split is None and config.use_validation else [])
            eval_images = held_out(train, used)
    z_eval, y_eval = center_features(cache, eval_images) if len(eval_images) else (None, None)
    extract_seconds = time.perf_counter() - started

    task = build_task(backbone, splits.classnames, splits.templates, config.shots,
                      with_text_side=config.method == "prolip-text")
    started = time.perf_counter()
    method = create(config.method, **config.hyperparameters).fit(task, support, validation, seed=config.seed)
    train_seconds = time.perf_counter() - started

    metrics: dict[str, Any] = {"extract_seconds": round(extract_seconds, 3), "train_seconds": round(train_seconds, 3)}
    if hasattr(cache, "stats"):  # this process's share under torchrun
        metrics["forward_passes"] = cache.stats.forward_passes
    if z_eval is not None and len(y_eval):
        with torch.no_grad():
            metrics["accuracy"] = accuracy(method.logits(z_eval), y_eval)
            metrics["zero_shot_accuracy"] = accuracy(
                clip_logits(z_eval, task.W0, task.bias, task.classifier, task.logit_scale), y_eval)
        metrics["eval_images"] = int(len(y_eval))
        metrics["eval_set"] = "test split" if eval_images is splits.test else "held-out images"

    manifest = {
        "prolip_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone": asdict(backbone.info),
        "logit_scale": task.logit_scale,
        "method": method.config(),
        "fit": asdict(config),
        "data": {"spec": data_spec, "name": splits.name, "num_classes": len(splits.classnames),
                 "support": [[str(p), int(y)] for p, y in zip(_paths(support_images), support_images.labels)]},
        "skipped_images": [[str(p), r] for p, r in getattr(cache, "skipped", [])],
        "metrics": metrics,
    }
    run = Run(manifest=manifest, method_state=method.state_dict(), classifier=task.classifier,
              classnames=list(splits.classnames), templates=list(splits.templates))
    return FitResult(run=run, method=method, metrics=metrics)


def task_from_run(backbone: Backbone, run: Run) -> Task:
    """The Task a saved run was fitted on, rebuilt without re-encoding text."""
    return build_task(backbone, run.classnames, run.templates, run.manifest["fit"]["shots"], classifier=run.classifier)


def method_from_run(backbone: Backbone, run: Run) -> Method:
    from prolip.methods import create

    cfg = run.manifest["method"]
    method = create(cfg["method"], **cfg.get("hyperparameters", {}))
    return method.load_state_dict(task_from_run(backbone, run), run.method_state)


def check_backbone_matches(backbone: Backbone, run: Run) -> None:
    """Refuse to apply a run to other weights than it was fitted on: the adapted W would be meaningless."""
    expected = run.manifest["backbone"]["fingerprint"]
    if backbone.info.fingerprint != expected:
        raise ValueError(
            f"run {run.path} was fitted on {run.manifest['backbone']['arch']} weights with fingerprint "
            f"{expected[:16]}…, but the loaded backbone ({backbone.info.describe()}) has "
            f"{backbone.info.fingerprint[:16]}…; pass the same --model/--pretrained as at fit time")
