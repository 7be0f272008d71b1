"""Per-image cost of the stream methods (DPE, BoostAdapter, TDA) beside test-time ProLIP, on the tiny model, in one run.

Every method is driven through prolip's test-time interface (``start``, ``observe`` per batch of 16, ``finish``) on
the same view features, extracted once (as the bench does) and not charged to any method; stream methods run one
stream order. Each dataset name only picks the methods' per-dataset rules: on "DescribableTextures" DPE and TDA read
one view per image, on "ImageNetA" 64 (DPE re-reads them for its prediction). The encoder row is what the original
DPE pays on top for every image, which prolip does not: a forward pass over the image's views (twice on ImageNet-A,
with autograd on), timed best of ``--repeats`` on 4 images. Methods: best of ``--repeats``, after one warm-up.

    python benchmarks/bench_tta_stream.py [--images 64 --views 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

BATCH = 16  # prolip.bench.tta.IMAGES_PER_BATCH


def run_once(name: str, scene, W, z, labels) -> float:
    from prolip.tta import create, method_class

    method = create(name, **({"orders": [1]} if method_class(name).streams else {}))
    started = time.perf_counter()
    method.start(scene, W)
    for i in range(0, len(z), BATCH):
        method.observe(z[i : i + BATCH])  # outside no_grad, as the bench calls it
    method.finish(labels)
    return (time.perf_counter() - started) / len(z)


def _encode_seconds(backbone, paths, views: int) -> float:
    from prolip.tta import view_features

    started = time.perf_counter()
    view_features(backbone, paths, views, seed=0)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import tempfile
    from pathlib import Path

    from prolip.data import resolve_data
    from prolip.episode import evaluation_images
    from prolip.functional import ensemble_classifier
    from prolip.tiny import DIGIT_TEMPLATES, load_tiny, write_digit_folder
    from prolip.tta import Scene, view_features

    torch.set_num_threads(2)
    backbone = load_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        splits = resolve_data(str(write_digit_folder(Path(tmp) / "digits", "noisy")))
        items = evaluation_images(splits).items[: args.images]
        paths = [it.path for it in items]
        z = view_features(backbone, paths, args.views, seed=0)
        encoder = min(_encode_seconds(backbone, paths[:4], args.views) for _ in range(args.repeats)) / 4
    labels = torch.tensor([it.label for it in items])
    T = ensemble_classifier(backbone.encode_text_templates(list(splits.classnames), DIGIT_TEMPLATES).float())
    site = backbone.projection()
    W = site.weight.detach().float()
    bias = None if site.bias is None else site.bias.detach().float()
    print(f"tiny model, {len(items)} images x {args.views} views, {T.shape[0]} classes, D_pre {z.shape[-1]}")
    print(f"encoder forward over the {args.views} views (what the original adds per image): {encoder * 1e3:.2f} ms")
    for dataset in ("DescribableTextures", "ImageNetA"):
        scene = Scene(T, bias, float(backbone.logit_scale), tuple(splits.classnames), backbone, dataset, args.views)
        seconds = {}
        for name in ("tda", "boostadapter", "dpe", "tta"):
            run_once(name, scene, W, z, labels)
            seconds[name] = min(run_once(name, scene, W, z, labels) for _ in range(args.repeats))
        print(f"\n{dataset} rules: per-image seconds (ms), ratio to DPE")
        for name, s in seconds.items():
            print(f"  {name:13s} {s * 1e3:8.3f} ms   DPE / {name}: {seconds['dpe'] / s:6.2f}")
        print(f"  DPE vs encoder forward over the views: {seconds['dpe'] / encoder:.3f}")


if __name__ == "__main__":
    main()
