"""The reliability suite's bookkeeping: every test declares its kind and records what it tried.

Each test module sets ``pytestmark = pytest.mark.reliability("<kind>")`` (one of tally.KINDS: bad_input, fault,
safety, determinism, output, resource, disk_fault, ambiguity);
a test without a kind is a collection error, so the tally can never silently miss one. Tests take the ``tally``
fixture and record, as they go, the bad inputs they tried, the faults they injected, the failures that ended in a
clear message (``tally.raises`` / ``tally.cli_error`` only count a failure once its message has been checked), the
bad inputs handled without an error (``tally.handled_ok``: decoded correctly, or skipped and listed) and the data
they found lost (``tally.lost``, counted only where a test measured it).

With ``PROLIP_TALLY_OUT=<file>`` each finished test appends one JSON line there; ``tests/reliability/tally.py``
runs the suite and sums those lines, so every number it prints comes from tests that actually ran.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

from .tally import KINDS  # one list of kinds, shared with the tally

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability(kind): kind of reliability test: " + ", ".join(KINDS))


def _kind(item) -> str | None:
    marker = item.get_closest_marker("reliability")
    return marker.args[0] if marker and marker.args else None


def pytest_collection_modifyitems(config, items):
    bad = [
        item.nodeid
        for item in items
        if Path(str(item.path)).resolve().is_relative_to(HERE) and _kind(item) not in KINDS
    ]
    if bad:
        raise pytest.UsageError(f"reliability tests need pytest.mark.reliability(one of {KINDS}): {bad}")


class Tally:
    """What one test tried and observed; summed over the suite by tally.py."""

    def __init__(self, kind: str | None = None):
        self.kind = kind
        self.inputs: list[str] = []
        self.faults: list[str] = []
        self.handled: list[str] = []  # failures that ended in a clear, checked message
        self.accepted: list[str] = []  # bad inputs handled without an error (decoded correctly, or skipped+listed)
        self.lost_items = 0
        self.loss_checks = 0

    def input(self, *labels: str) -> None:
        self.inputs.extend(map(str, labels))

    def fault(self, *labels: str) -> None:
        self.faults.extend(map(str, labels))

    def handled_ok(self, what: str) -> None:
        """A bad input that was handled without failing (skipped and listed, or decoded correctly)."""
        self.accepted.append(what)

    def lost(self, n: int, what: str = "") -> int:
        """Record a measured amount of lost or corrupted data (expected 0) and return it for the assert."""
        self.loss_checks += 1
        self.lost_items += int(n)
        return int(n)

    @contextmanager
    def raises(self, exc, match: str | None = None, *, input: str | None = None):
        """pytest.raises that counts the failure as handled once the message matched.

        In a bad-input test each call is also one input tried (``input`` names it; default: the expected error).
        """
        if input is not None or self.kind == "bad_input":
            self.input(input or f"{exc.__name__}: {match}")
        with pytest.raises(exc, match=match) as info:
            yield info
        self.handled.append(str(info.value))

    def clear_error(self, e: BaseException, *expected: str) -> None:
        """An exception caught by the test counts as handled once every expected string is in its message."""
        for x in expected:
            assert x in str(e), f"{x!r} not in {str(e)!r}"
        self.handled.append(str(e))

    def cli_error(self, result, *expected: str, input: str | None = None) -> str:
        """A CLI failure that is handled: non-zero exit, no traceback, every expected string in the message."""
        if input is not None:
            self.input(input)
        output = result.output if hasattr(result, "output") else (result.stdout or "") + (result.stderr or "")
        code = result.exit_code if hasattr(result, "exit_code") else result.returncode
        assert code != 0, f"expected a failure, got exit 0:\n{output}"
        assert "Traceback" not in output, output
        assert "a bug in prolip" not in output, f"a bug, not a refusal:\n{output}"  # prolip.cli.BUG_MARK
        exc = getattr(result, "exception", None)
        assert exc is None or isinstance(exc, SystemExit), f"unhandled {exc!r}:\n{output}"
        for e in expected:
            assert re.search(e, output), f"{e!r} not in:\n{output}"
        self.handled.append(output.strip().splitlines()[-1] if output.strip() else "")
        return output


@pytest.fixture
def tally(request) -> Tally:
    return request.node._tally


@pytest.fixture(autouse=True)
def _tally_record(request):
    request.node._tally = Tally(_kind(request.node))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    path = os.environ.get("PROLIP_TALLY_OUT")
    if not path or not Path(str(item.path)).resolve().is_relative_to(HERE):
        return
    # One line per test: from the call phase, or from setup when the test never got to run (skip / fixture error).
    if report.when == "call" or (report.when == "setup" and not report.passed):
        t: Tally = getattr(item, "_tally", None) or Tally()
        line = (
            json.dumps(
                {
                    "test": item.nodeid,
                    "kind": _kind(item),
                    "outcome": report.outcome,
                    "inputs": len(t.inputs),
                    "faults": len(t.faults),
                    "handled": len(t.handled),
                    "accepted": len(t.accepted),
                    "lost": t.lost_items,
                    "loss_checks": t.loss_checks,
                    "skip_reason": str(report.longrepr[-1])
                    if report.skipped and isinstance(report.longrepr, tuple)
                    else None,
                }
            )
            + "\n"
        )
        # O_APPEND + one write per line: xdist workers can share the file without interleaving.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    elif report.when == "teardown" and report.failed:
        # A teardown failure (e.g. a leftover mount) fails the suite too.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(
                fd,
                (
                    json.dumps(
                        {
                            "test": item.nodeid,
                            "kind": _kind(item),
                            "outcome": "failed",
                            "inputs": 0,
                            "faults": 0,
                            "handled": 0,
                            "accepted": 0,
                            "lost": 0,
                            "loss_checks": 0,
                            "skip_reason": None,
                        }
                    )
                    + "\n"
                ).encode(),
            )
        finally:
            os.close(fd)


# ---- shared helpers for the reliability tests ------------------------------------------------------------------


def make_images(root: Path, n=12, size=40, seed=0) -> list[Path]:
    """n random PNGs named img_000.png… under root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size + 5, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def make_folder(root: Path, classes=("cat", "dog", "fox"), per_class=5, seed=0) -> Path:
    """root/<class>/<i>.jpg with a class-dependent brightness."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = (np.zeros((40, 40, 3)) + 60 * c + rng.integers(0, 80, (40, 40, 3))).clip(0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i}.jpg")
    return root


def unit_contents(root: Path) -> dict:
    """Unit files by name → (metadata, feature bytes); safetensors orders header keys arbitrarily, so not raw bytes."""
    from safetensors import safe_open

    out = {}
    for f in Path(root).rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out[f.relative_to(root)] = (h.metadata(), h.get_tensor("features").numpy().tobytes())
    return out


def leftovers(root: Path) -> list[Path]:
    """Temporary and lock files: what an interrupted or failed write must never leave behind."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and (p.name.endswith((".tmp", ".lock"))))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = ["--model", "test-vit-tiny", "--pretrained", "none"]


def cli(*args, env=None):
    """`prolip …` in-process through click; the result has .output, .exit_code, .exception."""
    from click.testing import CliRunner

    from prolip.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True, env=env)


def fit_cli(data, out, cache, *extra, shots=2, views=2, steps=5):
    """`prolip fit` as a user types it, on the tiny random ViT with a small budget (None leaves an option out)."""
    budget = [
        x
        for flag, v in (("--shots", shots), ("--views", views), ("--steps", steps))
        if v is not None
        for x in (flag, v)
    ]
    return cli("fit", "--data", data, *budget, "--cache-dir", cache, "--out", out, *extra, *TINY)


@contextmanager
def tmpfs(mountpoint: Path, size: str, *, read_only: bool = False):
    """A size-limited tmpfs at mountpoint (a real full disk); skips the test where mounting is not permitted."""
    import subprocess

    mountpoint.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mountpoint)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def remount(mountpoint: Path, options: str) -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,{options}", str(mountpoint)], check=True)


def digest(root: Path) -> dict[str, str]:
    """Content hash of every file under root (or of root itself), with the type of anything that is not a file:
    what a test compares before and after to show that nothing was changed, added or deleted."""
    import hashlib

    root = Path(root)
    if not (root.exists() or root.is_symlink()):
        return {}
    if root.is_file() and not root.is_symlink():
        return {str(root): hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {str(root): "dir" if root.is_dir() and not root.is_symlink() else f"link:{os.readlink(root)}"}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = f"link:{os.readlink(p)}"
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p)] = "dir" if p.is_dir() else "special"
    return out


@contextmanager
def deadline(seconds: float):
    """Fail with TimeoutError instead of hanging: SIGALRM interrupts even a blocking open() of a FIFO."""
    import signal

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def special_file(path: Path, kind: str) -> Path:
    """A file that is not a regular file at ``path``: "fifo", "socket", "device" (a link to the endless /dev/zero)
    or "folder"."""
    import socket

    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        cwd = os.getcwd()
        os.chdir(path.parent)  # a relative name: AF_UNIX paths are limited to ~107 bytes
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(path.name)  # the socket file stays after close
        finally:
            os.chdir(cwd)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    return path


SPECIAL_KINDS = ("fifo", "socket", "device")


def fake_run(path: Path | None = None, *, classes=("a", "b", "c"), seed: int = 0):
    """A complete Run (no backbone needed), saved at ``path`` when given."""
    import torch

    from prolip.run import Run

    g = torch.Generator().manual_seed(seed)
    manifest = {
        "backbone": {
            "family": "open_clip",
            "arch": "test-vit-tiny",
            "weights": "none",
            "random_weights": True,
            "fingerprint": "0" * 64,
        },
        "method": {"method": "prolip", "hyperparameters": {"lr": 1e-5}},
        "fit": {"shots": 2},
        "logit_scale": 100.0,
    }
    run = Run(
        manifest=manifest,
        method_state={"W": torch.randn(8, 4, generator=g), "b": torch.zeros(4)},
        classifier=torch.randn(len(classes), 4, generator=g),
        classnames=list(classes),
        templates=["a photo of a {}."],
    )
    if path is not None:
        run.save(path)
    return run
