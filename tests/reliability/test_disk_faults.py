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
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

import prolip.outputs
from prolip.cli import BUG_MARK, main

from .conftest import TINY, cli, digest, fit_cli, leftovers, make_folder

pytestmark = pytest.mark.reliability("disk_fault")

ERRNOS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS, "EACCES": errno.EACCES, "EDQUOT": errno.EDQUOT}
# Every command that writes, as the user types it, and the output (under the workspace's disk) it writes.
WRITERS = {
    "fit --force": "run",
    "eval --out": "eval",
    "export": "export",
    "pretrain-tiny": "tiny",
    "bench --out": "bench",
    "report --out": "report",
    "extract": "cache",
}
COMMANDS = tuple(WRITERS)
READ_ONLY = ("predict", "methods", "models")  # commands that write nothing
REPLACES_A_FOLDER = ("fit --force", "eval --out", "export", "report --out")  # swapped in whole
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class FaultyDisk:
    """Fails the ``at``-th write operation under ``root`` with ``code`` (``at`` None: only counts them)."""

    def __init__(self, root: Path, code: int | None = None, at: int | None = None):
        self.root, self.code, self.at = str(root), code, at
        self.events: list[str] = []
        self.outside: list[str] = []  # operations made outside prolip.outputs.writing (the output layer)
        self.fired: str | None = None
        self.fired_path: Path | None = None

    def _under(self, path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(self.root + os.sep)

    def hit(self, what: str, *paths) -> bool:
        """Count one operation on ``paths``; True when it is the one to fail."""
        if not any(self._under(p) for p in paths):
            return False
        self.events.append(f"{what} {Path(os.fspath(next(p for p in paths if self._under(p)))).name}")
        if not getattr(prolip.outputs._WRITING, "depth", 0):
            self.outside.append(self.events[-1])
        if self.at is not None and len(self.events) == self.at:
            self.fired = self.events[-1]
            self.fired_path = Path(os.fspath(next(p for p in paths if self._under(p))))
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
        self.experiment = root / "experiment.yaml"
        self.experiment.write_text(
            f"datasets: [{self.data}]\nmodel: test-vit-tiny\npretrained: none\nshots: [1]\nseeds: [1]\nviews: 1\n"
            f"cache_dir: {self.cache}\nmethods: [zeroshot, {{name: prolip, steps: 2}}]\n"
        )
        self.counts: dict[str, int] = {}
        self._state = None

    def out(self, command: str) -> Path:
        return self.disk / WRITERS[command]

    def invoke(self, command: str, force: bool = True):
        """The command over its earlier output: with --force where it replaces one, with new work where it adds to
        one (bench: a second seed; extract: a second view)."""
        extra = ["--force"] if force else []
        if command == "fit --force":
            return fit_cli(self.data, self.run, self.cache, *extra, shots=1, views=1, steps=2)
        if command == "eval --out":
            return cli(
                "eval", self.run, "--data", self.data, "--cache-dir", self.cache, "--out", self.out(command), *extra
            )
        if command == "export":
            return cli("export", self.run, "--out", self.out(command), *extra)
        if command == "bench --out":
            seeds = ["--set", "seeds=[1, 2]"] if force else []
            return cli("bench", self.experiment, "--out", self.out(command), *seeds)
        if command == "report --out":
            return cli("report", self.out("bench --out"), "--out", self.out(command))
        if command == "extract":
            views = "2" if force else "1"
            return cli("extract", "--data", self.data, "--views", views, "--cache-dir", self.out(command), *TINY)
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
            for needed in (*PREREQUISITES.get(command, ()), command):
                if not self.out(needed).exists():
                    assert (r := self.invoke(needed, force=False)).exit_code == 0, r.output
            with kept_as_it_is(self.out(command)), faulty_disk(self.disk) as counted:
                assert (r := self.invoke(command)).exit_code == 0, r.output
            self.counts[command] = len(counted.events)
        return self.counts[command]

    def check_kept(self, command: str, before: dict[str, str]) -> int:
        """How many earlier files a failed command changed or left half-written (0 expected). A command that
        replaces its output must leave it byte for byte; one that adds to it (records appended, cache units) may
        have kept what it finished before the fault, whole, and never touched what was there."""
        after = digest(self.disk)
        if command not in ADDS:
            return int(after != before)
        changed = [p for p, h in before.items() if after.get(p) != h and not _appended(Path(p), h)]
        return len(changed) + len(leftovers(self.disk))


PREREQUISITES = {"report --out": ("bench --out",), "eval --out": ("fit --force",), "export": ("fit --force",)}
ADDS = ("bench --out", "extract")  # add to their output: finished records and cache units are kept


def _appended(path: Path, earlier_hash: str) -> bool:
    """A records file whose earlier content is intact and followed only by complete lines."""
    import hashlib

    if path.name != "records.jsonl" or not path.is_file():
        return False
    data = path.read_bytes()
    return any(
        hashlib.sha256(data[: i + 1]).hexdigest() == earlier_hash for i, b in enumerate(data) if b == 10
    ) and data.endswith(b"\n")


@contextmanager
def kept_as_it_is(path: Path):
    """Whatever the block does to ``path``, it is put back as it was (so every faulted run starts alike)."""
    saved = path.parent.parent / "saved" / path.name  # beside the disk, not on it
    shutil.rmtree(saved, ignore_errors=True)
    saved.parent.mkdir(exist_ok=True)
    shutil.copytree(path, saved, symlinks=True) if path.is_dir() else shutil.copy2(path, saved)
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        os.rename(saved, path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("disk_faults"))


def says_it_could_not_write(command: str, out: Path) -> str:
    """The start of the one line a failed write prints: the cache says it in its own words (and names its folder)."""
    if command == "extract":
        return re.escape(f"feature cache directory {out}")
    return re.escape(f"could not write {out}")


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
        with kept_as_it_is(out):
            with faulty_disk(workspace.disk, code, at) as disk:
                r = workspace.invoke(command)
            assert disk.fired, f"{command}: write {at} of {writes} never came"
            tally.fault(f"{name} at {disk.fired} ({command})")
            if r.exit_code == 0 and command in ADDS:  # a memo or lock probe the cache does without: no failure
                tally.handled_ok(f"{name} at {disk.fired} ({command}): done without it")
            else:
                tally.cli_error(r, says_it_could_not_write(command, out), re.escape(os.strerror(code)))
                one_error_line(r.output)
            lost = workspace.check_kept(command, before)
        assert tally.lost(lost) == 0, f"{command}: {name} at {disk.fired}"


def test_every_kind_of_write_is_faulted(workspace, tally):
    """The counting itself: each command's writes include the ones its output is made of."""
    seen = {}
    for command in COMMANDS:
        workspace.earlier(command)
        with kept_as_it_is(workspace.out(command)), faulty_disk(workspace.disk) as counted:
            assert workspace.invoke(command).exit_code == 0
        seen[command] = {e.split()[0] for e in counted.events}
    assert {"mkdir", "open", "safetensors"} <= seen["fit --force"], seen
    assert {"mkdir", "open"} <= seen["eval --out"], seen
    assert {"mkdir", "open", "safetensors", "rename"} <= seen["export"], seen
    assert {"open", "rename"} <= seen["pretrain-tiny"], seen
    assert {"open"} <= seen["bench --out"], seen
    assert {"mkdir", "open"} <= seen["report --out"], seen
    assert {"open", "rename"} <= seen["extract"], seen
    tally.handled_ok(f"write operations counted: {sorted(workspace.counts.items())}")


@pytest.mark.parametrize("name", list(ERRNOS))
@pytest.mark.parametrize("command", REPLACES_A_FOLDER)
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
        tally.cli_error(
            r, says_it_could_not_write(command, workspace.out(command)), re.escape(os.strerror(ERRNOS[name]))
        )
        one_error_line(r.output)
        assert tally.lost(int(digest(workspace.disk) != before)) == 0, f"{command}: {name} at {disk.fired}"


def test_every_command_is_a_writer_here_or_writes_nothing():
    """A new command must join WRITERS (and so every fault here) or READ_ONLY (and so the test below)."""
    listed = {c.split()[0] for c in WRITERS} | set(READ_ONLY) | {"demo"}  # demo: the test after this one
    assert listed == set(main.commands), f"list {set(main.commands) - listed} in WRITERS or READ_ONLY"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_write_goes_through_the_output_layer(workspace, command, tally):
    workspace.earlier(command)
    with kept_as_it_is(workspace.out(command)), faulty_disk(workspace.disk) as counted:
        assert (r := workspace.invoke(command)).exit_code == 0, r.output
    assert counted.events and not counted.outside, f"{command} wrote outside prolip.outputs: {counted.outside}"
    tally.handled_ok(f"{command}: {len(counted.events)} writes, all through the output layer")


@pytest.mark.parametrize("command", READ_ONLY)
def test_read_only_commands_write_nothing(workspace, command, tally):
    workspace.earlier("fit --force")
    image = next(workspace.data.rglob("*.jpg"))
    args = {"predict": ["predict", workspace.run, image], "methods": ["methods", "-v"], "models": ["models", "ViT-B"]}
    with faulty_disk(workspace.root) as counted:
        assert (r := cli(*args[command])).exit_code == 0, r.output
    assert not counted.events, f"{command} wrote {counted.events}"
    tally.handled_ok(f"{command}: writes nothing")


def test_the_demo_writes_through_the_output_layer_and_a_failed_write_is_one_line(tmp_path, monkeypatch, tally):
    """The demo writes hundreds of files (digit images, cache, runs, plot), all through the output layer. Run
    again over its workdir, a fault at each of its writes (the errnos in turn) is one line and leaves the workdir
    as it was."""
    import functools

    import prolip.demo
    import prolip.tiny

    small = functools.partial(
        prolip.demo.DemoConfig, domains=("noisy",), shots=(1,), pool_per_class=1, test_per_class=1, baselines=()
    )
    monkeypatch.setattr(prolip.demo, "DemoConfig", small)
    monkeypatch.setattr(prolip.tiny, "HELD_OUT_PER_CLASS", 2)  # 20 digit images per domain, not hundreds
    workdir = tmp_path / "demo"
    for run in range(3):  # from nothing, again (hashes of the images remembered), then as the faults below find it
        with faulty_disk(tmp_path) as counted:
            assert (r := cli("demo", "--workdir", workdir, "--views", "1")).exit_code == 0, r.output
        assert counted.events and not counted.outside, f"demo wrote outside prolip.outputs: {counted.outside[:5]}"
        if run == 0:  # images written a moment ago are hashed but not remembered (their mtime may yet change)
            for f in workdir.rglob("*.png"):
                os.utime(f, (f.stat().st_mtime - 3600, f.stat().st_mtime - 3600))
    before, errnos = digest(workdir), list(ERRNOS.items())
    for at in range(1, len(counted.events) + 1):
        name, code = errnos[at % len(errnos)]
        with faulty_disk(tmp_path, code, at) as disk:
            r = cli("demo", "--workdir", workdir, "--views", "1")
        assert disk.fired, f"demo: write {at} of {len(counted.events)} never came"
        tally.fault(f"{name} at {disk.fired} (demo)")
        if r.exit_code == 0 and disk.fired_path and disk.fired_path.is_relative_to(workdir / "cache"):
            tally.handled_ok(f"{name} at {disk.fired} (demo): a cache memo or lock probe, done without")
        else:
            tally.cli_error(r, re.escape(f"{workdir}"), re.escape(os.strerror(code)))
            one_error_line(r.output)
        # Files finished before the fault may be new (a run saved again, a cache memo); none is missing or
        # half-written, and no temporary is left.
        after = digest(workdir)
        broken = set(before) - set(after) | {p for p in after if Path(p).is_file() and b"partial" == _head(p)}
        broken |= {str(p) for p in leftovers(workdir)}
        assert tally.lost(len(broken)) == 0, f"demo: {name} at {disk.fired}: {sorted(broken)[:3]}"


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(7)
