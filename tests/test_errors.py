"""One base class for every user-facing error: the CLI shows any of them as one line, and no table of class names
has to be kept in step with the library."""

from __future__ import annotations

import ast
import subprocess
import sys
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
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found.append((module, node.name))
    return found


ERRORS = _error_classes()


def test_the_source_has_the_error_classes_it_had():
    assert len(ERRORS) >= 13  # the twelve the CLI's old table named, and ProlipError itself


@pytest.mark.parametrize(("module", "name"), ERRORS, ids=[f"{m}.{n}" for m, n in ERRORS])
def test_every_error_class_is_a_prolip_error(module, name):
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert issubclass(cls, ProlipError)


def test_the_base_class_imports_without_torch():
    code = "import sys, prolip.errors, prolip.cli; assert 'torch' not in sys.modules, 'torch was imported'"
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
        except TypeError:  # one that takes structured arguments (a path and a reason): the message is what counts
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


def test_any_other_exception_keeps_its_traceback():
    from prolip.cli import main

    @click.command("bug")
    def bug():
        raise ValueError("a bug, not bad input")

    main.add_command(bug)
    try:
        r = CliRunner().invoke(main, ["bug"])
    finally:
        main.commands.pop("bug")
    assert isinstance(r.exception, ValueError)


def test_a_cache_error_names_the_option_that_fixes_it():
    from prolip.features.storage import CacheError

    assert CacheError.option == "--cache-dir"
