"""`prolip bench FILE --plan`: what an experiment will ask of the image encoder, before anything is extracted.

The plan walks the same path as the run: the protocol's groups, less the cells already recorded (``Bench.pending``),
and for each the feature requests its protocol declares (``Protocol.requests``: the very list the run fills the
cache with before scoring the group, so the two cannot drift), and the cache's read-only
:meth:`~prolip.features.cache.FeatureCache.survey`, which removes what the requests share (across shots, seeds,
protocols and methods) and what is already cached. One batch of images is then timed through the backbone to turn
forward passes into an estimated wall time.

The count is that of the feature cache (``cache.stats.forward_passes`` after the run). Reported beside it, not in
it: test-time views (the tta protocol encodes them directly, uncached) and the passes of methods that train inside
the image encoder. Support center crops are requested lazily, only by methods that read them (the linear probe);
which ones do, each method declares (``Capabilities.reads_center``, held to its fit by ``check_method``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from prolip.bench.harness import Bench, GroupRequests
from prolip.bench.protocols import protocol_class
from prolip.bench.ranks import Split, group_cost
from prolip.bench.ranks import request_passes as _passes
from prolip.bench.records import finished_cells
from prolip.bench.spec import Experiment
from prolip.features.cache import Request, Survey
from prolip.features.extraction import center_views


@dataclass
class Plan:
    experiment: str
    protocol: str
    cells: int
    pending: int
    survey: Survey
    reference_passes: int  # every cell extracting everything it uses, as the reference code's runs do
    requested_passes: int  # the same requests, each (image, view) counted once per request (no cross-request sharing)
    tta_passes: int = 0  # test-time views, encoded directly (not cached)
    encoder_cells: int = 0  # cells of methods that train inside the image encoder (their own passes, not counted)
    cache_root: Path = Path()
    cache_bytes: int = 0
    seconds_per_pass: float | None = None
    timed_batch: int = 0
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    split: Split | None = None  # the pending groups across the ranks asked for (--ranks N > 1)


@dataclass
class _Tally:
    """Requests of the pending cells: all of them (for the survey) and the passes each cell would pay alone."""

    requests: list[Request] = field(default_factory=list)
    reference: int = 0
    tta: int = 0
    tta_paths: list[Path] = field(default_factory=list)  # the test-time images (timed when nothing else is)
    encoder_cells: int = 0
    costs: list[int] = field(default_factory=list)  # each group's estimated cost, as the run splits them
    group_cells: list[int] = field(default_factory=list)

    def add(self, group: GroupRequests) -> None:
        """One group's requests, as its protocol declares them (the run fills the cache with the same list)."""
        self.requests += group.cached()
        alone = group.direct or [0] * len(group.per_cell)
        shared = _passes(group.shared)
        self.reference += sum(shared + _passes(own) + v for own, v in zip(group.per_cell, alone, strict=True))
        self.tta += group.direct_passes
        self.tta_paths += group.direct_paths
        self.encoder_cells += group.encoder_cells
        self.costs.append(group_cost(group))
        self.group_cells.append(len(group.per_cell))


# ----------------------------------------------------------------------------------------------- the walk


def plan_experiment(
    exp: Experiment, backbone=None, *, name: str = "experiment", time_batch: bool = True, ranks: int = 1
) -> Plan:
    """The plan of ``exp``'s unfinished cells: nothing is extracted and nothing is written (the records of
    ``exp.out`` are only read, to leave out finished cells); ``ranks`` > 1: how torchrun ranks would split them."""
    with tempfile.TemporaryDirectory() as scratch:  # Bench creates its results folder: give it a throwaway one
        b = Bench(dataclasses.replace(exp, out=scratch), echo=lambda _: None, backbone=backbone)
    b.finished = finished_cells(Path(exp.out).expanduser())
    protocol = protocol_class(exp.protocol)(b)
    tally, cells = _Tally(), 0
    for group in protocol.groups():
        cells += len(group.cells)
        todo = b.pending(group.cells)
        if todo:
            tally.add(protocol.requests(group, todo))
    survey = b.cache.survey(tally.requests)
    plan = Plan(
        name,
        exp.protocol,
        cells,
        cells - b.skipped,
        survey,
        tally.reference,
        _passes(tally.requests),
        tally.tta,
        tally.encoder_cells,
        b.cache.root,
        _tree_bytes(b.cache.root),
        device=str(b.backbone.device),
        split=Split.of(tally.costs, tally.group_cells, ranks) if ranks > 1 else None,
    )
    sample = [p for r in tally.requests for p in r.paths] + tally.tta_paths
    if time_batch and survey.forward_passes + tally.tta and sample:
        plan.seconds_per_pass, plan.timed_batch = _time_one_batch(b, sample)
    return plan


def plan_sites(exp: Experiment, backbone=None, *, name: str = "experiment", **options) -> list[Plan]:
    """One plan per site the experiment runs at (``site: [native, output]`` runs once per site, as
    ``run_experiment`` does), each named with its site when there are several."""
    several = len(exp.sites) > 1
    return [
        plan_experiment(one, backbone, name=f"{name} ({one.site} site)" if several else name, **options)
        for one in exp.per_site()
    ]


# ----------------------------------------------------------------------------------------------- time and disk


def _time_one_batch(b: Bench, sample: list[Path]) -> tuple[float, int]:
    """Seconds per forward pass: one batch of the experiment's own images (decode, crop, encode), after a one-image
    warm-up, through the extractor the run uses."""
    paths = (sample * (b.cache.batch_size // len(sample) + 1))[: b.cache.batch_size]
    extractor, make_view = b.cache.extractor, center_views(b.backbone.preprocessing)
    extractor.encode([(paths[0], "warm-up")], 1, make_view, skip_bad=True)
    started = time.perf_counter()
    extractor.encode([(p, i) for i, p in enumerate(paths)], 1, make_view, skip_bad=True)
    return (time.perf_counter() - started) / len(paths), len(paths)


def _tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*.safetensors")) if root.is_dir() else 0


# ----------------------------------------------------------------------------------------------- report


def format_plan(plan: Plan) -> str:
    s = plan.survey
    lines = [
        f"plan for {plan.experiment} (protocol {plan.protocol}): {plan.cells} cells, "
        f"{plan.cells - plan.pending} already recorded, {plan.pending} to run",
        f"images: {s.images:,} distinct image files need features",
        f"forward passes: {s.forward_passes:,} to compute, {s.cached_passes:,} already cached "
        f"({plan.requested_passes:,} requested in all; each (image, view) is encoded once)",
        f"  the reference code's structure (every run extracts what it uses): {plan.reference_passes:,} "
        f"({plan.reference_passes / max(s.forward_passes + s.cached_passes, 1):.1f}x)",
    ]
    if plan.tta_passes:
        lines.append(f"  plus {plan.tta_passes:,} test-time views, encoded directly (not cached)")
    if plan.encoder_cells:
        lines.append(
            f"  plus the image-encoder passes of {plan.encoder_cells} cells of methods that train inside "
            "the encoder (not counted)"
        )
    if s.unreadable:
        lines.append(f"  {len(s.unreadable)} images not found: {s.unreadable[0][0]} ...")
    lines.append(
        f"cache: {plan.cache_root} holds {_size(plan.cache_bytes)} ({_size(s.disk_bytes())} in this "
        f"experiment's namespaces); this run adds about {_size(s.forward_passes * s.bytes_per_pass)}"
    )
    lines.append(_time_line(plan))
    lines += plan.split.lines() if plan.split else []
    return "\n".join(lines + plan.notes)


def _time_line(plan: Plan) -> str:
    passes = plan.survey.forward_passes + plan.tta_passes
    if not passes:
        return "estimated extraction time: none (everything is cached)"
    if plan.seconds_per_pass is None:
        return "estimated extraction time: not timed"
    seconds = passes * plan.seconds_per_pass
    ranks = f", about {_duration(seconds / plan.split.world)} on {plan.split.world} ranks" if plan.split else ""
    return (
        f"estimated extraction time: {_duration(seconds)}{ranks} at {plan.seconds_per_pass * 1000:.1f} ms per "
        f"forward pass (one timed batch of {plan.timed_batch} on {plan.device}); training and scoring not included"
    )


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
