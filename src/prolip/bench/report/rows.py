"""Bench records aggregated into typed rows (per dataset, per group, averaged over datasets).

Per dataset, a row is the mean ± population std over seeds. A group row (methods entries sharing a ``group``)
averages its members per dataset and seed. An average row is the mean over datasets of the per-dataset means, and
its ± is the population std over seeds of the per-seed dataset means; it exists only when every dataset of its
table is scored on the same seeds — otherwise it says what is missing instead of averaging fewer datasets. For
base-to-new the harmonic mean is taken of the averaged base and new accuracies (per dataset: over seeds; across
datasets: over datasets), as the paper does; the mean of the per-seed harmonic means is kept as ``hm_seed_mean``.
Reference numbers (reference.py: the paper's and the originals') are attached only where the setting matches exactly,
with their source and the label the report shows them under.

A row is a :class:`ReportRow`, built once here from typed :class:`~prolip.bench.records.Record` s; the markdown,
figures, CSV and JSON read its fields. Its stored form (:meth:`ReportRow.to_json`, results.json) is the object the
untyped report wrote, and read access by key sees that form, as a Record's does, for code written against it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from prolip.bench.protocols import layout_of, metrics
from prolip.bench.records import LINE_FIELDS, REQUIRED, SECTION_FIELDS, SETTING_FIELDS, Record
from prolip.bench.reference import MIXED, NAMED_SETS, reference_for
from prolip.functional import harmonic_mean

SECTION, SETTING, LINE = SECTION_FIELDS, SETTING_FIELDS, LINE_FIELDS  # the record schema's (records.py)
ACCURACY = "accuracy"  # the headline metric: a row's ``mean`` and ``std``
BASE_NEW = ("base", "new", "hm")  # a base-to-new cell's metrics: its HM is taken of the averaged base and new
PAPER_FIELDS = (("accuracy", "paper"), ("base", "paper_base"), ("new", "paper_new"), ("hm", "paper_hm"))
HP_SORT_KEYS = ("precision", "lam", "alpha", "lr")  # hyperparameters rows are ordered by, numerically
HP_SYMBOLS = {"lam": "λ", "alpha": "α"}
RANDOM_NOTE = "RANDOM weights: numbers from a randomly initialised model, they say nothing about CLIP or the paper"
SELECTION_NAMES = ("source", "template")  # what a method's ``selected`` may name besides how it selected


# ----------------------------------------------------------------------------------------------- small pieces


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and population std (the reference's np.std); None for one value, which has no spread to show."""
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else None)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def numeric_order(value: Any) -> tuple:
    """Sort key: numbers ascending first (also numbers written as text), then rules such as "1/N" by their text."""
    if value is None or isinstance(value, bool):
        return (2, 0.0, str(value))
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def format_number(value: Any) -> str:
    """Powers of ten below 1 as the paper writes them (1e-05 and 0.01 → "1e-5", "1e-2"), other numbers short
    (0.0 → "0", 0.3 → "0.3"), rules such as "1/N" unchanged."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if 0 < abs(value) < 1 and math.isclose(math.log10(abs(value)), round(math.log10(abs(value))), abs_tol=1e-9):
        return f"{'-' if value < 0 else ''}1e{round(math.log10(abs(value)))}"
    return f"{value:g}".replace("e-0", "e-").replace("e+0", "e+")


def agreed(values: Iterable[Any]) -> Any:
    """The one value all records share, or MIXED (which never matches a paper setting)."""
    distinct = {canonical(v): v for v in values}
    return next(iter(distinct.values())) if len(distinct) == 1 else MIXED


def _fields(source: Any, names: Iterable[str]) -> dict[str, Any]:
    """The named schema fields of a record or row (LINE, SECTION, ...), read as attributes."""
    return {k: getattr(source, k) for k in names}


def line_key(row: ReportRow | Record) -> tuple:
    """What one table line shares across datasets."""
    return tuple(canonical(v) for v in _fields(row, LINE).values())


def section_key(row: ReportRow) -> tuple:
    return tuple(_fields(row, SECTION).values())


def _scope_key(row: ReportRow) -> tuple:
    """Rows whose averages must cover the same datasets: one section, one source."""
    return section_key(row) + (row.source,)


def _is_transfer_source(row: ReportRow) -> bool:
    return layout_of(row.protocol).source_apart and row.dataset == row.source


# ----------------------------------------------------------------------------------------------- the row types


class _StoredForm(Mapping[str, Any]):
    """Read access by key to a typed value's stored form (``to_json``), as a Record gives: the tests and
    reference.py's matching read rows as the objects results.json holds. The report's own modules read fields."""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @cached_property
    def _stored(self) -> dict[str, Any]:
        return self.to_json()

    def __getitem__(self, key: str) -> Any:
        return self._stored[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)


@dataclass(frozen=True)
class Summary:
    """One metric of a row over seeds: mean and population std (None: no spread, or not a mean over seeds), and
    how many seeds had a value (None: derived, not averaged; base-to-new's HM of the averaged base and new)."""

    mean: float | None
    std: float | None = None
    scored: int | None = None


@dataclass(frozen=True)
class Cost:
    """What a cell cost, as the mean over its seeds (a table line: over its datasets too); memory: the largest
    peak and how it was measured. ``seconds_per_image``: test-time cells only (older records: None, not shown)."""

    seconds: float | None = None
    forward_passes: float | None = None
    trainable_parameters: float | None = None
    peak_memory_mb: float | None = None
    memory_measure: Any = None
    seconds_per_image: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "seconds": self.seconds,
            "forward_passes": self.forward_passes,
            "trainable_parameters": self.trainable_parameters,
            "peak_memory_mb": self.peak_memory_mb,
            "memory_measure": self.memory_measure,
        }
        return out | ({"seconds_per_image": self.seconds_per_image} if self.seconds_per_image is not None else {})


@dataclass(frozen=True)
class Card:
    """What a dataset row's numbers were selected on: how (validation / rule / given / last ...: cells each), what
    the method can select, whether a validation set was given, templates per dataset, and the stream orders."""

    hows: dict[str, int]
    selects: Any
    validation: bool
    templates: dict[str, int]
    # What the methods' own ``selected`` names (SELECTION_NAMES): each method writes its own, so only the names
    # some record holds are here, as that record's free-form JSON holds them.
    named: dict[str, Any] = field(default_factory=dict)
    stream_orders: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"hows": self.hows, "selects": self.selects, "validation": self.validation, "templates": self.templates}
        return out | self.named | ({"stream orders": self.stream_orders} if self.stream_orders else {})


# The stored form's keys of each kind of row, in the order the untyped report wrote them (before the metrics).
_HEAD = {
    "dataset": (*LINE, "dataset", "group", "kind"),
    "group": (*LINE, "dataset", "kind", "group", "members", "varying"),
    "average": (*LINE, "group", "members", "varying", "kind", "of", "dataset", "datasets", "subset"),
}
_BODY = ("templates", "by_seed", "seeds", "notes", "missing")


@dataclass(frozen=True, kw_only=True, eq=False)
class ReportRow(_StoredForm):
    """One line of one table for one dataset (``kind`` "dataset"), a group's mean ("group"), or an average over
    datasets ("average": ``dataset`` is its title, ``datasets`` what it averages, ``of`` the kind of rows)."""

    kind: str
    protocol: str
    model: str | None
    weights: str | None
    random_weights: bool
    sampler: str | None
    templates_name: str
    source: str | None
    fingerprint: str | None
    views: int | None
    aug_seed: int | None
    validation: bool | None
    setting: dict[str, Any] | None
    label: str
    method: Any  # a method name, or MIXED for a group of several
    hyperparameters: dict[str, Any]
    shots: Any
    dataset: str
    group: str | None = None
    members: list[str] | None = None  # a group's member labels (average rows: copied from what they average)
    varying: dict[str, list] | None = None  # a group's hyperparameters that differ among members: their values
    of: str | None = None
    datasets: list[str] | None = None
    subset: str | None = None  # an average over a named subset (NAMED_SETS); None: over the whole table
    templates: dict[str, Any] = field(default_factory=dict)  # dataset -> its templates (or MIXED)
    by_seed: dict[str, dict[str, Any]] = field(default_factory=dict)  # seed -> metric -> value
    seeds: Any = ()  # the seeds, sorted (or MIXED when combined rows disagree)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # what keeps a combination from being shown
    cost: Cost | None = None  # dataset rows
    card: Card | None = None  # dataset rows
    # The metrics a protocol declares (Protocol.metrics) stay a mapping, metric -> Summary: which a row has is its
    # protocol's declaration, so the report reads them by name and never needs to know a protocol.
    metrics: dict[str, Summary] = field(default_factory=dict)
    hm_seed: Summary | None = None  # base-to-new: the mean ± std of the per-seed harmonic means
    references: dict[str, float] = field(default_factory=dict)  # metric -> the reference number for this setting
    paper_source: str | None = None
    paper_label: str | None = None

    # -- metrics ---------------------------------------------------------------------------------------------
    def mean_of(self, metric: str) -> float | None:
        summary = self.metrics.get(metric)
        return None if summary is None else summary.mean

    def std_of(self, metric: str) -> float | None:
        summary = self.metrics.get(metric)
        return None if summary is None else summary.std

    def scored_of(self, metric: str) -> int | None:
        summary = self.metrics.get(metric)
        return None if summary is None else summary.scored

    @property
    def mean(self) -> float | None:
        return self.mean_of(ACCURACY)

    @property
    def std(self) -> float | None:
        return self.std_of(ACCURACY)

    @property
    def base_new(self) -> bool:
        """Whether the row's cells are base / new / HM."""
        return all(m in self.metrics for m in BASE_NEW[:2])

    @property
    def paper(self) -> float | None:
        """The reference number for the headline metric."""
        return self.references.get(ACCURACY)

    @property
    def reference_label(self) -> str:
        return self.paper_label or "paper"

    # -- the stored form -------------------------------------------------------------------------------------
    def to_json(self, *, by_seed: bool = True) -> dict[str, Any]:
        """The object the untyped report held (results.json: without ``by_seed``), keys in its order."""
        out = _fields(self, _HEAD[self.kind]) | _fields(self, _BODY)
        if self.kind == "dataset":
            out |= {"cost": self.cost and self.cost.to_json(), "card": self.card and self.card.to_json()}
        averaged = {m: s for m, s in self.metrics.items() if s.scored is not None}
        for m, s in averaged.items():
            out |= {m: s.mean, f"{m}_std": s.std, f"{m}_scored": s.scored}
        if self.hm_seed is not None:
            out |= {"hm_seed_mean": self.hm_seed.mean, "hm_seed_std": self.hm_seed.std}
        for m, s in self.metrics.items():
            if m not in averaged:  # derived after the seeds (base-to-new's HM): written after them
                out |= {m: s.mean, f"{m}_std": s.std}
        out |= {"mean": self.mean, "std": self.std}
        for metric, name in PAPER_FIELDS:
            if metric in self.references:
                out[name] = self.references[metric]
                out.setdefault("paper_source", self.paper_source)
                out.setdefault("paper_label", self.paper_label)
        return out if by_seed else {k: v for k, v in out.items() if k != "by_seed"}


def _summaries(by_seed: dict[str, dict[str, Any]]) -> tuple[dict[str, Summary], Summary | None]:
    """A row's metrics from its per-seed values, and (base-to-new) the per-seed harmonic means' summary."""
    seeds = list(by_seed.values())
    out = {}
    for m in metrics():
        if not any(m in v for v in seeds):
            continue  # not a metric of this protocol
        values = [v[m] for v in seeds if v.get(m) is not None]
        mean, std = mean_std(values) if values else (None, None)
        out[m] = Summary(mean, std, len(values))
    base, new, hm = BASE_NEW
    if base not in out or new not in out:
        return out, None
    # Base-to-new as the paper: HM of the averaged accuracies; the per-seed HMs' mean is secondary.
    per_seed = out.get(hm, Summary(None))
    b, n = out[base].mean, out[new].mean
    value = harmonic_mean(b, n) if b is not None and n is not None else None
    out[hm] = Summary(value, None, per_seed.scored)
    out[ACCURACY] = Summary(value, None, out[ACCURACY].scored if ACCURACY in out else None)
    return out, Summary(per_seed.mean, per_seed.std)


def _row(by_seed: dict[str, dict[str, Any]], **values: Any) -> ReportRow:
    """A row with its metrics summarised from ``by_seed``."""
    summaries, hm_seed = _summaries(by_seed)
    return ReportRow(by_seed=by_seed, metrics=summaries, hm_seed=hm_seed, **values)


# ----------------------------------------------------------------------------------------------- from records


@dataclass(frozen=True)
class _Results:
    """What the report reads of one record's results: its metrics, note, cost and what it selected."""

    values: dict[str, Any]
    note: str | None
    cost: Cost  # this one cell's, as recorded
    hows: list[str]
    named: dict[str, Any]
    stream_order_seeds: list[Any]


COST_MEANS = ("seconds", "forward_passes", "trainable_parameters", "seconds_per_image")  # means over seeds


def _selection_hows(selected: Any) -> list[str]:
    """Every ``how`` a record's ``selected`` holds (a method may select one thing on validation and fix another)."""
    if not isinstance(selected, dict):
        return []
    own = [str(selected["how"])] if "how" in selected else []
    return own + [h for value in selected.values() for h in _selection_hows(value)]


def _results_of(record: Record) -> _Results:
    """The one place the report reads a record's ``results`` by key: they are the record's free-form JSON (what
    scoring wrote, records.py), so what it holds is named here, once."""
    results = record.results
    selected = results.get("selected") or {}
    return _Results(
        values={m: results[m] for m in metrics() if m in results},
        note=record.note,
        cost=Cost(
            **{k: results.get(k) for k in COST_MEANS},
            peak_memory_mb=results.get("peak_memory_mb"),
            memory_measure=results.get("memory_measure"),
        ),
        hows=sorted(set(_selection_hows(selected))) or ["not recorded"],
        named={k: selected[k] for k in SELECTION_NAMES if isinstance(selected, dict) and k in selected},
        stream_order_seeds=[o["seed"] for o in results.get("stream_orders") or []],
    )


def _mean_of(values: Iterable[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.fmean(numbers) if numbers else None


def _cost(costs: list[Cost]) -> Cost:
    """A dataset row's cost over its seeds: mean seconds, forward passes and trainable parameters, peak memory."""
    memory = [c.peak_memory_mb for c in costs if c.peak_memory_mb is not None]
    return Cost(
        **{k: _mean_of(getattr(c, k) for c in costs) for k in COST_MEANS},
        peak_memory_mb=max(memory) if memory else None,
        memory_measure=agreed(c.memory_measure for c in costs if c.memory_measure),
    )


def _card(records: list[Record], results: list[_Results]) -> Card:
    """What a dataset row's numbers were selected on: how (validation / rule / given / last ...), what the method
    can select, whether a validation set was given, its templates and seeds, and any source or prompt it names."""
    hows: dict[str, int] = defaultdict(int)
    for r in results:
        for how in r.hows:
            hows[how] += 1
    names = [key for key in SELECTION_NAMES if any(key in r.named for r in results)]
    orders = sorted({seed for r in results for seed in r.stream_order_seeds})
    stream = f"seeds {', '.join(map(str, orders))} (accuracy: their mean; worst shown apart)" if orders else None
    return Card(
        hows=dict(hows),
        selects=agreed(r.selects for r in records),
        validation=any(r.validation for r in records),
        templates={r.dataset: len(r.templates or []) for r in records},
        named={key: agreed(r.named.get(key) for r in results) for key in names},
        stream_orders=stream,
    )


def _seed_order(seed: Any) -> tuple:
    return numeric_order(seed)


def _dataset_row(records: list[Record]) -> ReportRow:
    last = records[-1]  # a cell recorded twice: the later record wins
    results = [_results_of(r) for r in records]
    return _row(
        {str(r.seed): res.values for r, res in zip(records, results, strict=True)},
        kind="dataset",
        **_fields(last, (*LINE, "dataset", "group")),
        templates={last.dataset: agreed(r.templates for r in records)},
        seeds=sorted({r.seed for r in records}, key=_seed_order),
        notes=sorted({res.note for res in results if res.note}),
        missing=[],
        cost=_cost([res.cost for res in results]),
        card=_card(records, results),
    )


def _record(record: Mapping[str, Any]) -> Record:
    """A record as the report reads it: typed (a stored object without a cell id, or hand-written without some
    required field, reads as null there, as the report always took it), with the report's defaults."""
    if not isinstance(record, Record):
        record = Record.from_json({**dict.fromkeys(REQUIRED), "cell": "", **record})
    return replace(
        record,
        templates_name=record.templates_name or "dataset",
        random_weights=bool(record.random_weights),
        hyperparameters=record.hyperparameters or {},
    )


def dataset_rows(records: Iterable[Mapping[str, Any]]) -> list[ReportRow]:
    cells: dict[tuple, list[Record]] = defaultdict(list)
    for r in map(_record, records):
        cells[line_key(r) + (r.dataset,)].append(r)
    return [_dataset_row(rs) for rs in cells.values()]


# ----------------------------------------------------------------------------------------------- combining rows


def _scoring_problem(row: ReportRow, metric: str) -> str | None:
    """Why ``row`` cannot enter a combination for ``metric`` (None: it can)."""
    n = len(row.by_seed)
    scored = sum(1 for v in row.by_seed.values() if v.get(metric) is not None)
    if n and scored == n:
        return None
    why = "; ".join(row.notes or row.missing or []) or "no value recorded"
    return f"not scored ({why})" if scored == 0 else f"scored on {scored} of {n} seeds ({why})"


def _grouped_problems(found: list[tuple[str, str]]) -> list[str]:
    """[(name, problem)] → one line per problem naming everything it hits (so one footnote says it once)."""
    names: dict[str, list[str]] = defaultdict(list)
    for name, problem in found:
        names[problem].append(name)
    return [f"{', '.join(sorted(ns))}: {problem}" for problem, ns in names.items()]


def combine(
    rows: list[ReportRow], expected: Iterable[str], name_of: Callable[[ReportRow], str]
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per-seed means over ``rows`` (one per expected name), and what prevents them: a metric is combined only
    when every expected row is there, all on the same seeds, each scored on every seed."""
    absent = sorted(set(expected) - {name_of(r) for r in rows})
    problems = [f"no records for {', '.join(absent)}"] if absent else []
    seed_sets = {frozenset(r.by_seed) for r in rows}
    if len(seed_sets) > 1:
        problems.append("different seeds for " + ", ".join(sorted(map(name_of, rows))))
    present = [m for m in metrics() if any(m in v for r in rows for v in r.by_seed.values())]
    usable, blocked_everywhere = {}, bool(problems)
    for m in present:
        found = [(name_of(r), p) for r in rows if (p := _scoring_problem(r, m))]
        usable[m] = not blocked_everywhere and not found
        problems += [p for p in _grouped_problems(found) if p not in problems]
    common = sorted(set.intersection(*map(set, seed_sets)) if rows else set(), key=_seed_order)
    by_seed = {
        s: {m: statistics.fmean(r.by_seed[s][m] for r in rows) if usable[m] else None for m in present} for s in common
    }
    return by_seed, problems


def _agreed_seeds(rows: list[ReportRow]) -> Any:
    return agreed(r.seeds for r in rows)


def _merged_templates(rows: list[ReportRow]) -> dict:
    out: dict = {}
    for r in rows:
        out.update(r.templates or {})
    return out


def _split_hyperparameters(hps: list[dict]) -> tuple[dict, dict]:
    """(the hyperparameters all members share, {key: sorted distinct values} for the others)."""
    keys = set().union(*hps)
    common = {k: hps[0][k] for k in keys if all(k in h and canonical(h[k]) == canonical(hps[0][k]) for h in hps)}
    varying = {
        k: sorted({canonical(h.get(k)): h.get(k) for h in hps}.values(), key=numeric_order) for k in keys - set(common)
    }
    return common, varying


def _group_row(rows: list[ReportRow], group: str, members: list[ReportRow]) -> ReportRow:
    by_seed, problems = combine(rows, [m.label for m in members], name_of=lambda r: r.label)
    common, varying = _split_hyperparameters([m.hyperparameters for m in members])
    members = sorted(members, key=line_order(members))
    line = _fields(rows[0], LINE) | {
        "label": group,
        "method": agreed(m.method for m in members),
        "hyperparameters": common,
    }
    return _row(
        by_seed,
        kind="group",
        **line,
        dataset=rows[0].dataset,
        group=group,
        members=[m.label for m in members],
        varying=varying,
        templates=_merged_templates(rows),
        seeds=_agreed_seeds(rows),
        notes=[],
        missing=problems,
    )


def group_rows(rows: list[ReportRow]) -> list[ReportRow]:
    """One row per group, shots and dataset: the mean of the group's members (e.g. over lr)."""
    members: dict[tuple, dict[str, ReportRow]] = defaultdict(dict)
    cells: dict[tuple, list[ReportRow]] = defaultdict(list)
    not_member = ("label", "method", "hyperparameters", "shots")
    for r in rows:
        # A protocol may form no groups (a sweep: each row is one point, a group would mix points).
        if r.group and layout_of(r.protocol).groups:
            scope = tuple(canonical(v) for k, v in _fields(r, LINE).items() if k not in not_member) + (r.group,)
            members[scope].setdefault(r.label, r)
            cells[scope + (r.shots, r.dataset)].append(r)
    return [_group_row(rs, key[-3], list(members[key[:-2]].values())) for key, rs in cells.items()]


def _average_row(rows: list[ReportRow], datasets: frozenset, title: str, subset: str | None) -> ReportRow:
    by_seed, problems = combine(rows, datasets, name_of=lambda r: r.dataset)
    first = rows[0]
    return _row(
        by_seed,
        kind="average",
        **_fields(first, (*LINE, "group", "members", "varying")),
        of=first.kind,
        dataset=title,
        datasets=sorted(datasets),
        subset=subset,
        templates=_merged_templates(rows),
        seeds=_agreed_seeds(rows),
        notes=[],
        missing=problems,
    )


def _expected_datasets(rows: list[ReportRow]) -> dict[tuple, frozenset]:
    expected: dict[tuple, set] = defaultdict(set)
    for r in rows:
        if not _is_transfer_source(r):
            expected[_scope_key(r)].add(r.dataset)
    return {k: frozenset(v) for k, v in expected.items()}


def average_rows(rows: list[ReportRow]) -> list[ReportRow]:
    """Per table line, the average over all the table's datasets (transfer: over the targets, the source apart),
    and over each named subset the table holds among other datasets (e.g. the ImageNet variants)."""
    expected = _expected_datasets(rows)
    lines: dict[tuple, list[ReportRow]] = defaultdict(list)
    for r in rows:
        if not _is_transfer_source(r):
            lines[line_key(r)].append(r)
    out = []
    for rs in lines.values():
        full = expected[_scope_key(rs[0])]
        what = layout_of(rs[0].protocol).average_title
        out.append(_average_row(rs, full, f"{what} ({len(full)})", None))
        for name, subset in NAMED_SETS.items():
            if subset < full:
                part = [r for r in rs if r.dataset in subset]
                out.append(_average_row(part, subset, f"average, {name} ({len(subset)})", name))
    return out


def with_references(row: ReportRow) -> ReportRow:
    """The row with the reference numbers that match its setting exactly (reference.py reads its stored form)."""
    datasets = frozenset(row.datasets or ()) if row.kind == "average" else row.dataset
    stored, found, source, label = row.to_json(), {}, None, None
    for metric, _ in PAPER_FIELDS:
        ref = reference_for(stored, datasets, metric) if row.mean_of(metric) is not None else None
        if ref is not None:
            found[metric], source, label = ref.value, ref.source, ref.short
    return replace(row, references=found, paper_source=source, paper_label=label) if found else row


def aggregate(records: Iterable[Mapping[str, Any]]) -> list[ReportRow]:
    """Per-dataset rows, group rows and average rows (``kind``), each with reference numbers where one matches
    exactly. Rows carry ``mean``/``std`` for the headline metric and a :class:`Summary` per metric."""
    rows = dataset_rows(records)
    rows += group_rows(rows)
    rows += average_rows(rows)
    return [with_references(r) for r in rows]


# ----------------------------------------------------------------------------------------------- line names and order


def _differing_fields(rows: list[ReportRow]) -> list[tuple[str, str]]:
    """Hyperparameters (then settings) whose values differ among rows that share a label."""
    keys = sorted(
        set().union(*(r.hyperparameters or {} for r in rows)),
        key=lambda k: (HP_SORT_KEYS.index(k) if k in HP_SORT_KEYS else len(HP_SORT_KEYS), k),
    )
    out = [("hp", k) for k in keys if len({canonical((r.hyperparameters or {}).get(k)) for r in rows}) > 1]
    out += [("setting", f) for f in SETTING if len({canonical(getattr(r, f)) for r in rows}) > 1]
    return out


def _describe(row: ReportRow, field: tuple[str, str]) -> str:
    where, key = field
    value = (row.hyperparameters or {}).get(key) if where == "hp" else getattr(row, key)
    text = format_number(value) if not isinstance(value, dict) else canonical(value)
    return f"{HP_SYMBOLS.get(key, key)}={text[:12]}"


def display_names(rows: list[ReportRow]) -> dict[tuple, str]:
    """Line key → name: the label, plus what tells apart lines sharing a label and shots (a sweep's lr and λ)."""
    lines: dict[tuple, ReportRow] = {}
    for r in rows:
        lines.setdefault(line_key(r), r)
    by_label: dict[tuple, list[tuple[tuple, ReportRow]]] = defaultdict(list)
    for key, r in lines.items():
        by_label[(r.label, canonical(r.shots))].append((key, r))
    names = {}
    for (label, _), members in by_label.items():
        differing = _differing_fields([r for _, r in members]) if len(members) > 1 else []
        for key, r in members:
            names[key] = " ".join([label] + [_describe(r, f) for f in differing])
    return names


def line_order(rows: list[ReportRow]) -> Callable[[ReportRow], tuple]:
    """Sort key for table lines: shots, methods in the order they were run, a method's group rows after its runs,
    then precision, λ, α and lr: numbers ascending, then words and rules (1/N) in the order they were run."""
    rank: dict[str, int] = {}
    for r in rows:
        rank.setdefault(canonical(r.method), len(rank))
        for k in HP_SORT_KEYS:
            value = (r.hyperparameters or {}).get(k)
            if numeric_order(value)[0] != 0:
                rank.setdefault(canonical([k, value]), len(rank))

    def value_key(k: str, value: Any) -> tuple:
        number = numeric_order(value)
        return number[:2] if number[0] == 0 else (1, rank.get(canonical([k, value]), len(rank)))

    def key(r: ReportRow) -> tuple:
        hp = r.hyperparameters or {}
        derived = r.kind == "group" or r.of == "group"
        return (
            numeric_order(r.shots),
            rank.get(canonical(r.method), len(rank)),
            derived,
            tuple(value_key(k, hp.get(k)) for k in HP_SORT_KEYS),
            r.label,
        )

    return key


def ordered_lines(
    rows: list[ReportRow], key_of: Callable[[ReportRow], tuple] = line_key
) -> list[tuple[tuple, ReportRow]]:
    first: dict[tuple, ReportRow] = {}
    for r in rows:
        first.setdefault(key_of(r), r)
    order = line_order(rows)
    return sorted(first.items(), key=lambda kv: order(kv[1]))


# ----------------------------------------------------------------------------------------------- gains over zero-shot


def _learns(method: Any) -> bool | None:
    """Whether a row's method learns from the shots (zero-shot CLIP does not); None when the row mixes methods or
    names one this installation does not have."""
    from prolip.methods import method_class

    try:
        return bool(method_class(method).capabilities.learns) if isinstance(method, str) else None
    except ValueError:
        return None


@dataclass(frozen=True, eq=False)
class Gain(_StoredForm):
    """A learning line's mean accuracy over zero-shot CLIP's on one dataset and shots."""

    row: ReportRow
    dataset: str
    shots: Any
    accuracy: float
    zero_shot: float
    gain: float

    def to_json(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "dataset": self.dataset,
            "shots": self.shots,
            "accuracy": self.accuracy,
            "zero_shot": self.zero_shot,
            "gain": self.gain,
        }


def _baseline_key(row: ReportRow) -> tuple:
    return section_key(row) + (row.source, row.dataset, canonical(row.shots))


def zero_shot_gains(rows: list[ReportRow]) -> list[Gain]:
    """Per dataset and shots, each learning line's mean accuracy minus zero-shot CLIP's on the same dataset, shots,
    backbone, protocol, sampler and templates (both means over seeds); lines without such a zero-shot row are left
    out."""
    base = {
        _baseline_key(r): r for r in rows if r.kind == "dataset" and r.mean is not None and _learns(r.method) is False
    }
    gains = []
    for r in rows:
        zero = base.get(_baseline_key(r)) if r.kind in ("dataset", "group") else None
        if zero is not None and zero.mean is not None and r.mean is not None and _learns(r.method):
            gains.append(Gain(r, r.dataset, r.shots, r.mean, zero.mean, r.mean - zero.mean))
    return gains
