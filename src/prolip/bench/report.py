"""Aggregate records into mean ± std over seeds, per dataset and averaged over datasets; tables and plots."""
from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from prolip.bench.reference import reference_for


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (protocol, model, weights, label, shots, dataset) plus an "average" row over datasets."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("accuracy") is None:
            continue
        groups[(r["protocol"], r["model"], r["weights"], bool(r.get("random_weights")), r["sampler"], r["label"],
                r["shots"], r["dataset"])].append(r)
    rows = []
    for (protocol, model, weights, rnd, sampler, label, shots, dataset), rs in sorted(groups.items()):
        accs = [r["accuracy"] for r in rs]
        row = {"protocol": protocol, "model": model, "weights": weights, "random_weights": rnd, "sampler": sampler,
               "method": label, "shots": shots, "dataset": dataset, "seeds": sorted(r["seed"] for r in rs),
               "mean": statistics.fmean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0}
        for extra in ("base", "new"):
            vals = [r[extra] for r in rs if r.get(extra) is not None]
            if vals:
                row[extra] = statistics.fmean(vals)
        rows.append(row)
    by_setting: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_setting[tuple(row[k] for k in ("protocol", "model", "weights", "random_weights", "sampler", "method",
                                           "shots"))].append(row)
    averages = []
    for key, rs in sorted(by_setting.items()):
        protocol, model, weights, rnd, sampler, label, shots = key
        avg = {"protocol": protocol, "model": model, "weights": weights, "random_weights": rnd, "sampler": sampler,
               "method": label, "shots": shots, "dataset": f"average ({len(rs)})", "seeds": rs[0]["seeds"],
               "mean": statistics.fmean(r["mean"] for r in rs), "std": statistics.fmean(r["std"] for r in rs),
               "paper": reference_for(model, weights, rnd, protocol, label, shots, len(rs))}
        averages.append(avg)
    return rows + averages


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| protocol | model [weights] | sampler | dataset | method | shots | seeds | top-1 % (mean ± std) | paper |",
             "|---|---|---|---|---|---:|---|---:|---:|"]
    for r in rows:
        weights = "RANDOM weights" if r["random_weights"] else r["weights"]
        extra = f" (base {r['base']:.2f} / new {r['new']:.2f})" if "base" in r and "new" in r else ""
        paper = f"{r['paper']:.2f} (paper)" if r.get("paper") is not None else ""
        lines.append(f"| {r['protocol']} | {r['model']} [{weights}] | {r['sampler']} | {r['dataset']} | "
                     f"{r['method']} | {r['shots']} | {','.join(map(str, r['seeds']))} | "
                     f"{r['mean']:.2f} ± {r['std']:.2f}{extra} | {paper} |")
    note = ("\nNumbers marked RANDOM weights come from randomly initialised models and say nothing about CLIP. "
            "'paper' = Fahes et al. (arXiv 2410.05270), shown only where model, weights, protocol and the 11-dataset "
            "average match.\n")
    return "\n".join(lines) + "\n" + note


def plot_shots(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curves: dict[str, list] = defaultdict(list)
    random = False
    for r in rows:
        if r["dataset"].startswith("average") and r["protocol"] == "fewshot":
            curves[f"{r['method']} ({r['model']})"].append((r["shots"], r["mean"]))
            random |= r["random_weights"]
    for label, pts in sorted(curves.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy (%), mean over datasets")
    ax.set_title("few-shot accuracy" + (" — RANDOM weights" if random else ""), fontsize=9)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(records: list[dict[str, Any]], out: Path | str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    paths = {"markdown": out / "results.md", "csv": out / "results.csv", "json": out / "results.json",
             "plot": out / "accuracy_vs_shots.png"}
    paths["markdown"].write_text(markdown(rows))
    fieldnames = ["protocol", "model", "weights", "random_weights", "sampler", "dataset", "method", "shots", "seeds",
                  "mean", "std", "base", "new", "paper"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "seeds": " ".join(map(str, r["seeds"]))})
    paths["json"].write_text(json.dumps(rows, indent=2))
    plot_shots(rows, paths["plot"])
    return paths
