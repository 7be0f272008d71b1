"""Aggregate bench records into rows (per dataset, per group, averaged over datasets); markdown, CSV, JSON, plots.

Per dataset, a row is the mean ± population std over seeds. A group row (methods entries sharing a ``group``)
averages its members per dataset and seed. An average row is the mean over datasets of the per-dataset means, and
its ± is the population std over seeds of the per-seed dataset means; it exists only when every dataset of its
table is scored on the same seeds — otherwise it says what is missing instead of averaging fewer datasets. For
base-to-new the harmonic mean is taken of the averaged base and new accuracies (per dataset: over seeds; across
datasets: over datasets), as the paper does; the mean of the per-seed harmonic means is kept as ``hm_seed_mean``.
The paper's numbers (reference.py) are attached only where the setting matches exactly.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import textwrap
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prolip.bench.reference import MIXED, NAMED_SETS, reference_for

PER_SEED_METRICS = ("accuracy", "base", "new", "hm", "start_accuracy", "accuracy_worst")
SECTION = ("protocol", "model", "weights", "random_weights", "sampler", "templates_name")
# Record fields that, besides the section, label, method and hyperparameters, make two results different rows.
SETTING = ("source", "fingerprint", "views", "aug_seed", "validation", "setting")
LINE = SECTION + SETTING + ("label", "method", "hyperparameters", "shots")
COPIED = LINE + ("group", "members", "varying")
TRANSFER = ("cross-dataset", "domain-generalisation")
PAPER_FIELDS = (("accuracy", "paper"), ("base", "paper_base"), ("new", "paper_new"), ("hm", "paper_hm"))
HP_SORT_KEYS = ("precision", "lam", "alpha", "lr")  # hyperparameters rows are ordered by, numerically
HP_SYMBOLS = {"lam": "λ", "alpha": "α"}
RANDOM_NOTE = "RANDOM weights: numbers from a randomly initialised model, they say nothing about CLIP or the paper"


# ----------------------------------------------------------------------------------------------- small pieces


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


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


def _agreed(values: Iterable[Any]) -> Any:
    """The one value all records share, or MIXED (which never matches a paper setting)."""
    distinct = {canonical(v): v for v in values}
    return next(iter(distinct.values())) if len(distinct) == 1 else MIXED


def _line_key(row: dict) -> tuple:
    """What one table line shares across datasets."""
    return tuple(canonical(row.get(k)) for k in LINE)


def _section_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in SECTION)


def _scope_key(row: dict) -> tuple:
    """Rows whose averages must cover the same datasets: one section, one source."""
    return _section_key(row) + (row.get("source"),)


def _is_transfer_source(row: dict) -> bool:
    return row["protocol"] in TRANSFER and row["dataset"] == row.get("source")


# ----------------------------------------------------------------------------------------------- summaries


def summarise(row: dict) -> dict:
    """Fill a row's metrics from its ``by_seed`` values: mean, std and how many seeds were scored."""
    seeds = list(row["by_seed"].values())
    for m in PER_SEED_METRICS:
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
    row["templates"] = {last["dataset"]: _agreed(r.get("templates") for r in records)}
    row["by_seed"] = {str(r.get("seed")): {m: r[m] for m in PER_SEED_METRICS if m in r} for r in records}
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
    return {
        "seconds": _mean_of(records, "seconds"),
        "forward_passes": _mean_of(records, "forward_passes"),
        "trainable_parameters": _mean_of(records, "trainable_parameters"),
        "peak_memory_mb": max(memory) if memory else None,
        "memory_measure": _agreed(r.get("memory_measure") for r in records if r.get("memory_measure")),
    }


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
        key: _agreed((r.get("selected") or {}).get(key) for r in records)
        for key in ("source", "template")
        if any(key in (r.get("selected") or {}) for r in records)
    }
    orders = sorted({o["seed"] for r in records for o in r.get("stream_orders") or []})
    if orders:
        extras["stream orders"] = f"seeds {', '.join(map(str, orders))} (accuracy: their mean; worst shown apart)"
    return {
        "hows": dict(hows),
        "selects": _agreed(r.get("selects") for r in records),
        "validation": any(r.get("validation") for r in records),
        "templates": {r["dataset"]: len(r.get("templates") or []) for r in records},
        **extras,
    }


def _normalised(record: dict) -> dict:
    r = dict(record)
    r["templates_name"] = r.get("templates_name") or "dataset"
    r["random_weights"] = bool(r.get("random_weights"))
    r["hyperparameters"] = r.get("hyperparameters") or {}
    return r


def dataset_rows(records: Iterable[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in map(_normalised, records):
        cells[_line_key(r) + (r["dataset"],)].append(r)
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
    metrics = [m for m in PER_SEED_METRICS if any(m in v for r in rows for v in r["by_seed"].values())]
    usable, blocked_everywhere = {}, bool(problems)
    for m in metrics:
        found = [(name_of(r), p) for r in rows if (p := _scoring_problem(r, m))]
        usable[m] = not blocked_everywhere and not found
        problems += [p for p in _grouped_problems(found) if p not in problems]
    common = sorted(set.intersection(*map(set, seed_sets)) if rows else set(), key=_seed_order)
    by_seed = {
        s: {m: statistics.fmean(r["by_seed"][s][m] for r in rows) if usable[m] else None for m in metrics}
        for s in common
    }
    return by_seed, problems


def _agreed_seeds(rows: list[dict]) -> Any:
    return _agreed(r["seeds"] for r in rows)


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
        method=_agreed(m["method"] for m in members),
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
        # A sensitivity row is one sweep point; a group there would mix points, so it is not formed.
        if r.get("group") and r["protocol"] != "sensitivity":
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
            lines[_line_key(r)].append(r)
    out = []
    for rs in lines.values():
        full = expected[_scope_key(rs[0])]
        what = "target average" if rs[0]["protocol"] in TRANSFER else "average"
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
                row[field], row["paper_source"] = ref.value, ref.source


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-dataset rows, group rows and average rows (``kind``), each with ``paper`` fields where a reference
    matches exactly. Rows carry ``mean``/``std`` for the headline metric and ``<metric>``/``<metric>_std``."""
    rows = dataset_rows(records)
    rows += group_rows(rows)
    rows += average_rows(rows)
    attach_references(rows)
    return rows


# ----------------------------------------------------------------------------------------------- markdown

INTRO = """# Results

Top-1 accuracy (%). Per dataset: mean ± population std over seeds. Averages: the mean over datasets of the per-dataset
means, ± the population std over seeds of the per-seed mean over datasets; an average is shown only when every
dataset of its table is scored on the same seeds (otherwise a footnote says what is missing). Group rows: the mean
of their member rows, per dataset and seed. Base-to-new cells: base / new / harmonic mean, the harmonic mean taken of
the seed-averaged (per dataset) or dataset-averaged (averages) base and new accuracies, as the paper does; the mean
of per-seed harmonic means is `hm_seed_mean` in results.csv and results.json. "(paper x)": the paper's number for
exactly this setting (backbone, OpenAI weights, protocol, sampler, seeds 1–10, cached views, templates, method and
all its hyperparameters, float16 `precision: reference` for ProLIP, shots and dataset set; see
prolip/bench/reference.py)."""


def _superscript(n: int) -> str:
    return "".join("⁰¹²³⁴⁵⁶⁷⁸⁹"[int(d)] for d in str(n))


class Footnotes:
    """Numbered notes under a section's tables; the same text keeps its number."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return _superscript(self.texts.index(text) + 1)

    def lines(self) -> list[str]:
        return [""] + [f"- {_superscript(i)} {t}" for i, t in enumerate(self.texts, 1)] if self.texts else []


def _value(row: dict, metric: str, notes: Footnotes) -> str:
    value = row.get(metric)
    if value is None:
        why = "; ".join(row.get("missing") or row.get("notes") or ["no value recorded"])
        if row["kind"] == "dataset":
            return "not scored" + notes.mark(why)
        what = "average" if row["kind"] == "average" else "group mean"
        return "not shown" + notes.mark(f"{what} not shown: {why}")
    text = f"{value:.2f}"
    std = row.get(f"{metric}_std")
    if std is not None:
        text += f" ± {std:.2f}"
    scored, seeds = row.get(f"{metric}_scored"), len(row["by_seed"])
    if scored is not None and scored < seeds:
        why = "; ".join(row.get("notes") or []) or "no value recorded"
        text += notes.mark(f"mean of the {scored} of {seeds} seeds scored; the others: {why}")
    return text


def _paper(row: dict) -> str:
    parts = [row.get(field) for metric, field in PAPER_FIELDS if metric != "accuracy"]
    if any(v is not None for v in parts):
        return " (paper " + " / ".join("–" if v is None else f"{v:.2f}" for v in parts) + ")"
    return f" (paper {row['paper']:.2f})" if row.get("paper") is not None else ""


def _cell(row: dict | None, notes: Footnotes) -> str:
    if row is None:
        return "–"
    if "base" in row and "new" in row:
        text = " / ".join(_value(row, m, notes) for m in ("base", "new", "hm"))
    else:
        text = _value(row, "accuracy", notes)
    return text + _paper(row)


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
        lines.setdefault(_line_key(r), r)
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


def _lines(rows: list[dict], key_of: Callable[[dict], tuple] = _line_key) -> list[tuple[tuple, dict]]:
    first: dict[tuple, dict] = {}
    for r in rows:
        first.setdefault(key_of(r), r)
    order = line_order(rows)
    return sorted(first.items(), key=lambda kv: order(kv[1]))


def _main_table(rows: list[dict], names: dict, notes: Footnotes) -> list[str]:
    source = next((r["source"] for r in rows if r.get("source") and r["protocol"] in TRANSFER), None)
    datasets = sorted({r["dataset"] for r in rows if r["kind"] != "average"}, key=lambda d: (d != source, d))
    averages = sorted({r["dataset"] for r in rows if r["kind"] == "average"}, key=lambda t: ("," in t, t))
    cells = {(_line_key(r), r["dataset"]): r for r in rows}
    head = ["method", "shots", *datasets, *averages]
    out = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for key, r in _lines(rows):
        values = [_cell(cells.get((key, d)), notes) for d in datasets + averages]
        out.append("| " + " | ".join([names[key], str(r["shots"]), *values]) + " |")
    return out


def _shots_table(rows: list[dict], names: dict, notes: Footnotes) -> list[str]:
    """The full averages again, one line per method and one column per shot count (the paper's layout)."""
    averages = [r for r in rows if r["kind"] == "average" and r["subset"] is None]
    shots = sorted({r["shots"] for r in averages}, key=numeric_order)
    without_shots = lambda r: _line_key(r)[:-1]  # shots is the last field of a line
    if len({without_shots(r) for r in averages}) == len(averages):
        return []  # no method at more than one shot count: nothing to lay out by shots
    cells = {(without_shots(r), r["shots"]): r for r in averages}
    out = _by_shots_head(f"{averages[0]['dataset'].capitalize()} by shots:", shots)
    for key, r in _lines(averages, without_shots):
        out.append(f"| {names[_line_key(r)]} | " + " | ".join(_cell(cells.get((key, s)), notes) for s in shots) + " |")
    return out


def _sensitivity_tables(rows: list[dict], notes: Footnotes) -> list[str]:
    grids: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        if r["kind"] == "average" and r["subset"] is None:
            hp = r["hyperparameters"]
            grids[(r["label"], r["shots"])][(canonical(hp.get("lr")), canonical(hp.get("lam")))] = r
    out = []
    for (label, shots), grid in sorted(grids.items(), key=lambda kv: (numeric_order(kv[0][1]), kv[0][0])):
        title = next(iter(grid.values()))["dataset"]
        lrs = sorted({json.loads(k[0]) for k in grid}, key=numeric_order)
        lams = sorted({json.loads(k[1]) for k in grid}, key=numeric_order)
        out += [
            "",
            f"{label}, {shots}-shot, {title}: lr (rows) × λ (columns):",
            "",
            "| lr \\ λ | " + " | ".join(format_number(x) for x in lams) + " |",
            "|---|" + "---:|" * len(lams),
        ]
        for lr in lrs:
            values = [_cell(grid.get((canonical(lr), canonical(lam))), notes) for lam in lams]
            out.append(f"| {format_number(lr)} | " + " | ".join(values) + " |")
    return out


def _section_title(key: tuple) -> str:
    protocol, model, weights, random_weights, sampler, templates = key
    shown = "RANDOM weights" if random_weights else weights
    return f"{protocol} — {model} [{shown}] — sampler {sampler} — templates {templates}"


def _section_notes(key: tuple, rows: list[dict]) -> list[str]:
    protocol, out = key[0], []
    if key[3]:
        out += [f"**{RANDOM_NOTE}.**", ""]
    if any("base" in r and "new" in r for r in rows):
        out += ["Cells: base / new / harmonic mean (of the averaged base and new accuracies).", ""]
    if protocol in TRANSFER:
        sources = ", ".join(sorted({str(r.get("source")) for r in rows}))
        out += [
            f"Trained on {sources}; the other columns use each target's own classifier, and the target "
            "average leaves the source out.",
            "",
        ]
    return out


def _group_notes(rows: list[dict]) -> list[str]:
    groups = {r["label"]: r for r in rows if r["kind"] == "group"}
    out = []
    for name, r in sorted(groups.items()):
        varying = "; ".join(
            f"{HP_SYMBOLS.get(k, k)} ∈ {{{', '.join(map(format_number, v))}}}"
            for k, v in sorted((r.get("varying") or {}).items())
        )
        out.append(
            f"- *{name}*: mean of {', '.join(r['members'])} per dataset and seed" + (f" ({varying})" if varying else "")
        )
    return ["", "Group rows:", ""] + out if out else []


def _paper_notes(rows: list[dict]) -> list[str]:
    sources = sorted({r["paper_source"] for r in rows if r.get("paper_source")})
    return ["", "Paper numbers from " + "; ".join(sources) + "."] if sources else []


def _section(key: tuple, rows: list[dict]) -> list[str]:
    notes, names = Footnotes(), display_names(rows)
    out = ["", f"## {_section_title(key)}", ""] + _section_notes(key, rows) + _main_table(rows, names, notes)
    if key[0] == "sensitivity":
        out += _sensitivity_tables(rows, notes)
    else:
        out += _shots_table(rows, names, notes)
    out += _cost_table(rows, names, notes) + _protocol_card(rows, names)
    return out + notes.lines() + _group_notes(rows) + _paper_notes(rows)


# ----------------------------------------------------------------------------------------------- cost and card


def _short(value: float | None, unit: str = "") -> str:
    """1234567 → "1.23M", 0.5 → "0.5", None → "–"."""
    if value is None:
        return "–"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def _line_cost(dataset_rows_: list[dict]) -> dict:
    """A line's cost over its datasets: the mean of their per-cell means; memory: the largest peak."""
    costs = [r["cost"] for r in dataset_rows_ if r.get("cost")]
    mean = lambda k: statistics.fmean(vs) if (vs := [c[k] for c in costs if c.get(k) is not None]) else None
    peaks = [c["peak_memory_mb"] for c in costs if c.get("peak_memory_mb") is not None]
    return {
        "seconds": mean("seconds"),
        "forward_passes": mean("forward_passes"),
        "trainable_parameters": mean("trainable_parameters"),
        "peak_memory_mb": max(peaks) if peaks else None,
        "memory_measure": _agreed(c.get("memory_measure") for c in costs if c.get("memory_measure")),
    }


def _cost_table(rows: list[dict], names: dict, notes: Footnotes) -> list[str]:
    """Accuracy (the full average) beside what it cost, one line per table line: seconds per cell (fit, or
    adaptation of the evaluation set at test time), image-encoder forward passes, peak memory, trainable
    parameters; means over datasets and seeds."""
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "dataset" and r.get("cost"):
            lines[_line_key(r)].append(r)
    if not lines:
        return []
    averages = {_line_key(r): r for r in rows if r["kind"] == "average" and r.get("subset") is None}
    out = [
        "",
        "Accuracy and cost (cost: mean per cell over datasets and seeds; memory: the largest peak):",
        "",
        "| method | shots | accuracy | seconds | forward passes | peak memory | trainable parameters |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in _lines([rs[0] for rs in lines.values()]):
        cost, average = _line_cost(lines[key]), averages.get(key)
        accuracy = _value(average if average is not None else r, "accuracy", notes)  # the paper's number: above
        worst = (average or r).get("accuracy_worst")
        accuracy += f" (worst order {worst:.2f})" if worst is not None else ""
        memory = "–" if cost["peak_memory_mb"] is None else f"{cost['peak_memory_mb']:.0f} MB"
        if cost["peak_memory_mb"] is not None and isinstance(cost["memory_measure"], str):
            memory += notes.mark(f"peak memory: {cost['memory_measure']}")
        out.append(
            f"| {names[key]} | {r['shots']} | {accuracy} | {_short(cost['seconds'], ' s')} | "
            f"{_short(cost['forward_passes'])} | {memory} | {_short(cost['trainable_parameters'])} |"
        )
    return out


HOW_WORDS = {
    "validation": "selected on the N-shot validation set",
    "rule": "no selection (a fixed rule or the original's settings)",
    "given": "given by the experiment",
    "last": "the last epoch",
    "loaded": "loaded from a saved run",
    "not recorded": "not recorded",
}


def _card_line(name: str, cards: list[dict]) -> str:
    hows: dict[str, int] = defaultdict(int)
    for card in cards:
        for how, count in card["hows"].items():
            hows[how] += count
    total = sum(hows.values())
    how_text = "; ".join(
        f"{HOW_WORDS.get(h, h)}" + (f" ({n} of {total} cells)" if len(hows) > 1 else "")
        for h, n in sorted(hows.items())
    )
    selects = _agreed(c["selects"] for c in cards)
    what = f"can select {selects}" if isinstance(selects, str) and selects else "selects nothing"
    if "validation" in hows:
        given = "test images never used"
    else:
        given = "a validation set was there, unused" if any(c["validation"] for c in cards) else "no validation set"
    counts = sorted({n for c in cards for n in c["templates"].values()})
    templates = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    extras = "".join(
        f"; {k}: {v!r}" for c in cards[:1] for k, v in c.items() if k in ("source", "template") and isinstance(v, str)
    )
    extras += "".join(f"; stream orders: {c['stream orders']}" for c in cards[:1] if "stream orders" in c)
    return f"- *{name}*: {what}; {how_text}; {given}; templates per dataset: {templates}{extras}"


def _protocol_card(rows: list[dict], names: dict) -> list[str]:
    """Under each table, per line: what was selected and on which split, the templates and the seeds — so no
    number is read beside one chosen on test labels (the harness never gives a method test labels)."""
    without_shots = lambda r: _line_key(r)[:-1]  # one card line per method entry, whatever its shots
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "dataset" and r.get("card"):
            lines[without_shots(r)].append(r)
    if not lines:
        return []
    seeds = sorted(
        {str(s) for rs in lines.values() for r in rs for s in r["seeds"] if s is not None}, key=numeric_order
    ) or ["none (nothing drawn)"]
    templates = sorted({str(r.get("templates_name")) for r in rows})
    out = [
        "",
        f"Protocol card (seeds {', '.join(seeds)}; templates: {', '.join(templates)}; no method sees test labels):",
        "",
    ]
    for key, r in _lines([rs[0] for rs in lines.values()], without_shots):
        out.append(_card_line(names[_line_key(r)], [x["card"] for x in lines[key]]))
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    sections: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        sections[_section_key(r)].append(r)
    out = [INTRO]
    for key in sorted(sections, key=str):
        out += _section(key, sections[key])
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seed_counts(rows: list[dict]) -> str:
    counts = sorted({len(r["by_seed"]) for r in rows})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _panel_title(row: dict) -> str:
    weights = "RANDOM weights, not CLIP" if row["random_weights"] else row["weights"]
    return f"{row['protocol']} — {row['model']} [{weights}]"


def _shot_curves(rows: list[dict], protocol: str) -> dict[str, dict[str, list[dict]]]:
    """Panel title → curve name → full-average rows, curves in table order. A group's members are drawn as the
    group's one curve (the table has them one by one); a curve with no average shown at all is left out."""
    panels: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    names = display_names(rows)
    averages = [
        r
        for r in rows
        if r["kind"] == "average"
        and r["subset"] is None
        and r["protocol"] == protocol
        and not (r.get("group") and r["of"] == "dataset")
    ]
    order = line_order(rows)
    for r in sorted(averages, key=lambda r: order({**r, "shots": 0})):
        panels[_panel_title(r)][names[_line_key(r)]].append(r)
    return {
        title: {name: pts for name, pts in curves.items() if any(r["mean"] is not None for r in pts)}
        for title, curves in panels.items()
    }


def _draw_curves(ax, curves: dict[str, list[dict]]) -> bool:
    """One line per curve, broken where an average is not shown; returns whether any point is missing."""
    handles, gaps = [], False
    for name, points in curves.items():
        points = sorted(points, key=lambda r: r["shots"])
        means = [math.nan if r["mean"] is None else r["mean"] for r in points]
        gaps |= any(math.isnan(m) for m in means)
        line = ax.errorbar(
            [r["shots"] for r in points],
            means,
            yerr=[r.get("std") or 0.0 for r in points],
            marker="o",
            ms=4,
            capsize=3,
            lw=1.4,
            label=name,
        )
        handles.append(line)
        paper = [(r["shots"], r["paper"]) for r in points if r.get("paper") is not None]
        if paper:
            handles += ax.plot(
                *zip(*paper, strict=True),
                "o",
                ms=9,
                mfc="none",
                mew=1.4,
                color=line[0].get_color(),
                label=f"{name}: paper",
            )
    all_shots = sorted({r["shots"] for pts in curves.values() for r in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_shots, [str(s) for s in all_shots])
    ax.minorticks_off()
    ax.set_xlabel("shots per class")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    return gaps


def shots_figure(rows: list[dict[str, Any]], protocol: str = "fewshot"):
    """Accuracy vs shots averaged over datasets, one panel per backbone, one curve per method (a group's members as
    the group's one curve); the paper's numbers as hollow circles where the setting matches exactly. None: nothing
    to draw."""
    panels = {title: curves for title, curves in _shot_curves(rows, protocol).items() if curves}
    if not panels:
        return None
    plt = _pyplot()
    height = 4.2 + 0.16 * max(len(c) + sum(any(r.get("paper") for r in p) for p in c.values()) for c in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), height), squeeze=False, layout="constrained")
    shown = [r for curves in panels.values() for pts in curves.values() for r in pts if r["mean"] is not None]
    gaps = False
    for ax, (title, curves) in zip(axes[0], sorted(panels.items()), strict=False):
        n = len(next(iter(curves.values()))[0]["datasets"])
        gaps |= _draw_curves(ax, curves)
        ax.set_ylabel(f"top-1 accuracy (%), mean over {n} datasets")
        ax.set_title(title, fontsize=9)
    caption = (
        f"Error bars: population std over seeds (n = {_seed_counts(shown)}) of the per-seed mean over datasets"
        + (" and the group's members" if any(r["of"] == "group" for r in shown) else "")
        + "."
        + (" Gaps: averages not shown, a dataset was not scored (see results.md)." if gaps else "")
    )
    caption = textwrap.fill(caption, width=int(16 * fig.get_figwidth()))  # about 16 characters an inch at 8 pt
    fig.suptitle(caption, fontsize=8, y=0.005, va="bottom")
    bottom = (0.35 + 0.14 * caption.count("\n")) / fig.get_figheight()  # room for the caption, in inches
    fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom))
    return fig


def _save(fig, path: Path) -> bool:
    if fig is None:
        return False
    fig.savefig(path, dpi=130)
    _pyplot().close(fig)
    return True


def plot_shots(rows: list[dict[str, Any]], path: Path, protocol: str = "fewshot") -> bool:
    return _save(shots_figure(rows, protocol), path)


def _sensitivity_panels(rows: list[dict]) -> dict[tuple, dict]:
    """(backbone title, label) → shots → {(lr, λ): mean over datasets}."""
    panels: dict[tuple, dict] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["kind"] == "average" and r["subset"] is None and r["protocol"] == "sensitivity":
            hp = r["hyperparameters"]
            panels[(_panel_title(r), r["label"])][r["shots"]][(hp.get("lr"), hp.get("lam"))] = r.get("mean")
    return panels


def _heatmap(ax, grid: dict, norm, cmap) -> None:
    lrs = sorted({k[0] for k in grid}, key=numeric_order)
    lams = sorted({k[1] for k in grid}, key=numeric_order)
    values = [[grid.get((lr, lam)) for lam in lams] for lr in lrs]
    ax.imshow([[float("nan") if v is None else v for v in row] for row in values], cmap=cmap, norm=norm, aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            dark = v is not None and norm(v) < 0.55  # light text on the dark end of the scale
            ax.text(
                j,
                i,
                "–" if v is None else f"{v:.1f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "black",
            )
    ax.set_xticks(range(len(lams)), [format_number(x) for x in lams], fontsize=7)
    ax.set_yticks(range(len(lrs)), [format_number(x) for x in lrs], fontsize=7)
    ax.set_xlabel("λ", fontsize=8)
    ax.set_ylabel("lr", fontsize=8)


def sensitivity_figure(rows: list[dict[str, Any]]):
    """Heatmaps of dataset-averaged accuracy over lr × λ: one row of panels per method label, one column per shot
    count, all on ONE colour scale with one labelled colour bar."""
    panels = _sensitivity_panels(rows)
    values = [v for by_shots in panels.values() for grid in by_shots.values() for v in grid.values() if v is not None]
    if not values:
        return None
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    norm, cmap = Normalize(min(values), max(values)), plt.get_cmap("viridis").with_extremes(bad="0.85")
    shots = sorted({s for by_shots in panels.values() for s in by_shots}, key=numeric_order)
    fig, axes = plt.subplots(
        len(panels),
        len(shots),
        figsize=(2.9 * len(shots) + 1.4, 2.7 * len(panels) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for i, ((_, label), by_shots) in enumerate(sorted(panels.items())):
        for j, s in enumerate(shots):
            if s in by_shots:
                _heatmap(axes[i][j], by_shots[s], norm, cmap)
                axes[i][j].set_title(f"{label}\n{s}-shot", fontsize=8)
            else:
                axes[i][j].set_axis_off()
    datasets = {len(r["datasets"]) for r in rows if r["kind"] == "average" and r["protocol"] == "sensitivity"}
    fig.colorbar(
        ScalarMappable(norm, cmap),
        ax=axes,
        shrink=0.85,
        label=f"top-1 accuracy (%), mean over {'/'.join(map(str, sorted(datasets)))} datasets and seeds",
    )
    fig.suptitle(" · ".join(sorted({t for t, _ in panels})), fontsize=9)
    return fig


def plot_sensitivity(rows: list[dict[str, Any]], path: Path) -> bool:
    return _save(sensitivity_figure(rows), path)


# ----------------------------------------------------------------------------------------------- per dataset


def _learns(method: Any) -> bool | None:
    """Whether a row's method learns from the shots (zero-shot CLIP does not); None when the row mixes methods or
    names one this installation does not have."""
    from prolip.methods import method_class

    try:
        return bool(method_class(method).learns) if isinstance(method, str) else None
    except ValueError:
        return None


def _baseline_key(row: dict) -> tuple:
    return _section_key(row) + (row.get("source"), row["dataset"], canonical(row["shots"]))


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


def _by_shots_head(title: str, shots: list) -> list[str]:
    """A titled table with one row per method and one column per shot count: its title and header lines."""
    header = "| method | " + " | ".join(f"{s}-shot" for s in shots) + " |"
    return ["", title, "", header, "|---|" + "---:|" * len(shots)]


def _dataset_table(rows: list[dict], dataset: str, names: dict, gains: dict, notes: Footnotes) -> list[str]:
    here = [r for r in rows if r["dataset"] == dataset]
    shots = sorted({r["shots"] for r in here}, key=numeric_order)
    without_shots = lambda r: _line_key(r)[:-1]  # shots is the last field of a line
    cells = {(without_shots(r), canonical(r["shots"])): r for r in here}
    out = _by_shots_head(f"### {dataset}", shots)
    for key, r in _lines(here, without_shots):
        values = []
        for s in shots:
            row = cells.get((key, canonical(s)))
            gain = gains.get(id(row))
            values.append(_cell(row, notes) + (f" ({gain:+.2f})" if gain is not None else ""))
        out.append(f"| {names[_line_key(r)]} | " + " | ".join(values) + " |")
    return out


def per_dataset_markdown(rows: list[dict[str, Any]]) -> str:
    """One table per dataset (lines × shots) in every section, each learning line's gain over zero-shot CLIP in
    brackets: the per-dataset view the averages hide."""
    gains = {id(g["row"]): g["gain"] for g in zero_shot_gains(rows)}
    sections: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["kind"] in ("dataset", "group"):
            sections[_section_key(r)].append(r)
    out = [
        "",
        "# Per dataset",
        "",
        "Top-1 accuracy (%) on each dataset: mean ± population std over seeds; in brackets "
        "the gain over zero-shot CLIP (percentage points) at the same shots and setting.",
    ]
    for key in sorted(sections, key=str):
        notes, names, rs = Footnotes(), display_names(sections[key]), sections[key]
        out += ["", f"## {_section_title(key)}"]
        for dataset in sorted({r["dataset"] for r in rs}):
            out += _dataset_table(rs, dataset, names, gains, notes)
        out += notes.lines()
    return "\n".join(out) + "\n"


def _gain_panels(rows: list[dict]) -> dict[tuple, dict[str, dict[str, float]]]:
    """(section title, shots) → line name → {dataset: gain}, with each line's mean over its datasets."""
    panels: dict[tuple, dict] = defaultdict(lambda: defaultdict(dict))
    names = display_names(rows)
    for g in zero_shot_gains(rows):
        r = g["row"]
        panels[(_panel_title(r), g["shots"])][names[_line_key(r)]][g["dataset"]] = g["gain"]
    for lines in panels.values():
        for gains in lines.values():
            gains["average"] = statistics.fmean(gains.values())
    return panels


def _gain_heatmap(ax, lines: dict[str, dict[str, float]], columns: list[str], norm, cmap, span: float) -> None:
    grid = [[gains.get(d) for d in columns] for gains in lines.values()]
    ax.imshow(
        [[math.nan if v is None else v for v in row] for row in grid],
        cmap=cmap.with_extremes(bad="0.85"),
        norm=norm,
        aspect="auto",
    )
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                "–" if v is None else f"{v:+.1f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v is not None and abs(v) > 0.6 * span else "black",
            )
    ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right", rotation_mode="anchor", fontsize=7)
    ax.set_yticks(range(len(lines)), list(lines), fontsize=7)


def gain_figure(rows: list[dict[str, Any]]):
    """Gain over zero-shot CLIP per dataset (percentage points): one heatmap per backbone and shot count, a row per
    learning method line, a column per dataset and their average, on one diverging colour scale centred on 0.
    None: no line has a zero-shot row to compare with."""
    panels = _gain_panels(rows)
    if not panels:
        return None
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import TwoSlopeNorm

    values = [v for lines in panels.values() for gains in lines.values() for v in gains.values()]
    span = max(1.0, max(abs(v) for v in values))
    norm, cmap = TwoSlopeNorm(0.0, -span, span), plt.get_cmap("RdBu")
    columns = sorted({d for lines in panels.values() for gains in lines.values() for d in gains} - {"average"})
    columns.append("average")
    height = max(len(lines) for lines in panels.values())
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(4.0 + 0.75 * len(columns), (0.45 * height + 1.6) * len(panels)),
        squeeze=False,
        layout="constrained",
    )
    order = sorted(panels, key=lambda k: (k[0], numeric_order(k[1])))
    for ax, (title, shots) in zip(axes[:, 0], order, strict=True):
        _gain_heatmap(ax, panels[(title, shots)], columns, norm, cmap, span)
        ax.set_title(f"{title}, {shots}-shot", fontsize=9)
    fig.colorbar(
        ScalarMappable(norm, cmap),
        ax=axes,
        shrink=0.8,
        label="gain over zero-shot CLIP (percentage points), mean over seeds",
    )
    return fig


def plot_gains(rows: list[dict[str, Any]], path: Path) -> bool:
    return _save(gain_figure(rows), path)


# ----------------------------------------------------------------------------------------------- files

CSV_FIELDS = [
    "protocol",
    "model",
    "weights",
    "random_weights",
    "sampler",
    "templates_name",
    "source",
    "kind",
    "dataset",
    "datasets",
    "label",
    "method",
    "group",
    "shots",
    "lr",
    "lam",
    "precision",
    "varying",
    "seeds",
    "mean",
    "std",
    "base",
    "base_std",
    "new",
    "new_std",
    "hm",
    "hm_seed_mean",
    "hm_seed_std",
    "start_accuracy",
    "start_accuracy_std",
    "paper",
    "paper_base",
    "paper_new",
    "paper_hm",
    "paper_source",
    "notes",
    "missing",
    "seconds",
    "forward_passes",
    "peak_memory_mb",
    "trainable_parameters",
    "selection",
]


def _csv_row(row: dict) -> dict:
    hp = row.get("hyperparameters") or {}
    as_text = lambda v: " ".join(map(str, v)) if isinstance(v, list) else v
    return {
        **{k: as_text(row.get(k)) for k in CSV_FIELDS},
        "lr": hp.get("lr"),
        "lam": hp.get("lam"),
        "precision": hp.get("precision"),
        "varying": canonical(row["varying"]) if row.get("varying") else "",
        "notes": "; ".join(row.get("notes") or []),
        "missing": "; ".join(row.get("missing") or []),
        **{
            k: (row.get("cost") or {}).get(k)
            for k in ("seconds", "forward_passes", "peak_memory_mb", "trainable_parameters")
        },
        "selection": canonical((row.get("card") or {}).get("hows")) if row.get("card") else "",
    }


def write_report(records: list[dict[str, Any]], out: Path | str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    paths = {"markdown": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    paths["markdown"].write_text(markdown(rows) + per_dataset_markdown(rows))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(map(_csv_row, rows))
    paths["json"].write_text(
        json.dumps([{k: v for k, v in r.items() if k != "by_seed"} for r in rows], indent=2, default=str)
    )
    for protocol, name in (("fewshot", "accuracy_vs_shots.png"), ("fewshot-val", "accuracy_vs_shots_val.png")):
        if plot_shots(rows, out / name, protocol):
            paths[f"plot_{protocol}"] = out / name
    if plot_sensitivity(rows, out / "sensitivity_heatmap.png"):
        paths["heatmap"] = out / "sensitivity_heatmap.png"
    if plot_gains(rows, out / "gain_over_zeroshot.png"):
        paths["gain"] = out / "gain_over_zeroshot.png"
    return paths
