"""One few-shot episode: dataset splits → the frozen task, the support set (augmented views + center crops), the
N-shot validation set and the evaluation set.

``prolip fit`` (``pipeline.fit``), every ``prolip bench`` protocol and the demo build their episodes here, so the
same data, shots, seed and sampler always give the same support images and the same evaluation images.

- Sampling (:func:`draw_images`, pure): the sampler's draws over *all* classes; with ``classes`` (base-to-new's
  base half) the draws are then restricted to those classes and relabelled, as the reference does (it samples the
  full dataset and keeps labels below ⌈C/2⌉). ImageNet under the LP++/ProLIP sampler draws 2N per class from the
  training split, the first N support and the last N validation.
- Evaluation: the test split when there is one, else the images of the folder used neither for support nor (when
  the episode has one) for validation ("held-out images").
- Features (:class:`EpisodeBuilder`): views and center crops come from the feature cache; text classifiers and
  evaluation features are memoised, because a bench run builds hundreds of episodes on the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from prolip.backbones.base import Backbone
from prolip.choices import SAMPLERS
from prolip.data import NotEnoughImagesError, sample_few_shot
from prolip.data.sampling import FewShotSplit
from prolip.data.types import DatasetSplits, ImageItem, LabeledImages
from prolip.errors import ProlipError
from prolip.features.cache import CachedViews
from prolip.functional import ensemble_classifier
from prolip.methods.base import NO_CACHED_VIEWS, Method, Support, Task, Validation
from prolip.transforms import DEFAULT_AUGMENTATION

EVAL_TEST_SPLIT, EVAL_HELD_OUT = "test split", "held-out images"


class EpisodeError(ProlipError, ValueError):
    """The data cannot make the requested episode; the message names the dataset and the option at fault."""


@dataclass(frozen=True)
class EpisodeSpec:
    """Everything besides the data that decides an episode's images and features (recorded with every result)."""

    shots: int
    seed: int = 1
    sampler: str = "lpp"
    views: int = 300
    aug_seed: int = 0
    allow_fewer: bool = False
    validation: bool = False
    classes: tuple[int, ...] | None = None  # keep only these classes after sampling, relabelled in this order
    # The cached views of the episode's support (other methods ask support_for).
    augmentation: str = DEFAULT_AUGMENTATION
    split_file: str | None = None  # a published split (2SFS's JSONL) instead of the sampler's draw
    split_val_file: str | None = None  # its validation images


@dataclass(frozen=True)
class EpisodeImages:
    support: LabeledImages
    validation: LabeledImages
    evaluation: LabeledImages
    eval_set: str  # EVAL_TEST_SPLIT or EVAL_HELD_OUT

    def support_digest(self) -> str:
        """A short hash of the support images and labels, recorded with every result, so two results can be
        checked to come from the same draw."""
        listing = "\n".join(f"{it.path}|{it.label}" for it in self.support.items)
        return hashlib.blake2b(listing.encode(), digest_size=8).hexdigest()


@dataclass
class Features:
    """Center-crop features of a labelled image set, with the images they belong to (unreadable ones dropped)."""

    features: Tensor
    labels: Tensor
    images: LabeledImages
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Episode:
    task: Task
    support: Support
    validation: Validation | None
    evaluation: Features
    images: EpisodeImages
    skipped: list[tuple[Path, str]]
    builder: EpisodeBuilder | None = None
    spec: EpisodeSpec | None = None  # what drew it and its views (its support's augmentation among them)
    _other_supports: dict[str, Support] = field(default_factory=dict)

    def support_for(self, method: Method) -> Support:
        """The support set as ``method`` trains on it: the same images, in its augmentation's cached views (a method
        that reads no cached views gets the episode's own, and nothing more is extracted for it)."""
        augmentation = method.capabilities.augmentation
        assert self.spec is not None
        if augmentation in (self.spec.augmentation, NO_CACHED_VIEWS):
            return self.support
        if augmentation not in self._other_supports:
            assert self.builder is not None
            own = dataclasses.replace(self.spec, augmentation=augmentation)
            support, _, skipped = self.builder.support(self.images.support, own)
            self._other_supports[augmentation] = support
            self.skipped.extend(skipped)
        return self._other_supports[augmentation]


# ----------------------------------------------------------------------------------------------- sampling (pure)


def restrict(images: LabeledImages, classes: Sequence[int]) -> LabeledImages:
    """The images of ``classes``, relabelled 0..len(classes)-1 in that order."""
    new = {c: i for i, c in enumerate(classes)}
    items = [ImageItem(it.path, new[it.label]) for it in images.items if it.label in new]
    return LabeledImages(items, [images.classnames[c] for c in classes], images.templates, images.name)


def restrict_splits(splits: DatasetSplits, classes: Sequence[int]) -> DatasetSplits:
    parts = [None if p is None else restrict(p, classes) for p in (splits.train, splits.val, splits.test)]
    return DatasetSplits(splits.name, [splits.classnames[c] for c in classes], splits.templates, *parts)


def evaluation_images(splits: DatasetSplits) -> LabeledImages:
    """Where a model trained elsewhere is evaluated: the test split, or every image of a plain folder."""
    if splits.test is not None and len(splits.test):
        return splits.test
    assert splits.train is not None
    return splits.train


def _check_data(splits: DatasetSplits, spec: EpisodeSpec) -> LabeledImages:
    train = splits.train
    if train is None or not len(train):
        raise EpisodeError(f"dataset {splits.name!r} has no training images to sample shots from")
    if len(splits.classnames) < 2:
        raise EpisodeError(
            f"dataset {splits.name!r} has a single class ({splits.classnames}): every prediction "
            "would be right, so accuracy would mean nothing; give it at least two classes"
        )
    if spec.sampler not in SAMPLERS:
        raise EpisodeError(f"unknown sampler {spec.sampler!r}; use one of {', '.join(SAMPLERS)}")
    largest = max(Counter(int(label) for label in train.labels).values())  # one pass: ImageNet has 1.3 M labels
    if spec.shots > largest:
        raise EpisodeError(
            f"--shots {spec.shots} exceeds the largest class of {splits.name!r} ({largest} training "
            f"images): even with --allow-fewer no class could give that many distinct images"
        )
    return train


def draw_images(splits: DatasetSplits, spec: EpisodeSpec) -> EpisodeImages:
    """Support, N-shot validation and evaluation images of one episode; validation never overlaps evaluation."""
    train = _check_data(splits, spec)
    few = (
        _published_split(splits, spec)
        if spec.split_file
        else sample_few_shot(
            train.labels,
            spec.shots,
            spec.seed,
            convention=spec.sampler,
            allow_fewer=spec.allow_fewer,
            val_labels=splits.val.labels if splits.val is not None else None,
            imagenet_style=splits.name == "ImageNet" and spec.sampler == "lpp",
            classnames=splits.classnames,
        )
    )
    support = train.subset(few.train_indices)
    validation = (splits.val if few.val_from == "val" and splits.val is not None else train).subset(few.val_indices)
    if splits.test is not None and len(splits.test):
        evaluation, eval_set = splits.test, EVAL_TEST_SPLIT
    else:
        # Validation images drawn from the folder are held out only when they are used, so a validation-free fit
        # is scored on every image it did not train on.
        used = set(few.train_indices) | (set(few.val_indices) if spec.validation and few.val_from == "train" else set())
        evaluation, eval_set = train.subset([i for i in range(len(train)) if i not in used]), EVAL_HELD_OUT
    if spec.classes is not None:
        support, validation, evaluation = (restrict(x, spec.classes) for x in (support, validation, evaluation))
    if spec.validation:
        _check_validation(support, validation, few.val_from)
    return EpisodeImages(support, validation, evaluation, eval_set)


def _published_split(splits: DatasetSplits, spec: EpisodeSpec) -> FewShotSplit:
    """The very images a published split file names (``split_file``, e.g. 2SFS's), read onto the dataset as prolip
    reads it; its shot count must be the episode's."""
    from prolip.data.fewshot_jsonl import read_split

    assert spec.split_file is not None
    few = read_split(splits, spec.split_file, spec.split_val_file)
    if few.shots != spec.shots:
        raise EpisodeError(
            f"--split-file {spec.split_file} is a {few.shots}-shot split, not {spec.shots}-shot: pass --shots "
            f"{few.shots}, or the file of {spec.shots} shots"
        )
    return few


def _check_validation(support: LabeledImages, validation: LabeledImages, source: str) -> None:
    """Selection on a validation set missing a class would select on the other classes only (or on nothing, and
    fail deep inside a method): refused, naming the classes and how to get validation images for them."""
    missing = sorted(set(support.labels) - set(validation.labels))
    if missing:
        names = [support.classnames[c] for c in missing][:5]
        where = (
            "its val split has no image of them"
            if source == "val"
            else "every image of theirs is a support image, none is left for validation"
        )
        raise NotEnoughImagesError(
            f"--validate needs validation images of every class, and {len(missing)} class(es) have none "
            f"({names}): {where}; lower --shots, add images, or fit without --validate"
        )


# ----------------------------------------------------------------------------------------------- features


class EpisodeBuilder:
    """Builds episodes on one backbone and feature cache, memoising text classifiers and center features. Views per
    image and their seed are the episode's (:class:`EpisodeSpec`, the one place they are given), never the builder's,
    so the run and ``prolip bench --plan`` read the same object."""

    def __init__(self, backbone: Backbone, cache, *, announce: Callable[[str], None] | None = None):
        self.backbone, self.cache = backbone, cache
        self.announce = announce
        self._text: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._center: dict[tuple, Features] = {}

    def text(self, classnames: Sequence[str], templates: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(classifier T [C, D] with normalised rows, unnormalised mean text embedding [C, D])."""
        key = (tuple(classnames), tuple(templates))
        if key not in self._text:
            names = [c.replace("_", " ") for c in classnames]
            per_template = self.backbone.encode_text_templates(names, list(templates)).float().cpu()
            self._text[key] = (ensemble_classifier(per_template), per_template.mean(dim=1))
        return self._text[key]

    def classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        return self.text(classnames, templates)[0]

    def task(self, classnames: Sequence[str], templates: Sequence[str], shots: int, *, text_side: bool = False) -> Task:
        """The frozen CLIP pieces of one classification task."""
        classifier, text_mean = self.text(classnames, templates)
        task = task_for(self.backbone, classifier, shots, text_mean=text_mean)
        if text_side:
            text_pre, text_proj = self.backbone.text_side(list(classnames), list(templates))
            task = dataclasses.replace(task, text_pre=text_pre, text_proj=text_proj)
        return task

    def center(self, images: LabeledImages) -> Features:
        """Center-crop features of ``images`` (unreadable images dropped under on_bad_image=skip), memoised."""
        key = tuple(str(it.path) for it in images.items) + tuple(images.labels)
        if key not in self._center:
            result = self.cache.center([it.path for it in images.items])
            labels = torch.tensor(images.labels, dtype=torch.long)[torch.as_tensor(result.kept, dtype=torch.long)]
            self._center[key] = Features(result.features, labels, images.subset(result.kept), list(result.skipped))
        return self._center[key]

    def support(
        self, images: LabeledImages, spec: EpisodeSpec
    ) -> tuple[Support, LabeledImages, list[tuple[Path, str]]]:
        """The support set: ``spec``'s cached augmented views (its views, seed and augmentation), labels, and (on
        first use) the center crops of the same images. With NO_CACHED_VIEWS (a method that trains on the images)
        its one view is the center crop, cached as such."""
        paths = [it.path for it in images.items]
        if spec.augmentation == NO_CACHED_VIEWS:
            found = self.cache.fill(paths)
            views = CachedViews(found.entries, 1, found.kept, found.skipped)
        else:
            views = self.cache.views(paths, spec.views, aug_seed=spec.aug_seed, augmentation=spec.augmentation)
        kept = images.subset(views.kept)
        labels = torch.tensor(kept.labels, dtype=torch.long)
        support = Support(views=views, labels=labels, center=lambda: self.center(kept).features, images=kept)
        return support, kept, list(views.skipped)

    def build(
        self,
        splits: DatasetSplits,
        spec: EpisodeSpec,
        *,
        templates: Sequence[str] | None = None,
        eval_images: LabeledImages | None = None,
        text_side: bool = False,
    ) -> Episode:
        """The whole episode; ``eval_images`` replaces the evaluation set (a user's separate folder)."""
        drawn = draw_images(splits, spec)
        if eval_images is not None:
            drawn = EpisodeImages(drawn.support, drawn.validation, eval_images, "given images")
        self.preflight(drawn, spec)
        classnames = drawn.support.classnames
        support, _, skipped = self.support(drawn.support, spec)
        validation = None
        if spec.validation:
            val = self.center(drawn.validation)
            validation, skipped = Validation(val.features, val.labels), skipped + val.skipped
        evaluation = self.center(drawn.evaluation) if len(drawn.evaluation) else _empty(drawn.evaluation, self.backbone)
        task = self.task(classnames, templates or splits.templates, spec.shots, text_side=text_side)
        return Episode(task, support, validation, evaluation, drawn, skipped + evaluation.skipped, self, spec)

    def preflight(self, drawn: EpisodeImages, spec: EpisodeSpec) -> None:
        """Say what extraction will do at most, and refuse up front when the cache's disk cannot hold it or one
        image's views cannot be held in memory while they are computed."""
        views = support_views(spec.augmentation, spec.views)
        self._check_memory(len(drawn.support), views)
        centers = len(drawn.evaluation) + (len(drawn.validation) if spec.validation else 0) + len(drawn.support)
        passes = len(drawn.support) * views + centers
        need = passes * self.backbone.dim_pre * 2  # float16 features
        root = _existing_ancestor(Path(self.cache.root))
        free = shutil.disk_usage(root).free
        if need > free:
            raise EpisodeError(
                f"caching {views} views of {len(drawn.support)} support images needs up to "
                f"{_size(need)} in {self.cache.root}, which has {_size(free)} free: lower --views or "
                "pass another --cache-dir"
            )
        if self.announce is not None:
            self.announce(
                f"features: up to {passes:,} forward passes ({len(drawn.support)} support images × "
                f"{views} views + {centers} center crops; cached ones are reused), up to {_size(need)} "
                f"in {self.cache.root}"
            )

    def _check_memory(self, support_images: int, views: int) -> None:
        # A unit's views are written into one float32 block, then copied to float16 for the write: 6 bytes a value at
        # the peak (features/extraction.py, Extractor.encode); a unit holds one image at the least.
        per_image = views * self.backbone.dim_pre * 6
        available = available_memory()
        if support_images and available is not None and per_image > available // 2:
            raise EpisodeError(
                f"--views {views} holds {_size(per_image)} of features per image in memory while they are "
                f"computed ({views:,} views × {self.backbone.dim_pre} values), more than half of the "
                f"{_size(available)} available: lower --views (ProLIP uses one view per step; 300 is the paper's)"
            )


def support_views(augmentation: str, views: int) -> int:
    """Augmented views extracted per support image: ``views``, or none for a method that trains on the images."""
    return 0 if augmentation == NO_CACHED_VIEWS else views


def available_memory() -> int | None:
    """Bytes of memory available now: Linux's MemAvailable (free plus reclaimable page cache), else the free pages
    the system reports, else None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def method_logits(method: Method, features: Features, classifier: Tensor | None = None) -> Tensor:
    """A fitted method's logits on an evaluation set: from the cached features, or, for a method that trains inside
    the image encoder, from the images through its own encoder."""
    if method.capabilities.encodes_images:
        return method.image_logits([it.path for it in features.images.items], classifier)
    return method.logits(features.features, classifier=classifier)


def _empty(images: LabeledImages, backbone: Backbone) -> Features:
    return Features(torch.empty(0, backbone.dim_pre), torch.empty(0, dtype=torch.long), images)


def task_for(backbone: Backbone, classifier: Tensor, shots: int, text_mean: Tensor | None = None) -> Task:
    """A task from a backbone's projection and a given text classifier (a saved run's, or a new one), with the
    backbone itself (methods that train inside the image encoder rebuild their encoder from it) and the rows of W
    that stay frozen (the residual's, at a MAP-head site)."""
    site = backbone.projection()
    return Task(
        W0=site.weight.detach().float().cpu(),
        bias=None if site.bias is None else site.bias.detach().float().cpu(),
        classifier=classifier.detach().float().cpu(),
        logit_scale=float(backbone.logit_scale),
        shots=shots,
        text_mean=text_mean,
        backbone=backbone,
        frozen_rows=site.residual_rows,
    )
