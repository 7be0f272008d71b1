"""ProLIP training throughput vs the machine's fp32 matmul rate, measured in the same run, on a small and a large
problem.

Shapes (``--shapes``, shots x classes : steps): 4-shot × 10-class (a small few-shot problem, where per-step overhead
would dominate) and 16-shot × 1000-class (ImageNet-sized), both 768 → 512 (ViT-B/16), random features and classifier.
Counted FLOPs per step are the four GEMMs of the forward/backward pass (zW, u·Tᵀ, dlogits·T, zᵀ·de), the same count
for both shapes; elementwise work (normalisation, softmax, the pull, Adam) is not counted, so the ratio is a lower
bound on efficiency. Only ``--views`` distinct views are materialised (the work per step does not depend on V).
Each round times every shape back to back, with the matmul rate (best of a few 2048³ fp32 GEMMs) probed before and
after it; a shape's ratio is its rate over the mean of the two probes, and the median over rounds is reported with
the range. ``--threads`` runs the whole measurement at other thread counts too (each in its own process).

    python benchmarks/bench_training.py [--shapes 4x10:300,16x1000:10] [--rounds 3] [--threads 2,1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from common import matmul_gflops, sync
from prolip.methods.base import TensorViews
from prolip.methods.prolip import prolip_loss_and_grad, train_projection


def step_flops(n: int, d_pre: int, d: int, c: int) -> int:
    return 2 * n * d_pre * d * 2 + 2 * n * d * c * 2


def problem(shots: int, classes: int, views: int, device: str, d_pre: int = 768, d: int = 512):
    g = torch.Generator().manual_seed(0)
    n = shots * classes
    z = torch.randn(views, n, d_pre, generator=g).to(device)
    labels = torch.arange(classes, device=device).repeat_interleave(shots)
    W0 = (torch.randn(d_pre, d, generator=g) * 0.03).to(device)
    T = F.normalize(torch.randn(classes, d, generator=g), dim=-1).to(device)
    return z, labels, W0, T


def measure(shape: str, steps: int, views: int, device: str) -> tuple[float, float]:
    """(seconds per step, counted GFLOP/s) of ``steps`` full-batch steps at ``shape``."""
    shots, classes = (int(x) for x in shape.split("x"))
    z, labels, W0, T = problem(shots, classes, views, device)
    run = lambda s: train_projection(W0, None, T, 100.0, TensorViews(z), labels, [1e-5], [1 / shots], s)
    run(2)  # warm-up: buffers, thread pools
    sync(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    wall = time.perf_counter() - start
    return wall / steps, step_flops(shots * classes, 768, 512, classes) * steps / wall / 1e9


def probe(device: str) -> float:
    return matmul_gflops(device, repeats=5)


def child(args) -> None:
    torch.set_num_threads(args.child_threads)
    shapes = [(s.split(":")[0], int(s.split(":")[1])) for s in args.shapes.split(",")]
    rows: dict[str, list[tuple[float, float, float]]] = {shape: [] for shape, _ in shapes}
    for _ in range(args.rounds):
        for shape, steps in shapes:
            before = probe(args.device)
            s_per_step, gflops = measure(shape, steps, args.views, args.device)
            rows[shape].append((s_per_step, gflops, (before + probe(args.device)) / 2))
    for shape, steps in shapes:
        ratios = sorted(g / peak for _, g, peak in rows[shape])
        print(
            json.dumps(
                {
                    "threads": torch.get_num_threads(),
                    "shape": f"{shape} (768->512)",
                    "steps": steps,
                    "ms_per_step": round(statistics.median(r[0] for r in rows[shape]) * 1e3, 3),
                    "achieved_gflops": round(statistics.median(r[1] for r in rows[shape]), 1),
                    "matmul_gflops": round(statistics.median(r[2] for r in rows[shape]), 1),
                    "ratio_median": round(statistics.median(ratios), 3),
                    "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
                }
            ),
            flush=True,
        )
    if args.compare_autograd:
        compare_autograd(args.device)


def compare_autograd(device: str) -> None:
    """Best-of-5 time of one gradient, hand-written vs autograd, at 16-shot × 1000-class."""
    z, labels, W0, T = problem(16, 1000, 1, device)
    W, lam = W0[None].clone(), torch.tensor([1 / 16], device=device)
    out = {}
    for label, fn in (
        ("analytic", lambda: prolip_loss_and_grad(z[0], W, None, T, 100.0, labels, W0, lam)),
        ("autograd", lambda: _autograd_step(z[0], W, T, labels, W0, lam)),
    ):
        fn()
        times = []
        for _ in range(5):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        out[f"{label}_grad_s"] = round(min(times), 4)
    print(json.dumps(out))


def _autograd_step(z, W, T, labels, W0, lam):
    W = W.detach().requires_grad_(True)
    logits = 100.0 * F.normalize(z @ W, dim=-1) @ T.T
    loss = sum(F.cross_entropy(lg, labels) for lg in logits) + (lam * (W - W0).pow(2).sum(dim=(1, 2))).sum()
    loss.backward()
    return W.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4x10:300,16x1000:10", help="shots x classes : steps, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="torch thread counts to run at")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare-autograd", action="store_true", help="also time an autograd gradient step")
    ap.add_argument("--child-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    if args.child_threads is not None:
        return child(args)
    print("target: >= 0.3 of the fp32 matmul rate at 4x10 (counted GEMM FLOPs), >= 0.5 at 16x1000", flush=True)
    for threads in args.threads.split(","):
        cmd = [
            sys.executable,
            __file__,
            f"--child-threads={threads}",
            f"--shapes={args.shapes}",
            f"--rounds={args.rounds}",
            f"--views={args.views}",
            f"--device={args.device}",
        ]
        subprocess.run(cmd + (["--compare-autograd"] if args.compare_autograd else []), check=True)


if __name__ == "__main__":
    main()
