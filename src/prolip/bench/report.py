"""Aggregate records into mean ± std over seeds, per dataset and averaged over datasets; tables and plots.

One section per (protocol, model, weights, sampler, templates): rows are methods (× shots), columns datasets, then the
average over datasets (for transfer: over the targets, the source shown apart) and the paper's number where the
setting matches (see reference.py). Std is the population std over seeds; an average's std is the std over seeds of
the per-seed dataset averages (seeds present for every dataset).
"""
from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from prolip.bench.reference import reference_for

METRICS = ("accuracy", "base", "new", "hm", "start_accuracy")
SECTION = ("protocol", "model", "weights", "random_weights", "sampler", "templates_name")
TRANSFER = ("cross-dataset", "domain-generalisation")
RANDOM_NOTE = "RANDOM weights: numbers from a randomly initialised model, they say nothing about CLIP or the paper"


def _row_key(r: dict) -> tuple:
    hp = r.get("hyperparameters") or {}
    sweep = (hp.get("lr"), str(hp.get("lam"))) if r["protocol"] == "sensitivity" else None
    return tuple(r.get(k) for k in SECTION) + (r.get("source"), r["label"], sweep, r["shots"])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-dataset rows (mean ± std over seeds) and one average row per setting, each with ``paper`` where a
    reference matches. Rows carry ``mean``/``std`` for the headline metric and ``<metric>``/``<metric>_std``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        r = {**r, "templates_name": r.get("templates_name") or "dataset", "random_weights": bool(r.get("random_weights"))}
        groups[_row_key(r) + (r["dataset"],)].append(r)
    rows = []
    for key, rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        first = rs[0]
        row = {k: first.get(k) for k in SECTION + ("source", "label", "method", "shots", "dataset",
                                                    "hyperparameters")}
        row["seeds"] = sorted((r.get("seed") for r in rs), key=str)
        row["by_seed"] = {str(r.get("seed")): {m: r.get(m) for m in METRICS} for r in rs}
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                row[m], row[f"{m}_std"] = _mean_std(vals)
        row["mean"], row["std"] = row.get("accuracy"), row.get("accuracy_std")
        ref = reference_for(row, row["dataset"])
        row["paper"], row["paper_source"] = (ref.value, ref.source) if ref else (None, None)
        rows.append(row)
    return rows + _averages(rows)


def _averages(rows: list[dict]) -> list[dict]:
    by_setting: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["protocol"] in TRANSFER and row["dataset"] == row["source"]:
            continue  # the source's own accuracy is shown, not averaged with the targets
        by_setting[_row_key(row)].append(row)
    out = []
    for rs in by_setting.values():
        datasets = frozenset(r["dataset"] for r in rs)
        avg = {k: v for k, v in rs[0].items() if k not in ("by_seed", "paper", "paper_source")}
        avg["dataset"] = f"average ({len(rs)})"
        avg["datasets"] = sorted(datasets)
        common = set.intersection(*(set(r["by_seed"]) for r in rs))
        avg["seeds"] = sorted(common, key=str)
        for m in METRICS:
            if not all(m in r for r in rs):
                avg.pop(m, None), avg.pop(f"{m}_std", None)
                continue
            per_seed = [statistics.fmean(r["by_seed"][s][m] for r in rs) for s in common
                        if all(r["by_seed"][s][m] is not None for r in rs)]
            avg[m] = statistics.fmean(r[m] for r in rs)
            avg[f"{m}_std"] = _mean_std(per_seed)[1] if per_seed else None
        avg["mean"], avg["std"] = avg.get("accuracy"), avg.get("accuracy_std")
        for m in ("accuracy", "base", "new", "hm"):
            ref = reference_for(avg, datasets, metric=m)
            if ref:
                avg[f"paper_{m}" if m != "accuracy" else "paper"] = ref.value
                avg["paper_source"] = ref.source
        out.append(avg)
    return out


# ----------------------------------------------------------------------------------------------- markdown

def _fmt(row: dict | None, metric: str = "accuracy") -> str:
    if row is None or row.get(metric) is None:
        return "–"
    std = row.get(f"{metric}_std")
    return f"{row[metric]:.2f}" + ("" if std is None else f" ± {std:.2f}")


def _method_name(row: dict) -> str:
    hp = row.get("hyperparameters") or {}
    if row["protocol"] == "sensitivity":
        return f"{row['label']} lr={hp.get('lr'):g} λ={hp.get('lam')}"
    return row["label"]


def _section_title(key: tuple) -> str:
    protocol, model, weights, rnd, sampler, templates = key
    w = "RANDOM weights" if rnd else weights
    return f"{protocol} — {model} [{w}] — sampler {sampler} — templates {templates}"


def _table(rows: list[dict]) -> list[str]:
    protocol = rows[0]["protocol"]
    per_dataset = [r for r in rows if "datasets" not in r]
    averages = [r for r in rows if "datasets" in r]
    datasets = sorted({r["dataset"] for r in per_dataset}, key=lambda d: (d != (rows[0].get("source") or ""), d))
    b2n = protocol == "base2new"
    has_paper = any(any(k.startswith("paper") and r.get(k) is not None for k in r if k != "paper_source")
                    for r in rows)
    head = ["method", "shots"] + datasets + [f"average ({len({r['dataset'] for r in per_dataset if r['dataset'] != r.get('source')})})"]
    if protocol in TRANSFER:
        head[-1] = "target average"
    if has_paper:
        head.append("paper")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    index = {(_method_name(r), r["shots"], r["dataset"]): r for r in per_dataset}
    avg_index = {(_method_name(r), r["shots"]): r for r in averages}
    for name, shots in sorted({(_method_name(r), r["shots"]) for r in rows}, key=lambda k: (k[1], k[0])):
        avg = avg_index.get((name, shots))
        if b2n:
            cell = lambda r: "–" if r is None else f"{_fmt(r, 'base')} / {_fmt(r, 'new')} / {_fmt(r, 'hm')}"
        else:
            cell = _fmt
        cells = [cell(index.get((name, shots, d))) for d in datasets] + [cell(avg)]
        if has_paper:
            if avg is None:
                cells.append("")
            elif b2n:
                vals = [avg.get(f"paper_{m}") for m in ("base", "new", "hm")]
                cells.append(" / ".join("–" if v is None else f"{v:.2f}" for v in vals) + " (paper)"
                             if any(v is not None for v in vals) else "")
            else:
                cells.append(f"{avg['paper']:.2f} (paper)" if avg.get("paper") is not None else "")
        lines.append(f"| {name} | {shots} | " + " | ".join(cells) + " |")
    # Per-dataset paper numbers (e.g. ImageNet 16-shot) go under the table, not into the measured cells.
    for r in per_dataset:
        if r.get("paper") is not None:
            lines.append(f"\npaper: {_method_name(r)} {r['shots']}-shot on {r['dataset']}: {r['paper']:.2f} "
                         f"({r['paper_source']})")
    return lines


def _sensitivity_matrix(rows: list[dict]) -> list[str]:
    lines = []
    cells: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        if "datasets" in r:
            hp = r["hyperparameters"]
            cells[(r["label"], r["shots"])][(hp["lr"], float(hp["lam"]))] = r
    for (label, shots), grid in sorted(cells.items()):
        lrs = sorted({k[0] for k in grid})
        lams = sorted({k[1] for k in grid})
        lines += ["", f"{label}, {shots}-shot, average over datasets (rows lr, columns λ):", "",
                  "| lr \\ λ | " + " | ".join(f"{x:g}" for x in lams) + " |", "|---|" + "---:|" * len(lams)]
        for lr in lrs:
            lines.append(f"| {lr:g} | " + " | ".join(_fmt(grid.get((lr, lam))) for lam in lams) + " |")
    return lines


def markdown(rows: list[dict[str, Any]]) -> str:
    sections: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        sections[tuple(r.get(k) for k in SECTION)].append(r)
    out = ["# Results", "", "Top-1 accuracy (%), mean ± std over seeds. 'paper' = the paper's number for exactly this "
           "setting (model, OpenAI weights, protocol, method and hyperparameters, shots, templates, dataset set); "
           "see prolip/bench/reference.py for sources."]
    for key, rs in sorted(sections.items(), key=lambda kv: str(kv[0])):
        out += ["", f"## {_section_title(key)}", ""]
        if key[3]:
            out += [f"**{RANDOM_NOTE}.**", ""]
        if key[0] == "base2new":
            out += ["Cells: base / new / harmonic mean.", ""]
        if key[0] in TRANSFER:
            out += [f"Trained on {', '.join(sorted({str(r.get('source')) for r in rs}))}; other columns use each "
                    "target's own classifier. '–': the method cannot score another dataset's classes.", ""]
        out += _table(rs)
        if key[0] == "sensitivity":
            out += _sensitivity_matrix(rs)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_shots(rows: list[dict[str, Any]], path: Path, protocol: str = "fewshot") -> bool:
    """Accuracy vs shots averaged over datasets, one line per method (and model); paper points as hollow markers."""
    curves: dict[str, list] = defaultdict(list)
    paper: dict[str, list] = defaultdict(list)
    random = False
    for r in rows:
        if "datasets" in r and r["protocol"] == protocol and r.get("mean") is not None:
            name = f"{r['label']} ({r['model']}{', RANDOM' if r['random_weights'] else ''})"
            curves[name].append((r["shots"], r["mean"], r.get("std") or 0.0))
            if r.get("paper") is not None:
                paper[name].append((r["shots"], r["paper"]))
            random |= r["random_weights"]
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in sorted(curves.items()):
        pts.sort()
        line = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                           capsize=2, label=name)
        if paper.get(name):
            ax.plot(*zip(*sorted(paper[name])), "o--", mfc="none", color=line[0].get_color(), alpha=0.6,
                    label=f"{name.split(' (')[0]} (paper)")
    ax.set_xscale("log", base=2)
    shots = sorted({p[0] for pts in curves.values() for p in pts})
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.minorticks_off()
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy (%), mean over datasets")
    ax.set_title(f"{protocol}" + (" — RANDOM weights, not CLIP" if random else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_sensitivity(rows: list[dict[str, Any]], path: Path) -> bool:
    """Heatmap of dataset-averaged accuracy over lr × λ, one panel per (model, method label, shots)."""
    panels: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        if "datasets" in r and r["protocol"] == "sensitivity" and r.get("mean") is not None:
            hp = r["hyperparameters"]
            tag = f"{r['model']}{' RANDOM' if r['random_weights'] else ''} {r['label']} {r['shots']}-shot"
            panels[tag][(hp["lr"], float(hp["lam"]))] = r["mean"]
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (tag, grid) in zip(axes[0], sorted(panels.items())):
        lrs, lams = sorted({k[0] for k in grid}), sorted({k[1] for k in grid})
        values = [[grid.get((lr, lam), float("nan")) for lam in lams] for lr in lrs]
        im = ax.imshow(values, cmap="viridis", aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(len(lams)), [f"{x:g}" for x in lams])
        ax.set_yticks(range(len(lrs)), [f"{x:g}" for x in lrs])
        ax.set_xlabel("λ")
        ax.set_ylabel("lr")
        ax.set_title(tag, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------- files

CSV_FIELDS = ["protocol", "model", "weights", "random_weights", "sampler", "templates_name", "source", "dataset",
              "label", "method", "shots", "lr", "lam", "seeds", "mean", "std", "base", "base_std", "new", "new_std",
              "hm", "hm_std", "start_accuracy", "paper", "paper_base", "paper_new", "paper_hm", "paper_source"]


def write_report(records: list[dict[str, Any]], out: Path | str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    paths = {"markdown": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    paths["markdown"].write_text(markdown(rows))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            hp = r.get("hyperparameters") or {}
            sweep = {"lr": hp.get("lr"), "lam": hp.get("lam")} if r["protocol"] == "sensitivity" else {}
            w.writerow({**r, **sweep, "seeds": " ".join(map(str, r["seeds"]))})
    paths["json"].write_text(json.dumps([{k: v for k, v in r.items() if k != "by_seed"} for r in rows], indent=2,
                                        default=str))
    for protocol, name in (("fewshot", "accuracy_vs_shots.png"), ("fewshot-val", "accuracy_vs_shots_val.png")):
        if plot_shots(rows, out / name, protocol):
            paths[f"plot_{protocol}"] = out / name
    if plot_sensitivity(rows, out / "sensitivity_heatmap.png"):
        paths["heatmap"] = out / "sensitivity_heatmap.png"
    return paths
