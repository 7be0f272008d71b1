"""Results as JSON lines: one record per finished cell, appended atomically; a finished cell is never re-run."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

CELL_FIELDS = ("protocol", "dataset", "model", "fingerprint", "sampler", "seed", "shots", "views", "label", "method",
               "hyperparameters", "validation")


def cell_id(record: dict[str, Any]) -> str:
    key = json.dumps({k: record.get(k) for k in CELL_FIELDS}, sort_keys=True, default=str)
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def read_records(path: Path | str) -> list[dict[str, Any]]:
    """All complete records (a line cut short by an interruption is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / "records.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_record(path: Path, record: dict[str, Any]) -> None:
    # One write of a whole line, then fsync: a crash loses at most this line, never corrupts earlier ones.
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def done_cells(records: Iterable[dict[str, Any]]) -> set[str]:
    return {r["cell"] for r in records if "cell" in r}
