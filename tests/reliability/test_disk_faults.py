"""The disk fails while a command writes: no space, over quota, read-only, no permission, at each of its writes.

Every writing command runs with ``--force`` over an earlier output of its own, and the k-th file operation under
the output folder fails with the errno (k over every operation the command makes there). Each time: one line
saying what could not be written and where, no traceback and no bug report, the earlier output byte for byte as it
was, and nothing beside it (no temporary, no half-written file).

The faults are raised where Python and safetensors' writer meet the filesystem (open for writing, mkdir, rename,
safetensors' serialize_file), with the exception each really raises (safetensors reports an OSError inside its
own SafetensorError text), after leaving a partial file where a real full disk would.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

from prolip.cli import BUG_MARK

from .conftest import cli, digest, fit_cli, make_folder

pytestmark = pytest.mark.reliability("disk_fault")

ERRNOS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS, "EACCES": errno.EACCES, "EDQUOT": errno.EDQUOT}
COMMANDS = ("fit --force", "eval --out", "export", "pretrain-tiny")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class FaultyDisk:
    """Fails the ``at``-th write operation under ``root`` with ``code`` (``at`` None: only counts them)."""

    def __init__(self, root: Path, code: int | None = None, at: int | None = None):
        self.root, self.code, self.at = str(root), code, at
        self.events: list[str] = []
        self.fired: str | None = None

    def _under(self, path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(self.root + os.sep)

    def hit(self, what: str, *paths) -> bool:
        """Count one operation on ``paths``; True when it is the one to fail."""
        if not any(self._under(p) for p in paths):
            return False
        self.events.append(f"{what} {Path(os.fspath(next(p for p in paths if self._under(p)))).name}")
        if self.at is not None and len(self.events) == self.at:
            self.fired = self.events[-1]
            return True
        return False

    def error(self, path) -> OSError:
        assert self.code is not None
        return OSError(self.code, os.strerror(self.code), os.fspath(path))


@contextmanager
def faulty_disk(root: Path, code: int | None = None, at: int | None = None):
    import safetensors
    import safetensors.torch

    disk = FaultyDisk(root, code, at)
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_replace, real_rename, real_serialize = os.replace, os.rename, safetensors.torch.serialize_file

    def opener(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and disk.hit("open", file):
            with real_open(file, "wb") as f:  # a real full disk leaves what it had room for
                f.write(b"partial")
            raise disk.error(file)
        return real_open(file, mode, *a, **k)

    def os_opener(path, flags, *a, **k):
        if flags & _WRITE_FLAGS and disk.hit("open", path):
            raise disk.error(path)
        return real_os_open(path, flags, *a, **k)

    def mkdir(path, *a, **k):
        if not os.path.exists(path) and disk.hit("mkdir", path):
            raise disk.error(path)
        return real_mkdir(path, *a, **k)

    def renamer(real):
        def rename(src, dst, *a, **k):
            if disk.hit("rename", dst, src):
                raise disk.error(src)
            return real(src, dst, *a, **k)

        return rename

    def serialize(tensors, filename, *a, **k):
        if disk.hit("safetensors", filename):
            with real_open(filename, "wb") as f:
                f.write(b"partial")
            # What safetensors' Rust writer raises on a real full or read-only disk.
            raise safetensors.SafetensorError(
                f"Error while serializing: I/O error: {os.strerror(disk.code or 0)} (os error {disk.code})"
            )
        return real_serialize(tensors, filename, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", opener)
        mp.setattr(io, "open", opener)
        mp.setattr(os, "open", os_opener)
        mp.setattr(os, "mkdir", mkdir)
        mp.setattr(os, "replace", renamer(real_replace))
        mp.setattr(os, "rename", renamer(real_rename))
        mp.setattr(safetensors.torch, "serialize_file", serialize)
        yield disk


class Workspace:
    """Data, a warm cache and, under ``disk``, an earlier output of every writing command."""

    def __init__(self, root: Path):
        self.root, self.disk = root, root / "disk"
        self.data = make_folder(root / "data", per_class=3)
        self.cache = root / "cache"
        self.run = self.disk / "run"
        self.counts: dict[str, int] = {}
        self._state = None

    def out(self, command: str) -> Path:
        return (
            self.disk
            / {"fit --force": "run", "eval --out": "eval", "export": "export", "pretrain-tiny": "tiny"}[command]
        )

    def invoke(self, command: str, force: bool = True):
        extra = ["--force"] if force else []
        if command == "fit --force":
            return fit_cli(self.data, self.run, self.cache, *extra, shots=1, views=1, steps=2)
        if command == "eval --out":
            return cli(
                "eval", self.run, "--data", self.data, "--cache-dir", self.cache, "--out", self.out(command), *extra
            )
        if command == "export":
            return cli("export", self.run, "--out", self.out(command), *extra)
        return self._pretrain(extra)

    def _pretrain(self, extra):
        import prolip.tiny

        # Training is not what is faulted: one real step, kept, so each faulted write costs no retraining.
        if self._state is None:
            self._state = prolip.tiny.pretrain(prolip.tiny.PretrainConfig(steps=1))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(prolip.tiny, "pretrain", lambda config, echo=None: self._state)
            return cli("pretrain-tiny", "--out", self.out("pretrain-tiny"), "--steps", "1", *extra)

    def earlier(self, command: str) -> int:
        """Put the command's earlier output in place (once) and return how many writes a --force over it makes."""
        if command not in self.counts:
            if not self.run.exists():
                assert (r := self.invoke("fit --force", force=False)).exit_code == 0, r.output
            if not self.out(command).exists():
                assert (r := self.invoke(command, force=False)).exit_code == 0, r.output
            with faulty_disk(self.disk) as counted:
                assert (r := self.invoke(command)).exit_code == 0, r.output
            self.counts[command] = len(counted.events)
        return self.counts[command]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("disk_faults"))


def one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and output.strip().splitlines()[-1] == errors[0], output
    assert BUG_MARK not in output, output
    return errors[0]


@pytest.mark.parametrize("name", list(ERRNOS))
@pytest.mark.parametrize("command", COMMANDS)
def test_a_failing_disk_at_each_write_is_one_line_and_keeps_the_earlier_output(workspace, command, name, tally):
    code, out = ERRNOS[name], workspace.out(command)
    writes = workspace.earlier(command)
    assert writes >= 2, f"{command} made {writes} write(s) under {workspace.disk}: the faults would test nothing"
    before = digest(workspace.disk)
    for at in range(1, writes + 1):
        with faulty_disk(workspace.disk, code, at) as disk:
            r = workspace.invoke(command)
        assert disk.fired, f"{command}: write {at} of {writes} never came"
        tally.fault(f"{name} at {disk.fired} ({command})")
        tally.cli_error(r, re.escape(f"could not write {out}"), re.escape(os.strerror(code)))
        one_error_line(r.output)
        assert tally.lost(int(digest(workspace.disk) != before)) == 0, f"{command}: {name} at {disk.fired}"


def test_every_kind_of_write_is_faulted(workspace, tally):
    """The counting itself: each command's writes include the ones its output is made of."""
    seen = {}
    for command in COMMANDS:
        workspace.earlier(command)
        with faulty_disk(workspace.disk) as counted:
            assert workspace.invoke(command).exit_code == 0
        seen[command] = {e.split()[0] for e in counted.events}
    assert {"mkdir", "open", "safetensors"} <= seen["fit --force"], seen
    assert {"mkdir", "open"} <= seen["eval --out"], seen
    assert {"mkdir", "open", "safetensors", "rename"} <= seen["export"], seen
    assert {"open", "rename"} <= seen["pretrain-tiny"], seen
    tally.handled_ok(f"write operations counted: {sorted(workspace.counts.items())}")


@pytest.mark.parametrize("name", list(ERRNOS))
@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "pretrain-tiny"])  # a file: one rename, no swap
def test_without_an_atomic_swap_a_failing_second_rename_puts_the_earlier_output_back(
    workspace, command, name, monkeypatch, tally
):
    """Where the OS cannot swap two folders, the earlier output is moved aside, then the new one renamed in: a
    failure at either rename leaves the earlier one under its name."""
    import prolip.outputs

    workspace.earlier(command)
    monkeypatch.setattr(prolip.outputs, "_exchange", lambda a, b: False)
    with faulty_disk(workspace.disk) as counted:
        assert (r := workspace.invoke(command)).exit_code == 0, r.output
    writes = len(counted.events)
    assert [e.split()[0] for e in counted.events[-2:]] == ["rename", "rename"], counted.events
    before = digest(workspace.disk)
    for at in (writes - 1, writes):  # the old output moved aside, then the new one moved in
        with faulty_disk(workspace.disk, ERRNOS[name], at) as disk:
            r = workspace.invoke(command)
        assert disk.fired, f"{command}: write {at} of {writes} never came"
        tally.fault(f"{name} at {disk.fired}, no atomic swap ({command})")
        tally.cli_error(r, re.escape(f"could not write {workspace.out(command)}"), re.escape(os.strerror(ERRNOS[name])))
        one_error_line(r.output)
        assert tally.lost(int(digest(workspace.disk) != before)) == 0, f"{command}: {name} at {disk.fired}"
