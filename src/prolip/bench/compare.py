"""Two results folders, cell by cell: did they use the same images and weights, and do their numbers agree?

Cells are matched by what defines them (the record's cell fields) less the weights' fingerprint, so a run with
other weights is matched and named as such instead of showing as two unrelated cells. Images are compared by the
fingerprints each record carries (``images``: support, validation, evaluation; a hash over the images' content
hashes, so the same images at another path match). Numbers are the metrics the protocols declare, plus ECE where
both have it; they agree when they differ by at most ``tolerance`` (points, as the records store them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prolip.bench.records import CELL_FIELDS

DEFAULT_TOLERANCE = 1e-6  # points: what the same images, weights and thread count give (bitwise, in practice)
EXTRA_NUMBERS = ("ece",)  # compared besides the protocols' metrics, where both records have them
_MATCH_FIELDS = tuple(f for f in CELL_FIELDS if f != "fingerprint")

AGREE, DIFFERS, OTHER_IMAGES, OTHER_WEIGHTS, ONLY_A, ONLY_B = (
    "agree",
    "numbers differ",
    "other images",
    "other weights",
    "only in A",
    "only in B",
)


@dataclass(frozen=True)
class CellComparison:
    """One matched (or unmatched) cell: what it is, its verdict, and every compared number that differs."""

    name: str
    verdict: str
    differences: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    images: dict[str, bool] = field(default_factory=dict)  # set -> same fingerprint (sets both records have)


@dataclass(frozen=True)
class Comparison:
    cells: list[CellComparison]
    tolerance: float

    def count(self, verdict: str) -> int:
        return sum(c.verdict == verdict for c in self.cells)

    @property
    def agrees(self) -> bool:
        return all(c.verdict == AGREE for c in self.cells)


def match_key(record: Mapping[str, Any]) -> str:
    return json.dumps({k: record.get(k) for k in _MATCH_FIELDS}, sort_keys=True, default=str)


def cell_name(record: Mapping[str, Any]) -> str:
    seed = "" if record.get("seed") is None else f" seed {record['seed']}"
    source = f"{record['source']}→" if record.get("source") else ""
    where = f"{source}{record.get('dataset')} {record.get('shots')}-shot{seed}"
    return f"{record.get('protocol')} {where} {record.get('label')}"


def compare_records(
    a: Iterable[Mapping[str, Any]],
    b: Iterable[Mapping[str, Any]],
    metrics: Iterable[str],
    tolerance: float = DEFAULT_TOLERANCE,
) -> Comparison:
    """Every cell of ``a`` and ``b`` (the last record of a cell counts, as the report reads them), in ``a``'s order
    then ``b``'s own."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    numbers = tuple(dict.fromkeys((*metrics, *EXTRA_NUMBERS)))
    left = {match_key(r): r for r in a}
    right = {match_key(r): r for r in b}
    cells = [
        _compare(left[k], right[k], numbers, tolerance) if k in right else CellComparison(cell_name(left[k]), ONLY_A)
        for k in left
    ]
    cells += [CellComparison(cell_name(right[k]), ONLY_B) for k in right if k not in left]
    return Comparison(cells, tolerance)


def _compare(a: Mapping[str, Any], b: Mapping[str, Any], numbers: tuple[str, ...], tolerance: float) -> CellComparison:
    images_a, images_b = a.get("images") or {}, b.get("images") or {}
    images = {s: images_a[s] == images_b[s] for s in images_a if s in images_b}
    differences = {
        k: (a.get(k), b.get(k)) for k in numbers if (k in a or k in b) and not _close(a.get(k), b.get(k), tolerance)
    }
    if a.get("fingerprint") != b.get("fingerprint"):
        verdict = OTHER_WEIGHTS
    elif not all(images.values()):
        verdict = OTHER_IMAGES
    else:
        verdict = DIFFERS if differences else AGREE
    return CellComparison(cell_name(a), verdict, differences, images)


def _close(x: Any, y: Any, tolerance: float) -> bool:
    if x is None or y is None:
        return x is None and y is None
    if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
        return x == y
    return abs(x - y) <= tolerance or (math.isnan(x) and math.isnan(y))


def format_comparison(comparison: Comparison, name_a: str, name_b: str) -> str:
    """The cells that do not agree, one line each, then a tally; images that differ are named by set."""
    lines = [f"A: {name_a}", f"B: {name_b}", f"tolerance: {comparison.tolerance:g} points"]
    for cell in comparison.cells:
        if cell.verdict == AGREE:
            continue
        detail = ""
        if cell.verdict == OTHER_IMAGES:
            detail = ": " + ", ".join(s for s, same in cell.images.items() if not same) + " images differ"
        if cell.differences:
            detail += ("; " if detail else ": ") + ", ".join(
                f"{k} {_number(x)} vs {_number(y)}" for k, (x, y) in cell.differences.items()
            )
        lines.append(f"{cell.verdict:>14}  {cell.name}{detail}")
    without = sum(1 for c in comparison.cells if c.verdict in (AGREE, DIFFERS) and not c.images)
    tally = ", ".join(
        f"{comparison.count(v)} {v}" for v in (AGREE, DIFFERS, OTHER_IMAGES, OTHER_WEIGHTS, ONLY_A, ONLY_B)
    )
    lines.append(f"{len(comparison.cells)} cells: {tally}")
    if without:
        lines.append(f"{without} matched cell(s) carry no image fingerprints (older records): images not checked")
    return "\n".join(lines)


def _number(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)
