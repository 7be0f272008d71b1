"""One writer per cache unit, across processes and hosts sharing the directory: an OS-level lock beside the unit.

``filelock`` takes a kernel lock (flock) on ``<unit>.lock``; the kernel releases it when its holder dies, kill -9
included, so a dead writer never blocks anyone and there is no stale-lock logic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock

from prolip.errors import ProlipError
from prolip.features.storage import write_error
from prolip.outputs import writing


@contextmanager
def unit_lock(target: Path) -> Iterator[bool]:
    """Hold the lock of the unit ``target``; yields False when another process wrote the unit while we waited."""
    with writing(target.parent, error=write_error):
        try:
            with held(target.with_suffix(".lock")):
                yield not target.exists()
        except LockError as e:
            raise e.error from None  # the output layer words it as the cache's write error


class LockError(ProlipError):
    """A lock file that cannot be taken (read-only or full directory); ``error`` is the OSError. Callers turn it
    into what failed (a cache write) or pass over it (a memo); should one escape, it still reads as one line."""

    option = "--cache-dir"

    def __init__(self, error: OSError):
        super().__init__(f"cannot take the lock {error.filename or ''}: {error.strerror or error}")
        self.error = error


@contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold the lock file ``path`` (an OS-level lock), removing it when done; LockError when it cannot be
    taken (the OSError inside)."""
    lock = FileLock(str(path))
    try:
        lock.acquire()
    except OSError as e:
        raise LockError(e) from None
    try:
        yield
    finally:
        # The holder removes the lock file, so a finished cache holds only units. Waiters poll, reopening the path
        # each time, so none keeps locking the removed file beyond an instant; and whoever holds the lock next
        # looks for the unit before computing it.
        with suppress(OSError):
            path.unlink(missing_ok=True)
        lock.release()


def remove_finished_locks(namespace: Path) -> None:
    """Remove the lock files of units already written: what a writer killed between writing its unit and removing
    its lock leaves behind. Safe for the same reason as removing one's own: whoever locks it next finds the unit."""
    for path in namespace.glob("*.lock"):
        if path.with_suffix(".safetensors").exists():
            with suppress(OSError):
                path.unlink()
