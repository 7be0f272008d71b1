"""The report's markdown: one section per protocol × backbone × sampler × templates (the main table, the table by
shots or the sweep's tables, cost, what each number was selected on, footnotes), then one table per dataset."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable

from prolip.bench.protocols import layout_of
from prolip.bench.report.rows import (
    ACCURACY,
    BASE_NEW,
    HP_SYMBOLS,
    PAPER_FIELDS,
    RANDOM_NOTE,
    Card,
    Cost,
    ReportRow,
    agreed,
    canonical,
    display_names,
    format_number,
    line_key,
    numeric_order,
    ordered_lines,
    section_key,
    zero_shot_gains,
)

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


def _value(row: ReportRow, metric: str, notes: Footnotes) -> str:
    value = row.mean_of(metric)
    if value is None:
        why = "; ".join(row.missing or row.notes or ["no value recorded"])
        if row.kind == "dataset":
            return "not scored" + notes.mark(why)
        what = "average" if row.kind == "average" else "group mean"
        return "not shown" + notes.mark(f"{what} not shown: {why}")
    text = f"{value:.2f}"
    std = row.std_of(metric)
    if std is not None:
        text += f" ± {std:.2f}"
    scored, seeds = row.scored_of(metric), len(row.by_seed)
    if scored is not None and scored < seeds:
        why = "; ".join(row.notes or []) or "no value recorded"
        text += notes.mark(f"mean of the {scored} of {seeds} seeds scored; the others: {why}")
    return text


def _paper(row: ReportRow) -> str:
    """The reference number beside a cell, under its source's label ("paper", "CLIP-SVD README", ...)."""
    label = row.reference_label
    parts = [row.references.get(metric) for metric, _ in PAPER_FIELDS if metric != ACCURACY]
    if any(v is not None for v in parts):
        return f" ({label} " + " / ".join("–" if v is None else f"{v:.2f}" for v in parts) + ")"
    return f" ({label} {row.paper:.2f})" if row.paper is not None else ""


def _cell(row: ReportRow | None, notes: Footnotes) -> str:
    if row is None:
        return "–"
    if row.base_new:
        text = " / ".join(_value(row, m, notes) for m in BASE_NEW)
    else:
        text = _value(row, ACCURACY, notes)
    return text + _paper(row)


def _main_table(rows: list[ReportRow], names: dict, notes: Footnotes) -> list[str]:
    source = next((r.source for r in rows if r.source and layout_of(r.protocol).source_apart), None)
    datasets = sorted({r.dataset for r in rows if r.kind != "average"}, key=lambda d: (d != source, d))
    averages = sorted({r.dataset for r in rows if r.kind == "average"}, key=lambda t: ("," in t, t))
    cells = {(line_key(r), r.dataset): r for r in rows}
    head = ["method", "shots", *datasets, *averages]
    out = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for key, r in ordered_lines(rows):
        values = [_cell(cells.get((key, d)), notes) for d in datasets + averages]
        out.append("| " + " | ".join([names[key], str(r.shots), *values]) + " |")
    return out


def _without_shots(row: ReportRow) -> tuple:
    return line_key(row)[:-1]  # shots is the last field of a line


def _shots_table(rows: list[ReportRow], names: dict, notes: Footnotes) -> list[str]:
    """The full averages again, one line per method and one column per shot count (the paper's layout)."""
    averages = [r for r in rows if r.kind == "average" and r.subset is None]
    shots = sorted({r.shots for r in averages}, key=numeric_order)
    without_shots = _without_shots
    if len({without_shots(r) for r in averages}) == len(averages):
        return []  # no method at more than one shot count: nothing to lay out by shots
    cells = {(without_shots(r), r.shots): r for r in averages}
    out = _by_shots_head(f"{averages[0].dataset.capitalize()} by shots:", shots)
    for key, r in ordered_lines(averages, without_shots):
        out.append(f"| {names[line_key(r)]} | " + " | ".join(_cell(cells.get((key, s)), notes) for s in shots) + " |")
    return out


def _sweep_tables(rows: list[ReportRow], notes: Footnotes, sweep: tuple[str, str]) -> list[str]:
    """Per label and shots, the averages over the two swept hyperparameters: the first in rows, the second in
    columns."""
    down, across = sweep
    a, d = HP_SYMBOLS.get(down, down), HP_SYMBOLS.get(across, across)
    grids: dict[tuple, dict[tuple, ReportRow]] = defaultdict(dict)
    for r in rows:
        if r.kind == "average" and r.subset is None:
            hp = r.hyperparameters
            grids[(r.label, r.shots)][(canonical(hp.get(down)), canonical(hp.get(across)))] = r
    out = []
    for (label, shots), grid in sorted(grids.items(), key=lambda kv: (numeric_order(kv[0][1]), kv[0][0])):
        title = next(iter(grid.values())).dataset
        firsts = sorted({json.loads(k[0]) for k in grid}, key=numeric_order)
        seconds = sorted({json.loads(k[1]) for k in grid}, key=numeric_order)
        out += [
            "",
            f"{label}, {shots}-shot, {title}: {a} (rows) × {d} (columns):",
            "",
            f"| {a} \\ {d} | " + " | ".join(format_number(x) for x in seconds) + " |",
            "|---|" + "---:|" * len(seconds),
        ]
        for x in firsts:
            values = [_cell(grid.get((canonical(x), canonical(y))), notes) for y in seconds]
            out.append(f"| {format_number(x)} | " + " | ".join(values) + " |")
    return out


def _section_title(key: tuple) -> str:
    protocol, model, weights, random_weights, sampler, templates = key
    shown = "RANDOM weights" if random_weights else weights
    return f"{protocol} — {model} [{shown}] — sampler {sampler} — templates {templates}"


def _section_notes(key: tuple, rows: list[ReportRow]) -> list[str]:
    layout, out = layout_of(key[0]), []
    if key[3]:
        out += [f"**{RANDOM_NOTE}.**", ""]
    if any(r.base_new for r in rows):
        out += ["Cells: base / new / harmonic mean (of the averaged base and new accuracies).", ""]
    if layout.note is not None:
        out += [layout.note.format(sources=", ".join(sorted({str(r.source) for r in rows}))), ""]
    return out


def _group_notes(rows: list[ReportRow]) -> list[str]:
    groups = {r.label: r for r in rows if r.kind == "group"}
    out = []
    for name, r in sorted(groups.items()):
        varying = "; ".join(
            f"{HP_SYMBOLS.get(k, k)} ∈ {{{', '.join(map(format_number, v))}}}"
            for k, v in sorted((r.varying or {}).items())
        )
        members = ", ".join(r.members or [])
        out.append(f"- *{name}*: mean of {members} per dataset and seed" + (f" ({varying})" if varying else ""))
    return ["", "Group rows:", ""] + out if out else []


def _paper_notes(rows: list[ReportRow]) -> list[str]:
    """Where the section's reference numbers come from: each label with its sources."""
    cited = sorted({(r.reference_label, r.paper_source) for r in rows if r.paper_source})
    if not cited:
        return []
    if {label for label, _ in cited} == {"paper"}:
        return ["", "Paper numbers from " + "; ".join(source for _, source in cited) + "."]
    return [
        "",
        "Reference numbers, each for exactly its source's setting (prolip/bench/reference.py): "
        + "; ".join(f"({label} x): {source}" for label, source in cited)
        + ".",
    ]


def _section(key: tuple, rows: list[ReportRow]) -> list[str]:
    notes, names = Footnotes(), display_names(rows)
    out = ["", f"## {_section_title(key)}", ""] + _section_notes(key, rows) + _main_table(rows, names, notes)
    sweep = layout_of(key[0]).sweep
    if sweep is not None:
        out += _sweep_tables(rows, notes, sweep)
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


def _line_cost(dataset_rows_: list[ReportRow]) -> Cost:
    """A line's cost over its datasets: the mean of their per-cell means; memory: the largest peak."""
    costs = [r.cost for r in dataset_rows_ if r.cost]

    def mean(of: Callable[[Cost], float | None]) -> float | None:
        values = [v for c in costs if (v := of(c)) is not None]
        return statistics.fmean(values) if values else None

    peaks = [c.peak_memory_mb for c in costs if c.peak_memory_mb is not None]
    return Cost(
        seconds=mean(lambda c: c.seconds),
        seconds_per_image=mean(lambda c: c.seconds_per_image),
        forward_passes=mean(lambda c: c.forward_passes),
        trainable_parameters=mean(lambda c: c.trainable_parameters),
        peak_memory_mb=max(peaks) if peaks else None,
        memory_measure=agreed(c.memory_measure for c in costs if c.memory_measure),
    )


def _cost_table(rows: list[ReportRow], names: dict, notes: Footnotes) -> list[str]:
    """Accuracy (the full average) beside what it cost, one line per table line: seconds per cell (fit, or
    adaptation of the evaluation set at test time), image-encoder forward passes, peak memory, trainable
    parameters; means over datasets and seeds."""
    lines: dict[tuple, list[ReportRow]] = defaultdict(list)
    for r in rows:
        if r.kind == "dataset" and r.cost:
            lines[line_key(r)].append(r)
    if not lines:
        return []
    averages = {line_key(r): r for r in rows if r.kind == "average" and r.subset is None}
    # Calibration beside accuracy where the records have it (records from before ECE was recorded: no column).
    ece = any(r.mean_of("ece") is not None for rs in lines.values() for r in rs)
    per_image = any(r.cost.seconds_per_image is not None for rs in lines.values() for r in rs if r.cost)
    out = [
        "",
        "Accuracy"
        + (", calibration (ECE, 15 bins)" if ece else "")
        + " and cost (cost: mean per cell over datasets and seeds; memory: the largest peak):",
        "",
        "| method | shots | accuracy |"
        + (" ECE |" if ece else "")
        + " seconds |"
        + (" s / image |" if per_image else "")
        + " forward passes | peak memory | trainable parameters |",
        "|---|---:|---:|" + ("---:|" if ece else "") + ("---:|" if per_image else "") + "---:|---:|---:|---:|",
    ]
    for key, r in ordered_lines([rs[0] for rs in lines.values()]):
        out.append(_cost_line(names[key], r, averages.get(key), _line_cost(lines[key]), (ece, per_image), notes))
    return out


def _cost_line(
    name: str, r: ReportRow, average: ReportRow | None, cost: Cost, columns: tuple[bool, bool], notes: Footnotes
) -> str:
    """One line of the cost table: the line's full average (its dataset row where it has none) and its cost."""
    ece, per_image = columns
    shown = average if average is not None else r
    accuracy = _value(shown, ACCURACY, notes)  # the paper's number: above
    worst = shown.mean_of("accuracy_worst")  # a stream's worst order, where the protocol records one
    accuracy += f" (worst order {worst:.2f})" if worst is not None else ""
    if ece:
        accuracy += " | " + _value(shown, "ece", notes)
    memory = "–" if cost.peak_memory_mb is None else f"{cost.peak_memory_mb:.0f} MB"
    if cost.peak_memory_mb is not None and isinstance(cost.memory_measure, str):
        memory += notes.mark(f"peak memory: {cost.memory_measure}")
    return (
        f"| {name} | {r.shots} | {accuracy} | {_short(cost.seconds, ' s')} | "
        + (f"{_short(cost.seconds_per_image, ' s')} | " if per_image else "")
        + f"{_short(cost.forward_passes)} | {memory} | {_short(cost.trainable_parameters)} |"
    )


HOW_WORDS = {
    "validation": "selected on the N-shot validation set",
    "rule": "no selection (a fixed rule or the original's settings)",
    "given": "given by the experiment",
    "last": "the last epoch",
    "loaded": "loaded from a saved run",
    "not recorded": "not recorded",
}


def _card_line(name: str, cards: list[Card]) -> str:
    hows: dict[str, int] = defaultdict(int)
    for card in cards:
        for how, count in card.hows.items():
            hows[how] += count
    total = sum(hows.values())
    how_text = "; ".join(
        f"{HOW_WORDS.get(h, h)}" + (f" ({n} of {total} cells)" if len(hows) > 1 else "")
        for h, n in sorted(hows.items())
    )
    selects = agreed(c.selects for c in cards)
    what = f"can select {selects}" if isinstance(selects, str) and selects else "selects nothing"
    if "validation" in hows:
        given = "test images never used"
    else:
        given = "a validation set was there, unused" if any(c.validation for c in cards) else "no validation set"
    counts = sorted({n for c in cards for n in c.templates.values()})
    templates = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    extras = "".join(f"; {k}: {v!r}" for c in cards[:1] for k, v in c.named.items() if isinstance(v, str))
    extras += "".join(f"; stream orders: {c.stream_orders}" for c in cards[:1] if c.stream_orders)
    return f"- *{name}*: {what}; {how_text}; {given}; templates per dataset: {templates}{extras}"


def _protocol_card(rows: list[ReportRow], names: dict) -> list[str]:
    """Under each table, per line: what was selected and on which split, the templates and the seeds — so no
    number is read beside one chosen on test labels (the harness never gives a method test labels)."""
    without_shots = _without_shots  # one card line per method entry, whatever its shots
    lines: dict[tuple, list[ReportRow]] = defaultdict(list)
    for r in rows:
        if r.kind == "dataset" and r.card:
            lines[without_shots(r)].append(r)
    if not lines:
        return []
    seeds = sorted(
        {str(s) for rs in lines.values() for r in rs for s in r.seeds if s is not None}, key=numeric_order
    ) or ["none (nothing drawn)"]
    templates = sorted({str(r.templates_name) for r in rows})
    out = [
        "",
        f"Protocol card (seeds {', '.join(seeds)}; templates: {', '.join(templates)}; no method sees test labels):",
        "",
    ]
    for key, r in ordered_lines([rs[0] for rs in lines.values()], without_shots):
        out.append(_card_line(names[line_key(r)], [x.card for x in lines[key] if x.card]))
    return out


def markdown(rows: list[ReportRow]) -> str:
    sections: dict[tuple, list[ReportRow]] = defaultdict(list)
    for r in rows:
        sections[section_key(r)].append(r)
    out = [INTRO]
    for key in sorted(sections, key=str):
        out += _section(key, sections[key])
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- per dataset


def _by_shots_head(title: str, shots: list) -> list[str]:
    """A titled table with one row per method and one column per shot count: its title and header lines."""
    header = "| method | " + " | ".join(f"{s}-shot" for s in shots) + " |"
    return ["", title, "", header, "|---|" + "---:|" * len(shots)]


def _dataset_table(rows: list[ReportRow], dataset: str, names: dict, gains: dict, notes: Footnotes) -> list[str]:
    here = [r for r in rows if r.dataset == dataset]
    shots = sorted({r.shots for r in here}, key=numeric_order)
    without_shots = _without_shots
    cells = {(without_shots(r), canonical(r.shots)): r for r in here}
    out = _by_shots_head(f"### {dataset}", shots)
    for key, r in ordered_lines(here, without_shots):
        values = []
        for s in shots:
            row = cells.get((key, canonical(s)))
            gain = gains.get(id(row))
            values.append(_cell(row, notes) + (f" ({gain:+.2f})" if gain is not None else ""))
        out.append(f"| {names[line_key(r)]} | " + " | ".join(values) + " |")
    return out


def per_dataset_markdown(rows: list[ReportRow]) -> str:
    """One table per dataset (lines × shots) in every section, each learning line's gain over zero-shot CLIP in
    brackets: the per-dataset view the averages hide."""
    gains = {id(g.row): g.gain for g in zero_shot_gains(rows)}
    sections: dict[tuple, list[ReportRow]] = defaultdict(list)
    for r in rows:
        if r.kind in ("dataset", "group"):
            sections[section_key(r)].append(r)
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
        for dataset in sorted({r.dataset for r in rs}):
            out += _dataset_table(rs, dataset, names, gains, notes)
        out += notes.lines()
    return "\n".join(out) + "\n"
