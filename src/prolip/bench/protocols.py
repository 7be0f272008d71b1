"""Run an experiment's cells on one shared feature cache, appending one record per finished cell.

A cell is one (dataset, shots, seed, method) — or (source → target, ...) for transfer, (lr, λ) for the sensitivity
sweep. All cells of one (dataset, shots, seed) share one sampled support set, its cached views, its validation
features and the dataset's test features; nothing is extracted for a group whose cells are all already recorded.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from prolip import __version__
from prolip.bench.experiment import DOMAIN_TARGETS, Experiment, MethodSpec
from prolip.bench.records import append_record, cell_id, done_cells, read_records
from prolip.data.types import DatasetSplits, ImageItem, LabeledImages
from prolip.functional import accuracy, clip_logits
from prolip.methods.base import Support, Validation


# ----------------------------------------------------------------------------------------------- pure pieces

def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def restrict(images: LabeledImages | None, classes: list[int], classnames: list[str]) -> LabeledImages | None:
    """The images of ``classes``, relabelled 0..len(classes)-1 in that order."""
    if images is None:
        return None
    new = {c: i for i, c in enumerate(classes)}
    items = [ImageItem(it.path, new[it.label]) for it in images.items if it.label in new]
    return LabeledImages(items, classnames, images.templates, images.name)


def split_classes(splits: DatasetSplits, classes: list[int]) -> DatasetSplits:
    names = [splits.classnames[c] for c in classes]
    return DatasetSplits(splits.name, names, splits.templates, restrict(splits.train, classes, names),
                         restrict(splits.val, classes, names), restrict(splits.test, classes, names))


@dataclass
class FewShotSets:
    support: LabeledImages
    val: LabeledImages
    eval: LabeledImages
    eval_set: str  # "test split" or "held-out images"


def few_shot_sets(splits: DatasetSplits, shots: int, seed: int, sampler: str, allow_fewer: bool = False) -> FewShotSets:
    """Support, N-shot validation and evaluation images of one cell. Validation comes from the val split (or unused
    training images) and never from the evaluation set."""
    from prolip.data import sample_few_shot
    from prolip.pipeline import held_out

    train = splits.train
    if train is None or not len(train):
        raise ValueError(f"dataset {splits.name!r} has no training images to sample shots from")
    few = sample_few_shot(train.labels, shots, seed, convention=sampler, allow_fewer=allow_fewer,
                          val_labels=splits.val.labels if splits.val is not None else None,
                          imagenet_style=splits.name == "ImageNet" and sampler == "lpp",
                          classnames=splits.classnames)
    val = (splits.val if few.val_from == "val" else train).subset(few.val_indices)
    if splits.test is not None and len(splits.test):
        return FewShotSets(train.subset(few.train_indices), val, splits.test, "test split")
    used = list(few.train_indices) + (list(few.val_indices) if few.val_from == "train" else [])
    return FewShotSets(train.subset(few.train_indices), val, held_out(train, used), "held-out images")


def evaluation_images(splits: DatasetSplits) -> LabeledImages:
    """Where a model trained elsewhere is evaluated: the test split, or every image of a plain folder."""
    return splits.test if splits.test is not None and len(splits.test) else splits.train


def balanced_subset(images: LabeledImages, max_images: int | None) -> LabeledImages:
    """At most ``max_images``, taken round-robin over classes in file order (deterministic, class-balanced)."""
    if max_images is None or len(images) <= max_images:
        return images
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(images.labels):
        by_class.setdefault(y, []).append(i)
    picked, rank = [], 0
    while len(picked) < max_images:
        for idx in by_class.values():
            if rank < len(idx) and len(picked) < max_images:
                picked.append(idx[rank])
        rank += 1
    return images.subset(sorted(picked))


# ----------------------------------------------------------------------------------------------- shared state

class Bench:
    """One experiment run: the backbone, the shared feature cache, the records file and in-memory memos."""

    def __init__(self, exp: Experiment, echo: Callable[[str], None] = print, backbone=None):
        from prolip.backbones import load_backbone
        from prolip.features import FeatureCache

        self.exp, self.echo = exp, echo
        out = Path(exp.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        self.records_path = out / "records.jsonl"
        self.finished = done_cells(read_records(self.records_path))
        self.backbone = backbone if backbone is not None else load_backbone(exp.model, exp.pretrained,
                                                                            device=exp.device)
        if self.backbone.info.random_weights:
            echo(f"WARNING: {self.backbone.info.describe()}: every number of this run comes from RANDOM weights.")
        cache_dir = None if exp.cache_dir is None else Path(exp.cache_dir).expanduser()
        self.cache = FeatureCache(cache_dir, self.backbone, batch_size=exp.batch_size, num_workers=exp.workers,
                                  on_bad_image=exp.on_bad_image, progress=False)
        self.ran = self.skipped = 0
        self._splits: dict[str, DatasetSplits] = {}
        self._classifiers: dict[tuple, torch.Tensor] = {}
        self._features: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tta_starts: dict[tuple, Any] = {}

    # -- data and features ----------------------------------------------------------------------------------
    def splits(self, dataset: str) -> DatasetSplits:
        from prolip.data import resolve_data

        if dataset not in self._splits:
            root = None if self.exp.data_root is None else Path(self.exp.data_root).expanduser()
            self._splits[dataset] = resolve_data(dataset, root=root)
        return self._splits[dataset]

    def templates(self, splits: DatasetSplits) -> tuple[str, list[str]]:
        return self.exp.templates_for(splits.templates)

    def classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        key = (tuple(classnames), tuple(templates))
        if key not in self._classifiers:
            self._classifiers[key] = self.backbone.encode_text(list(classnames), list(templates)).float().cpu()
        return self._classifiers[key]

    def features(self, images: LabeledImages) -> tuple[torch.Tensor, torch.Tensor]:
        """Center-crop features and labels (bad images dropped), read from the cache once per run."""
        from prolip.pipeline import center_features

        key = tuple(str(it.path) for it in images.items) + tuple(images.labels)
        if key not in self._features:
            self._features[key] = center_features(self.cache, images)
        return self._features[key]

    def support(self, images: LabeledImages) -> Support:
        paths = [it.path for it in images.items]
        views = self.cache.views(paths, self.exp.views, aug_seed=self.exp.aug_seed)
        labels = torch.tensor(images.labels, dtype=torch.long)[torch.as_tensor(views.kept, dtype=torch.long)]
        center, _ = self.features(images.subset(views.kept))
        return Support(views=views, labels=labels, center=center)

    def validation(self, images: LabeledImages) -> Validation:
        return Validation(*self.features(images))

    def task(self, classnames: Sequence[str], templates: Sequence[str], shots: int, methods: Sequence[MethodSpec]):
        from prolip.pipeline import build_task

        return build_task(self.backbone, classnames, templates, shots,
                          with_text_side=any(m.name == "prolip-text" for m in methods),
                          classifier=self.classifier(classnames, templates))

    # -- cells ---------------------------------------------------------------------------------------------
    def hyperparameters(self, m: MethodSpec) -> dict[str, Any]:
        """The method's full hyperparameters (defaults included, so a changed default is a different cell)."""
        from prolip.methods import create

        hp = dict(m.hyperparameters)
        if self.exp.protocol == "fewshot-val" and m.name == "prolip":
            hp.setdefault("grid", True)  # the paper's validation protocol: the 49-point (lr, λ) grid
        return create(m.name, **hp).hyperparameters

    def record(self, m: MethodSpec, *, dataset: str, shots: int, seed: int | None, templates: tuple[str, list[str]],
               hyperparameters: dict | None = None, **extra: Any) -> dict[str, Any]:
        info = self.backbone.info
        rec = {"protocol": self.exp.protocol, "dataset": dataset, "source": None, "model": self.exp.model,
               "weights": self.exp.pretrained, "random_weights": info.random_weights, "fingerprint": info.fingerprint,
               "sampler": self.exp.sampler, "seed": seed, "shots": shots, "views": self.exp.views,
               "aug_seed": self.exp.aug_seed, "label": m.label, "method": m.name,
               "hyperparameters": self.hyperparameters(m) if hyperparameters is None else hyperparameters,
               "validation": self.uses_validation, "templates_name": templates[0], "templates": templates[1],
               "setting": None}
        rec.update(extra)
        rec["cell"] = cell_id(rec)
        return rec

    @property
    def uses_validation(self) -> bool:
        return self.exp.validation or self.exp.protocol == "fewshot-val"

    def pending(self, cells: list) -> list:
        """The cells (``(…, record)`` tuples or records) not recorded yet; counts the others as skipped."""
        todo = [c for c in cells if (c[-1] if isinstance(c, tuple) else c)["cell"] not in self.finished]
        self.skipped += len(cells) - len(todo)
        return todo

    def write(self, rec: dict[str, Any], seconds: float) -> None:
        rec.update(seconds=round(seconds, 3), prolip_version=__version__,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        append_record(self.records_path, rec)
        self.finished.add(rec["cell"])
        self.ran += 1
        acc = rec.get("accuracy")
        where = rec["dataset"] if rec.get("source") is None else f"{rec['source']}→{rec['dataset']}"
        seed = "" if rec["seed"] is None else f" seed {rec['seed']}"
        self.echo(f"{where} {rec['shots']}-shot{seed} {rec['label']}: "
                  f"{'-' if acc is None else format(acc, '.2f')}")


def _fit(m: MethodSpec, hp: dict, task, support: Support | None, val: Validation | None, seed: int):
    from prolip.methods import create

    started = time.perf_counter()
    method = create(m.name, **hp).fit(task, support, val, seed=seed)
    return method, time.perf_counter() - started


def _swapped_accuracy(method, z: torch.Tensor, y: torch.Tensor, classifier: torch.Tensor | None):
    """Accuracy with another text classifier, or None for methods tied to their training classes."""
    try:
        with torch.no_grad():
            return accuracy(method.logits(z, classifier=classifier), y)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------- protocols

def run_fewshot(b: Bench) -> None:
    """Few-shot accuracy per dataset × shots × seed × method; with validation (fewshot-val) methods get an N-shot
    validation set and ProLIP runs its 49-point grid on it."""
    exp = b.exp
    for dataset in exp.datasets:
        splits = b.splits(dataset)
        templates = b.templates(splits)
        for shots in exp.shots:
            for seed in exp.seeds:
                cells = [(m, b.record(m, dataset=splits.name, shots=shots, seed=seed, templates=templates))
                         for m in exp.methods]
                todo = b.pending(cells)
                if not todo:
                    continue
                sets = few_shot_sets(splits, shots, seed, exp.sampler, exp.allow_fewer)
                support = b.support(sets.support)
                val = b.validation(sets.val) if b.uses_validation else None
                task = b.task(splits.classnames, templates[1], shots, exp.methods)
                z, y = b.features(sets.eval)
                for m, rec in todo:
                    method, seconds = _fit(m, rec["hyperparameters"], task, support, val, seed)
                    with torch.no_grad():
                        rec["accuracy"] = accuracy(method.logits(z), y)
                    rec.update(selected=method.selected_, eval_images=len(y), eval_set=sets.eval_set)
                    b.write(rec, seconds)


def run_sensitivity(b: Bench) -> None:
    """ProLIP over lr × λ (validation-free, test accuracy for each point, as the paper's sensitivity figure): every
    point of one support set trains in one batched computation."""
    from prolip.methods.prolip import train_projection

    exp = b.exp
    for dataset in exp.datasets:
        splits = b.splits(dataset)
        templates = b.templates(splits)
        for shots in exp.shots:
            for seed in exp.seeds:
                cells = []
                for m in exp.methods:
                    base_hp = b.hyperparameters(m)
                    for lr in exp.sensitivity.lrs:
                        for lam in exp.sensitivity.lams:
                            hp = {**base_hp, "lr": float(lr), "lam": float(lam)}
                            cells.append((m, b.record(m, dataset=splits.name, shots=shots, seed=seed,
                                                      templates=templates, hyperparameters=hp)))
                todo = b.pending(cells)
                if not todo:
                    continue
                sets = few_shot_sets(splits, shots, seed, exp.sampler, exp.allow_fewer)
                support = b.support(sets.support)
                task = b.task(splits.classnames, templates[1], shots, [])
                z, y = b.features(sets.eval)
                for m in exp.methods:
                    mine = [rec for mm, rec in todo if mm is m]
                    if not mine:
                        continue
                    hp = mine[0]["hyperparameters"]
                    started = time.perf_counter()
                    Ws = train_projection(task.W0, task.bias, task.classifier, task.logit_scale, support.views,
                                          support.labels, [r["hyperparameters"]["lr"] for r in mine],
                                          [r["hyperparameters"]["lam"] for r in mine], hp["steps"], hp["precision"])
                    seconds = (time.perf_counter() - started) / len(mine)
                    for W, rec in zip(Ws, mine):
                        with torch.no_grad():
                            rec["accuracy"] = accuracy(clip_logits(z, W.float(), task.bias, task.classifier,
                                                                   task.logit_scale), y)
                        rec.update(selected={"lr": rec["hyperparameters"]["lr"], "lam": rec["hyperparameters"]["lam"],
                                             "how": "sweep"}, eval_images=len(y), eval_set=sets.eval_set)
                        b.write(rec, seconds)


def run_base2new(b: Bench) -> None:
    """Train on the base classes (first ⌈C/2⌉ labels, relabelled), then: base accuracy with the base-only classifier
    on base test images, new accuracy with the new-only classifier on new test images (same adapted W), and HM.

    Sampling on the base classes alone draws the same images as sampling all classes and then keeping the base
    ones (CoOp's order), because both samplers walk classes in label order and the base labels come first."""
    from prolip.data import base_new_split

    exp = b.exp
    for dataset in exp.datasets:
        splits = b.splits(dataset)
        templates = b.templates(splits)
        base, new = base_new_split(len(splits.classnames))
        base_splits, new_splits = split_classes(splits, base), split_classes(splits, new)
        for shots in exp.shots:
            for seed in exp.seeds:
                cells = [(m, b.record(m, dataset=splits.name, shots=shots, seed=seed, templates=templates))
                         for m in exp.methods]
                todo = b.pending(cells)
                if not todo:
                    continue
                sets = few_shot_sets(base_splits, shots, seed, exp.sampler, exp.allow_fewer)
                support = b.support(sets.support)
                val = b.validation(sets.val) if b.uses_validation else None
                task = b.task(base_splits.classnames, templates[1], shots, exp.methods)
                z_base, y_base = b.features(sets.eval)
                z_new, y_new = b.features(evaluation_images(new_splits))
                T_new = b.classifier(new_splits.classnames, templates[1])
                for m, rec in todo:
                    method, seconds = _fit(m, rec["hyperparameters"], task, support, val, seed)
                    with torch.no_grad():
                        base_acc = accuracy(method.logits(z_base), y_base)
                    new_acc = _swapped_accuracy(method, z_new, y_new, T_new)
                    hm = None if new_acc is None else harmonic_mean(base_acc, new_acc)
                    rec.update(base=base_acc, new=new_acc, hm=hm, accuracy=hm, selected=method.selected_,
                               base_classes=len(base), new_classes=len(new))
                    if new_acc is None:
                        rec["note"] = f"{m.name} cannot score classes it was not trained on"
                    b.write(rec, seconds)


def run_transfer(b: Bench) -> None:
    """Cross-dataset / domain generalisation: train on the one source dataset, evaluate the adapted method on the
    source's test set and on each target with the target's own classifier (its classes and templates; ImageNet-A/-R
    thus get the 200-way classifier of their class subsets)."""
    exp = b.exp
    source = b.splits(exp.datasets[0])
    src_templates = b.templates(source)
    specs = exp.targets if exp.targets else DOMAIN_TARGETS
    targets = [b.splits(t) for t in specs]
    for shots in exp.shots:
        for seed in exp.seeds:
            cells = []
            for m in exp.methods:
                hp = b.hyperparameters(m)
                for target in [source] + targets:
                    cells.append((m, target, b.record(m, dataset=target.name, source=source.name, shots=shots,
                                                      seed=seed, templates=b.templates(target), hyperparameters=hp)))
            todo = b.pending(cells)
            if not todo:
                continue
            sets = few_shot_sets(source, shots, seed, exp.sampler, exp.allow_fewer)
            support = b.support(sets.support)
            val = b.validation(sets.val) if b.uses_validation else None
            task = b.task(source.classnames, src_templates[1], shots, exp.methods)
            fitted: dict[int, tuple[Any, float]] = {}
            for m, target, rec in todo:
                if id(m) not in fitted:
                    fitted[id(m)] = _fit(m, rec["hyperparameters"], task, support, val, seed)
                method, seconds = fitted[id(m)]
                started = time.perf_counter()
                if target is source:
                    z, y = b.features(sets.eval)
                    with torch.no_grad():
                        acc = accuracy(method.logits(z), y)
                else:
                    z, y = b.features(evaluation_images(target))
                    acc = _swapped_accuracy(method, z, y, b.classifier(target.classnames, b.templates(target)[1]))
                    if acc is None:
                        rec["note"] = f"{m.name} cannot score another dataset's classes"
                rec.update(accuracy=acc, selected=method.selected_, eval_images=len(y),
                           num_classes=len(target.classnames))
                b.write(rec, seconds + time.perf_counter() - started)


def run_tta(b: Bench) -> None:
    """Test-time ProLIP from W0 (zeroshot) or from a few-shot ProLIP W, on a (class-balanced, optionally capped)
    test set; optional TPT and no-update view-ensemble rows on the very same views."""
    from prolip.tta import TTAConfig, adapt_projection, tpt_logits, view_ensemble_logits, view_features

    exp, t = b.exp, b.exp.tta
    cfg = TTAConfig(views=t.views, ratio=t.ratio, steps=t.steps, lr=t.lr, seed=t.seed)
    setting = {"tta": asdict(t)}
    for dataset in exp.datasets:
        splits = b.splits(dataset)
        templates = b.templates(splits)
        images = balanced_subset(evaluation_images(splits), t.max_images)
        # (kind, start method spec, shots, seed, record): zeroshot starts do not depend on shots/seed.
        cells = []
        for m in exp.methods:
            starts = [(0, None)] if m.name == "zeroshot" else [(s, seed) for s in exp.shots for seed in exp.seeds]
            for shots, seed in starts:
                cells.append(("tta", m, shots, seed, b.record(
                    MethodSpec(m.name, f"tta+{m.label}", m.hyperparameters), dataset=splits.name, shots=shots,
                    seed=seed, templates=templates, setting=setting)))
        for kind, on in (("tpt", t.tpt), ("ensemble", t.ensemble)):
            if on:
                spec = MethodSpec("zeroshot", kind)
                cells.append((kind, spec, 0, None, b.record(spec, dataset=splits.name, shots=0, seed=None,
                                                            templates=templates, setting=setting)))
        todo = b.pending(cells)
        if not todo:
            continue
        T = b.classifier(splits.classnames, templates[1])
        task0 = b.task(splits.classnames, templates[1], 1, [])
        started_fit = time.perf_counter()
        starts = {}
        for kind, m, shots, seed, rec in todo:
            if kind == "tta" and m.name == "prolip":
                method = _fitted_start(b, m, rec["hyperparameters"], t.train_on or dataset, shots, seed)
                starts[rec["cell"]] = method.W
                rec["selected"] = method.selected_
                rec["source"] = b.splits(t.train_on).name if t.train_on else None
            else:
                starts[rec["cell"]] = task0.W0
        fit_seconds = time.perf_counter() - started_fit
        correct = {rec["cell"]: 0 for *_, rec in todo}
        before = {rec["cell"]: 0 for *_, rec in todo}
        paths = [it.path for it in images.items]
        labels = torch.tensor(images.labels)
        started = time.perf_counter()
        for i in range(0, len(paths), 16):
            z = view_features(b.backbone, paths[i:i + 16], cfg.views, cfg.seed)
            y = labels[i:i + 16]
            for kind, m, shots, seed, rec in todo:
                W = starts[rec["cell"]]
                with torch.no_grad():
                    before[rec["cell"]] += int((clip_logits(z[:, 0], W, task0.bias, T, task0.logit_scale)
                                                .argmax(-1) == y).sum())
                if kind == "tta":
                    logits = adapt_projection(z, W, task0.bias, T, task0.logit_scale, cfg)[0]
                elif kind == "tpt":
                    logits = tpt_logits(b.backbone, z, W, task0.bias, splits.classnames, task0.logit_scale,
                                        ratio=cfg.ratio, steps=cfg.steps)
                else:
                    logits = view_ensemble_logits(z, W, task0.bias, T, task0.logit_scale, cfg.ratio)
                correct[rec["cell"]] += int((logits.argmax(-1) == y).sum())
        seconds = (time.perf_counter() - started) / len(todo)
        for kind, m, shots, seed, rec in todo:
            n = len(paths)
            rec.update(accuracy=100.0 * correct[rec["cell"]] / n, start_accuracy=100.0 * before[rec["cell"]] / n,
                       eval_images=n)
            b.write(rec, seconds + fit_seconds / len(todo))


def _fitted_start(b: Bench, m: MethodSpec, hp: dict, train_on: str, shots: int, seed: int):
    """A few-shot ProLIP fitted on ``train_on`` (memoised: the same W starts TTA on every dataset)."""
    memo = b._tta_starts
    key = (m.label, train_on, shots, seed)
    if key not in memo:
        splits = b.splits(train_on)
        templates = b.templates(splits)
        sets = few_shot_sets(splits, shots, seed, b.exp.sampler, b.exp.allow_fewer)
        task = b.task(splits.classnames, templates[1], shots, [])
        memo[key] = _fit(m, hp, task, b.support(sets.support), None, seed)[0]
    return memo[key]


PROTOCOL_RUNNERS = {"fewshot": run_fewshot, "fewshot-val": run_fewshot, "sensitivity": run_sensitivity,
                    "base2new": run_base2new, "cross-dataset": run_transfer, "domain-generalisation": run_transfer,
                    "tta": run_tta}


def run_experiment(exp: Experiment, echo: Callable[[str], None] = print, backbone=None) -> Path:
    """Run every unfinished cell of ``exp``; returns the records file. ``backbone`` skips loading one (tests)."""
    b = Bench(exp, echo, backbone)
    PROTOCOL_RUNNERS[exp.protocol](b)
    echo(f"{b.ran} cells run, {b.skipped} already done; records in {b.records_path}; cache: {b.cache.stats}")
    return b.records_path
