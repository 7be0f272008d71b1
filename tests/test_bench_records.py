"""Bench records are one typed schema (:class:`prolip.bench.records.Record`) that reads every records file written
before it: the fixture under tests/fixtures/bench_c404782 was written by the code of commit c404782 (untyped dicts),
for every protocol. Each of its records loads, keeps its cell id, and writes back the same JSON object; a key the
schema does not know (a field newer code adds) is kept; and the report over the fixture is, byte for byte, what that
code's report wrote (results.json: the same objects, as its key order varied from run to run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prolip.bench.records import CELL_FIELDS, Record, RecordsError, append_record, cell_id, load_records, read_records
from prolip.bench.report import write_report

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bench_c404782"


def _stored() -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / "records.jsonl").read_text().splitlines()]


def test_the_fixture_covers_every_built_in_protocol():
    from prolip.bench.protocols import CrossDataset, protocol_class

    stored = {r["protocol"] for r in _stored()}
    assert len(stored) == 6 and all(protocol_class(name) for name in stored)
    assert {protocol_class(name).score for name in stored} >= {CrossDataset.score}  # domain generalisation's too


def test_every_stored_record_loads_keeps_its_cell_id_and_writes_back_the_same_object():
    for stored in _stored():
        record = Record.from_json(stored)
        assert record.to_json() == stored and list(record.to_json()) == list(stored)  # same keys, same order
        assert record.cell == stored["cell"] == cell_id(record)
        identity = {k: stored[k] for k in stored if k in Record.__dataclass_fields__ and k not in ("cell", "results")}
        assert Record.new(**identity).cell == stored["cell"]  # a new record for the same cell: the same id
        assert dict(record) == stored and record["label"] == stored["label"]  # read access as the stored object


def test_an_older_record_without_newer_fields_loads_and_keeps_its_id():
    stored = _stored()[0]
    old = {k: v for k, v in stored.items() if k not in ("group", "selects", "augmentation", "weights", "views")}
    record = Record.from_json(old)
    assert record.cell == stored["cell"] and record.group is None and record.selects is None
    assert cell_id(record) == cell_id(old)  # a missing field counts as null, as it always did
    assert {k: v for k, v in record.to_json().items() if k in old} == old


def test_unknown_keys_are_kept_in_order_and_written_back(tmp_path):
    stored = {**_stored()[0], "support_fingerprint": "abc", "environment": {"torch": "9.9"}}
    record = Record.from_json(stored)
    assert record.results["support_fingerprint"] == "abc" and record.to_json() == stored
    path = tmp_path / "records.jsonl"
    append_record(path, record)
    (again,) = load_records(path)
    assert again == record and again.to_json()["environment"] == {"torch": "9.9"}
    assert read_records(path) == [stored]


def test_with_results_adds_in_order_and_an_existing_key_keeps_its_place():
    record = Record.new(protocol="fewshot", dataset="d", label="m", method="m", shots=1)
    record = record.with_results(accuracy=None, eval_images=3).with_results(accuracy=50.0, note="x")
    assert list(record.results) == ["accuracy", "eval_images", "note"] and record.accuracy == 50.0
    assert set(CELL_FIELDS) <= set(record.to_json())


def test_a_record_without_the_required_fields_is_refused():
    with pytest.raises(RecordsError, match="no cell, protocol"):
        Record.from_json({"dataset": "d"})


def test_the_report_over_the_fixture_is_byte_for_byte_what_the_untyped_report_wrote(tmp_path):
    paths = write_report(read_records(FIXTURE / "records.jsonl"), tmp_path)
    for kind in ("markdown", "csv"):
        assert paths[kind].read_bytes() == (FIXTURE / paths[kind].name).read_bytes(), kind
    # The same objects: a group row's shared hyperparameters come out of a set, in an order no run promised.
    assert json.loads(paths["json"].read_text()) == json.loads((FIXTURE / "results.json").read_text())
    assert {p.name for p in paths.values()} >= {"accuracy_vs_shots.png", "sensitivity_heatmap.png"}
    typed = write_report(load_records(FIXTURE / "records.jsonl"), tmp_path / "typed")
    assert typed["markdown"].read_bytes() == paths["markdown"].read_bytes()
