"""Test-time ProLIP throughput: batched across images vs one image at a time, and TPT, on the same CPU in one run.

ProLIP variants run on precomputed view features (64 views × 768-d, ViT-B/16 sizes, 1000 classes as on ImageNet),
so only the adaptation is timed; the backbone forward of the 64 views is the same for every method and excluded.
TPT needs the text encoder for every step: it runs on the tiny test model (10 classes) and its rate is an upper
bound for ViT-B/16 × 1000 classes, which costs ~1000 text-encoder passes per image per step.

    python benchmarks/bench_tta.py [--images 32 --batch 16]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    from prolip.backbones import load_backbone
    from prolip.tta import TTAConfig, adapt_projection, tpt_logits

    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.images, 64, 768, generator=g)
    W0 = torch.randn(768, 512, generator=g) * 768 ** -0.5
    T = F.normalize(torch.randn(1000, 512, generator=g), dim=-1)
    cfg = TTAConfig()

    t = time.perf_counter()
    batched = torch.cat([adapt_projection(z[i:i + args.batch], W0, None, T, 100.0, cfg)[0]
                         for i in range(0, args.images, args.batch)])
    rate_batched = args.images / (time.perf_counter() - t)
    t = time.perf_counter()
    single = torch.cat([adapt_projection(z[i:i + 1], W0, None, T, 100.0, cfg)[0] for i in range(args.images)])
    rate_single = args.images / (time.perf_counter() - t)

    tiny = load_backbone("test-vit-tiny", "none")
    names = [f"class {i}" for i in range(10)]
    zt = torch.randn(args.images, 64, tiny.dim_pre, generator=g)
    t = time.perf_counter()
    tpt_logits(tiny, zt, tiny.projection().weight, None, names, tiny.logit_scale)
    rate_tpt = args.images / (time.perf_counter() - t)

    print(f"{args.images} images, 64 views, 10% kept, 1 AdamW step (lr 1e-4); ProLIP on 768->512, 1000 classes "
          f"(synthetic features); TPT on test-vit-tiny, 10 classes (RANDOM weights); {torch.get_num_threads()} threads")
    print(f"test-time ProLIP, batched ({args.batch}/batch): {rate_batched:8.1f} images/s")
    print(f"test-time ProLIP, one at a time       : {rate_single:8.1f} images/s  -> batched is "
          f"{rate_batched / rate_single:.2f}x")
    print(f"TPT (tiny text encoder, 10 classes)   : {rate_tpt:8.1f} images/s  -> batched ProLIP is "
          f"{rate_batched / rate_tpt:.2f}x")
    print(f"batched == one at a time: {torch.allclose(batched, single, atol=1e-4)}")


if __name__ == "__main__":
    main()
