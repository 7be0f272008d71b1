"""`prolip bench` under torchrun: groups split across ranks, each rank's own records file, rank 0's merge, and a
re-run (any world size) resuming what a killed rank left, to the records one process writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from prolip.bench.harness import GroupRequests
from prolip.bench.ranks import ENCODER_CELL_WEIGHT, KILL_HOOK, Split, assign, cell_order, group_cost
from prolip.bench.records import (
    finished_cells,
    merge_lines,
    merge_rank_records,
    rank_files,
    rank_records_path,
    read_records,
)
from prolip.cli import main
from prolip.features.cache import Request

PROLIP = str(Path(sys.executable).parent / "prolip")
# What legitimately differs between two runs of the same cells: when, how long, and a process's memory peak.
VARIES = ("created", "seconds", "seconds_per_image", "peak_memory_mb")


# ----------------------------------------------------------------------------------------------- pure


def test_assign_balances_costliest_first_and_is_deterministic():
    costs = [5, 3, 3, 2, 2, 1]
    assert assign(costs, 2) == [0, 1, 1, 0, 1, 0]  # 5 + 2 + 1 = 3 + 3 + 2: the costliest first, to the lighter rank
    assert assign(costs, 1) == [0] * 6 and assign([], 3) == []
    assert assign([1, 1, 1, 1], 4) == [0, 1, 2, 3]  # ties: the earlier group to the lower rank
    assert assign([1] * 5, 8) == [0, 1, 2, 3, 4]  # more ranks than groups: the rest idle
    with pytest.raises(ValueError, match="world"):
        assign([1], 0)


def test_group_cost_counts_what_each_cell_reads_and_weights_image_level_cells():
    support, evaluation = Request(("a", "b"), 4), Request(("c", "d", "e"))
    plain = GroupRequests(shared=[support, evaluation], per_cell=[[], [Request(("a", "b"))]])
    assert group_cost(plain) == (8 + 3) * 2 + 2
    encoder = GroupRequests(shared=[support, evaluation], per_cell=[[]], encoder_cells=1)
    assert group_cost(encoder) == 11 + ENCODER_CELL_WEIGHT * 8
    assert group_cost(GroupRequests(per_cell=[[], []])) == 2  # at least one per cell


def test_split_lines_say_each_ranks_share():
    split = Split.of([6, 2, 2], [2, 1, 1], 2)
    assert split.owner == [0, 1, 1] and split.share(0) == 0.6
    text = "\n".join(split.lines())
    assert "rank 0: 1 groups, 2 cells, 60% of the cost" in text and "rank 1: 2 groups, 2 cells, 40%" in text
    assert "about 1.7x faster than one rank" in text


def _line(cell: str) -> str:
    return json.dumps({"cell": cell, "protocol": "fewshot", "dataset": "d", "label": "m", "method": "m", "shots": 1})


def test_cell_order_follows_groups_then_cells():
    from prolip.bench.harness import Cell, Group
    from prolip.bench.records import Record

    def cell(name: str) -> Cell:
        return Cell(None, Record(protocol="p", dataset="d", shots=1, label=name, method=name, cell=name))  # type: ignore

    groups = [Group("d", 1, 1, [cell("x"), cell("y")]), Group("d", 1, 2, [cell("z"), cell("x")])]
    assert cell_order(groups) == {"x": 0, "y": 1, "z": 2}


def test_merge_keeps_the_merged_file_and_orders_new_cells_as_one_process_writes():
    merged = [_line("old"), "not json at all"]
    order = {"a": 0, "b": 1, "c": 2, "d": 3}
    one = merge_lines(merged, [[_line("c"), _line("a"), _line("d"), _line("b")]], order)
    # However the cells were spread over ranks' files, the merge is the same.
    two = merge_lines(merged, [[_line("d"), _line("a")], [_line("b"), '{"cell": "x", "cut sh', _line("c")]], order)
    assert one == two == [*merged, *(_line(c) for c in "abcd")]
    # A cell already merged, or in two files, is written once; a cell the run does not know goes last.
    again = merge_lines([_line("a")], [[_line("zz"), _line("a"), _line("b")], [_line("b")]], order)
    assert again == [_line("a"), _line("b"), _line("zz")]


def test_merge_rank_records_on_disk(tmp_path):
    for rank, cells in ((1, "db"), (0, "ca")):
        rank_records_path(tmp_path, rank, 2).write_text("".join(_line(c) + "\n" for c in cells))
    rank_records_path(tmp_path, 0, 1).write_text(_line("e") + "\n" + '{"cell": "trunc')  # a killed single rank
    assert [p.name for p in rank_files(tmp_path)] == [
        "records.rank-0-of-1.jsonl",
        "records.rank-0-of-2.jsonl",
        "records.rank-1-of-2.jsonl",
    ]
    assert finished_cells(tmp_path) == set("abcde")
    assert merge_rank_records(tmp_path, {c: i for i, c in enumerate("abcde")}) == 5
    assert [r["cell"] for r in read_records(tmp_path)] == list("abcde") and not rank_files(tmp_path)
    before = (tmp_path / "records.jsonl").stat().st_mtime_ns
    assert merge_rank_records(tmp_path, {}) == 0 and (tmp_path / "records.jsonl").stat().st_mtime_ns == before
    assert finished_cells(tmp_path / "nowhere") == set()


# ----------------------------------------------------------------------------------------------- under torchrun


def _digits(root: Path) -> Path:
    """Six held-out digits a class (60 images): the in-house tiny CLIP gives numbers that differ by cell."""
    from prolip.tiny import held_out_split, load_digit_scans, write_digit_folder

    labels = load_digit_scans()[1]
    held = held_out_split(labels)[1]
    return write_digit_folder(root, "clean", np.concatenate([held[labels[held] == c][:6] for c in range(10)]))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    from prolip.tiny import SHIPPED_WEIGHTS, TINY_MODEL

    root = tmp_path_factory.mktemp("bench_ranks")
    exp = {
        "model": TINY_MODEL,
        "pretrained": str(SHIPPED_WEIGHTS),
        "datasets": [str(_digits(root / "digits"))],
        "protocol": "fewshot",
        "shots": [1],
        "seeds": [1, 2],  # two groups: one a rank
        "views": 2,
        "methods": [{"name": "prolip", "steps": 10}, "tip-adapter"],
    }
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def torchrun(experiment: Path, out: Path, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """`prolip bench` under torchrun, two ranks of one thread each."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    return subprocess.run(
        [*launch, PROLIP, "bench", str(experiment), "--out", str(out), "--set", f"cache_dir={cache}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": os.path.dirname(sys.executable), "OMP_NUM_THREADS": "1", **env},
    )


def alone(experiment: Path, out: Path, cache: Path) -> str:
    """`prolip bench` in this process, on one thread as each rank (no torchrun startup to pay)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["bench", str(experiment), "--out", str(out), "--set", f"cache_dir={cache}"]
        r = CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    return r.output


def comparable(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VARIES} for r in read_records(out)]


@pytest.fixture(scope="module")
def one_process(experiment, tmp_path_factory) -> tuple[list[dict], Path, int]:
    """The records one process writes, its cache, and the forward passes it made."""
    root = tmp_path_factory.mktemp("one")
    said = alone(experiment, root / "res", root / "cache")
    return comparable(root / "res"), root / "cache", sum(passes(said).values())


def passes(said: str) -> dict[str, int]:
    """Forward passes each process made, from its closing line (``rank R/N: ... cache: P forward passes``)."""
    return {who: int(n) for who, n in re.findall(r"^(rank \d/\d: )?\d+ cells run.*cache: (\d+) forward", said, re.M)}


@pytest.mark.slow
def test_two_ranks_write_one_processs_records(experiment, one_process, tmp_path):
    expected, _, one_passes = one_process
    r = torchrun(experiment, tmp_path / "res", tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2: 2 cells run" in r.stdout and "rank 1/2: 2 cells run" in r.stdout, r.stdout
    split = passes(r.stdout)  # the extraction was split: each rank encoded some images, none encoded twice
    assert len(split) == 2 and min(split.values()) > 0 and sum(split.values()) == one_passes, (split, one_passes)
    assert [p.name for p in tmp_path.joinpath("res").iterdir()] == ["records.jsonl"]  # the ranks' files merged
    assert len({x["accuracy"] for x in expected}) > 2  # numbers that differ by cell, so equality says something
    assert comparable(tmp_path / "res") == expected  # same cells, same order, same numbers and fingerprints


@pytest.mark.slow
def test_a_killed_rank_is_resumed_by_a_later_run(experiment, one_process, tmp_path):
    expected, cache, _ = one_process  # its cache: the features are there, this test is about the records
    out = tmp_path / "res"
    killed = torchrun(experiment, out, cache, **{KILL_HOOK: "1:1"})
    said = killed.stdout + killed.stderr[-3000:]
    assert killed.returncode != 0, said
    left = {p.name: len(read_records(p)) for p in rank_files(out)}
    assert left.get("records.rank-1-of-2.jsonl") == 1 and sum(left.values()) < 4, (left, said)
    assert read_records(out) == []  # rank 0 never merged
    resumed = alone(experiment, out, cache)  # one process finishes what rank 1 left
    assert f"{4 - sum(left.values())} cells run, {sum(left.values())} already done" in resumed, resumed
    assert comparable(out) == expected and not rank_files(out)


def test_plan_says_each_ranks_share(experiment, tmp_path):
    from prolip.bench.experiment import load_experiment
    from prolip.bench.plan import format_plan, plan_experiment

    exp = load_experiment(experiment, {"out": str(tmp_path / "res"), "cache_dir": str(tmp_path / "cache")})
    text = format_plan(plan_experiment(exp, ranks=2, time_batch=False))
    assert "split across 2 ranks" in text and "rank 0: 1 groups, 2 cells, 50% of the cost" in text, text
    assert "rank 1: 1 groups, 2 cells, 50% of the cost" in text and "about 2.0x faster" in text
    assert "split across" not in format_plan(plan_experiment(exp, time_batch=False))  # one rank: as before
    r = CliRunner().invoke(main, ["bench", str(experiment), "--ranks", "2"])
    assert r.exit_code == 2 and "--ranks applies to --plan only" in r.output
