"""ProLIP training throughput vs the machine's fp32 matmul rate, measured in the same run.

Problem: 16-shot × 1000-class × 768-d pre-projection features (ImageNet-sized, ViT-B/16 shapes: W 768×512),
random features and classifier. Counted FLOPs per step are the four GEMMs of the forward/backward pass
(zW, u·Tᵀ, dlogits·T, zᵀ·de); elementwise work is not counted, so the ratio is a lower bound on efficiency.
Only ``--views`` distinct views are materialised (300 would take 14.7 GB); the work per step is identical.

    python benchmarks/bench_training.py [--steps 300] [--classes 1000] [--shots 16] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from prolip.methods.base import TensorViews
from common import matmul_gflops, sync
from prolip.methods.prolip import prolip_loss_and_grad, train_projection


def step_flops(n: int, d_pre: int, d: int, c: int) -> int:
    return 2 * n * d_pre * d * 2 + 2 * n * d * c * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--d-pre", type=int, default=768)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare-autograd", action="store_true", help="also time an autograd gradient step")
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32

    torch.manual_seed(0)
    dev, n = args.device, args.classes * args.shots
    views = torch.randn(args.views, n, args.d_pre, device=dev)
    labels = torch.arange(args.classes, device=dev).repeat_interleave(args.shots)
    W0 = torch.randn(args.d_pre, args.d, device=dev) * 0.03
    T = F.normalize(torch.randn(args.classes, args.d, device=dev), dim=-1)

    peak = matmul_gflops(dev)
    train_projection(W0, None, T, 100.0, TensorViews(views), labels, [1e-5], [1 / args.shots], 2)  # warm-up
    sync(dev)
    t = time.perf_counter()
    train_projection(W0, None, T, 100.0, TensorViews(views), labels, [1e-5], [1 / args.shots], args.steps)
    sync(dev)
    wall = time.perf_counter() - t
    achieved = step_flops(n, args.d_pre, args.d, args.classes) * args.steps / wall / 1e9
    peak_after = matmul_gflops(dev)  # the machine is shared: bracket the run with two measurements
    result = {
        "device": dev, "threads": torch.get_num_threads(), "problem": f"{args.shots}-shot x {args.classes}-class "
        f"x {args.d_pre}->{args.d}", "steps": args.steps, "wall_s": round(wall, 2),
        "s_per_step": round(wall / args.steps, 4), "achieved_gflops": round(achieved, 1),
        "matmul_gflops": round(max(peak, peak_after), 1),
        "ratio": round(achieved / max(peak, peak_after), 3),
    }
    if args.compare_autograd:
        z = views[0]
        W = W0[None].clone()
        lam = torch.tensor([1 / args.shots], device=dev)
        for label, fn in (("analytic", lambda: prolip_loss_and_grad(z, W, None, T, 100.0, labels, W0, lam)),
                          ("autograd", lambda: _autograd_step(z, W, T, labels, W0, lam))):
            fn()
            times = []
            for _ in range(5):  # best of 5: the machine may be shared
                sync(dev)
                t = time.perf_counter()
                fn()
                sync(dev)
                times.append(time.perf_counter() - t)
            result[f"{label}_grad_s"] = round(min(times), 4)
    print(json.dumps(result, indent=2))


def _autograd_step(z, W, T, labels, W0, lam):
    W = W.detach().requires_grad_(True)
    logits = 100.0 * F.normalize(z @ W, dim=-1) @ T.T
    loss = sum(F.cross_entropy(lg, labels) for lg in logits) + (lam * (W - W0).pow(2).sum(dim=(1, 2))).sum()
    loss.backward()
    return W.grad


if __name__ == "__main__":
    main()
