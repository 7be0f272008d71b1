"""What several benchmarks measure the same way: the machine's GEMM rate, the yardstick every ratio is taken against."""

from __future__ import annotations

import time

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(
    device: str | torch.device = "cpu", n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32
) -> float:
    """Best-of-``repeats`` GEMM rate (GFLOP/s) on square n×n matrices of ``dtype``."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9
