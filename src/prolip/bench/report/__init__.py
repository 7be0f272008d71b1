"""Aggregate bench records into rows (per dataset, per group, averaged over datasets); markdown, CSV, JSON, plots.

The report names no protocol: what a protocol's section shows, its protocol declares (``Protocol.layout``,
``Protocol.metrics``). ``rows`` aggregates, ``markdown`` and ``figures`` lay the rows out, this module writes them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prolip.bench.protocols import available, layout_of
from prolip.bench.records import SECTION_FIELDS
from prolip.bench.report.figures import (
    gain_figure,
    plot_gains,
    plot_sensitivity,
    plot_shots,
    sensitivity_figure,
    shots_figure,
)
from prolip.bench.report.markdown import markdown, per_dataset_markdown
from prolip.bench.report.rows import (
    PAPER_FIELDS,
    Cost,
    Gain,
    ReportRow,
    Summary,
    aggregate,
    canonical,
    format_number,
    zero_shot_gains,
)

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


# The columns that are a row's fields as they are, and the hyperparameters results.csv has a column for.
CSV_ATTRIBUTES = (*SECTION_FIELDS, "source", "kind", "dataset", "datasets", "label", "method", "group", "shots")
CSV_HYPERPARAMETERS = ("lr", "lam", "precision")


def _csv_text(value: Any) -> Any:
    return " ".join(map(str, value)) if isinstance(value, list) else value


def _csv_row(row: ReportRow) -> dict[str, Any]:
    """One row of results.csv: CSV_FIELDS' columns (lists as space-separated text), metrics a protocol does not
    record empty."""
    hp, cost, paper, hm_seed = row.hyperparameters or {}, row.cost or Cost(), row.references.get, row.hm_seed
    named = {k: _csv_text(getattr(row, k)) for k in CSV_ATTRIBUTES}
    return named | {
        **{k: hp.get(k) for k in CSV_HYPERPARAMETERS},
        "varying": canonical(row.varying) if row.varying else "",
        "seeds": _csv_text(row.seeds),
        "mean": row.mean,
        "std": row.std,
        "base": row.mean_of("base"),
        "base_std": row.std_of("base"),
        "new": row.mean_of("new"),
        "new_std": row.std_of("new"),
        "hm": row.mean_of("hm"),
        "hm_seed_mean": hm_seed and hm_seed.mean,
        "hm_seed_std": hm_seed and hm_seed.std,
        "start_accuracy": row.mean_of("start_accuracy"),
        "start_accuracy_std": row.std_of("start_accuracy"),
        **{name: paper(metric) for metric, name in PAPER_FIELDS},
        "paper_source": row.paper_source,
        "notes": "; ".join(row.notes or []),
        "missing": "; ".join(row.missing or []),
        "seconds": cost.seconds,
        "forward_passes": cost.forward_passes,
        "peak_memory_mb": cost.peak_memory_mb,
        "trainable_parameters": cost.trainable_parameters,
        "selection": canonical(row.card.hows) if row.card else "",
    }


def write_report(
    records: Iterable[Mapping[str, Any]], out: Path | str, *, data_paths: Iterable[Path | str] = ()
) -> dict[str, Path]:
    """Write the report's tables and figures to the folder ``out`` (created, or replaced if it is a report or
    empty) through the output layer: assembled beside it and swapped in whole, so a failed write leaves the
    earlier report as it was. ``data_paths``: the records read, which ``out`` may not be, be inside or contain."""
    from prolip.outputs import write_directory

    rows = aggregate(records)
    names: dict[str, str] = {}

    def fill(folder: Path) -> None:
        names.update({k: p.name for k, p in _write_report_files(rows, folder).items()})

    out = write_directory(out, fill, force=True, data_paths=data_paths, kind="bench")
    return {k: out / name for k, name in names.items()}


def _write_report_files(rows: list[ReportRow], out: Path) -> dict[str, Path]:
    tables = out / "results.md", out / "results.csv", out / "results.json"
    paths = dict(zip(("markdown", "csv", "json"), tables, strict=True))
    tables[0].write_text(markdown(rows) + per_dataset_markdown(rows))
    with open(tables[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(map(_csv_row, rows))
    tables[2].write_text(json.dumps([r.to_json(by_seed=False) for r in rows], indent=2, default=str))
    _write_figures(rows, out, paths)
    if plot_gains(rows, out / "gain_over_zeroshot.png"):
        paths["gain"] = out / "gain_over_zeroshot.png"
    return paths


def _write_figures(rows: list[ReportRow], out: Path, paths: dict[str, Path]) -> None:
    """Each registered protocol's figures, as its layout names them (a sweep's heatmap is ``heatmap``)."""
    for name in available():
        layout = layout_of(name)
        if layout.shots_figure and plot_shots(rows, out / layout.shots_figure, name):
            paths[f"plot_{name}"] = out / layout.shots_figure
        if layout.sweep_figure and plot_sensitivity(rows, out / layout.sweep_figure, name):
            paths["heatmap" if "heatmap" not in paths else f"heatmap_{name}"] = out / layout.sweep_figure


__all__ = [
    "CSV_FIELDS",
    "Cost",
    "Gain",
    "ReportRow",
    "Summary",
    "aggregate",
    "canonical",
    "format_number",
    "gain_figure",
    "markdown",
    "per_dataset_markdown",
    "plot_gains",
    "plot_sensitivity",
    "plot_shots",
    "sensitivity_figure",
    "shots_figure",
    "write_report",
    "zero_shot_gains",
]
