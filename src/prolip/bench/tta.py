"""The test-time protocol's scoring: every start W (zero-shot W0 or a few-shot method's adapted W) adapted per test
image on the very same views, plus the optional plain zero-shot, TPT, view-ensemble, ZERO and TDA rows.

Each image's views are extracted once and shared by every row. TDA is a stream: its inputs are collected image by
image, then the stream runs once per seeded order (``tta.tda_orders``); its record holds every order's seed, digest
and accuracy, their mean (``accuracy``) and their worst (``accuracy_worst``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from prolip.bench.protocols import Bench, Cell, Group, PeakMemory, balanced_subset
from prolip.episode import evaluation_images
from prolip.functional import clip_logits, project
from prolip.methods import method_class
from prolip.tta import TTAConfig, adapt_projection, batched_logits, tpt_logits, view_ensemble_logits, view_features
from prolip.tta_methods import (
    TDAInputs,
    TDASettings,
    order_digest,
    stream_order,
    tda_inputs,
    tda_settings,
    tda_stream,
    zero_votes,
)

IMAGES_PER_BATCH = 16


def _start(b: Bench, cell: Cell, dataset: str, memo: dict) -> torch.Tensor:
    """The W a TTA cell starts from: a learning method's adapted projection (fitted once per train set, shots and
    seed, memoised across datasets), or W0."""
    kind, shots, seed = cell.extra["kind"], cell.extra["shots"], cell.extra["seed"]
    if kind != "tta" or not method_class(cell.method.name).learns:
        return _w0(b)
    train_on = b.exp.tta.train_on or dataset
    key = (cell.method.label, train_on, shots, seed)
    if key not in memo:
        splits = b.splits(train_on)
        episode = b.episode(splits, shots, seed)
        method, _ = b.fit(cell.method, cell.record["hyperparameters"], episode, seed)
        memo[key] = method
    method = memo[key]
    cell.record["selected"] = method.selected_
    cell.record["source"] = b.splits(b.exp.tta.train_on).name if b.exp.tta.train_on else None
    W = method.projection()
    assert W is not None, f"{cell.method.name} exposes no projection"  # refused when the experiment is parsed
    return W


def _w0(b: Bench) -> torch.Tensor:
    return b.backbone.projection().weight.detach().float().cpu()


@dataclass
class Scene:
    """What every row of one dataset shares: the text classifier, the frozen bias, the logit scale, the views."""

    classifier: Tensor
    bias: Tensor | None
    scale: float
    cfg: TTAConfig
    classnames: list[str]
    zero_gamma: float
    tda: TDASettings
    tda_source: str


@dataclass
class Tally:
    """One row's running counts on the stream of batches."""

    W: Tensor
    correct: int = 0
    before: int = 0
    seconds: float = 0.0
    tda_parts: list[TDAInputs] = field(default_factory=list)


def _row_logits(kind: str, b: Bench, scene: Scene, z: Tensor, tally: Tally) -> Tensor | None:
    """One batch's logits for a row; None for TDA, whose inputs are collected for the stream instead."""
    W, cfg = tally.W, scene.cfg
    if kind == "zeroshot":
        return clip_logits(z[:, 0], W, scene.bias, scene.classifier, scene.scale)
    if kind == "tta":
        return adapt_projection(z, W, scene.bias, scene.classifier, scene.scale, cfg)[0]
    if kind == "tpt":
        return tpt_logits(b.backbone, z, W, scene.bias, scene.classnames, scene.scale, ratio=cfg.ratio, steps=cfg.steps)
    if kind == "zero":
        return zero_votes(batched_logits(z, W, scene.bias, scene.classifier, scene.scale), scene.zero_gamma)
    if kind == "tda":
        embeddings = F.normalize(project(z, W, scene.bias), dim=-1)
        tally.tda_parts.append(tda_inputs(embeddings, scene.scale, scene.classifier, scene.tda))
        return None
    return view_ensemble_logits(z, W, scene.bias, scene.classifier, scene.scale, cfg.ratio)


def _scene(b: Bench, dataset: str) -> Scene:
    t = b.exp.tta
    splits = b.splits(dataset)
    bias = b.backbone.projection().bias
    settings, source = tda_settings(splits.name)
    return Scene(
        classifier=b.builder.classifier(splits.classnames, b.templates(splits)[1]),
        bias=None if bias is None else bias.detach().float().cpu(),
        scale=float(b.backbone.logit_scale),
        cfg=TTAConfig(views=t.views, ratio=t.ratio, steps=t.steps, lr=t.lr, seed=t.seed),
        classnames=list(splits.classnames),
        zero_gamma=t.zero_gamma,
        tda=settings,
        tda_source=source,
    )


def _tda_record(b: Bench, tally: Tally, scene: Scene, labels: Tensor) -> dict:
    """TDA over every seeded stream order: per order its seed, digest and accuracy; their mean and worst."""
    inputs = TDAInputs.concat(tally.tda_parts)
    orders = []
    for seed in b.exp.tta.tda_orders:
        order = stream_order(len(labels), seed)
        logits = tda_stream(inputs, order, scene.tda)[0]
        accuracy = 100.0 * int((logits.argmax(-1) == labels).sum()) / len(labels)
        orders.append({"seed": seed, "digest": order_digest(order), "accuracy": accuracy})
    accuracies = [o["accuracy"] for o in orders]
    return {
        "accuracy": sum(accuracies) / len(accuracies),
        "accuracy_worst": min(accuracies),
        "stream_orders": orders,
        "selected": {"how": "rule", "source": scene.tda_source, **scene.tda.as_record()},
    }


def _forward_passes(kind: str, scene: Scene, images: int) -> dict:
    """Image-encoder passes a row needs per evaluation set (TDA reads one view unless its dataset uses many), and
    TPT's text-encoder passes (one classifier per step, plus the selection and the final prediction)."""
    views = {"tda": min(scene.tda.views, scene.cfg.views), "zeroshot": 1}.get(kind, scene.cfg.views)
    out = {"forward_passes": images * views}
    if kind == "tpt":
        out["text_forward_passes"] = images * (scene.cfg.steps + 2) * len(scene.classnames)
    return out


def _score_batches(
    b: Bench, scene: Scene, cells: list[Cell], tallies: dict[str, Tally], paths: list, labels: Tensor, dataset: str
) -> float:
    """Every row on every batch of images; returns the seconds spent extracting the shared views."""
    extraction = 0.0
    bar = tqdm(total=len(paths), desc=f"test-time adaptation on {dataset}", unit="image", disable=None, leave=False)
    for i in range(0, len(paths), IMAGES_PER_BATCH):
        started = time.perf_counter()
        z = view_features(b.backbone, paths[i : i + IMAGES_PER_BATCH], scene.cfg.views, scene.cfg.seed)
        extraction += time.perf_counter() - started
        y = labels[i : i + IMAGES_PER_BATCH]
        for cell in cells:
            tally = tallies[cell.record["cell"]]
            started = time.perf_counter()
            with torch.no_grad():
                tally.before += int(
                    (clip_logits(z[:, 0], tally.W, scene.bias, scene.classifier, scene.scale).argmax(-1) == y).sum()
                )
            logits = _row_logits(cell.extra["kind"], b, scene, z, tally)
            if logits is not None:
                tally.correct += int((logits.argmax(-1) == y).sum())
            tally.seconds += time.perf_counter() - started
        bar.update(len(y))
    bar.close()
    return extraction


def run_tta_group(b: Bench, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
    scene = _scene(b, group.dataset)
    images = balanced_subset(evaluation_images(b.splits(group.dataset)), b.exp.tta.max_images)
    started = time.perf_counter()
    tallies = {c.record["cell"]: Tally(_start(b, c, group.dataset, b.tta_starts)) for c in cells}
    shared = time.perf_counter() - started
    paths, labels = [it.path for it in images.items], torch.tensor(images.labels)
    with PeakMemory(b.backbone.device) as memory:
        shared += _score_batches(b, scene, cells, tallies, paths, labels, group.dataset)
        tda = {
            c.record["cell"]: _tda_stream_timed(b, tallies[c.record["cell"]], scene, labels)
            for c in cells
            if c.extra["kind"] == "tda"
        }
    n = len(paths)
    for cell in cells:
        key, kind = cell.record["cell"], cell.extra["kind"]
        tally = tallies[key]
        cell.record.update(
            accuracy=100.0 * tally.correct / n,
            start_accuracy=100.0 * tally.before / n,
            eval_images=n,
            peak_memory_mb=None if memory.mb is None else round(memory.mb, 1),
            memory_measure=f"{memory.measure}, every row of this dataset",
            trainable_parameters=_adapted_per_image(b, kind, tally.W),
            **_forward_passes(kind, scene, n),
        )
        cell.record.update(tda.get(key, {}))  # TDA: its accuracy is the mean over stream orders
        cell.record.setdefault("selected", {"how": "rule"})  # fixed settings, from each original
        yield cell, tally.seconds + shared / len(cells)


def _adapted_per_image(b: Bench, kind: str, W: Tensor) -> int:
    """Parameters a row adapts for each test image: test-time ProLIP's W, TPT's context token embeddings; ZERO,
    TDA and the view ensemble adapt none (TDA's caches are features, not parameters)."""
    if kind == "tta":
        return W.numel()
    if kind == "tpt":
        embeds, eot = b.backbone.prompt_embeddings(["a photo of a"])  # tpt_logits' ctx_init
        return int(eot[0] - 1) * embeds.shape[-1]
    return 0


def _tda_stream_timed(b: Bench, tally: Tally, scene: Scene, labels: Tensor) -> dict:
    started = time.perf_counter()
    record = _tda_record(b, tally, scene, labels)
    tally.seconds += time.perf_counter() - started
    return record
