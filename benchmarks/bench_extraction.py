"""ViT-B/16 feature extraction on this CPU vs the image rate its measured float32 matmul rate allows.

Images/s of the whole cache path (JPEG decode + center crop + encode_pre + float16 unit write) on real dtd10 images,
for a few batch sizes, against (measured GEMM FLOP/s) / (FLOPs of one ViT-B/16 forward, counted by torch's
FlopCounterMode). Random weights (the speed does not depend on them).

    python benchmarks/bench_extraction.py [--images 64] [--batch-sizes 16,32,64]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

DTD10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dtd10" / "dtd" / "images"


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--model", default="ViT-B-16")
    args = ap.parse_args()
    from torch.utils.flop_counter import FlopCounterMode

    from prolip.backbones import load_backbone
    from prolip.features import FeatureCache

    backbone = load_backbone(args.model, "none")
    size = backbone.preprocessing.image_size
    with FlopCounterMode(display=False) as counter:
        backbone.encode_pre(torch.randn(1, 3, size, size))
    gflop_per_image = counter.get_total_flops() / 1e9
    paths = sorted(DTD10.rglob("*.jpg"))[: args.images]
    peak = matmul_gflops()
    bound = peak / gflop_per_image
    print(f"{args.model} (RANDOM weights), {gflop_per_image:.1f} GFLOP/image, fp32 matmul {peak:.0f} GFLOP/s "
          f"-> bound {bound:.2f} images/s; {len(paths)} dtd10 JPEGs, {torch.get_num_threads()} threads")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            cache = FeatureCache(tmp, backbone, batch_size=bs, progress=False, unit_images=max(bs, 32))
            t = time.perf_counter()
            cache.center(paths)
            rate = len(paths) / (time.perf_counter() - t)
        print(f"batch {bs:3d}: {rate:6.2f} images/s = {rate / bound:5.1%} of the matmul bound (target >= 80%)")


if __name__ == "__main__":
    main()
