"""Where a classifier fails: top-k accuracy, per-class accuracy, the confusion matrix and its most confused pairs.

The computations are pure (logits and labels in, plain numbers and lists out, JSON-ready). The files ``prolip eval
--out`` writes from them (a per-class CSV, a confusion-matrix picture readable at 10 and at 1000 classes) are at
the end, the only part that touches matplotlib or the disk.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prolip.functional import expected_calibration_error

TOP_K = 5
SHOWN = 5  # worst classes and confused pairs printed by `prolip eval`, and kept in a run's manifest
FULL_MATRIX_UP_TO = 30  # classes: beyond this the picture shows the classes of the top confusions only
PICTURED_PAIRS = 15


# ---- computations (pure) -----------------------------------------------------------------------------------------


def confusion_matrix(
    predictions: Sequence[int] | Tensor, labels: Sequence[int] | Tensor, num_classes: int
) -> list[list[int]]:
    """Counts [true class][predicted class]."""
    pred = torch.as_tensor(predictions, dtype=torch.long).reshape(-1)
    true = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(f"{len(pred)} predictions for {len(true)} labels")
    both = torch.cat([true, pred])
    if len(both) and (int(both.min()) < 0 or int(both.max()) >= num_classes):
        raise ValueError(f"class indices must lie in 0..{num_classes - 1}")
    counts = torch.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).tolist()


def topk_accuracy(logits: Tensor, labels: Sequence[int] | Tensor, k: int) -> float | None:
    """Percentage of images whose class is among the ``k`` highest logits; None when there are at most ``k``
    classes (it would be 100% by construction) or no images."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if logits.shape[-1] <= k or not len(labels):
        return None
    top = logits.topk(k, dim=-1).indices
    return 100.0 * float((top == labels[:, None]).any(dim=-1).float().mean())


@dataclass(frozen=True)
class ClassResult:
    index: int
    name: str
    images: int
    correct: int
    accuracy: float | None  # percent; None for a class with no images
    confused_with: str | None  # the class its images are most often taken for
    confused_count: int


def per_class(confusion: list[list[int]], classnames: Sequence[str]) -> list[ClassResult]:
    out = []
    for i, row in enumerate(confusion):
        images, correct = sum(row), row[i]
        wrong = [(count, j) for j, count in enumerate(row) if j != i and count]
        count, j = max(wrong, key=lambda cj: (cj[0], -cj[1])) if wrong else (0, None)
        out.append(
            ClassResult(
                i,
                classnames[i],
                images,
                correct,
                100.0 * correct / images if images else None,
                classnames[j] if j is not None else None,
                count,
            )
        )
    return out


def mean_per_class_accuracy(rows: Sequence[ClassResult]) -> float | None:
    """The mean of the per-class accuracies, over the classes that have images (each class weighs the same)."""
    scored = [r.accuracy for r in rows if r.accuracy is not None]
    return sum(scored) / len(scored) if scored else None


def worst_classes(rows: Sequence[ClassResult], n: int = SHOWN) -> list[ClassResult]:
    """The ``n`` least accurate classes (ties: more images first, then class order)."""
    scored = [r for r in rows if r.accuracy is not None]
    return sorted(scored, key=lambda r: (r.accuracy, -r.images, r.index))[:n]


def most_confused(confusion: list[list[int]], classnames: Sequence[str], n: int = SHOWN) -> list[dict[str, Any]]:
    """The ``n`` largest off-diagonal counts: which true class is taken for which, how often, and what share of
    the true class's images that is (ties: class order)."""
    pairs = [(count, i, j) for i, row in enumerate(confusion) for j, count in enumerate(row) if i != j and count]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [
        {"true": classnames[i], "predicted": classnames[j], "count": count, "share": 100.0 * count / sum(confusion[i])}
        for count, i, j in pairs[:n]
    ]


def diagnose(logits: Tensor, labels: Sequence[int] | Tensor, classnames: Sequence[str]) -> dict[str, Any]:
    """Everything ``prolip eval`` reports, JSON-ready: accuracies, the per-class table and the confusion matrix."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    confusion = confusion_matrix(logits.argmax(dim=-1), labels, len(classnames))
    rows = per_class(confusion, classnames)
    correct = sum(confusion[i][i] for i in range(len(confusion)))
    return {
        "accuracy": 100.0 * correct / len(labels) if len(labels) else None,
        "top5_accuracy": topk_accuracy(logits, labels, TOP_K),
        "ece": expected_calibration_error(logits, labels) if len(labels) else None,
        "mean_per_class_accuracy": mean_per_class_accuracy(rows),
        "worst_classes": [_brief(r) for r in worst_classes(rows)],
        "most_confused": most_confused(confusion, classnames),
        "per_class": [asdict(r) for r in rows],
        "confusion_matrix": confusion,
    }


def _brief(row: ClassResult) -> dict[str, Any]:
    return {"class": row.name, "accuracy": row.accuracy, "correct": row.correct, "images": row.images}


def summary_lines(diagnosis: dict[str, Any]) -> list[str]:
    """The worst classes and the most confused pairs, one line each, as ``prolip eval`` prints them."""
    worst = ", ".join(
        f"{w['class']} {w['accuracy']:.1f}% ({w['correct']}/{w['images']})" for w in diagnosis["worst_classes"]
    )
    confused = ", ".join(
        f"{c['true']} → {c['predicted']} {c['count']}× ({c['share']:.0f}% of {c['true']})"
        for c in diagnosis["most_confused"]
    )
    return [f"worst classes: {worst or '-'}", f"most confused (true → predicted): {confused or 'none'}"]


# ---- files (the edge: disk and matplotlib) -------------------------------------------------------------------------

CSV_FIELDS = ("index", "name", "images", "correct", "accuracy", "confused_with", "confused_count")


def write_per_class_csv(diagnosis: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in diagnosis["per_class"]:
            acc = row["accuracy"]
            w.writerow(
                {**row, "accuracy": "" if acc is None else f"{acc:.2f}", "confused_with": row["confused_with"] or ""}
            )


def pictured_classes(confusion: list[list[int]], pairs: int = PICTURED_PAIRS) -> list[int]:
    """Which classes the picture shows, in order: all of them up to FULL_MATRIX_UP_TO classes; beyond, the classes
    of the largest confusions, each pair placed side by side as it first appears, so clusters of classes that are
    taken for one another form blocks near the diagonal."""
    n = len(confusion)
    if n <= FULL_MATRIX_UP_TO:
        return list(range(n))
    found = sorted(
        ((count, i, j) for i, row in enumerate(confusion) for j, count in enumerate(row) if i != j and count),
        key=lambda p: (-p[0], p[1], p[2]),
    )[:pairs]
    order: list[int] = []
    for _, i, j in found:
        for c in (i, j):
            if c not in order:
                order.append(c)
    return order


def confusion_figure(diagnosis: dict[str, Any], title: str = ""):
    """The confusion matrix as row shares (each true class sums to 100%): the whole matrix for a few classes, the
    classes of the top confusions (with a bar chart of those confusions) for many."""
    plt = _pyplot()
    confusion = diagnosis["confusion_matrix"]
    names = [r["name"] for r in diagnosis["per_class"]]
    shown = pictured_classes(confusion)
    full = len(shown) == len(confusion)
    size = max(4.5, 0.26 * len(shown) + 2.5)
    fig, axes = plt.subplots(
        1,
        1 if full else 2,
        figsize=(size if full else size + 5.0, size),
        squeeze=False,
        layout="constrained",
        width_ratios=[size, 5.0] if not full else None,
    )
    _matrix_panel(axes[0][0], confusion, names, shown, annotate=len(shown) <= 15)
    if not full:
        _pairs_panel(axes[0][1], diagnosis["most_confused_pictured"])
    scope = (
        f"all {len(confusion)} classes"
        if full
        else f"the {len(shown)} classes of the {PICTURED_PAIRS} largest confusions, of {len(confusion)} classes"
    )
    fig.suptitle(
        f"{title + ': ' if title else ''}confusion matrix, {scope}; colour = share of the true class's images",
        fontsize=9,
    )
    return fig


def _matrix_panel(ax, confusion, names, shown, annotate: bool) -> None:
    shares = [[100.0 * confusion[i][j] / max(1, sum(confusion[i])) for j in shown] for i in shown]
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=100)
    if annotate:
        for a, i in enumerate(shown):
            for b, j in enumerate(shown):
                if confusion[i][j]:
                    ax.text(
                        b,
                        a,
                        str(confusion[i][j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if shares[a][b] > 55 else "black",
                    )
    labels = [names[i] for i in shown]
    fontsize = 8 if len(shown) <= 15 else 6
    ax.set_xticks(range(len(shown)), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=fontsize)
    ax.set_yticks(range(len(shown)), labels, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.figure.colorbar(image, ax=ax, shrink=0.7, label="% of the true class")


def _pairs_panel(ax, pairs: list[dict[str, Any]]) -> None:
    labels = [f"{p['true']} → {p['predicted']}" for p in pairs][::-1]
    counts = [p["count"] for p in pairs][::-1]
    bars = ax.barh(range(len(pairs)), counts, color="tab:blue")
    for bar, p in zip(bars, pairs[::-1], strict=True):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {p['count']} ({p['share']:.0f}%)",
            va="center",
            fontsize=7,
        )
    ax.set_yticks(range(len(pairs)), labels, fontsize=7)
    ax.set_xlabel("images (share of the true class)")
    ax.set_title(f"the {len(pairs)} largest confusions (true → predicted)", fontsize=9)
    ax.margins(x=0.25)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, and no display needed
    import matplotlib.pyplot as plt

    return plt


def write_eval_files(diagnosis: dict[str, Any], folder: Path, title: str = "") -> list[Path]:
    """``per_class.csv`` and ``confusion_matrix.png`` in ``folder``; the paths written."""
    csv_path, png_path = folder / "per_class.csv", folder / "confusion_matrix.png"
    write_per_class_csv(diagnosis, csv_path)
    pictured = {
        **diagnosis,
        "most_confused_pictured": most_confused(
            diagnosis["confusion_matrix"], [r["name"] for r in diagnosis["per_class"]], PICTURED_PAIRS
        ),
    }
    fig = confusion_figure(pictured, title)
    fig.savefig(png_path, dpi=130)
    _pyplot().close(fig)
    return [csv_path, png_path]
