"""Run an experiment's cells on one shared feature cache, appending one record per finished cell."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from prolip import __version__
from prolip.bench.experiment import Experiment
from prolip.bench.records import append_record, cell_id, done_cells, read_records
from prolip.data.types import DatasetSplits, ImageItem, LabeledImages


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


def run_experiment(exp: Experiment, echo: Callable[[str], None] = print) -> Path:
    from prolip import pipeline
    from prolip.backbones import load_backbone
    from prolip.data import base_new_split, resolve_data
    from prolip.features import FeatureCache
    from prolip.functional import accuracy

    out = Path(exp.out)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.jsonl"
    finished = done_cells(read_records(records_path))
    backbone = load_backbone(exp.model, exp.pretrained)
    cache = FeatureCache(None if exp.cache_dir is None else Path(exp.cache_dir).expanduser(), backbone,
                         progress=False)
    ran = skipped = 0
    for dataset in exp.datasets:
        splits = resolve_data(dataset, root=None if exp.data_root is None else Path(exp.data_root).expanduser())
        for shots in exp.shots:
            for seed in exp.seeds:
                for m in exp.methods:
                    record = {"protocol": exp.protocol, "dataset": splits.name, "model": exp.model,
                              "weights": exp.pretrained, "random_weights": backbone.info.random_weights,
                              "fingerprint": backbone.info.fingerprint, "sampler": exp.sampler, "seed": seed,
                              "shots": shots, "views": exp.views, "label": m.label, "method": m.name,
                              "hyperparameters": m.hyperparameters, "validation": exp.validation,
                              "templates": splits.templates}
                    record["cell"] = cell_id(record)
                    if record["cell"] in finished:
                        skipped += 1
                        continue
                    cfg = pipeline.FitConfig(shots=shots, seed=seed, method=m.name, views=exp.views,
                                             hyperparameters=dict(m.hyperparameters), sampler=exp.sampler,
                                             use_validation=exp.validation)
                    started = time.perf_counter()
                    if exp.protocol == "fewshot":
                        result = pipeline.fit(backbone, splits, cache, cfg)
                        record["accuracy"] = result.metrics["accuracy"]
                    else:  # base2new
                        base, new = base_new_split(len(splits.classnames))
                        result = pipeline.fit(backbone, split_classes(splits, base), cache, cfg)
                        new_splits = split_classes(splits, new)
                        z, y = pipeline.center_features(cache, new_splits.test)
                        T_new = backbone.encode_text(new_splits.classnames, splits.templates).float().cpu()
                        try:
                            with torch.no_grad():
                                new_acc = accuracy(result.method.logits(z, classifier=T_new), y)
                        except ValueError:  # methods tied to their training classes have no new-class accuracy
                            new_acc = None
                        record.update(base=result.metrics["accuracy"], new=new_acc,
                                      hm=None if new_acc is None else harmonic_mean(result.metrics["accuracy"],
                                                                                   new_acc))
                        record["accuracy"] = record["hm"]
                    record.update(selected=result.method.selected_, seconds=round(time.perf_counter() - started, 3),
                                  prolip_version=__version__)
                    append_record(records_path, record)
                    finished.add(record["cell"])
                    ran += 1
                    echo(f"{splits.name} {shots}-shot seed {seed} {m.label}: "
                         f"{'-' if record['accuracy'] is None else format(record['accuracy'], '.2f')}")
    echo(f"{ran} cells run, {skipped} already done; records in {records_path}; cache: {cache.stats}")
    return records_path
