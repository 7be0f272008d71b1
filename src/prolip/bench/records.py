"""Results as JSON lines: one record per finished cell, appended atomically; a finished cell is never re-run.

Under torchrun each rank appends to its own file beside ``records.jsonl`` (``records.rank-R-of-N.jsonl``); rank 0
merges them into ``records.jsonl`` when every rank is done (:func:`merge_rank_records`), and a finished cell is
one in any of these files (:func:`finished_cells`), so a re-run at any world size resumes what a rank left.

:class:`Record` is the one schema of a record: the fields that say which cell it is (typed, always written), its
``cell`` id, and ``results``: what scoring wrote (metrics, cost, notes, provenance), in the order written. A stored
key the schema does not name is kept in ``results`` as read, so a record that newer code wrote (a field this
version does not know) loads, and writes back, unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
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


# What the report groups records by, in this order: a section (one table) and, within it, the setting that makes two
# results different lines besides label, method, hyperparameters and shots.
SECTION_FIELDS = ("protocol", "model", "weights", "random_weights", "sampler", "templates_name")
SETTING_FIELDS = ("source", "fingerprint", "views", "aug_seed", "validation", "setting")
LINE_FIELDS = SECTION_FIELDS + SETTING_FIELDS + ("label", "method", "hyperparameters", "shots")


def cell_id(record: Mapping[str, Any]) -> str:
    """Hash of the fields that define a cell (missing fields count as null)."""
    key = json.dumps({k: record.get(k) for k in CELL_FIELDS}, sort_keys=True, default=str)
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


REQUIRED = ("cell", "protocol", "dataset", "label", "method", "shots")


@dataclass(frozen=True, eq=True, kw_only=True)
class Record(Mapping[str, Any]):
    """One finished (or, while it is scored, pending) cell. Read access by key (``record["accuracy"]``) sees the
    JSON object it is stored as, so code written against the stored form keeps working. The fields that define it
    are declared in the order Bench has always written them (``cell`` and the results follow)."""

    protocol: str
    dataset: str
    source: str | None = None  # transfer: the dataset trained on; tta: ``train_on``
    model: str | None = None
    weights: str | None = None
    random_weights: bool | None = None
    fingerprint: str | None = None
    sampler: str | None = None
    seed: int | None = None
    shots: int
    views: int | None = None
    aug_seed: int | None = None
    label: str
    method: str
    hyperparameters: dict[str, Any] | None = None
    validation: bool | None = None
    selects: str | None = None
    augmentation: str | None = None
    templates_name: str | None = None
    templates: list[str] | None = None
    setting: dict[str, Any] | None = None
    group: str | None = None
    # Where W sat in the image tower (prolip.backbones.SITES; None: written before sites, native). Not part of the
    # cell id: an output site's fingerprint is its own already, and native cells keep the ids they always had.
    site: str | None = None
    cell: str = ""
    results: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, **identity: Any) -> Record:
        """A pending cell's record, its ``cell`` id computed from what defines it."""
        record = cls(**identity)
        return replace(record, cell=cell_id(record.to_json()))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Record:
        """A stored record; missing schema fields read as null (older files), unknown keys are kept in ``results``."""
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise RecordsError(f"not a bench record: no {', '.join(missing)}")
        named = {k: data[k] for k in _IDENTITY if k in data}
        results = {k: v for k, v in data.items() if k not in _IDENTITY}
        return cls(**named, results=results)

    def to_json(self) -> dict[str, Any]:
        """The stored form: the fields that define the cell (in the order written since records began), then
        ``cell``, then the results in the order they were written."""
        out = {k: getattr(self, k) for k in _WRITTEN if k not in _WHEN_SET or getattr(self, k) is not None}
        out["cell"] = self.cell
        out.update(self.results)
        return out

    def with_results(self, **values: Any) -> Record:
        """This record with more results (an existing key keeps its place and takes the new value)."""
        return replace(self, results={**self.results, **values})

    # -- read access as the stored JSON object ---------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in _IDENTITY:
            return getattr(self, key)
        return self.results[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())

    @property
    def accuracy(self) -> float | None:
        return self.results.get("accuracy")

    @property
    def note(self) -> str | None:
        return self.results.get("note")


# The defining fields in the order they are written (``cell`` follows them).
_WRITTEN = tuple(f.name for f in fields(Record) if f.name not in ("cell", "results"))
_IDENTITY = frozenset((*_WRITTEN, "cell"))
# Fields newer than the stored records, written only when set, so a record that never had one writes back unchanged.
_WHEN_SET = frozenset({"site"})
assert set(CELL_FIELDS) | set(LINE_FIELDS) <= set(_WRITTEN)  # the schema names every field it groups by


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


def load_records(path: Path | str) -> list[Record]:
    """:func:`read_records`, each as a :class:`Record`."""
    return [Record.from_json(r) for r in read_records(path)]


def append_record(path: Path | str, record: Mapping[str, Any]) -> None:
    """Append one record as one line, through the output layer: a failed write (no space, read-only, ...) is one
    OutputError, and the file is cut back to what it held, so no half line is left behind."""
    from prolip.outputs import writing

    # One write() of a whole line with O_APPEND, then fsync: a crash loses at most this line, never an earlier one.
    # A line cut short by an earlier crash is closed first, so it cannot swallow this record.
    data = (
        json.dumps(dict(record) if not isinstance(record, Record) else record.to_json(), default=str) + "\n"
    ).encode()
    with writing(Path(path).parent):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            try:
                os.write(fd, data)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):  # best effort: a read-only disk refuses this too
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def done_cells(records: Iterable[Mapping[str, Any]]) -> set[str]:
    return {r["cell"] for r in records if "cell" in r}


# ----------------------------------------------------------------------------------------------- ranks' files

RECORDS = "records.jsonl"
_RANK_FILE = re.compile(r"records\.rank-(\d+)-of-(\d+)\.jsonl")


def rank_records_path(out: Path | str, rank: int, world: int) -> Path:
    """The file rank ``rank`` of ``world`` appends its records to, in the results folder ``out``."""
    return Path(out) / f"records.rank-{rank}-of-{world}.jsonl"


def rank_files(out: Path | str) -> list[Path]:
    """The ranks' records files in ``out`` (any world size, e.g. a killed run's), by world size then rank."""
    out = Path(out)
    found = [(m, p) for p in out.iterdir() if (m := _RANK_FILE.fullmatch(p.name))] if out.is_dir() else []
    return [p for m, p in sorted(found, key=lambda mp: (int(mp[0][2]), int(mp[0][1])))]


def finished_cells(out: Path | str) -> set[str]:
    """The cells recorded in ``out``: in records.jsonl or in any rank's file not yet merged into it."""
    return done_cells(r for path in [Path(out) / RECORDS, *rank_files(out)] for r in read_records(path))


def merge_lines(merged: list[str], ranks: Iterable[list[str]], order: Mapping[str, int]) -> list[str]:
    """``merged`` (the lines of records.jsonl, kept as they are) followed by the records of the ranks' files it
    lacks, each cell once, in ``order`` (a cell's place in the run: the place one process would have written it);
    cells ``order`` does not know follow, as found. Lines cut short by a killed rank are left out. Pure: the same
    files give the same lines whatever the number of ranks that wrote them."""
    seen = done_cells(_parsed(merged))
    new: list[tuple[float, int, str]] = []
    for line in (line for lines in ranks for line in lines):
        record = next(iter(_parsed([line])), None)
        if record is None or record["cell"] in seen:
            continue
        seen.add(record["cell"])
        new.append((order.get(record["cell"], math.inf), len(new), line))
    return merged + [line for *_, line in sorted(new)]


def _parsed(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "cell" in record and all(k in record for k in REQUIRED):
            yield record


def merge_rank_records(out: Path | str, order: Mapping[str, int]) -> int:
    """Fold every rank's file of ``out`` into records.jsonl (:func:`merge_lines`, one atomic replace), then remove
    them; returns the number of records added. Interrupted, it leaves records.jsonl whole and the ranks' files in
    place, and the next merge adds only what is still missing."""
    from prolip.outputs import replace_atomically, writing

    out = Path(out)
    files = rank_files(out)
    if not files:
        return 0
    path = out / RECORDS
    merged = _lines(path) if path.is_file() else []
    lines = merge_lines(merged, [_lines(f) for f in files], order)
    if len(lines) > len(merged):

        def fill(tmp: Path) -> None:
            tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")

        replace_atomically(path, fill)
    with writing(out):
        for f in files:
            f.unlink()
    return len(lines) - len(merged)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
