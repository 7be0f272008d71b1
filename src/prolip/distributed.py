"""torchrun support: the process group that extraction, the grid search and the bench share, set up from torchrun's
environment.

Outside torchrun (or with one process) every helper here is a no-op, so the rest of prolip never branches on it.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


def init_from_env(device: str | torch.device = "cpu", timeout: timedelta | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); (rank, world), or (0, 1) alone.
    ``timeout``: how long a collective may wait for the slowest rank (torch's default when None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:  # one GPU per local rank, before any model or tensor lands on a device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)  # None: torch's default
        atexit.register(_destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


_ALONE = [0]  # depth of alone() blocks in this process


@contextmanager
def alone() -> Iterator[None]:
    """Inside, this process works as if it were the only one (rank_world() is (0, 1), so every helper here and
    the cache's split are no-ops): the bench scores the groups each rank was given without waiting on the others."""
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1


def rank_world() -> tuple[int, int]:
    """This process's (rank, world size) in the current process group; (0, 1) when there is none or inside
    :func:`alone`."""
    if not _ALONE[0] and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait until every rank gets here (nothing alone)."""
    if rank_world()[1] > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself when alone)."""
    if rank_world()[1] == 1:
        return t
    buf = t.to(_comm_device()).clone()
    dist.all_reduce(buf)
    return buf.to(t.device)


def broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    """``t`` as held by rank ``src`` (every rank passes a tensor of the same shape and dtype)."""
    if rank_world()[1] == 1:
        return t
    buf = t.to(_comm_device()).contiguous()
    dist.broadcast(buf, src=src)
    return buf.to(t.device)
