"""Bench records aggregated into rows (per dataset, per group, averaged over datasets); markdown, CSV, JSON, plots.

Per dataset, a row is the mean ± population std over seeds. A group row (methods entries sharing a ``group``)
averages its members per dataset and seed. An average row is the mean over datasets of the per-dataset means, and
its ± is the population std over seeds of the per-seed dataset means; it exists only when every dataset of its
table is scored on the same seeds — otherwise it says what is missing instead of averaging fewer datasets. For
base-to-new the harmonic mean is taken of the averaged base and new accuracies (per dataset: over seeds; across
datasets: over datasets), as the paper does; the mean of the per-seed harmonic means is kept as ``hm_seed_mean``.
Reference numbers (reference.py: the paper's and the originals') are attached only where the setting matches exactly,
with their source and the label the report shows them under.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prolip.bench.protocols import layout_of, metrics
from prolip.bench.records import LINE_FIELDS, SECTION_FIELDS, SETTING_FIELDS
from prolip.bench.reference import MIXED, NAMED_SETS, reference_for
from prolip.functional import harmonic_mean

SECTION, SETTING, LINE = SECTION_FIELDS, SETTING_FIELDS, LINE_FIELDS  # the record schema's (records.py)
COPIED = LINE + ("group", "members", "varying")
PAPER_FIELDS = (("accuracy", "paper"), ("base", "paper_base"), ("new", "paper_new"), ("hm", "paper_hm"))
HP_SORT_KEYS = ("precision", "lam", "alpha", "lr")  # hyperparameters rows are ordered by, numerically
HP_SYMBOLS = {"lam": "λ", "alpha": "α"}
RANDOM_NOTE = "RANDOM weights: numbers from a randomly initialised model, they say nothing about CLIP or the paper"


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


def line_key(row: dict) -> tuple:
    """What one table line shares across datasets."""
    return tuple(canonical(row.get(k)) for k in LINE)


def section_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in SECTION)


def _scope_key(row: dict) -> tuple:
    """Rows whose averages must cover the same datasets: one section, one source."""
    return section_key(row) + (row.get("source"),)


def _is_transfer_source(row: dict) -> bool:
    return layout_of(row["protocol"]).source_apart and row["dataset"] == row.get("source")


# ----------------------------------------------------------------------------------------------- summaries


def summarise(row: dict) -> dict:
    """Fill a row's metrics from its ``by_seed`` values: mean, std and how many seeds were scored."""
    seeds = list(row["by_seed"].values())
    for m in metrics():
        if not any(m in v for v in seeds):
            continue  # not a metric of this protocol
        values = [v[m] for v in seeds if v.get(m) is not None]
        row[m], row[f"{m}_std"] = mean_std(values) if values else (None, None)
        row[f"{m}_scored"] = len(values)
    if "base" in row and "new" in row:
        # Base-to-new as the paper: HM of the averaged accuracies; the per-seed HMs' mean is secondary.
        row["hm_seed_mean"], row["hm_seed_std"] = row.get("hm"), row.get("hm_std")
        both = row["base"] is not None and row["new"] is not None
        row["hm"], row["hm_std"] = (harmonic_mean(row["base"], row["new"]) if both else None), None
        row["accuracy"], row["accuracy_std"] = row["hm"], None
    row["mean"], row["std"] = row.get("accuracy"), row.get("accuracy_std")
    return row


def _seed_order(seed: Any) -> tuple:
    return numeric_order(seed)


def _dataset_row(records: list[dict]) -> dict:
    last = records[-1]  # a cell recorded twice: the later record wins
    row = {k: last.get(k) for k in LINE + ("dataset", "group")}
    row["kind"] = "dataset"
    row["templates"] = {last["dataset"]: agreed(r.get("templates") for r in records)}
    row["by_seed"] = {str(r.get("seed")): {m: r[m] for m in metrics() if m in r} for r in records}
    row["seeds"] = sorted({r.get("seed") for r in records}, key=_seed_order)
    row["notes"] = sorted({r["note"] for r in records if r.get("note")})
    row["missing"] = []
    row["cost"], row["card"] = _cost(records), _card(records)
    return summarise(row)


def _mean_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return statistics.fmean(values) if values else None


def _cost(records: list[dict]) -> dict:
    """A dataset row's cost over its seeds: mean seconds, forward passes and trainable parameters, peak memory."""
    memory = [r["peak_memory_mb"] for r in records if r.get("peak_memory_mb") is not None]
    per_image = _mean_of(records, "seconds_per_image")  # test-time cells only (older records: none)
    return {
        "seconds": _mean_of(records, "seconds"),
        "forward_passes": _mean_of(records, "forward_passes"),
        "trainable_parameters": _mean_of(records, "trainable_parameters"),
        "peak_memory_mb": max(memory) if memory else None,
        "memory_measure": agreed(r.get("memory_measure") for r in records if r.get("memory_measure")),
    } | ({"seconds_per_image": per_image} if per_image is not None else {})


def _selection_hows(selected: Any) -> list[str]:
    """Every ``how`` a record's ``selected`` holds (a method may select one thing on validation and fix another)."""
    if not isinstance(selected, dict):
        return []
    own = [str(selected["how"])] if "how" in selected else []
    return own + [h for value in selected.values() for h in _selection_hows(value)]


def _card(records: list[dict]) -> dict:
    """What a dataset row's numbers were selected on: how (validation / rule / given / last ...), what the method
    can select, whether a validation set was given, its templates and seeds, and any source or prompt it names."""
    hows: dict[str, int] = defaultdict(int)
    for r in records:
        for how in set(_selection_hows(r.get("selected"))) or {"not recorded"}:
            hows[how] += 1
    extras = {
        key: agreed((r.get("selected") or {}).get(key) for r in records)
        for key in ("source", "template")
        if any(key in (r.get("selected") or {}) for r in records)
    }
    orders = sorted({o["seed"] for r in records for o in r.get("stream_orders") or []})
    if orders:
        extras["stream orders"] = f"seeds {', '.join(map(str, orders))} (accuracy: their mean; worst shown apart)"
    return {
        "hows": dict(hows),
        "selects": agreed(r.get("selects") for r in records),
        "validation": any(r.get("validation") for r in records),
        "templates": {r["dataset"]: len(r.get("templates") or []) for r in records},
        **extras,
    }


def _normalised(record: Mapping[str, Any]) -> dict:
    r = dict(record)
    r["templates_name"] = r.get("templates_name") or "dataset"
    r["random_weights"] = bool(r.get("random_weights"))
    r["hyperparameters"] = r.get("hyperparameters") or {}
    return r


def dataset_rows(records: Iterable[Mapping[str, Any]]) -> list[dict]:
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in map(_normalised, records):
        cells[line_key(r) + (r["dataset"],)].append(r)
    return [_dataset_row(rs) for rs in cells.values()]


# ----------------------------------------------------------------------------------------------- combining rows


def _scoring_problem(row: dict, metric: str) -> str | None:
    """Why ``row`` cannot enter a combination for ``metric`` (None: it can)."""
    n = len(row["by_seed"])
    scored = sum(1 for v in row["by_seed"].values() if v.get(metric) is not None)
    if n and scored == n:
        return None
    why = "; ".join(row.get("notes") or row.get("missing") or []) or "no value recorded"
    return f"not scored ({why})" if scored == 0 else f"scored on {scored} of {n} seeds ({why})"


def _grouped_problems(found: list[tuple[str, str]]) -> list[str]:
    """[(name, problem)] → one line per problem naming everything it hits (so one footnote says it once)."""
    names: dict[str, list[str]] = defaultdict(list)
    for name, problem in found:
        names[problem].append(name)
    return [f"{', '.join(sorted(ns))}: {problem}" for problem, ns in names.items()]


def combine(rows: list[dict], expected: Iterable[str], name_of: Callable[[dict], str]) -> tuple[dict, list[str]]:
    """Per-seed means over ``rows`` (one per expected name), and what prevents them: a metric is combined only
    when every expected row is there, all on the same seeds, each scored on every seed."""
    absent = sorted(set(expected) - {name_of(r) for r in rows})
    problems = [f"no records for {', '.join(absent)}"] if absent else []
    seed_sets = {frozenset(r["by_seed"]) for r in rows}
    if len(seed_sets) > 1:
        problems.append("different seeds for " + ", ".join(sorted(map(name_of, rows))))
    present = [m for m in metrics() if any(m in v for r in rows for v in r["by_seed"].values())]
    usable, blocked_everywhere = {}, bool(problems)
    for m in present:
        found = [(name_of(r), p) for r in rows if (p := _scoring_problem(r, m))]
        usable[m] = not blocked_everywhere and not found
        problems += [p for p in _grouped_problems(found) if p not in problems]
    common = sorted(set.intersection(*map(set, seed_sets)) if rows else set(), key=_seed_order)
    by_seed = {
        s: {m: statistics.fmean(r["by_seed"][s][m] for r in rows) if usable[m] else None for m in present}
        for s in common
    }
    return by_seed, problems


def _agreed_seeds(rows: list[dict]) -> Any:
    return agreed(r["seeds"] for r in rows)


def _merged_templates(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.update(r.get("templates") or {})
    return out


def _split_hyperparameters(hps: list[dict]) -> tuple[dict, dict]:
    """(the hyperparameters all members share, {key: sorted distinct values} for the others)."""
    keys = set().union(*hps)
    common = {k: hps[0][k] for k in keys if all(k in h and canonical(h[k]) == canonical(hps[0][k]) for h in hps)}
    varying = {
        k: sorted({canonical(h.get(k)): h.get(k) for h in hps}.values(), key=numeric_order) for k in keys - set(common)
    }
    return common, varying


def _group_row(rows: list[dict], group: str, members: list[dict]) -> dict:
    by_seed, problems = combine(rows, [m["label"] for m in members], name_of=lambda r: r["label"])
    common, varying = _split_hyperparameters([m["hyperparameters"] for m in members])
    first = rows[0]
    row = {k: first.get(k) for k in LINE + ("dataset",)}
    members = sorted(members, key=line_order(members))
    row.update(
        kind="group",
        label=group,
        group=group,
        members=[m["label"] for m in members],
        method=agreed(m["method"] for m in members),
        hyperparameters=common,
        varying=varying,
        templates=_merged_templates(rows),
        by_seed=by_seed,
        seeds=_agreed_seeds(rows),
        notes=[],
        missing=problems,
    )
    return summarise(row)


def group_rows(rows: list[dict]) -> list[dict]:
    """One row per group, shots and dataset: the mean of the group's members (e.g. over lr)."""
    members: dict[tuple, dict[str, dict]] = defaultdict(dict)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    not_member = ("label", "method", "hyperparameters", "shots")
    for r in rows:
        # A protocol may form no groups (a sweep: each row is one point, a group would mix points).
        if r.get("group") and layout_of(r["protocol"]).groups:
            scope = tuple(canonical(r.get(k)) for k in LINE if k not in not_member) + (r["group"],)
            members[scope].setdefault(r["label"], r)
            cells[scope + (r["shots"], r["dataset"])].append(r)
    return [_group_row(rs, key[-3], list(members[key[:-2]].values())) for key, rs in cells.items()]


def _average_row(rows: list[dict], datasets: frozenset, title: str, subset: str | None) -> dict:
    by_seed, problems = combine(rows, datasets, name_of=lambda r: r["dataset"])
    first = rows[0]
    row = {k: first.get(k) for k in COPIED}
    row.update(
        kind="average",
        of=first["kind"],
        dataset=title,
        datasets=sorted(datasets),
        subset=subset,
        templates=_merged_templates(rows),
        by_seed=by_seed,
        seeds=_agreed_seeds(rows),
        notes=[],
        missing=problems,
    )
    return summarise(row)


def _expected_datasets(rows: list[dict]) -> dict[tuple, frozenset]:
    expected: dict[tuple, set] = defaultdict(set)
    for r in rows:
        if not _is_transfer_source(r):
            expected[_scope_key(r)].add(r["dataset"])
    return {k: frozenset(v) for k, v in expected.items()}


def average_rows(rows: list[dict]) -> list[dict]:
    """Per table line, the average over all the table's datasets (transfer: over the targets, the source apart),
    and over each named subset the table holds among other datasets (e.g. the ImageNet variants)."""
    expected = _expected_datasets(rows)
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if not _is_transfer_source(r):
            lines[line_key(r)].append(r)
    out = []
    for rs in lines.values():
        full = expected[_scope_key(rs[0])]
        what = layout_of(rs[0]["protocol"]).average_title
        out.append(_average_row(rs, full, f"{what} ({len(full)})", None))
        for name, subset in NAMED_SETS.items():
            if subset < full:
                part = [r for r in rs if r["dataset"] in subset]
                out.append(_average_row(part, subset, f"average, {name} ({len(subset)})", name))
    return out


def attach_references(rows: list[dict]) -> None:
    for row in rows:
        datasets = frozenset(row["datasets"]) if row["kind"] == "average" else row["dataset"]
        for metric, field in PAPER_FIELDS:
            ref = reference_for(row, datasets, metric) if row.get(metric) is not None else None
            if ref is not None:
                row[field], row["paper_source"], row["paper_label"] = ref.value, ref.source, ref.short


def aggregate(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-dataset rows, group rows and average rows (``kind``), each with ``paper`` fields where a reference
    matches exactly. Rows carry ``mean``/``std`` for the headline metric and ``<metric>``/``<metric>_std``."""
    rows = dataset_rows(records)
    rows += group_rows(rows)
    rows += average_rows(rows)
    attach_references(rows)
    return rows


# ----------------------------------------------------------------------------------------------- line names and order


def _differing_fields(rows: list[dict]) -> list[tuple[str, str]]:
    """Hyperparameters (then settings) whose values differ among rows that share a label."""
    keys = sorted(
        set().union(*(r.get("hyperparameters") or {} for r in rows)),
        key=lambda k: (HP_SORT_KEYS.index(k) if k in HP_SORT_KEYS else len(HP_SORT_KEYS), k),
    )
    out = [("hp", k) for k in keys if len({canonical((r.get("hyperparameters") or {}).get(k)) for r in rows}) > 1]
    out += [("setting", f) for f in SETTING if len({canonical(r.get(f)) for r in rows}) > 1]
    return out


def _describe(row: dict, field: tuple[str, str]) -> str:
    where, key = field
    value = (row.get("hyperparameters") or {}).get(key) if where == "hp" else row.get(key)
    text = format_number(value) if not isinstance(value, dict) else canonical(value)
    return f"{HP_SYMBOLS.get(key, key)}={text[:12]}"


def display_names(rows: list[dict]) -> dict[tuple, str]:
    """Line key → name: the label, plus what tells apart lines sharing a label and shots (a sweep's lr and λ)."""
    lines: dict[tuple, dict] = {}
    for r in rows:
        lines.setdefault(line_key(r), r)
    by_label: dict[tuple, list[tuple]] = defaultdict(list)
    for key, r in lines.items():
        by_label[(r["label"], canonical(r["shots"]))].append((key, r))
    names = {}
    for (label, _), members in by_label.items():
        differing = _differing_fields([r for _, r in members]) if len(members) > 1 else []
        for key, r in members:
            names[key] = " ".join([label] + [_describe(r, f) for f in differing])
    return names


def line_order(rows: list[dict]) -> Callable[[dict], tuple]:
    """Sort key for table lines: shots, methods in the order they were run, a method's group rows after its runs,
    then precision, λ, α and lr: numbers ascending, then words and rules (1/N) in the order they were run."""
    rank: dict[str, int] = {}
    for r in rows:
        rank.setdefault(canonical(r.get("method")), len(rank))
        for k in HP_SORT_KEYS:
            value = (r.get("hyperparameters") or {}).get(k)
            if numeric_order(value)[0] != 0:
                rank.setdefault(canonical([k, value]), len(rank))

    def value_key(k: str, value: Any) -> tuple:
        number = numeric_order(value)
        return number[:2] if number[0] == 0 else (1, rank.get(canonical([k, value]), len(rank)))

    def key(r: dict) -> tuple:
        hp = r.get("hyperparameters") or {}
        derived = r["kind"] == "group" or r.get("of") == "group"
        return (
            numeric_order(r["shots"]),
            rank.get(canonical(r.get("method")), len(rank)),
            derived,
            tuple(value_key(k, hp.get(k)) for k in HP_SORT_KEYS),
            r["label"],
        )

    return key


def ordered_lines(rows: list[dict], key_of: Callable[[dict], tuple] = line_key) -> list[tuple[tuple, dict]]:
    first: dict[tuple, dict] = {}
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
        return bool(method_class(method).learns) if isinstance(method, str) else None
    except ValueError:
        return None


def _baseline_key(row: dict) -> tuple:
    return section_key(row) + (row.get("source"), row["dataset"], canonical(row["shots"]))


def zero_shot_gains(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset and shots, each learning line's mean accuracy minus zero-shot CLIP's on the same dataset, shots,
    backbone, protocol, sampler and templates (both means over seeds); lines without such a zero-shot row are left
    out."""
    base = {
        _baseline_key(r): r
        for r in rows
        if r["kind"] == "dataset" and r.get("mean") is not None and _learns(r.get("method")) is False
    }
    gains = []
    for r in rows:
        zero = base.get(_baseline_key(r)) if r["kind"] in ("dataset", "group") else None
        if zero is not None and r.get("mean") is not None and _learns(r.get("method")):
            gains.append(
                {
                    "row": r,
                    "dataset": r["dataset"],
                    "shots": r["shots"],
                    "accuracy": r["mean"],
                    "zero_shot": zero["mean"],
                    "gain": r["mean"] - zero["mean"],
                }
            )
    return gains
