"""Test-time ProLIP throughput: batched across images vs one image at a time, and TPT, on the same CPU in one run.

ProLIP variants run on precomputed view features (64 views × 768-d → 512-d, ViT-B/16 sizes, 1000 classes as on
ImageNet), so only the adaptation is timed; the backbone forward of the 64 views is the same for every method and
excluded. TPT needs the text encoder for every step: it runs on ``--tpt-model`` (random weights: only the speed
means something) with ``--tpt-classes`` prompts; real TPT on ImageNet runs 1000 prompts per forward.
Every variant is warmed up once, then timed best-of-``--repeats`` (the first call pays for page faults on fresh
buffers, which would otherwise be charged to whichever variant runs first).

    python benchmarks/bench_tta.py [--images 32 --batches 1,4,16,32 --tpt-model test-vit-tiny --tpt-classes 10]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def best_rate(fn, images: int, repeats: int) -> float:
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return images / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16,32", help="images adapted together, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tpt-model", default="test-vit-tiny", help="open_clip architecture for TPT (random weights)")
    ap.add_argument("--tpt-classes", type=int, default=10)
    ap.add_argument("--tpt-images", type=int, default=8)
    args = ap.parse_args()
    from prolip.backbones import load_backbone
    from prolip.tta import TTAConfig, adapt_projection, tpt_logits

    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.images, 64, 768, generator=g)
    W0 = torch.randn(768, 512, generator=g) * 768**-0.5
    T = F.normalize(torch.randn(1000, 512, generator=g), dim=-1)
    cfg = TTAConfig()

    def prolip(batch):
        return torch.cat(
            [adapt_projection(z[i : i + batch], W0, None, T, 100.0, cfg)[0] for i in range(0, args.images, batch)]
        )

    batches = [int(b) for b in args.batches.split(",")]
    rates = {b: best_rate(lambda: prolip(b), args.images, args.repeats) for b in batches}
    same = all(torch.allclose(prolip(b), prolip(1), atol=1e-4) for b in batches)

    tpt_model = load_backbone(args.tpt_model, "none")
    names = [f"class {i}" for i in range(args.tpt_classes)]
    zt = torch.randn(args.tpt_images, 64, tpt_model.dim_pre, generator=g)
    W0t = tpt_model.projection().weight
    rate_tpt = best_rate(
        lambda: tpt_logits(tpt_model, zt, W0t, None, names, tpt_model.logit_scale), args.tpt_images, args.repeats
    )

    print(
        f"{args.images} images, 64 views, 10% kept, 1 AdamW step (lr 1e-4); ProLIP on 768->512, 1000 classes "
        f"(synthetic features); TPT on {args.tpt_model} (RANDOM weights), {args.tpt_classes} classes, "
        f"{args.tpt_images} images; {torch.get_num_threads()} threads; best of {args.repeats} after a warm-up"
    )
    one = rates.get(1) or best_rate(lambda: prolip(1), args.images, args.repeats)
    for b, r in rates.items():
        label = "one image at a time" if b == 1 else f"batched, {b} images"
        print(f"test-time ProLIP, {label:20s}: {r:8.1f} images/s  ({r / one:.2f}x one at a time)")
    print(
        f"TPT, {args.tpt_model}, {args.tpt_classes} classes{'':12s}: {rate_tpt:8.1f} images/s  "
        f"(one-at-a-time ProLIP is {one / rate_tpt:.1f}x faster)"
    )
    print(f"batched == one at a time (atol 1e-4): {same}")


if __name__ == "__main__":
    main()
