"""The report's rows are typed (issue 21): ``aggregate`` builds frozen :class:`ReportRow` s from typed records once,
and the report's modules read their fields, never a row by string key (checked on the source, by a check that can
fail); the stored form a row gives (results.json, read access by key) is the one the untyped report wrote."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from prolip.bench.records import Record
from prolip.bench.report import CSV_FIELDS, ReportRow, Summary, aggregate
from prolip.bench.report import _csv_row as csv_row

REPORT = Path(__file__).resolve().parents[1] / "src" / "prolip" / "bench" / "report"

# Where the report may read by key, and why: a record's ``results`` are its free-form JSON (what scoring wrote,
# records.py), read once, in rows.py, into typed parts.
READS_RECORD_RESULTS = {("rows.py", "_results_of"), ("rows.py", "_selection_hows")}


def string_key_reads(source: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    """``x["key"]``, ``x[f"..."]`` and ``x.get("key", ...)`` read anywhere but in the ``allowed`` functions."""
    found: list[str] = []

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            where = node.name if where == "" else where
        literal = lambda n: isinstance(n, ast.JoinedStr) or (isinstance(n, ast.Constant) and isinstance(n.value, str))
        read = isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and literal(node.slice)
        read |= (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and bool(node.args)
            and literal(node.args[0])
        )
        if read and where not in allowed:
            found.append(ast.unparse(node))
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(ast.parse(source), "")
    return found


def test_the_string_key_checker_can_fail():
    before = 'def f(row, r):\n    return row["accuracy"], r.get("ece"), row[f"{m}_std"], (r.get("cost") or {})["s"]\n'
    assert string_key_reads(before) == [
        "row['accuracy']",
        "r.get('ece')",
        "row[f'{m}_std']",
        "(r.get('cost') or {})['s']",
        "r.get('cost')",
    ]
    assert string_key_reads(before, frozenset({"f"})) == []
    # Reads by a variable (a metric a protocol declares), writes, and attributes are not string-key reads.
    assert string_key_reads('def g(row, m, d):\n    d["x"] = row.mean_of(m) or row.metrics[m]\n') == []


@pytest.mark.parametrize("module", sorted(p.name for p in REPORT.glob("*.py")))
def test_no_report_module_reads_a_row_by_string_key(module):
    allowed = frozenset(name for file, name in READS_RECORD_RESULTS if file == module)
    assert string_key_reads((REPORT / module).read_text(), allowed) == []


def _record(dataset, seed, accuracy, **extra):
    identity = {"protocol": "fewshot", "dataset": dataset, "label": "m", "method": "zeroshot", "shots": 1, "seed": seed}
    return identity | {"accuracy": accuracy, "ece": 1.0, "seconds": 2.0, "selected": {"how": "rule"}, **extra}


def test_rows_are_frozen_typed_and_read_by_key_as_results_json_holds_them():
    stored = [_record("A", 1, 60.0), _record("A", 2, 62.0), _record("B", 1, 70.0), _record("B", 2, 80.0)]
    typed = [Record.from_json({"cell": "", **r}) for r in stored]
    rows = aggregate(typed)
    assert all(isinstance(r, ReportRow) for r in rows)
    a = next(r for r in rows if r.kind == "dataset" and r.dataset == "A")
    assert (a.mean, a.std, a.seeds) == (61.0, 1.0, [1, 2]) and a.metrics["ece"] == Summary(1.0, 0.0, 2)
    assert a.cost is not None and a.cost.seconds == 2.0 and a.card is not None and a.card.hows == {"rule": 2}
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.label = "other"  # type: ignore[misc]
    # Read access by key is the stored form, keys in the order the untyped report wrote them.
    assert a["accuracy"] == 61.0 and a["accuracy_scored"] == 2 and "paper" not in a and dict(a) == a.to_json()
    assert list(a)[-8:] == [
        "accuracy",
        "accuracy_std",
        "accuracy_scored",
        "ece",
        "ece_std",
        "ece_scored",
        "mean",
        "std",
    ]
    assert "by_seed" in a and "by_seed" not in a.to_json(by_seed=False)
    average = next(r for r in rows if r.kind == "average")
    assert (average.of, average.datasets, average.mean) == ("dataset", ["A", "B"], 68.0)
    assert [dict(r) for r in aggregate(stored)] == [dict(r) for r in rows]  # stored objects read the same


def test_a_csv_row_has_every_column_and_no_other():
    rows = aggregate([_record("A", 1, 60.0), _record("B", 1, 70.0)])
    assert all(list(csv_row(r)) == CSV_FIELDS for r in rows)
