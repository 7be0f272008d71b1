"""The reliability tally sums the per-test records it is given, per kind and overall."""

from reliability.tally import problems, summarize, table


def rec(kind, outcome="passed", inputs=0, faults=0, handled=0, accepted=0, lost=0, loss_checks=0):
    return {
        "test": f"t::{kind}",
        "kind": kind,
        "outcome": outcome,
        "inputs": inputs,
        "faults": faults,
        "handled": handled,
        "accepted": accepted,
        "lost": lost,
        "loss_checks": loss_checks,
        "skip_reason": None,
    }


def test_summarize_sums_per_kind_and_overall():
    rows = summarize(
        [
            rec("fault", faults=9, handled=2, loss_checks=3),
            rec("fault", "failed", faults=1, lost=2),
            rec("bad_input", inputs=4, handled=3, accepted=1),
            rec("safety", "skipped"),
        ]
    )
    assert rows["fault"] == {
        "tests": 2,
        "passed": 1,
        "failed": 1,
        "skipped": 0,
        "inputs": 0,
        "faults": 10,
        "handled": 2,
        "accepted": 0,
        "lost": 2,
        "loss_checks": 3,
    }
    assert rows["bad_input"]["inputs"] == 4 and rows["safety"]["skipped"] == 1
    assert rows["determinism"]["tests"] == 0  # every kind gets a row, even with no test
    assert rows["all"] == {
        "tests": 4,
        "passed": 2,
        "failed": 1,
        "skipped": 1,
        "inputs": 4,
        "faults": 10,
        "handled": 5,
        "accepted": 1,
        "lost": 2,
        "loss_checks": 3,
    }
    lines = table(rows).splitlines()
    assert lines[0].split()[:2] == ["kind", "tests"] and lines[-1].split() == [
        "all",
        "4",
        "2",
        "1",
        "1",
        "4",
        "10",
        "5",
        "1",
        "2",
        "3",
    ]


def test_problems_fail_on_any_failure_loss_or_empty_run():
    ok = summarize([rec("fault", loss_checks=1)])["all"]
    assert problems(0, ok) == []
    assert problems(1, ok) == ["pytest exited with 1"]  # e.g. a collection error no record shows
    assert problems(5, summarize([])["all"]) == ["pytest exited with 5", "no test recorded anything"]
    assert problems(0, summarize([rec("fault", lost=1)])["all"]) == ["1 item(s) of data lost"]
    assert problems(1, summarize([rec("safety", "failed")])["all"]) == ["pytest exited with 1", "1 test(s) failed"]
