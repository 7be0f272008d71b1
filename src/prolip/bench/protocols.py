"""Run an experiment's cells on one shared feature cache, appending one record per finished cell.

One loop (:func:`run_experiment`): a protocol lists its cells in groups, each group sharing one few-shot episode
(one dataset, shots and seed); a group whose cells are all recorded is skipped before anything is extracted; the
protocol scores the pending cells of a group. Episodes come from :mod:`prolip.episode`, the same path as
``prolip fit``, so the CLI and the bench draw the same images for the same data, shots and seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from prolip.bench.experiment import DOMAIN_TARGETS, Experiment, MethodSpec, TestTimeSpec
from prolip.bench.memory import PeakMemory
from prolip.bench.records import append_record, cell_id, done_cells, read_records
from prolip.bench.tta import ZERO_SHOT, balanced_subset, run_tta_group
from prolip.data.sampling import base_new_split
from prolip.data.types import DatasetSplits
from prolip.episode import (
    Episode,
    EpisodeBuilder,
    EpisodeSpec,
    Features,
    evaluation_images,
    method_logits,
    restrict,
)
from prolip.functional import accuracy
from prolip.methods import Method, configure, create, method_class
from prolip.methods.base import NO_CACHED_VIEWS, Support, ViewSource
from prolip.tta import method_class as test_time_class
from prolip.version import __version__


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


@dataclass
class Cell:
    """One record to produce: a method (with its effective hyperparameters) and where it is scored."""

    method: MethodSpec
    record: dict[str, Any]
    target: str | None = None  # transfer protocols: the dataset scored, as the experiment names it (None: the source)
    extra: dict[str, Any] = field(default_factory=dict)  # protocol-specific (sensitivity point; tta row and start)


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
        out.mkdir(parents=True, exist_ok=True)
        self.records_path = out / "records.jsonl"
        self.finished = done_cells(read_records(self.records_path))
        self.backbone = backbone or load_backbone(exp.model, exp.pretrained, device=exp.device)
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
        self.builder = EpisodeBuilder(self.backbone, self.cache, views=exp.views, aug_seed=exp.aug_seed)
        self.ran = self.skipped = 0
        self._splits: dict[str, DatasetSplits] = {}
        self.tta_starts: dict[tuple, Method] = {}  # fitted start methods, shared by every dataset of a TTA run
        self.costs: dict[int, dict[str, Any]] = {}  # by id of a method fitted here: its cost (see fit_cost)

    @property
    def uses_validation(self) -> bool:
        return self.exp.validation or self.exp.protocol == "fewshot-val"

    def splits(self, dataset: str) -> DatasetSplits:
        from prolip.data import resolve_data

        if dataset not in self._splits:
            root = None if self.exp.data_root is None else Path(self.exp.data_root).expanduser()
            self._splits[dataset] = resolve_data(dataset, root=root)
        return self._splits[dataset]

    def templates(self, splits: DatasetSplits) -> tuple[str, list[str]]:
        return self.exp.templates_for(splits.templates)

    def spec(self, shots: int, seed: int, classes: tuple[int, ...] | None = None) -> EpisodeSpec:
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
        augmentations = (method_class(m.name).augmentation for m in self.exp.methods)
        return next((a for a in augmentations if a != NO_CACHED_VIEWS), NO_CACHED_VIEWS)

    def episode(self, splits: DatasetSplits, shots: int, seed: int, classes=None) -> Episode:
        text_side = any(method_class(m.name).uses_text_side for m in self.exp.methods)
        return self.builder.build(
            splits, self.spec(shots, seed, classes), templates=self.templates(splits)[1], text_side=text_side
        )

    # -- methods ---------------------------------------------------------------------------------------------
    def validates(self, m: MethodSpec) -> bool:
        """Whether this method selects anything on the validation set in this experiment."""
        return self.uses_validation and bool(method_class(m.name).selects)

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
        **extra: Any,
    ) -> dict[str, Any]:
        info = self.backbone.info
        rec = {
            "protocol": self.exp.protocol,
            "dataset": dataset,
            "source": None,
            "model": self.exp.model,
            "weights": self.exp.pretrained,
            "random_weights": info.random_weights,
            "fingerprint": info.fingerprint,
            "sampler": self.exp.sampler,
            "seed": seed,
            "shots": shots,
            "views": self.exp.views,
            "aug_seed": self.exp.aug_seed,
            "label": m.label,
            "method": m.name,
            "hyperparameters": self.method(m, extra.get("source") or dataset, hyperparameters).get_params(),
            "validation": self.uses_validation,
            "selects": method_class(m.name).selects or None,
            "augmentation": method_class(m.name).augmentation,
            "templates_name": templates[0],
            "templates": templates[1],
            "setting": None,
            "group": m.group,
        }
        rec.update(extra)
        rec["cell"] = cell_id(rec)
        return rec

    def pending(self, cells: list[Cell]) -> list[Cell]:
        todo = [c for c in cells if c.record["cell"] not in self.finished]
        self.skipped += len(cells) - len(todo)
        return todo

    def write(self, rec: dict[str, Any], seconds: float) -> None:
        rec.update(seconds=round(seconds, 3), prolip_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        append_record(self.records_path, rec)
        self.finished.add(rec["cell"])
        self.ran += 1
        acc = rec.get("accuracy")
        where = rec["dataset"] if rec.get("source") is None else f"{rec['source']}→{rec['dataset']}"
        seed = "" if rec["seed"] is None else f" seed {rec['seed']}"
        point = (
            ""
            if rec["protocol"] != "sensitivity"
            else f" lr {rec['hyperparameters']['lr']:g} λ {rec['hyperparameters']['lam']}"
        )
        score = rec.get("note", "not scored") if acc is None else format(acc, ".2f")
        self.echo(f"{where} {rec['shots']}-shot{seed} {rec['label']}{point}: {score}")


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


def trainable_parameters(method: Method) -> int | None:
    """Numbers the fit learned: the method's own count when it gives one, else the size of its fitted state less
    the frozen task tensors it keeps (ProLIP's W0, a projection bias); 0 for a method that learns nothing."""
    if not method.learns:
        return 0
    own = getattr(method, "trainable_parameters", None)
    if callable(own):
        return int(own())
    task = method.task
    frozen = {id(t) for t in (task.W0, task.bias, task.classifier, task.text_mean) if t is not None} if task else set()
    return sum(v.numel() for v in method.state_dict().values() if id(v) not in frozen)


def fit_cost(method: Method, features_read: int, memory: PeakMemory) -> dict[str, Any]:
    """The record fields of a fit's cost. Forward passes: cached features read (support views, center crops,
    validation images; view 0 always, which Method.fit checks) plus the passes a method that runs the encoder
    itself reports (``forward_passes_``); None for an encoder-training method that reports none."""
    own = getattr(method, "forward_passes_", None)
    passes = None if method.encodes_images and own is None else features_read + (own or 0)
    # Method.fit reads view 0 to check the features are finite; a method that learns nothing needs none of them.
    passes = passes if method.learns else 0
    return {
        "forward_passes": passes,
        "peak_memory_mb": None if memory.mb is None else round(memory.mb, 1),
        "memory_measure": memory.measure,
        "trainable_parameters": trainable_parameters(method),
    }


def score(method: Method, features: Features, classifier: torch.Tensor | None = None) -> float | None:
    """Top-1 accuracy (%) of a fitted method on a feature set; None when there is nothing to score."""
    if not len(features):
        return None
    with torch.no_grad():
        return accuracy(method_logits(method, features, classifier), features.labels)


NOTHING_TO_SCORE = "no evaluation images left (every image was used for support or validation)"


# ----------------------------------------------------------------------------------------------- protocols


class Protocol:
    """How one paper protocol lists its cells and scores a group of them on the group's episode."""

    def __init__(self, bench: Bench):
        self.b, self.exp = bench, bench.exp

    def groups(self) -> Iterator[Group]:
        """By default one cell per method for every dataset × shots × seed (the few-shot protocols' grid)."""
        return self._per_dataset_groups(self._method_cells)

    def _method_cells(self, splits: DatasetSplits, shots: int, seed: int) -> list[Cell]:
        t = self.b.templates(splits)
        return [
            Cell(m, self.b.record(m, dataset=splits.name, shots=shots, seed=seed, templates=t))
            for m in self.exp.methods
        ]

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        raise NotImplementedError

    def _per_dataset_groups(self, cells_for: Callable[[DatasetSplits, int, int], list[Cell]]) -> Iterator[Group]:
        for dataset in self.exp.datasets:
            splits = self.b.splits(dataset)
            for shots in self.exp.shots:
                for seed in self.exp.seeds:
                    yield Group(dataset, shots, seed, cells_for(splits, shots, seed))


class FewShot(Protocol):
    """Few-shot accuracy per dataset × shots × seed × method; with validation (fewshot-val) each method selects what
    it declares on an N-shot validation set (ProLIP: the paper's 49-point grid)."""

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        assert group.seed is not None
        episode = self.b.episode(self.b.splits(group.dataset), group.shots, group.seed)
        for cell in cells:
            method, seconds = self.b.fit(cell.method, cell.record["hyperparameters"], episode, group.seed)
            acc = score(method, episode.evaluation)
            cell.record.update(
                accuracy=acc,
                selected=method.selected_,
                eval_images=len(episode.evaluation),
                eval_set=episode.images.eval_set,
                support_digest=episode.images.support_digest(),
                **self.b.cost(method),
            )
            if acc is None:
                cell.record["note"] = NOTHING_TO_SCORE
            yield cell, seconds


class Sensitivity(Protocol):
    """A method's lr × λ sweep, validation-free, test accuracy for each point (the paper's sensitivity figure);
    methods that can (ProLIP) train every point of one support set in one batched computation."""

    def groups(self) -> Iterator[Group]:
        sweep = self.exp.sensitivity

        def cells(splits: DatasetSplits, shots: int, seed: int) -> list[Cell]:
            t, out = self.b.templates(splits), []
            for m in self.exp.methods:
                base_hp = self.b.method(m, splits.name).get_params()
                for lr in sweep.lrs:
                    for lam in sweep.lams:
                        hp = {**base_hp, "lr": float(lr), "lam": float(lam)}
                        rec = self.b.record(
                            m, dataset=splits.name, shots=shots, seed=seed, templates=t, hyperparameters=hp
                        )
                        out.append(Cell(m, rec, extra={"lr": float(lr), "lam": float(lam)}))
            return out

        return self._per_dataset_groups(cells)

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        assert group.seed is not None
        episode = self.b.episode(self.b.splits(group.dataset), group.shots, group.seed)
        for m in self.exp.methods:
            mine = [c for c in cells if c.method is m]
            if not mine:
                continue
            started = time.perf_counter()
            method = create(m.name, **mine[0].record["hyperparameters"])
            fitted = method.fit_each(episode.task, episode.support_for(method), [c.extra for c in mine], group.seed)
            seconds = (time.perf_counter() - started) / len(mine)
            for cell, method in zip(mine, fitted, strict=True):
                cell.record.update(
                    accuracy=score(method, episode.evaluation),
                    selected=method.selected_,
                    eval_images=len(episode.evaluation),
                    eval_set=episode.images.eval_set,
                )
                yield cell, seconds


class BaseToNew(Protocol):
    """Train on the base classes (the first ⌈C/2⌉ labels; sampled over all classes, then restricted, as the
    reference); base accuracy with the base-only classifier on base test images, new accuracy with the new-only
    classifier on new test images (same adapted method), and their harmonic mean."""

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        assert group.seed is not None
        splits = self.b.splits(group.dataset)
        base, new = base_new_split(len(splits.classnames))
        episode = self.b.episode(splits, group.shots, group.seed, classes=tuple(base))
        new_images = restrict(evaluation_images(splits), new)
        new_features = self.b.builder.center(new_images)
        T_new = self.b.builder.classifier(new_images.classnames, self.b.templates(splits)[1])
        for cell in cells:
            method, seconds = self.b.fit(cell.method, cell.record["hyperparameters"], episode, group.seed)
            base_acc = score(method, episode.evaluation)
            new_acc = score(method, new_features, T_new) if method.accepts_classifier else None
            hm = None if new_acc is None or base_acc is None else harmonic_mean(base_acc, new_acc)
            cell.record.update(
                base=base_acc,
                new=new_acc,
                hm=hm,
                accuracy=hm,
                selected=method.selected_,
                base_classes=len(base),
                new_classes=len(new),
                **self.b.cost(method),
            )
            if not method.accepts_classifier:
                cell.record["note"] = f"{cell.method.name} cannot score classes it was not trained on"
            yield cell, seconds


class Transfer(Protocol):
    """Cross-dataset / domain generalisation: train on the one source dataset, evaluate the adapted method on the
    source's evaluation set and on each target with the target's own classifier (its classes and templates;
    ImageNet-A/-R thus get the 200-way classifier of their class subsets)."""

    def groups(self) -> Iterator[Group]:
        source = self.b.splits(self.exp.datasets[0])
        specs = [None, *(self.exp.targets or DOMAIN_TARGETS)]  # None: the source itself
        targets = [source if spec is None else self.b.splits(spec) for spec in specs]
        for shots in self.exp.shots:
            for seed in self.exp.seeds:
                cells = [
                    Cell(
                        m,
                        self.b.record(
                            m,
                            dataset=target.name,
                            source=source.name,
                            shots=shots,
                            seed=seed,
                            templates=self.b.templates(target),
                        ),
                        target=spec,
                    )
                    for m in self.exp.methods
                    for spec, target in zip(specs, targets, strict=True)
                ]
                yield Group(source.name, shots, seed, cells)

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        assert group.seed is not None
        source = self.b.splits(self.exp.datasets[0])
        episode = self.b.episode(source, group.shots, group.seed)
        fitted: dict[int, tuple[Method, float]] = {}
        for cell in cells:
            if id(cell.method) not in fitted:
                fitted[id(cell.method)] = self.b.fit(cell.method, cell.record["hyperparameters"], episode, group.seed)
            method, seconds = fitted[id(cell.method)]
            started = time.perf_counter()
            if cell.target is None:
                features, acc = episode.evaluation, score(method, episode.evaluation)
            else:
                target = self.b.splits(cell.target)
                features = self.b.builder.center(evaluation_images(target))
                T = self.b.builder.classifier(target.classnames, self.b.templates(target)[1])
                acc = score(method, features, T) if method.accepts_classifier else None
                if not method.accepts_classifier:
                    cell.record["note"] = f"{cell.method.name} cannot score another dataset's classes"
            cell.record.update(
                accuracy=acc,
                selected=method.selected_,
                eval_images=len(features),
                num_classes=len(self.b.splits(cell.target or source.name).classnames),
                **self.b.cost(method),
            )
            yield cell, seconds + time.perf_counter() - started


class TestTime(Protocol):
    """Test-time methods (:mod:`prolip.tta`) on the very same views of a class-balanced (optionally capped)
    evaluation set: test-time ProLIP from every method's projection (W0 for methods that learn nothing, zero-shot;
    a few-shot method's adapted W, fitted on ``tta.train_on`` or the dataset itself), and each other test-time
    method the experiment lists (TPT, ZERO, TDA, the no-update view ensemble, plain zero-shot), from W0."""

    def groups(self) -> Iterator[Group]:
        t = self.exp.tta
        setting = {"tta": t.setting()}
        for dataset in self.exp.datasets:
            splits = self.b.splits(dataset)
            templates = self.b.templates(splits)
            cells = []
            for row in t.rows():
                from_fit = test_time_class(row.name).starts_from_fit
                for m, shots, seed in self._starts(row, from_fit):
                    spec = MethodSpec(m.name, f"{row.name}+{m.label}" if from_fit else m.label, m.hyperparameters)
                    rec = self.b.record(
                        spec, dataset=splits.name, shots=shots, seed=seed, templates=templates, setting=setting
                    )
                    cells.append(Cell(m, rec, extra={"test_time": row, "shots": shots, "seed": seed}))
            yield Group(dataset, 0, None, cells)

    def _starts(self, row: TestTimeSpec, from_fit: bool) -> list[tuple[MethodSpec, int, int | None]]:
        """Where a row's W comes from: for a method that ``starts_from_fit``, each method's own, per shots and seed
        when it learns (once, at 0 shots, when it does not); for any other, zero-shot CLIP's W0, once."""
        if not from_fit:
            return [(MethodSpec(ZERO_SHOT, row.name), 0, None)]
        return [
            (m, shots, seed)
            for m in self.exp.methods
            for shots, seed in (
                [(s, seed) for s in self.exp.shots for seed in self.exp.seeds]
                if method_class(m.name).learns
                else [(0, None)]
            )
        ]

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        yield from run_tta_group(self.b, group, cells)


PROTOCOLS: dict[str, type[Protocol]] = {
    "fewshot": FewShot,
    "fewshot-val": FewShot,
    "sensitivity": Sensitivity,
    "base2new": BaseToNew,
    "cross-dataset": Transfer,
    "domain-generalisation": Transfer,
    "tta": TestTime,
}


def run_experiment(exp: Experiment, echo: Callable[[str], None] = print, backbone=None) -> Path:
    """Run every unfinished cell of ``exp``; returns the records file. ``backbone`` skips loading one (tests)."""
    b = Bench(exp, echo, backbone)
    protocol = PROTOCOLS[exp.protocol](b)
    for group in protocol.groups():
        todo = b.pending(group.cells)
        for cell, seconds in protocol.score(group, todo) if todo else ():
            b.write(cell.record, seconds)
    echo(f"{b.ran} cells run, {b.skipped} already done; records in {b.records_path}; cache: {b.cache.stats}")
    return b.records_path


__all__ = ["PROTOCOLS", "Bench", "Cell", "Group", "Protocol", "balanced_subset", "harmonic_mean", "run_experiment"]
