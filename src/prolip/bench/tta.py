"""The test-time protocol's scoring: every test-time method of :mod:`prolip.tta` run on the very same views, each
from its start W (zero-shot W0, or a few-shot method's adapted W for a method that ``starts_from_fit``).

Each image's views are extracted once and shared by every row. Every method is driven through the same calls
(``start``, ``observe`` per batch, ``finish``); a stream method (TDA) scores in ``finish`` what it collected, and its
record holds what it declares (TDA: every stream order's seed, digest and accuracy, their mean and their worst).
Nothing here knows one method from another: what a record reports of its cost, each method declares.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from prolip.bench.memory import PeakMemory
from prolip.data.types import LabeledImages
from prolip.episode import evaluation_images
from prolip.functional import calibration_error, clip_logits, top_confidence
from prolip.methods import method_class
from prolip.tta import Scene, TestTimeMethod, create, view_features
from prolip.tta import method_class as test_time_class

if TYPE_CHECKING:  # the protocol passes its bench and cells in
    from prolip.bench.harness import Bench, Cell, Group

IMAGES_PER_BATCH = 16
# The few-shot method a row that does not start from a fit is recorded under: its W is W0 (the records' "method").
ZERO_SHOT = "zeroshot"


def balanced_subset(images: LabeledImages, max_images: int | None) -> LabeledImages:
    """At most ``max_images``, taken round-robin over classes in file order (deterministic, class-balanced)."""
    if max_images is None or len(images) <= max_images:
        return images
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(images.labels):
        by_class.setdefault(y, []).append(i)
    picked: list[int] = []
    rank = 0
    while len(picked) < max_images:
        for idx in by_class.values():
            if rank < len(idx) and len(picked) < max_images:
                picked.append(idx[rank])
        rank += 1
    return images.subset(sorted(picked))


def starts_from_fit(cell: Cell) -> bool:
    """Whether the cell's W is its few-shot method's, fitted on a support set (else zero-shot CLIP's W0)."""
    learns = method_class(cell.method.name).capabilities.learns
    return test_time_class(cell.extra["test_time"].name).starts_from_fit and learns


def _start(b: Bench, cell: Cell, dataset: str, memo: dict) -> Tensor:
    """The W a TTA cell starts from: a learning method's adapted projection (fitted once per train set, shots and
    seed, memoised across datasets), or W0."""
    if not starts_from_fit(cell):
        return _w0(b)
    shots, seed = cell.extra["shots"], cell.extra["seed"]
    train_on = b.exp.tta.train_on or dataset
    key = (cell.method.label, train_on, shots, seed)
    if key not in memo:
        splits = b.splits(train_on)
        episode = b.episode(splits, shots, seed)
        method, _ = b.fit(cell.method, cell.record["hyperparameters"], episode, seed)
        memo[key] = method
        memo[key, "images"] = b.identity(episode)["images"]
    method = memo[key]
    cell.add(selected=method.selected_, images=memo[key, "images"])
    # Where the start was fitted: said after the cell id is made, as it always was, so ids stay the same.
    cell.record = replace(cell.record, source=b.splits(b.exp.tta.train_on).name if b.exp.tta.train_on else None)
    W = method.projection()
    assert W is not None, f"{cell.method.name} exposes no projection"  # refused when the experiment is parsed
    return W


def _w0(b: Bench) -> Tensor:
    return b.backbone.projection().weight.detach().float().cpu()


def scene_for(b: Bench, dataset: str) -> Scene:
    """What every test-time method of ``dataset`` shares: classifier, frozen bias, logit scale, the views."""
    t = b.exp.tta
    splits = b.splits(dataset)
    bias = b.backbone.projection().bias
    return Scene(
        classifier=b.builder.classifier(splits.classnames, b.templates(splits)[1]),
        bias=None if bias is None else bias.detach().float().cpu(),
        logit_scale=float(b.backbone.logit_scale),
        classnames=tuple(splits.classnames),
        backbone=b.backbone,
        dataset=splits.name,
        views=t.views,
        view_seed=t.seed,
    )


@dataclass
class Tally:
    """One row: its test-time method, its start W and its running counts on the stream of batches."""

    method: TestTimeMethod
    W: Tensor
    correct: int = 0
    before: int = 0
    seconds: float = 0.0
    confidence: list[Tensor] = field(default_factory=list)  # per batch: each image's top probability...
    right: list[Tensor] = field(default_factory=list)  # ...and whether its class was right (for ECE)


def _tally(b: Bench, cell: Cell, scene: Scene, dataset: str) -> Tally:
    """The cell's method, created with the experiment's settings, started on ``dataset`` from the cell's W."""
    spec = cell.extra["test_time"]
    method = create(spec.name, **b.exp.tta.settings_for(spec))
    W = _start(b, cell, dataset, b.tta_starts)
    method.start(scene, W)
    return Tally(method, W)


def _score_batches(b: Bench, scene: Scene, tallies: list[Tally], paths: list, labels: Tensor, dataset: str) -> float:
    """Every row on every batch of images; returns the seconds spent extracting the shared views."""
    extraction = 0.0
    bar = tqdm(total=len(paths), desc=f"test-time adaptation on {dataset}", unit="image", disable=None, leave=False)
    for i in range(0, len(paths), IMAGES_PER_BATCH):
        started = time.perf_counter()
        z = view_features(b.backbone, paths[i : i + IMAGES_PER_BATCH], scene.views, scene.view_seed)
        extraction += time.perf_counter() - started
        y = labels[i : i + IMAGES_PER_BATCH]
        for tally in tallies:
            started = time.perf_counter()
            with torch.no_grad():
                start = clip_logits(z[:, 0], tally.W, scene.bias, scene.classifier, scene.logit_scale)
            tally.before += int((start.argmax(-1) == y).sum())
            logits = tally.method.observe(z)
            if logits is not None:
                tally.correct += int((logits.argmax(-1) == y).sum())
                confidence, predicted = top_confidence(logits)
                tally.confidence.append(confidence)
                tally.right.append((predicted == y).float())
            tally.seconds += time.perf_counter() - started
        bar.update(len(y))
    bar.close()
    return extraction


def _finish(tally: Tally, labels: Tensor) -> dict[str, Any]:
    """What the method writes once every image is seen (a stream method's accuracy), only the fields it declares."""
    started = time.perf_counter()
    fields = tally.method.finish(labels)
    tally.seconds += time.perf_counter() - started
    cls = type(tally.method)
    undeclared = sorted(set(fields) - {"accuracy", *cls.record_fields})
    if undeclared or (cls.streams and "accuracy" not in fields):
        raise RuntimeError(
            f"test-time method {cls.name!r} wrote record field(s) {undeclared} it does not declare in "
            f"record_fields, or (a stream method) no accuracy"
        )
    return fields


def run_tta_group(b: Bench, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
    scene = scene_for(b, group.dataset)
    images = balanced_subset(evaluation_images(b.splits(group.dataset)), b.exp.tta.max_images)
    started = time.perf_counter()
    tallies = [_tally(b, c, scene, group.dataset) for c in cells]
    shared = time.perf_counter() - started
    paths, labels = [it.path for it in images.items], torch.tensor(images.labels)
    with PeakMemory(b.backbone.device) as memory:
        shared += _score_batches(b, scene, tallies, paths, labels, group.dataset)
        finished = [_finish(tally, labels) for tally in tallies]
    n = len(paths)
    for cell, tally, fields in zip(cells, tallies, finished, strict=True):
        method = tally.method
        cell.add(
            accuracy=100.0 * tally.correct / n,
            start_accuracy=100.0 * tally.before / n,
            eval_images=n,
            peak_memory_mb=None if memory.mb is None else round(memory.mb, 1),
            memory_measure=f"{memory.measure}, every row of this dataset",
            trainable_parameters=method.adapted_per_image(scene, tally.W),
            forward_passes=n * method.views_read(scene.views, scene.dataset),
        )
        text_passes = method.text_passes_per_image(scene)
        if text_passes is not None:
            cell.add(text_forward_passes=n * text_passes)
        if tally.confidence:  # a per-image method's logits were seen; a stream method scores itself in finish
            cell.add(ece=calibration_error(torch.cat(tally.confidence), torch.cat(tally.right)))
        cell.add(**fields)  # a stream method's accuracy is its own (TDA: the mean over stream orders)
        found = b.identity(evaluation=images)  # and the support's, for a cell that starts from a fit
        cell.add(images={**cell.record.results.get("images", {}), **found["images"]}, environment=found["environment"])
        if "selected" not in cell.record.results:
            cell.add(selected={"how": "rule"})  # fixed settings, from each original
        seconds = tally.seconds + shared / len(cells)
        cell.add(seconds_per_image=seconds / n if n else None)  # what a test-time method costs each image
        yield cell, seconds
