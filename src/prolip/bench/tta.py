"""The test-time protocol's scoring: every start W (zero-shot W0 or a few-shot method's adapted W) adapted per test
image on the very same views, plus the optional TPT and view-ensemble rows."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from prolip.bench.protocols import Bench, Cell, Group, balanced_subset
from prolip.episode import evaluation_images
from prolip.functional import clip_logits
from prolip.methods import method_class
from prolip.tta import TTAConfig, adapt_projection, tpt_logits, view_ensemble_logits, view_features

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


def run_tta_group(b: Bench, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
    t = b.exp.tta
    cfg = TTAConfig(views=t.views, ratio=t.ratio, steps=t.steps, lr=t.lr, seed=t.seed)
    splits = b.splits(group.dataset)
    images = balanced_subset(evaluation_images(splits), t.max_images)
    T = b.builder.classifier(splits.classnames, b.templates(splits)[1])
    bias = b.backbone.projection().bias
    bias = None if bias is None else bias.detach().float().cpu()
    scale = float(b.backbone.logit_scale)
    started = time.perf_counter()
    starts = {c.record["cell"]: _start(b, c, group.dataset, b.tta_starts) for c in cells}
    fit_seconds = time.perf_counter() - started
    correct = dict.fromkeys(starts, 0)
    before = dict.fromkeys(starts, 0)
    paths, labels = [it.path for it in images.items], torch.tensor(images.labels)
    started = time.perf_counter()
    bar = tqdm(total=len(paths), desc=f"test-time adaptation on {group.dataset}", unit="image", disable=None,
               leave=False)
    for i in range(0, len(paths), IMAGES_PER_BATCH):
        z = view_features(b.backbone, paths[i : i + IMAGES_PER_BATCH], cfg.views, cfg.seed)
        y = labels[i : i + IMAGES_PER_BATCH]
        for cell in cells:
            W, key = starts[cell.record["cell"]], cell.record["cell"]
            with torch.no_grad():
                before[key] += int((clip_logits(z[:, 0], W, bias, T, scale).argmax(-1) == y).sum())
            kind = cell.extra["kind"]
            if kind == "tta":
                logits = adapt_projection(z, W, bias, T, scale, cfg)[0]
            elif kind == "tpt":
                logits = tpt_logits(b.backbone, z, W, bias, splits.classnames, scale, ratio=cfg.ratio, steps=cfg.steps)
            else:
                logits = view_ensemble_logits(z, W, bias, T, scale, cfg.ratio)
            correct[key] += int((logits.argmax(-1) == y).sum())
        bar.update(len(y))
    bar.close()
    seconds = (time.perf_counter() - started) / len(cells)
    n = len(paths)
    for cell in cells:
        key = cell.record["cell"]
        cell.record.update(accuracy=100.0 * correct[key] / n, start_accuracy=100.0 * before[key] / n, eval_images=n)
        yield cell, seconds + fit_seconds / len(cells)
