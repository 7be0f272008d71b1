"""Bounded memory: ProLIP trains on a 16-shot ImageNet-sized support set with 300 cached views (16,000 images ×
300 views × 768-d float16 ≈ 7.4 GB on disk) while streaming one view per step from the cache's unit files.

Prints the on-disk size, peak resident memory of the training process (target < 2 GB) and checks, on a scaled-down
copy, that streaming gives a W identical to holding every view in memory. Features are synthetic (random), written in
the cache's own unit format; the memory behaviour does not depend on their values.

    python benchmarks/bench_memory.py [--images 16000 --views 300 --dim 768 --classes 1000 --steps 300]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_units(root: Path, images: int, views: int, dim: int, unit_images: int = 32) -> list:
    from prolip.features.storage import Entry, write_unit

    entries, g = [], torch.Generator().manual_seed(0)
    for u, start in enumerate(range(0, images, unit_images)):
        n = min(unit_images, images - start)
        feats = torch.randn(views, n, dim, generator=g).to(torch.float16)
        target = root / f"unit{u:05d}.safetensors"
        write_unit(target, feats, [f"img{start + i}" for i in range(n)], views)
        entries.extend(Entry(target, i, views) for i in range(n))
    return entries


def train(entries, views, classes, dim, steps, in_memory=False):
    from prolip.features.cache import CachedViews
    from prolip.methods.base import TensorViews
    from prolip.methods.prolip import train_projection

    source = CachedViews(entries, views, list(range(len(entries))))
    if in_memory:
        source = TensorViews(source.to_tensor())
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(dim, 512, generator=g) * dim**-0.5
    T = torch.nn.functional.normalize(torch.randn(classes, 512, generator=g), dim=-1)
    labels = torch.arange(len(entries)) % classes
    return train_projection(W0, None, T, 100.0, source, labels, [1e-5], [1.0 / 16], steps)[0]


def child(args) -> None:
    """Runs in a fresh process so ru_maxrss measures the training alone."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        entries = write_units(Path(tmp), args.images, args.views, args.dim)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        t1 = time.perf_counter()
        train(entries, args.views, args.classes, args.dim, args.steps)
        t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"{size / 1e9:.2f} GB of cached views written in {t1 - t0:.0f} s; {args.steps} streamed steps in "
        f"{t2 - t1:.0f} s; peak RSS {peak:.2f} GB (target < 2 GB)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16000)
    ap.add_argument("--views", type=int, default=300)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tmp", default=None, help="folder for the synthetic cache (needs ~7.4 GB)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(
        f"support set: {args.images} images x {args.views} views x {args.dim}-d float16, {args.classes} classes, "
        f"ProLIP fp32, {args.steps} steps (synthetic features)"
    )
    cmd = [
        sys.executable,
        __file__,
        "--child",
        *[f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "tmp") and v is not None],
    ]
    if args.tmp:
        cmd.append(f"--tmp={args.tmp}")
    subprocess.run(cmd, check=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        entries = write_units(Path(tmp), 512, 20, 64)
        same = torch.equal(train(entries, 20, 10, 64, 40), train(entries, 20, 10, 64, 40, in_memory=True))
    print(f"streamed W identical to in-memory W (512 images x 20 views, 40 steps): {same}")


if __name__ == "__main__":
    main()
