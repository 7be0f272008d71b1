"""One base class for every user-facing error: the CLI shows any of them as one line, and no table of class names
has to be kept in step with the library."""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from prolip.errors import ProlipError

SRC = Path(__file__).resolve().parents[1] / "src" / "prolip"


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) for every class in the source whose name ends in Error, found by reading the files."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            # A private one (``_AcquireError``) signals inside its module and never reaches the user.
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and not node.name.startswith("_"):
                found.append((module, node.name))
    return found


# Errors meant for developers, not users: a broken method is a bug in that method, not bad input.
DEVELOPER_ERRORS = {("prolip.methods.checks", "MethodContractError")}
ERRORS = [e for e in _error_classes() if e not in DEVELOPER_ERRORS]


def test_developer_errors_are_not_shown_as_user_errors():
    from prolip.methods.checks import MethodContractError

    assert not issubclass(MethodContractError, ProlipError) and issubclass(MethodContractError, AssertionError)


def test_the_source_has_the_error_classes_it_had():
    assert len(ERRORS) >= 13  # the twelve the CLI's old table named, and ProlipError itself


@pytest.mark.parametrize(("module", "name"), ERRORS, ids=[f"{m}.{n}" for m, n in ERRORS])
def test_every_error_class_is_a_prolip_error(module, name):
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert issubclass(cls, ProlipError)


def test_the_base_class_imports_without_torch():
    code = (
        "import sys, prolip.errors, prolip.cli; assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert 'prolip.data' not in sys.modules, 'the data readers (numpy, PIL) were imported at CLI start-up'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("module", "name"), ERRORS, ids=[f"{m}.{n}" for m, n in ERRORS])
def test_the_cli_shows_any_prolip_error_as_one_line(module, name, monkeypatch):
    from prolip.cli import main

    cls = getattr(__import__(module, fromlist=[name]), name)
    message = f"the thing at fault, named by {name}"

    @click.command("boom")
    def boom():
        try:
            error = cls(message)
        except (TypeError, AttributeError):  # one built from structured arguments (a path and a reason, an OSError)
            error = cls.__new__(cls)
            Exception.__init__(error, message)
        raise error

    main.add_command(boom)
    try:
        r = CliRunner().invoke(main, ["boom"])
    finally:
        main.commands.pop("boom")
    assert r.exit_code == 1 and r.exception is not None and isinstance(r.exception, SystemExit)
    assert r.output.strip() == f"Error: {message}" + (f" ({cls.option})" if cls.option else "")
    assert "Traceback" not in r.output


def _bug_command():
    @click.command("bug")
    def bug():
        raise ValueError("a bug, not bad input")

    return bug


def test_any_other_exception_is_one_line_that_calls_it_a_bug_with_its_traceback_saved(monkeypatch, tmp_path):
    from prolip.cli import BUG_MARK, main

    monkeypatch.delenv("PROLIP_TRACEBACK", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # read TMPDIR again
    main.add_command(_bug_command())
    try:
        r = CliRunner().invoke(main, ["bug"])
    finally:
        main.commands.pop("bug")
        tempfile.tempdir = None
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    line = r.output.strip()
    assert "\n" not in line and "ValueError: a bug, not bad input" in line and BUG_MARK in line
    (saved,) = tmp_path.glob("prolip-crash-*.txt")
    assert str(saved) in line and "Traceback" in saved.read_text() and "a bug, not bad input" in saved.read_text()


def test_a_developer_gets_the_traceback_on_request(monkeypatch):
    from prolip.cli import main

    monkeypatch.setenv("PROLIP_TRACEBACK", "1")
    main.add_command(_bug_command())
    try:
        r = CliRunner().invoke(main, ["bug"])
    finally:
        main.commands.pop("bug")
    assert isinstance(r.exception, ValueError)


def test_a_cache_error_names_the_option_that_fixes_it():
    from prolip.features.storage import CacheError

    assert CacheError.option == "--cache-dir"
