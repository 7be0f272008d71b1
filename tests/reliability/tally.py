"""Run the reliability suite and print its tally: what was tried, what was injected, what was handled, what was lost.

    python tests/reliability/tally.py [extra pytest args]

Every number comes from the JSON lines the tests themselves write (see conftest.py), so a test that did not run
counts for nothing. Exits non-zero if a test failed, pytest itself failed, or any data was lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Every kind a reliability test may declare (conftest.py imports this tuple, so the two can never disagree):
# bad_input: malformed or hostile files and options; fault: kills, full disks, races; safety: code never run,
# data never written over; determinism: same inputs, same bits; output: where and how results are written
# (overwrite rules, locks, permissions); resource: time and memory bounded on hostile inputs (FIFOs, extreme images);
# disk_fault: no space, quota, read-only or permission at each write of every writing command; ambiguity: inputs
# where prolip would have to guess, refused with the choice spelled out.
KINDS = ("bad_input", "fault", "safety", "determinism", "output", "resource", "disk_fault", "ambiguity")
COLUMNS = (
    ("tests", "tests"),
    ("passed", "passed"),
    ("failed", "failed"),
    ("skipped", "skipped"),
    ("inputs", "inputs tried"),
    ("faults", "faults injected"),
    ("handled", "failed w/ clear msg"),
    ("accepted", "handled, no error"),
    ("lost", "data lost"),
    ("loss_checks", "loss checks"),
)


def summarize(records: list[dict]) -> dict[str, dict[str, int]]:
    """Per-kind and overall ("all") sums of the per-test records."""
    rows = {kind: dict.fromkeys([key for key, _ in COLUMNS], 0) for kind in (*KINDS, "all")}
    for r in records:
        for kind in (r["kind"], "all"):
            row = rows.setdefault(kind, dict.fromkeys([key for key, _ in COLUMNS], 0))
            row["tests"] += 1
            row[r["outcome"]] = row.get(r["outcome"], 0) + 1
            for key in ("inputs", "faults", "handled", "accepted", "lost", "loss_checks"):
                row[key] += int(r[key])
    return rows


def table(rows: dict[str, dict[str, int]]) -> str:
    header = ["kind", *(title for _, title in COLUMNS)]
    body = [[kind, *(str(row[key]) for key, _ in COLUMNS)] for kind, row in rows.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line):
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body[:-1]), rule, fmt(body[-1])])


def problems(pytest_code: int, total: dict[str, int]) -> list[str]:
    """Why the suite is not OK; empty when it is."""
    found = []
    if pytest_code != 0:
        found.append(f"pytest exited with {pytest_code}")
    if not total["tests"]:
        found.append("no test recorded anything")
    if total["failed"]:
        found.append(f"{total['failed']} test(s) failed")
    if total["lost"]:
        found.append(f"{total['lost']} item(s) of data lost")
    return found


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tally.jsonl"
        env = {**os.environ, "PROLIP_TALLY_OUT": str(out), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "2",
            "--dist",
            "loadfile",
            "-p",
            "no:cacheprovider",
            "tests/reliability",
            *argv,
        ]
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    rows = summarize(records)
    print("\nReliability tally\n" + table(rows))
    for r in records:
        if r["outcome"] != "passed":
            print(f"  {r['outcome']}: {r['test']}" + (f" ({r['skip_reason']})" if r.get("skip_reason") else ""))
    found = problems(code, rows["all"])
    print("FAIL: " + "; ".join(found) if found else "OK: every test passed and no data was lost")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
