"""`prolip bench FILE --plan`: what an experiment will ask of the image encoder, before anything is extracted.

The plan walks the same path as the run: the protocol's groups, less the cells already recorded (``Bench.pending``),
each group's episode drawn by :func:`prolip.episode.draw_images` from the bench's own ``EpisodeSpec``, the feature
requests the run's ``EpisodeBuilder`` and protocol make for it, and the cache's read-only
:meth:`~prolip.features.cache.FeatureCache.survey`, which removes what the requests share (across shots, seeds,
protocols and methods) and what is already cached. One batch of images is then timed through the backbone to turn
forward passes into an estimated wall time.

The count is that of the feature cache (``cache.stats.forward_passes`` after the run). Reported beside it, not in
it: test-time views (the tta protocol encodes them directly, uncached) and the passes of methods that train inside
the image encoder. Support center crops are requested lazily, only by methods that read them (the linear probe);
which ones do is found by fitting each method once on a tiny synthetic problem whose center crops record being read.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prolip.bench.experiment import Experiment, MethodSpec
from prolip.bench.protocols import (
    PROTOCOLS,
    BaseToNew,
    Bench,
    Cell,
    Group,
    Sensitivity,
    TestTime,
    Transfer,
)
from prolip.bench.records import done_cells, read_records
from prolip.bench.tta import balanced_subset, starts_from_fit
from prolip.data.sampling import base_new_split
from prolip.episode import EpisodeImages, draw_images, evaluation_images, restrict, support_views
from prolip.features.cache import Request, Survey
from prolip.features.extraction import center_views
from prolip.methods import create, method_class
from prolip.methods.base import NO_CACHED_VIEWS, Support, Task, TensorViews, Validation
from prolip.tta import create as create_test_time


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


@dataclass
class _Tally:
    """Requests of the pending cells: all of them (for the survey) and the passes each cell would pay alone."""

    requests: list[Request] = field(default_factory=list)
    reference: int = 0
    tta: int = 0
    tta_paths: list[Path] = field(default_factory=list)  # the test-time images (timed when nothing else is)
    encoder_cells: int = 0

    def add(self, shared: list[Request], per_cell: list[list[Request]], tta_per_cell: list[int] | None = None) -> None:
        """``tta_per_cell``: the test-time views each cell would encode alone."""
        self.requests += shared + [r for own in per_cell for r in own]
        alone = tta_per_cell or [0] * len(per_cell)
        self.reference += sum(_passes(shared) + _passes(own) + v for own, v in zip(per_cell, alone, strict=True))


def _passes(requests: list[Request]) -> int:
    return sum(len(r.paths) * max(r.views, 1) for r in requests)


# ----------------------------------------------------------------------------------------------- the walk


def plan_experiment(exp: Experiment, backbone=None, *, name: str = "experiment", time_batch: bool = True) -> Plan:
    """The plan of ``exp``'s unfinished cells: nothing is extracted and nothing is written (the records of
    ``exp.out`` are only read, to leave out finished cells)."""
    with tempfile.TemporaryDirectory() as scratch:  # Bench creates its results folder: give it a throwaway one
        b = Bench(dataclasses.replace(exp, out=scratch), echo=lambda _: None, backbone=backbone)
    b.records_path = Path(exp.out).expanduser() / "records.jsonl"
    b.finished = done_cells(read_records(b.records_path)) if b.records_path.exists() else set()
    protocol = PROTOCOLS[exp.protocol](b)
    tally, cells, probe = _Tally(), 0, _CenterProbe(b)
    for group in protocol.groups():
        cells += len(group.cells)
        todo = b.pending(group.cells)
        if todo:
            _group_requests(protocol, b, group, todo, tally, probe)
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
        notes=probe.notes,
    )
    sample = [p for r in tally.requests for p in r.paths] + tally.tta_paths
    if time_batch and survey.forward_passes + tally.tta and sample:
        plan.seconds_per_pass, plan.timed_batch = _time_one_batch(b, sample)
    return plan


def _group_requests(protocol, b: Bench, group: Group, todo: list[Cell], tally: _Tally, probe: _CenterProbe) -> None:
    """What the run's protocol asks the cache for when it scores ``todo`` of ``group`` (see protocols.py)."""
    splits = b.splits(group.dataset)
    if isinstance(protocol, TestTime):
        return _test_time_requests(b, group, todo, tally, probe)
    classes = tuple(base_new_split(len(splits.classnames))[0]) if isinstance(protocol, BaseToNew) else None
    drawn, shared = _episode_requests(b, splits, group.shots, group.seed, classes)
    if isinstance(protocol, BaseToNew):
        new_images = restrict(evaluation_images(splits), base_new_split(len(splits.classnames))[1])
        shared.append(Request(_paths(new_images)))
    per_cell = []
    fitted: set[str] = set()  # transfer and sensitivity fit a method once for all its cells
    once = isinstance(protocol, (Transfer, Sensitivity))
    for cell in todo:
        own = [] if once and cell.method.label in fitted else _method_requests(b, cell, drawn, probe, tally)
        fitted.add(cell.method.label)
        if isinstance(protocol, Transfer) and cell.target is not None:
            own.append(Request(_paths(evaluation_images(b.splits(cell.target)))))
        per_cell.append(own)
    tally.add(shared, per_cell)


def _episode_requests(
    b: Bench, splits, shots: int, seed: int | None, classes=None
) -> tuple[EpisodeImages, list[Request]]:
    """The requests of ``EpisodeBuilder.build``: the support's views, then validation and evaluation center crops."""
    assert seed is not None
    spec = b.spec(shots, seed, classes)
    drawn = draw_images(splits, spec)
    requests = [
        Request(_paths(drawn.support), support_views(spec.augmentation, spec.views), spec.aug_seed, spec.augmentation)
    ]
    if spec.validation:
        requests.append(Request(_paths(drawn.validation)))
    if len(drawn.evaluation):
        requests.append(Request(_paths(drawn.evaluation)))
    return drawn, requests


def _method_requests(b: Bench, cell: Cell, drawn: EpisodeImages, probe: _CenterProbe, tally: _Tally) -> list[Request]:
    """What fitting the cell's method adds: its own augmentation's views (``Episode.support_for``) and the
    support's center crops when it reads them."""
    cls = method_class(cell.method.name)
    support = _paths(drawn.support)
    out = []
    if cls.augmentation not in (b.augmentation, NO_CACHED_VIEWS):
        out.append(Request(support, b.exp.views, b.exp.aug_seed, cls.augmentation))
    if cls.encodes_images:
        tally.encoder_cells += 1
    elif probe.reads_center(cell.method, cell.record["hyperparameters"]):
        out.append(Request(support))
    return out


def _test_time_requests(b: Bench, group: Group, todo: list[Cell], tally: _Tally, probe: _CenterProbe) -> None:
    """bench/tta.py: cells that start from a fit fit on (``tta.train_on`` or the dataset, shots, seed); the
    ``tta.views`` views of each evaluation image are then encoded once, directly, and shared by every cell, of which
    each reads the views its test-time method declares (what each would encode alone)."""
    t = b.exp.tta
    splits = b.splits(group.dataset)
    images = balanced_subset(evaluation_images(splits), t.max_images)
    per_cell, alone = [], []
    for cell in todo:
        own: list[Request] = []
        if starts_from_fit(cell):
            drawn, episode = _episode_requests(
                b, b.splits(t.train_on or group.dataset), cell.extra["shots"], cell.extra["seed"]
            )
            own = episode + _method_requests(b, cell, drawn, probe, tally)
        per_cell.append(own)
        method = create_test_time(cell.extra["test_time"].name, **t.settings_for(cell.extra["test_time"]))
        alone.append(len(images) * method.views_read(t.views, splits.name))
    tally.tta += len(images) * t.views
    tally.tta_paths += [it.path for it in images.items]
    tally.add([], per_cell, tta_per_cell=alone)


def _paths(images) -> tuple[Path, ...]:
    return tuple(it.path for it in images.items)


# ----------------------------------------------------------------------------------------------- center-crop probe


class _CenterProbe:
    """Whether a method, with given hyperparameters, reads the support's center crops."""

    def __init__(self, b: Bench):
        self.b = b
        self.notes: list[str] = []
        self._memo: dict[tuple, bool] = {}

    def reads_center(self, m: MethodSpec, hyperparameters: dict[str, Any]) -> bool:
        key = (m.name, repr(sorted(hyperparameters.items())), self.b.validates(m))
        if key not in self._memo:
            self._memo[key] = self._probe(m, hyperparameters)
        return self._memo[key]

    def _probe(self, m: MethodSpec, hyperparameters: dict[str, Any]) -> bool:
        read: list[bool] = []
        task, support, val = _tiny_problem(lambda: read.append(True))
        try:
            create(m.name, **hyperparameters).fit(task, support, val if self.b.validates(m) else None, seed=0)
        except Exception as e:  # noqa: BLE001 - any failure: count the crops, and say so
            self.notes.append(
                f"{m.label}: could not tell whether it reads the support's center crops ({e}); counted them"
            )
            return True
        return bool(read)


def _tiny_problem(on_center: Callable[[], None]) -> tuple[Task, Support, Validation]:
    """Two classes, two shots, 8 → 4 features, two views: enough for any method on cached features to fit."""
    g = torch.Generator().manual_seed(0)
    classes, shots, d_pre, d = 2, 2, 8, 4
    classifier = F.normalize(torch.randn(classes, d, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(shots)
    z = torch.randn(2, classes * shots, d_pre, generator=g)
    task = Task(
        W0=torch.randn(d_pre, d, generator=g) * 0.3,
        bias=None,
        classifier=classifier,
        logit_scale=100.0,
        shots=shots,
        text_mean=classifier * 10.0,
    )
    task.text_proj = torch.eye(d) + 0.01 * torch.randn(d, d, generator=g)
    task.text_pre = classifier[:, None, :].repeat(1, 2, 1)

    def center() -> torch.Tensor:
        on_center()
        return z[0]

    return task, Support(TensorViews(z), labels, center=center), Validation(z[1], labels)


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
    return "\n".join(lines + plan.notes)


def _time_line(plan: Plan) -> str:
    passes = plan.survey.forward_passes + plan.tta_passes
    if not passes:
        return "estimated extraction time: none (everything is cached)"
    if plan.seconds_per_pass is None:
        return "estimated extraction time: not timed"
    seconds = passes * plan.seconds_per_pass
    return (
        f"estimated extraction time: {_duration(seconds)} at {plan.seconds_per_pass * 1000:.1f} ms per forward "
        f"pass (one timed batch of {plan.timed_batch} on {plan.device}); training and scoring not included"
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
