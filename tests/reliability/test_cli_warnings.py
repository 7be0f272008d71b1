"""Warnings said once: random weights are announced by one line, not by the library and the CLI both."""

import subprocess
import sys

import pytest

from .conftest import TINY, make_folder

pytestmark = pytest.mark.reliability("bad_input")

CLI = "import sys; from prolip.cli import main; sys.exit(main())"


def test_fit_with_random_weights_warns_exactly_once(tmp_path, tally):
    data = make_folder(tmp_path / "data", per_class=2)
    # A real process: in-process runs under pytest would capture the library's warning instead of printing it.
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            CLI,
            "fit",
            "--data",
            str(data),
            "--shots",
            "1",
            "--views",
            "1",
            "--steps",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "run"),
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    tally.input("--pretrained none")
    warnings = [line for line in child.stderr.splitlines() if "RANDOM" in line]
    assert len(warnings) == 1, child.stderr
    tally.handled_ok("one RANDOM-weights warning")
