"""The state every protocol shares while it runs (:class:`Bench`: the backbone, the feature cache and episode
builder, the records file), the cells and groups protocols list, the cost meters a fit is measured with, and the
feature requests protocols declare (:class:`GroupRequests`), which the run prefetches and the plan counts.

Nothing here knows one protocol from another: what a protocol needs, it declares (:mod:`prolip.bench.protocols`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from prolip.bench.memory import PeakMemory
from prolip.bench.records import Record, append_record, finished_cells
from prolip.bench.spec import Experiment, MethodSpec
from prolip.data.types import DatasetSplits, LabeledImages
from prolip.episode import (
    Episode,
    EpisodeBuilder,
    EpisodeImages,
    EpisodeSpec,
    Features,
    draw_images,
    method_logits,
    support_views,
)
from prolip.features.cache import Request
from prolip.features.identity import environment_fingerprint, image_set_fingerprint
from prolip.functional import accuracy, expected_calibration_error
from prolip.methods import Method, configure, create, method_class
from prolip.methods.base import NO_CACHED_VIEWS, Support, ViewSource
from prolip.outputs import writing
from prolip.version import __version__


@dataclass
class Cell:
    """One record to produce: a method (with its effective hyperparameters) and where it is scored."""

    method: MethodSpec
    record: Record
    target: str | None = None  # transfer protocols: the dataset scored, as the experiment names it (None: the source)
    extra: dict[str, Any] = field(default_factory=dict)  # protocol-specific (sensitivity point; tta row and start)

    def add(self, **results: Any) -> None:
        """Results scoring found, written into the cell's record in this order."""
        self.record = self.record.with_results(**results)


@dataclass
class Group:
    """Cells that share one episode."""

    dataset: str
    shots: int
    seed: int | None
    cells: list[Cell]


# ----------------------------------------------------------------------------------------------- shared state


class Bench:
    """One experiment run: the backbone, the shared cache and episode builder, the records file and memos."""

    def __init__(self, exp: Experiment, echo: Callable[[str], None] = print, backbone=None):
        from prolip.backbones import load_backbone
        from prolip.features import FeatureCache

        self.exp, self.echo = exp, echo
        out = Path(exp.out).expanduser()
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        self.records_path = out / "records.jsonl"
        self.finished = finished_cells(out)  # records.jsonl and any rank's file not yet merged into it
        if len(exp.sites) != 1:
            raise ValueError(f"a Bench runs at one site, not {exp.sites}: run each of exp.per_site()")
        self.site = exp.sites[0]
        self.backbone = (
            load_backbone(exp.model, exp.pretrained, device=exp.device, site=self.site)
            if backbone is None
            else backbone_at(backbone, self.site)
        )
        if self.backbone.info.random_weights:
            echo(f"WARNING: {self.backbone.info.describe()}: every number of this run comes from RANDOM weights.")
        cache_dir = None if exp.cache_dir is None else Path(exp.cache_dir).expanduser()
        self.cache = FeatureCache(
            cache_dir,
            self.backbone,
            batch_size=exp.batch_size,
            num_workers=exp.workers,
            on_bad_image=exp.on_bad_image,
            progress=False,
        )
        self.builder = EpisodeBuilder(self.backbone, self.cache)
        self.ran = self.skipped = 0
        self._splits: dict[str, DatasetSplits] = {}
        self.tta_starts: dict[tuple, Method] = {}  # fitted start methods, shared by every dataset of a TTA run
        self.costs: dict[int, dict[str, Any]] = {}  # by id of a method fitted here: its cost (see fit_cost)
        self._fingerprints: dict[tuple[str, ...], str] = {}  # image set -> its fingerprint (see identity)
        self._environment: dict[str, Any] | None = None

    @property
    def uses_validation(self) -> bool:
        """Whether episodes draw a validation set: the experiment asks for one, or its protocol does (it says so
        when the experiment is read, :meth:`Protocol.settle`)."""
        return self.exp.validation

    def splits(self, dataset: str) -> DatasetSplits:
        from prolip.data import resolve_data

        if dataset not in self._splits:
            root = None if self.exp.data_root is None else Path(self.exp.data_root).expanduser()
            self._splits[dataset] = resolve_data(dataset, root=root, cache_dir=self.cache.root)
        return self._splits[dataset]

    def templates(self, splits: DatasetSplits) -> tuple[str, list[str]]:
        return self.exp.templates_for(splits.templates)

    def spec(self, shots: int, seed: int, classes: tuple[int, ...] | None = None) -> EpisodeSpec:
        """The one description of an episode (its views and their seed among it) that the run builds from and the
        plan counts from (:func:`episode_requests`, :func:`fit_requests`)."""
        return EpisodeSpec(
            shots=shots,
            seed=seed,
            sampler=self.exp.sampler,
            views=self.exp.views,
            aug_seed=self.exp.aug_seed,
            allow_fewer=self.exp.allow_fewer,
            validation=self.uses_validation,
            classes=classes,
            augmentation=self.augmentation,
        )

    @property
    def augmentation(self) -> str:
        """The views an episode's support is cached in: those of the first method that reads cached views (the
        others get theirs from ``Episode.support_for``), or none when no method does (zero-shot, image-level)."""
        augmentations = (method_class(m.name).capabilities.augmentation for m in self.exp.methods)
        return next((a for a in augmentations if a != NO_CACHED_VIEWS), NO_CACHED_VIEWS)

    def episode(self, splits: DatasetSplits, shots: int, seed: int, classes=None) -> Episode:
        text_side = any(method_class(m.name).capabilities.uses_text_side for m in self.exp.methods)
        return self.builder.build(
            splits, self.spec(shots, seed, classes), templates=self.templates(splits)[1], text_side=text_side
        )

    # -- methods ---------------------------------------------------------------------------------------------
    def validates(self, m: MethodSpec) -> bool:
        """Whether this method selects anything on the validation set in this experiment."""
        return self.uses_validation and bool(method_class(m.name).capabilities.selects)

    def method(self, m: MethodSpec, dataset: str, hyperparameters: dict | None = None) -> Method:
        """The method as this experiment runs it on ``dataset``: its original's per-dataset settings, what it selects
        on validation (when the protocol gives it a validation set) and the experiment's own settings."""
        hp = m.hyperparameters if hyperparameters is None else hyperparameters
        return configure(
            m.name, dict(hp), validate=self.uses_validation, dataset=dataset, refuse_useless_validation=False
        )

    def fit(self, m: MethodSpec, hp: dict, episode: Episode, seed: int) -> tuple[Method, float]:
        started = time.perf_counter()
        val = episode.validation if self.validates(m) else None
        method = create(m.name, **hp)
        support, passes = counted_support(episode.support_for(method))
        with PeakMemory(self.backbone.device) as memory:
            method.fit(episode.task, support, val, seed=seed)
        self.costs[id(method)] = fit_cost(method, passes() + (len(val.labels) if val is not None else 0), memory)
        return method, time.perf_counter() - started

    def cost(self, method: Method) -> dict[str, Any]:
        """What fitting ``method`` cost besides its seconds (forward passes, peak memory, trainable parameters)."""
        return dict(self.costs.get(id(method), {}))

    # -- records ---------------------------------------------------------------------------------------------
    def record(
        self,
        m: MethodSpec,
        *,
        dataset: str,
        shots: int,
        seed: int | None,
        templates: tuple[str, list[str]],
        hyperparameters: dict | None = None,
        source: str | None = None,
        setting: dict[str, Any] | None = None,
    ) -> Record:
        info = self.backbone.info
        return Record.new(
            protocol=self.exp.protocol,
            dataset=dataset,
            source=source,
            model=self.exp.model,
            weights=self.exp.pretrained,
            random_weights=info.random_weights,
            fingerprint=info.fingerprint,
            sampler=self.exp.sampler,
            seed=seed,
            shots=shots,
            views=self.exp.views,
            aug_seed=self.exp.aug_seed,
            label=m.label if self.site == "native" else f"{m.label} ({self.site} site)",  # native: as ever
            method=m.name,
            hyperparameters=self.method(m, source or dataset, hyperparameters).get_params(),
            validation=self.uses_validation,
            selects=method_class(m.name).capabilities.selects or None,
            augmentation=method_class(m.name).capabilities.augmentation,
            templates_name=templates[0],
            templates=templates[1],
            setting=setting,
            group=m.group,
            site=self.site,
        )

    def identity(self, episode: Episode | None = None, **evaluated: LabeledImages) -> dict[str, Any]:
        """What a record's numbers came from besides its cell: ``images``, the fingerprints of the episode's
        support and validation sets and of each set it was ``evaluated`` on (a hash over the images' content
        hashes, in order: the same wherever the files are), and ``environment`` (prolip, commit, torch, device,
        dtype, threads)."""
        sets = {"support": episode.images.support, "validation": episode.images.validation} if episode else {}
        sets.update(evaluated)
        if self._environment is None:
            self._environment = environment_fingerprint(str(self.backbone.device), self.cache.compute_dtype)
        return {
            "images": {name: self._fingerprint(images) for name, images in sets.items()},
            "environment": self._environment,
        }

    def _fingerprint(self, images: LabeledImages) -> str:
        paths = tuple(str(it.path) for it in images.items)
        if paths not in self._fingerprints:
            self._fingerprints[paths] = image_set_fingerprint(paths, self.cache.root)
        return self._fingerprints[paths]

    def pending(self, cells: list[Cell]) -> list[Cell]:
        todo = [c for c in cells if c.record.cell not in self.finished]
        self.skipped += len(cells) - len(todo)
        return todo

    def write(self, rec: Record, seconds: float, point: str = "") -> None:
        """Append a scored record; ``point``: what the progress line adds after the label (a sweep point)."""
        rec = rec.with_results(
            seconds=round(seconds, 3), prolip_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z")
        )
        append_record(self.records_path, rec)
        self.finished.add(rec.cell)
        self.ran += 1
        acc = rec.accuracy
        where = rec.dataset if rec.source is None else f"{rec.source}→{rec.dataset}"
        seed = "" if rec.seed is None else f" seed {rec.seed}"
        score = rec.results.get("note", "not scored") if acc is None else format(acc, ".2f")
        self.echo(f"{where} {rec.shots}-shot{seed} {rec.label}{point}: {score}")

    # -- what the cache is asked for -------------------------------------------------------------------------
    def prefetch(self, requests: GroupRequests) -> None:
        """Fill the cache with what a group declared, in the order declared (the order the run reads it in)."""
        for r in requests.cached():
            self.cache.fill(r.paths, r.views, r.aug_seed, augmentation=r.augmentation)


# ----------------------------------------------------------------------------------------------- cost


class CountedViews:
    """A ViewSource that remembers which cached views a method read: each is one image-encoder forward pass per
    support image when the cache is cold, the cost of the features the method consumed."""

    def __init__(self, views: ViewSource):
        self.inner = views
        self.read: set[int] = set()

    @property
    def num_views(self) -> int:
        return self.inner.num_views

    @property
    def num_images(self) -> int:
        return self.inner.num_images

    def view(self, t: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.read.add(t % self.inner.num_views)
        return self.inner.view(t, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # the cache's other helpers (to_tensor, kept, ...)
        return getattr(self.inner, name)


def counted_support(support: Support) -> tuple[Support, Callable[[], int]]:
    """A copy of ``support`` that counts the features read from it, and a function giving that count (distinct
    views × images, plus the center crops when read)."""
    views = CountedViews(support.views)
    center_read: list[bool] = []

    def center() -> torch.Tensor:
        center_read.append(True)
        return support.center_features()

    counted = replace(support, views=views, center=center)
    return counted, lambda: len(views.read) * views.num_images + (views.num_images if center_read else 0)


def fit_cost(method: Method, features_read: int, memory: PeakMemory) -> dict[str, Any]:
    """The record fields of a fit's cost. Forward passes: cached features read (support views, center crops,
    validation images; view 0 always, which Method.fit checks) plus the passes the method ran itself
    (``Method.forward_passes``); None when it cannot say (an encoder-training method that counts none)."""
    own = method.forward_passes()
    passes = None if own is None else features_read + own
    # Method.fit reads view 0 to check the features are finite; a method that learns nothing needs none of them.
    passes = passes if method.capabilities.learns else 0
    return {
        "forward_passes": passes,
        "peak_memory_mb": None if memory.mb is None else round(memory.mb, 1),
        "memory_measure": memory.measure,
        "trainable_parameters": method.trainable_parameters(),
    }


NOT_SCORED: dict[str, float | None] = {"accuracy": None, "ece": None}


def score(method: Method, features: Features, classifier: torch.Tensor | None = None) -> float | None:
    """Top-1 accuracy (%) of a fitted method on a feature set; None when there is nothing to score."""
    return scores(method, features, classifier)["accuracy"]


def scores(method: Method, features: Features, classifier: torch.Tensor | None = None) -> dict[str, float | None]:
    """Top-1 accuracy and expected calibration error (%, 15 bins) of a fitted method on a feature set, from one
    pass of its logits; None each when there is nothing to score."""
    if not len(features):
        return dict(NOT_SCORED)
    with torch.no_grad():
        logits = method_logits(method, features, classifier)
        return {
            "accuracy": accuracy(logits, features.labels),
            "ece": expected_calibration_error(logits, features.labels),
        }


NOTHING_TO_SCORE = "no evaluation images left (every image was used for support or validation)"


# ----------------------------------------------------------------------------------------------- requests


@dataclass
class GroupRequests:
    """What scoring some cells of a group asks of the image encoder, in the order the run asks it.

    ``shared``: the cache requests of the group itself (its episode); ``per_cell``: what each cell adds alone (its
    method's own views, the support's center crops, a target's images), [] for a cell that shares another's fit;
    ``direct``: per cell, the passes encoded outside the cache (test-time views), each as the cell would alone;
    ``direct_passes`` / ``direct_paths``: those passes once shared, and their images (the plan times them);
    ``encoder_cells``: cells whose method trains inside the image encoder (their passes are its own)."""

    shared: list[Request] = field(default_factory=list)
    per_cell: list[list[Request]] = field(default_factory=list)
    direct: list[int] | None = None
    direct_passes: int = 0
    direct_paths: list[Path] = field(default_factory=list)
    encoder_cells: int = 0

    def cached(self) -> list[Request]:
        return self.shared + [r for own in self.per_cell for r in own]


def backbone_at(backbone, site: str):
    """A given backbone (tests, a caller's own) at ``site``: wrapped at the output site when it is native."""
    from prolip.backbones import at_site

    moved = backbone if backbone.info.site == site else at_site(backbone, site)
    if moved.info.site != site:
        raise ValueError(f"a backbone at the {backbone.info.site} site cannot be moved to the {site} site")
    return moved


def image_paths(images) -> tuple[Path, ...]:
    return tuple(it.path for it in images.items)


def episode_requests(
    b: Bench, splits: DatasetSplits, shots: int, seed: int | None, classes: tuple[int, ...] | None = None
) -> tuple[EpisodeImages, list[Request]]:
    """The requests of ``Bench.episode`` (``EpisodeBuilder.build``): the support's views, then validation and
    evaluation center crops."""
    assert seed is not None
    spec = b.spec(shots, seed, classes)
    drawn = draw_images(splits, spec)
    requests = [support_request(drawn.support, spec)]
    if spec.validation:
        requests.append(Request(image_paths(drawn.validation)))
    if len(drawn.evaluation):
        requests.append(Request(image_paths(drawn.evaluation)))
    return drawn, requests


def support_request(images: LabeledImages, spec: EpisodeSpec) -> Request:
    """The cache request of a support set's views as ``spec`` gives them (views, seed, augmentation): what
    ``EpisodeBuilder.support`` reads, so the plan's count and the run's reads come from one object."""
    return Request(image_paths(images), support_views(spec.augmentation, spec.views), spec.aug_seed, spec.augmentation)


def fit_requests(b: Bench, cell: Cell, drawn: EpisodeImages, out: GroupRequests) -> list[Request]:
    """What fitting the cell's method adds to its episode's: its own augmentation's views
    (``Episode.support_for``) and the support's center crops when it declares it reads them (with these
    hyperparameters, on a support of the episode's views; ``check_method`` holds the declaration to the fit)."""
    cls = method_class(cell.method.name)
    can, support = cls.capabilities, image_paths(drawn.support)
    own = []
    spec = b.spec(cell.record.shots, cell.record.seed or 0)  # the episode's views, in the method's augmentation
    if can.augmentation not in (b.augmentation, NO_CACHED_VIEWS):
        own.append(support_request(drawn.support, replace(spec, augmentation=can.augmentation)))
    if can.encodes_images:
        out.encoder_cells += 1
    else:
        views = max(1, support_views(spec.augmentation, spec.views))  # no cached views: its one view is the crop
        if can.reads_center_crops({**cls.defaults(), **cell.record["hyperparameters"]}, views):
            own.append(Request(support))
    return own
