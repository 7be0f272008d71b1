"""Results as JSON lines: one record per finished cell, appended atomically; a finished cell is never re-run."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prolip.errors import ProlipError

# What defines a cell: the same values mean the same numbers (same seed, same numbers), so a re-run skips it.
CELL_FIELDS = (
    "protocol",
    "dataset",
    "source",
    "model",
    "fingerprint",
    "sampler",
    "seed",
    "shots",
    "views",
    "aug_seed",
    "label",
    "method",
    "hyperparameters",
    "validation",
    "templates",
    "setting",
)


def cell_id(record: dict[str, Any]) -> str:
    """Hash of the fields that define a cell (missing fields count as null)."""
    key = json.dumps({k: record.get(k) for k in CELL_FIELDS}, sort_keys=True, default=str)
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


REQUIRED = ("cell", "protocol", "dataset", "label", "method", "shots")


class RecordsError(ProlipError, ValueError):
    """A records file that holds no bench records; the message names the file and the first bad line."""


def read_records(path: Path | str) -> list[dict[str, Any]]:
    """All complete records. A line cut short by an interruption is ignored; a file whose lines are not bench
    records at all (another JSON file, a CSV) is a RecordsError naming the line, not an empty report."""
    path = Path(path)
    if path.is_dir():
        path = path / "records.jsonl"
    if not path.is_file():
        return []
    out, first_bad = [], None
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and all(k in record for k in REQUIRED):
            out.append(record)
        elif first_bad is None:
            first_bad = number
    if not out and first_bad is not None:
        raise RecordsError(
            f"{path}: line {first_bad} is not a bench record (records are JSON objects with "
            f"{', '.join(REQUIRED)}, one per line, as `prolip bench` writes them)"
        )
    return out


def append_record(path: Path | str, record: dict[str, Any]) -> None:
    # One write() of a whole line with O_APPEND, then fsync: a crash loses at most this line, never an earlier one.
    # A line cut short by an earlier crash is closed first, so it cannot swallow this record.
    data = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def done_cells(records: Iterable[dict[str, Any]]) -> set[str]:
    return {r["cell"] for r in records if "cell" in r}
