"""The front door: ``prolip.fit``, ``prolip.evaluate``, ``prolip.load_run``, ``prolip.load_backbone``.

Each is the library call a ``prolip`` command makes, with the command's defaults, so a Python user and a shell user
get the same episode, the same cache and the same numbers::

    import prolip

    backbone = prolip.load_backbone("ViT-B-16", "openai")
    result = prolip.fit("path/to/folder", backbone, shots=16)   # features cached in ~/.cache/prolip
    result.run.save("runs/mine")
    run = prolip.load_run("runs/mine")
    run.predict(["photo.jpg"], top_k=3)
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from prolip.backbones import load_backbone
from prolip.backbones.base import Backbone
from prolip.data import resolve_data
from prolip.data.types import DatasetSplits, LabeledImages
from prolip.features import FeatureCache
from prolip.inference import evaluate_run
from prolip.pipeline import FitConfig, FitResult
from prolip.pipeline import fit as fit_episode
from prolip.run import Run
from prolip.tta import TTAConfig

FIT_OPTIONS = tuple(f.name for f in fields(FitConfig))


def _splits(
    data: str | Path | DatasetSplits, data_root: Path | str | None, cache_dir: Path | str | None = None
) -> DatasetSplits:
    return data if isinstance(data, DatasetSplits) else resolve_data(str(data), root=data_root, cache_dir=cache_dir)


def fit(
    data: str | Path | DatasetSplits,
    backbone: Backbone | None = None,
    *,
    model: str = "ViT-B-16",
    pretrained: str = "openai",
    cache_dir: Path | str | None = None,
    data_root: Path | str | None = None,
    eval_images: LabeledImages | None = None,
    device: str = "cpu",
    **options: Any,
) -> FitResult:
    """``prolip fit``: sample ``shots`` images per class of ``data`` (anything ``--data`` takes, or resolved
    splits), cache their features, train the method, evaluate on what is left; returns the run (not yet saved),
    the fitted method and the metrics. ``options`` are :class:`~prolip.pipeline.FitConfig`'s fields (shots, seed,
    method, hyperparameters, views, aug_seed, sampler, allow_fewer, use_validation)."""
    unknown = sorted(set(options) - set(FIT_OPTIONS))
    if unknown:
        raise TypeError(f"prolip.fit() got unknown option(s) {unknown}; it takes {', '.join(FIT_OPTIONS)}")
    backbone = load_backbone(model, pretrained, device=device) if backbone is None else backbone
    splits = _splits(data, data_root, cache_dir)
    cache = FeatureCache(cache_dir, backbone)
    return fit_episode(backbone, splits, cache, FitConfig(**options), eval_images=eval_images, data_spec=str(data))


def load_run(path: Path | str) -> Run:
    """A saved run (validated: a damaged one is a RunError naming the file); ``run.predict(paths)`` classifies
    images with it."""
    return Run.load(path)


def evaluate(
    run: Run | Path | str,
    data: str | Path | DatasetSplits,
    *,
    split: str | None = None,
    tta: TTAConfig | None = None,
    cache_dir: Path | str | None = None,
    data_root: Path | str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """``prolip eval``: a saved run's accuracy and diagnostics on ``data`` (its own support and validation images
    left out)."""
    run = run if isinstance(run, Run) else Run.load(run)
    backbone = run.backbone(device)
    cache = None if tta is not None else FeatureCache(cache_dir, backbone)
    return evaluate_run(run, _splits(data, data_root, cache_dir), split=split, tta=tta, backbone=backbone, cache=cache)


__all__ = ["TTAConfig", "evaluate", "fit", "load_backbone", "load_run"]
