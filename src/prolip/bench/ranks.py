"""`prolip bench` split across torchrun ranks, and what `prolip bench --plan --ranks N` says of the split.

Alone (no torchrun, or one process) the bench runs every pending group itself and appends to records.jsonl, as it
always has. Under torchrun (N > 1 ranks), every rank lists the same groups and pending cells, then:

1. the feature requests of every pending group are filled, in the order one process asks for them, each request's
   units split across the ranks as `prolip extract` splits them (a barrier after);
2. each group (the cells that share an episode) goes to one rank (:func:`assign`: costliest first, to the least
   loaded rank; :func:`group_cost`), which scores it alone (``distributed.alone``: no collective, the cache's own
   split off) and appends to its own records file (``records.rank-R-of-N.jsonl``);
3. once every rank is done, rank 0 merges the ranks' files into records.jsonl in the order one process writes
   them (``records.merge_rank_records``).

A group's numbers depend on its episode and methods only, never on the rank that scored it (the cache holds the same
features whichever rank computed them), so the merged records are one process's. A finished cell is one in any of
the files, so a re-run at any world size resumes what a killed rank left; one that finds ranks' files writes its own
(rank 0 of 1) and merges them all, so the records come out in the order one uninterrupted process writes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prolip.bench.harness import Bench, Cell, Group, GroupRequests
from prolip.bench.records import RECORDS, merge_rank_records, rank_files, rank_records_path
from prolip.distributed import alone, barrier, rank_world
from prolip.features.cache import Request
from prolip.outputs import writing

if TYPE_CHECKING:
    from prolip.bench.protocols.base import Protocol

# An image-level cell (CLIP-LoRA, fine-tuning) runs the image encoder over its support at every step: far costlier
# than the cached features a feature method reads. A rough weight: the split need only keep such cells apart.
ENCODER_CELL_WEIGHT = 8
KILL_HOOK = "PROLIP_BENCH_KILL_AFTER"  # tests only: "R:K" makes rank R SIGKILL itself after writing K records


# ----------------------------------------------------------------------------------------------- pure


def request_passes(requests: Iterable[Request]) -> int:
    """Forward passes of some cache requests, each (image, view) once per request."""
    return sum(len(r.paths) * max(r.views, 1) for r in requests)


def group_cost(requests: GroupRequests) -> int:
    """The estimated cost of scoring a group once its features are cached: the features each cell reads as if it
    ran alone (its episode's, its own, its test-time views: what the plan's reference count adds up), plus
    ``ENCODER_CELL_WEIGHT`` times the support's passes for each image-level cell; at least 1 a cell."""
    shared = request_passes(requests.shared)
    direct = requests.direct or [0] * len(requests.per_cell)
    alone_ = sum(shared + request_passes(own) + d for own, d in zip(requests.per_cell, direct, strict=True))
    encoder = requests.encoder_cells * ENCODER_CELL_WEIGHT * request_passes(requests.shared[:1])
    return max(alone_ + encoder, len(requests.per_cell))


def assign(costs: Sequence[int], world: int) -> list[int]:
    """The rank of each group: costliest first (ties: the earlier group), each to the rank with the least cost so
    far (ties: the lower rank). Deterministic, so every rank computes the same split without talking."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    loads, owner = [0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owner[i], loads[rank] = rank, loads[rank] + costs[i]
    return owner


def cell_order(groups: Iterable[Group]) -> dict[str, int]:
    """Each cell's place in the run (groups in order, cells in order): where one process writes its record."""
    order: dict[str, int] = {}
    for cell in (c for g in groups for c in g.cells):
        order.setdefault(cell.record.cell, len(order))
    return order


@dataclass(frozen=True)
class Split:
    """Pending groups across ``world`` ranks: each group's estimated cost, cells and rank."""

    world: int
    costs: list[int]
    cells: list[int]
    owner: list[int]

    @classmethod
    def of(cls, costs: Sequence[int], cells: Sequence[int], world: int) -> Split:
        return cls(world, list(costs), list(cells), assign(costs, world))

    def load(self, rank: int) -> int:
        return sum(c for c, o in zip(self.costs, self.owner, strict=True) if o == rank)

    def share(self, rank: int) -> float:
        """The fraction of the scoring cost rank ``rank`` holds."""
        return self.load(rank) / max(sum(self.costs), 1)

    def lines(self) -> list[str]:
        """What ``prolip bench --plan`` says of the split."""
        out = [
            f"split across {self.world} ranks (after the shared extraction; whole groups, balanced by estimated "
            f"cost: the features each cell reads, image-level cells x{ENCODER_CELL_WEIGHT}):"
        ]
        for rank in range(self.world):
            mine = [i for i, o in enumerate(self.owner) if o == rank]
            cells = sum(self.cells[i] for i in mine)
            out.append(f"  rank {rank}: {len(mine)} groups, {cells} cells, {100 * self.share(rank):.0f}% of the cost")
        busiest = max((self.share(r) for r in range(self.world)), default=0.0)
        if busiest:
            out.append(
                f"  scoring: the busiest rank holds {100 * busiest:.0f}% of it, so about {1 / busiest:.1f}x faster "
                f"than one rank (at most {self.world}x)"
            )
        return out


# ----------------------------------------------------------------------------------------------- the run


class RankedRun:
    """This process's part of a bench run: the groups it scores, where it writes them, and the merge at the end.
    Alone and with no ranks' files left, the groups are all its own, listed lazily, and it writes records.jsonl."""

    def __init__(self, b: Bench, protocol: Protocol):
        self.b, self.rank, self.world = b, *rank_world()
        self.out = b.records_path.parent
        groups = list(protocol.groups())
        self.order = cell_order(groups)
        todo = [(g, cells) for g in groups if (cells := b.pending(g.cells))]
        self.sharded = self.world > 1 or bool(rank_files(self.out))
        if self.sharded:
            if self.rank == 0:  # records.jsonl marks the folder as a bench's while only the ranks' files hold records
                with writing(self.out):
                    (self.out / RECORDS).touch()
            b.records_path = rank_records_path(self.out, self.rank, self.world)
        self.written, self._kill = 0, os.environ.get(KILL_HOOK, "")
        if self.world == 1:
            self.mine: Iterable[tuple[Group, list[Cell], GroupRequests]] = _lazily(protocol, todo)
            return
        with alone():  # whatever a protocol does to list its requests, it does without the others
            requests = [protocol.requests(g, cells) for g, cells in todo]
        for r in requests:
            b.prefetch(r)  # every rank takes its units of each request, then waits for the others
        barrier()
        split = Split.of([group_cost(r) for r in requests], [len(c) for _, c in todo], self.world)
        self.mine = [(*t, r) for t, r, o in zip(todo, requests, split.owner, strict=True) if o == self.rank]
        echo = b.echo
        b.echo = lambda line: echo(f"rank {self.rank}/{self.world}: {line}")

    def wrote(self) -> None:
        """After each record this rank writes (the tests' kill hook)."""
        self.written += 1
        if self._kill == f"{self.rank}:{self.written}":
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self) -> Path:
        """Wait for every rank, merge (rank 0), and say where the records are."""
        barrier()
        merged = self.out / RECORDS
        if self.sharded and self.rank == 0:
            added = merge_rank_records(self.out, self.order)
            self.b.echo(f"merged {added} records of the ranks' files into {merged}")
        barrier()  # the others leave once the merged file is whole
        return merged


def _lazily(
    protocol: Protocol, todo: list[tuple[Group, list[Cell]]]
) -> Iterator[tuple[Group, list[Cell], GroupRequests]]:
    for group, cells in todo:
        yield group, cells, protocol.requests(group, cells)
