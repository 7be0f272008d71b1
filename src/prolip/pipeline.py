"""The product path the CLI and the demo share: episode → method → evaluation → a run ready to save.

``fit`` builds one few-shot episode (:mod:`prolip.episode`), fits a method on it, evaluates it and returns a
:class:`~prolip.run.Run`. Applying a saved run (``method_from_run``, ``evaluate_run``, ``predict``) is
:mod:`prolip.inference`, re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from prolip import runcard
from prolip.backbones.base import Backbone
from prolip.data.folder import DataError
from prolip.data.types import DatasetSplits, LabeledImages
from prolip.diagnostics import diagnose
from prolip.episode import Episode, EpisodeBuilder, EpisodeSpec, method_logits
from prolip.features.identity import result_fingerprints
from prolip.functional import accuracy, calibration_error, chunk_rows, clip_logits, row_slices, top_confidence
from prolip.inference import (
    backbone_for_run,
    check_backbone_matches,
    evaluate_run,
    left_out,
    method_from_run,
    predict,
    task_from_run,
)
from prolip.methods import Method, configure
from prolip.methods.base import Task
from prolip.run import FORMAT as RUN_FORMAT
from prolip.run import Run
from prolip.transforms import DEFAULT_AUGMENTATION
from prolip.version import __version__


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
    split_file: str | None = None  # a published split file (2SFS's JSONL) instead of the sampler's draw
    split_val_file: str | None = None

    def episode_spec(self, augmentation: str = DEFAULT_AUGMENTATION) -> EpisodeSpec:
        return EpisodeSpec(
            shots=self.shots,
            seed=self.seed,
            sampler=self.sampler,
            views=self.views,
            aug_seed=self.aug_seed,
            allow_fewer=self.allow_fewer,
            validation=self.use_validation,
            augmentation=augmentation,
            split_file=self.split_file,
            split_val_file=self.split_val_file,
        )


@dataclass
class FitResult:
    run: Run
    method: Method
    metrics: dict[str, Any]
    episode: Episode


def evaluate(method: Method, episode: Episode) -> dict[str, Any]:
    """Adapted and zero-shot accuracy on the episode's evaluation set (nothing when it is empty), with the adapted
    model's top-5 and mean per-class accuracy, its least accurate classes and most confused pairs."""
    ev, task = episode.evaluation, episode.task
    if not len(ev):
        return {"eval_images": 0, "eval_set": episode.images.eval_set}
    with torch.no_grad():
        zero_shot_accuracy, zero_shot_ece = zero_shot_scores(task, ev.features, ev.labels)
        logits = method_logits(method, ev)
    diagnosis = diagnose(logits, ev.labels, ev.images.classnames)
    return {
        "accuracy": accuracy(logits, ev.labels),
        "zero_shot_accuracy": zero_shot_accuracy,
        "eval_images": len(ev),
        "eval_set": episode.images.eval_set,
        "zero_shot_ece": zero_shot_ece,
        **{
            k: diagnosis[k]
            for k in ("top5_accuracy", "ece", "mean_per_class_accuracy", "worst_classes", "most_confused")
        },
    }


def zero_shot_scores(task: Task, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Zero-shot CLIP's (accuracy %, ECE %) on features [N, D_pre], its logits built a block of rows at a time:
    what they need is O(N) (each image's class and top probability), so no [N, C] logits are held."""
    n = features.shape[0]
    predicted = torch.empty(n, dtype=torch.long)
    confidence, calibrated = torch.empty(n), torch.empty(n, dtype=torch.long)
    for rows in row_slices(n, chunk_rows(task.num_classes)):
        logits = clip_logits(features[rows], task.W0, task.bias, task.classifier, task.logit_scale)
        predicted[rows] = logits.argmax(dim=-1)
        confidence[rows], calibrated[rows] = top_confidence(logits)
    correct = (predicted == labels).float().mean().item() * 100.0  # = functional.accuracy on the whole logits
    return correct, calibration_error(confidence, (calibrated == labels).float())


def fit(
    backbone: Backbone,
    splits: DatasetSplits,
    cache,
    config: FitConfig,
    *,
    eval_images: LabeledImages | None = None,
    data_spec: str | None = None,
    announce: Callable[[str], None] | None = None,
    command: str | None = None,
) -> FitResult:
    """Sample, cache, train and evaluate one adaptation; returns the run (not yet saved) and its metrics.

    ``announce`` hears what extraction will do before it starts; ``command`` (how the fit was asked for) goes
    into the run card."""
    method = configure(config.method, config.hyperparameters, validate=config.use_validation, dataset=splits.name)
    if eval_images is not None and list(eval_images.classnames) != list(splits.classnames):
        differ = sorted(set(eval_images.classnames) ^ set(splits.classnames))[:5]
        raise DataError(
            f"the evaluation images ({eval_images.name}): their classes differ from the training "
            f"classes (e.g. {differ})",
            option="--val",
        )
    builder, can = EpisodeBuilder(backbone, cache, announce=announce), method.capabilities
    started = time.perf_counter()
    episode = builder.build(
        splits, config.episode_spec(can.augmentation), eval_images=eval_images, text_side=can.uses_text_side
    )
    extract_seconds = time.perf_counter() - started
    refuse_emptied_classes(episode, splits.classnames)
    started = time.perf_counter()
    method.fit(episode.task, episode.support, episode.validation, seed=config.seed)
    train_seconds = time.perf_counter() - started
    metrics = {
        "extract_seconds": round(extract_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "forward_passes": cache.stats.forward_passes,
        **evaluate(method, episode),
    }
    manifest = result_fingerprints(episode.images, cache, str(backbone.device)) | {
        "prolip_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone": asdict(backbone.info),
        "logit_scale": episode.task.logit_scale,
        "method": method.config(),
        "fit": asdict(config),
        "data": {
            "spec": data_spec,
            "name": splits.name,
            "num_classes": len(splits.classnames),
            "train_images": len(splits.train) if splits.train is not None else 0,
            "class_ids": splits.train.class_ids if splits.train is not None else None,
            "support": _listing(episode.images.support),
            "support_digest": episode.images.support_digest(),
            "validation": _listing(episode.images.validation) if config.use_validation else [],
            "eval_set": episode.images.eval_set,
            "augmentation": can.augmentation,
        },
        **left_out([[str(p), r] for p, r in episode.skipped], [splits.train, eval_images]),
        "metrics": metrics,
    }
    run = Run(
        manifest=manifest,
        method_state=method.state_dict(),
        classifier=episode.task.classifier,
        classnames=list(splits.classnames),
        templates=list(splits.templates),
        card=runcard.render({"format": RUN_FORMAT, **manifest}, command),
    )
    return FitResult(run=run, method=method, metrics=metrics, episode=episode)


def _listing(images: LabeledImages) -> list[list]:
    return [[str(it.path), int(it.label)] for it in images.items]


def refuse_emptied_classes(episode: Episode, classnames: list[str]) -> None:
    """A fit where skipping unreadable images emptied a class's support set would train a classifier that silently
    has one class fewer than the user's data: refused, naming the class and its files."""
    bad = {str(p) for p, _ in episode.skipped}
    left: dict[int, int] = {}
    for it in episode.images.support.items:
        left[it.label] = left.get(it.label, 0) + (str(it.path) not in bad)
    empty = sorted(label for label, n in left.items() if n == 0)
    if empty:
        files = [str(it.path) for it in episode.images.support.items if it.label in empty][:5]
        raise DataError(
            f"every support image of class(es) {[classnames[i] for i in empty]} is unreadable and was skipped "
            f"(e.g. {files}), which would silently drop the class: replace those images or remove the class folder"
        )


__all__ = [
    "FitConfig",
    "FitResult",
    "backbone_for_run",
    "check_backbone_matches",
    "evaluate",
    "evaluate_run",
    "fit",
    "method_from_run",
    "predict",
    "refuse_emptied_classes",
    "task_from_run",
]
