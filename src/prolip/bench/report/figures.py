"""The report's figures: accuracy against shots, the sweep heatmaps, and the gain over zero-shot CLIP per dataset."""

from __future__ import annotations

import math
import statistics
import textwrap
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from prolip.bench.protocols import available, layout_of
from prolip.bench.report.rows import (
    HP_SYMBOLS,
    ReportRow,
    display_names,
    format_number,
    line_key,
    line_order,
    numeric_order,
    zero_shot_gains,
)

# ----------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seed_counts(rows: list[ReportRow]) -> str:
    counts = sorted({len(r.by_seed) for r in rows})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _panel_title(row: ReportRow) -> str:
    weights = "RANDOM weights, not CLIP" if row.random_weights else row.weights
    return f"{row.protocol} — {row.model} [{weights}]"


def _shot_curves(rows: list[ReportRow], protocol: str) -> dict[str, dict[str, list[ReportRow]]]:
    """Panel title → curve name → full-average rows, curves in table order. A group's members are drawn as the
    group's one curve (the table has them one by one); a curve with no average shown at all is left out."""
    panels: dict[str, dict[str, list[ReportRow]]] = defaultdict(lambda: defaultdict(list))
    names = display_names(rows)
    averages = [
        r
        for r in rows
        if r.kind == "average" and r.subset is None and r.protocol == protocol and not (r.group and r.of == "dataset")
    ]
    order = line_order(rows)
    for r in sorted(averages, key=lambda r: order(replace(r, shots=0))):
        panels[_panel_title(r)][names[line_key(r)]].append(r)
    return {
        title: {name: pts for name, pts in curves.items() if any(r.mean is not None for r in pts)}
        for title, curves in panels.items()
    }


def _draw_curves(ax, curves: dict[str, list[ReportRow]]) -> bool:
    """One line per curve, broken where an average is not shown; returns whether any point is missing."""
    handles, gaps = [], False
    for name, points in curves.items():
        points = sorted(points, key=lambda r: r.shots)
        means = [math.nan if r.mean is None else r.mean for r in points]
        gaps |= any(math.isnan(m) for m in means)
        line = ax.errorbar(
            [r.shots for r in points],
            means,
            yerr=[r.std or 0.0 for r in points],
            marker="o",
            ms=4,
            capsize=3,
            lw=1.4,
            label=name,
        )
        handles.append(line)
        paper = [(r.shots, r.paper) for r in points if r.paper is not None]
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
    all_shots = sorted({r.shots for pts in curves.values() for r in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_shots, [str(s) for s in all_shots])
    ax.minorticks_off()
    ax.set_xlabel("shots per class")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    return gaps


def shots_figure(rows: list[ReportRow], protocol: str | None = None):
    """Accuracy vs shots averaged over datasets, one panel per backbone, one curve per method (a group's members as
    the group's one curve); the paper's numbers as hollow circles where the setting matches exactly. None: nothing
    to draw. ``protocol``: whose rows (default: the first registered protocol that draws this figure)."""
    protocol = protocol or next(n for n in available() if layout_of(n).shots_figure)
    panels = {title: curves for title, curves in _shot_curves(rows, protocol).items() if curves}
    if not panels:
        return None
    plt = _pyplot()
    height = 4.2 + 0.16 * max(len(c) + sum(any(r.paper for r in p) for p in c.values()) for c in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), height), squeeze=False, layout="constrained")
    shown = [r for curves in panels.values() for pts in curves.values() for r in pts if r.mean is not None]
    gaps = False
    for ax, (title, curves) in zip(axes[0], sorted(panels.items()), strict=False):
        n = len(next(iter(curves.values()))[0].datasets or [])
        gaps |= _draw_curves(ax, curves)
        ax.set_ylabel(f"top-1 accuracy (%), mean over {n} datasets")
        ax.set_title(title, fontsize=9)
    caption = (
        f"Error bars: population std over seeds (n = {_seed_counts(shown)}) of the per-seed mean over datasets"
        + (" and the group's members" if any(r.of == "group" for r in shown) else "")
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


def plot_shots(rows: list[ReportRow], path: Path, protocol: str | None = None) -> bool:
    return _save(shots_figure(rows, protocol), path)


def _swept(row: ReportRow, protocol: str | None) -> bool:
    """Whether a row is a point of a sweep (of ``protocol``, or of any protocol that sweeps)."""
    return layout_of(row.protocol).sweep is not None and protocol in (None, row.protocol)


def _sweep_panels(rows: list[ReportRow], protocol: str | None) -> dict[tuple, dict]:
    """(backbone title, label) → shots → {(first, second swept value): mean over datasets}."""
    panels: dict[tuple, dict] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.kind == "average" and r.subset is None and _swept(r, protocol):
            hp, (down, across) = r.hyperparameters, layout_of(r.protocol).sweep or ("", "")
            panels[(_panel_title(r), r.label)][r.shots][(hp.get(down), hp.get(across))] = r.mean
    return panels


def _sweep_symbols(rows: list[ReportRow], protocol: str | None) -> tuple[str, str]:
    down, across = next(layout_of(r.protocol).sweep or ("", "") for r in rows if _swept(r, protocol))
    return HP_SYMBOLS.get(down, down), HP_SYMBOLS.get(across, across)


def _heatmap(ax, grid: dict, norm, cmap, symbols: tuple[str, str]) -> None:
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
    ax.set_xlabel(symbols[1], fontsize=8)
    ax.set_ylabel(symbols[0], fontsize=8)


def sensitivity_figure(rows: list[ReportRow], protocol: str | None = None):
    """Heatmaps of dataset-averaged accuracy over a protocol's two swept hyperparameters (the paper's lr × λ): one
    row of panels per method label, one column per shot count, all on ONE colour scale with one labelled colour
    bar. ``protocol``: the rows of that protocol only (default: of every protocol that sweeps)."""
    panels = _sweep_panels(rows, protocol)
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
                _heatmap(axes[i][j], by_shots[s], norm, cmap, _sweep_symbols(rows, protocol))
                axes[i][j].set_title(f"{label}\n{s}-shot", fontsize=8)
            else:
                axes[i][j].set_axis_off()
    datasets = {len(r.datasets or []) for r in rows if r.kind == "average" and _swept(r, protocol)}
    fig.colorbar(
        ScalarMappable(norm, cmap),
        ax=axes,
        shrink=0.85,
        label=f"top-1 accuracy (%), mean over {'/'.join(map(str, sorted(datasets)))} datasets and seeds",
    )
    fig.suptitle(" · ".join(sorted({t for t, _ in panels})), fontsize=9)
    return fig


def plot_sensitivity(rows: list[ReportRow], path: Path, protocol: str | None = None) -> bool:
    return _save(sensitivity_figure(rows, protocol), path)


def _gain_panels(rows: list[ReportRow]) -> dict[tuple, dict[str, dict[str, float]]]:
    """(section title, shots) → line name → {dataset: gain}, with each line's mean over its datasets."""
    panels: dict[tuple, dict] = defaultdict(lambda: defaultdict(dict))
    names = display_names(rows)
    for g in zero_shot_gains(rows):
        panels[(_panel_title(g.row), g.shots)][names[line_key(g.row)]][g.dataset] = g.gain
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


def gain_figure(rows: list[ReportRow]):
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


def plot_gains(rows: list[ReportRow], path: Path) -> bool:
    return _save(gain_figure(rows), path)
