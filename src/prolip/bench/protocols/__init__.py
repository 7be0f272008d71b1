"""The bench's protocols, one module each, and the loop that runs any of them.

Importing this package registers the built-in protocols (in this order: the experiment parser lists them so); a
protocol defined elsewhere registers itself the same way, by subclassing :class:`Protocol` with a ``name``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prolip.bench.harness import Bench, Cell, Group, GroupRequests
from prolip.bench.protocols.base import (
    Protocol,
    ReportLayout,
    available,
    layout_of,
    metrics,
    protocol_class,
    register,
)
from prolip.functional import harmonic_mean

# The order registered is the order the parser lists the protocols in.
# isort: off
from prolip.bench.protocols.fewshot import FewShot, FewShotValidation
from prolip.bench.protocols.sensitivity import Sensitivity
from prolip.bench.protocols.base2new import BaseToNew
from prolip.bench.protocols.transfer import CrossDataset, DomainGeneralisation
from prolip.bench.protocols.tta import TestTime

# isort: on
from prolip.bench.ranks import RankedRun
from prolip.bench.spec import Experiment
from prolip.bench.tta import balanced_subset
from prolip.distributed import alone

Transfer = CrossDataset  # its name before domain generalisation was a class of its own


def run_experiment(exp: Experiment, echo: Callable[[str], None] = print, backbone=None) -> Path:
    """Run every unfinished cell of ``exp``; returns the records file. ``backbone`` skips loading one (tests).
    Before a group is scored, the cache is filled with what its protocol declares (:meth:`Protocol.requests`),
    the same list ``prolip bench --plan`` counts. Under torchrun the ranks split the groups (``bench.ranks``).
    An experiment at several sites (``site: [native, output]``) runs once per site, each on its own backbone."""
    if len(exp.sites) > 1:
        return [run_experiment(one, echo, backbone) for one in exp.per_site()][-1]
    b = Bench(exp, echo, backbone)
    protocol = protocol_class(exp.protocol)(b)
    run = RankedRun(b, protocol)
    with alone():  # each group is scored by one rank, which never waits on the others
        for group, todo, requests in run.mine:
            b.prefetch(requests)
            for cell, seconds in protocol.score(group, todo):
                b.write(cell.record, seconds, protocol.progress(cell))
                run.wrote()
    records = run.finish()
    b.echo(f"{b.ran} cells run, {b.skipped} already done; records in {records}; cache: {b.cache.stats}")
    return records


__all__ = [
    "BaseToNew",
    "Bench",
    "Cell",
    "CrossDataset",
    "DomainGeneralisation",
    "FewShot",
    "FewShotValidation",
    "Group",
    "GroupRequests",
    "Protocol",
    "ReportLayout",
    "Sensitivity",
    "TestTime",
    "Transfer",
    "available",
    "balanced_subset",
    "harmonic_mean",
    "layout_of",
    "metrics",
    "protocol_class",
    "register",
    "run_experiment",
]
