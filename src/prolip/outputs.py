"""Where prolip may write: the one rule every writer (runs, exports, bench results, reports) goes through.

* An output directory may be created when it is absent.
* An existing one is replaced only with ``force``, and only when it is empty or is one of ours of the same kind:
  a run (``manifest.json`` with ``"format": "prolip-run/1"`` and nothing but run files), an export (a
  ``prolip-export.json`` marker, the classifier head and checkpoints written by :mod:`prolip.export`), or bench
  results (``records.jsonl`` or a report). Anything else is refused: prolip never deletes what it did not write.
* An output is never equal to, inside, or (when it would be replaced) around a data path being read.
* One prolip process at a time writes an output: a second one is refused at the start, not half-way through.

Writers assemble a directory under a temporary name beside the target and rename it into place, so an interrupted
write never leaves a half-written output; files and directories get the permissions the user's umask gives. A write
that fails (no space, over quota, read-only, no permission) is one :class:`OutputError` naming what could not be
written and where, with the earlier output as it was and no temporary left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prolip.errors import ProlipError

RUN_FORMAT = "prolip-run/1"
EXPORT_MARKER = "prolip-export.json"
EXPORT_FORMAT = "prolip-export/1"
HEAD_FILES = ("classifier_head.safetensors", "classifier_head.json")
BENCH_ANCHORS = ("records.jsonl", "results.md", "results.csv", "results.json")
RUN_CARD = "README.md"
EVAL_FORMAT = "prolip-eval/1"
EVAL_FILES = ("eval.json", "per_class.csv", "confusion_matrix.png")
KINDS = ("run", "export", "bench", "eval")
_SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # a larger "header" is not one of our checkpoints
_OUR_TEMPORARY = re.compile(r"\..+\.tmp(-\d+(-[0-9a-f]+)?)?")  # .<name>.tmp[-<pid>[-<token>]], as the writers name them


class OutputError(ProlipError, ValueError):
    """An output path prolip must not write: the message names the path and why."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and replacing it needs force (still a FileExistsError for callers that catch that)."""


# ---- failed writes ---------------------------------------------------------------------------------------------

_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or choose another output path",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another output path",
    errno.EFBIG: "the file is larger than this filesystem or process allows: choose another output path",
    errno.EROFS: "the filesystem is read-only: choose another output path",
    errno.EACCES: "no permission to write there: choose another output path",
    errno.EPERM: "the operation is not permitted there: choose another output path",
}
_TEMPORARY_OF = re.compile(r"\.(.+)\.tmp(?:-\d+(?:-[0-9a-f]+)?)?")  # a writer's temporary: the name it stands for
_WRITING = threading.local()  # how many writing() blocks this thread is inside
_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports an OSError


def _errno_of(e: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one safetensors puts in its SafetensorError text."""
    if isinstance(e, OSError):
        return e.errno
    if type(e).__name__ == "SafetensorError":
        found = _RUST_IO_ERROR.search(str(e))
        return int(found.group(1)) if found else None
    return None


@contextmanager
def writing(out: Path | str, error: Callable[[Path, OSError], Exception] | None = None) -> Iterator[None]:
    """Turn an I/O error raised while writing ``out`` into one :class:`OutputError` naming it and the file that
    failed; the writers inside clean up their own temporaries before it gets here. Nested, the outermost names
    the output: a file written inside a directory's temporary is reported as part of that directory. ``error``:
    what an output with its own words raises instead (the feature cache), given ``out`` and the OSError."""
    _WRITING.depth = getattr(_WRITING, "depth", 0) + 1
    try:
        yield
    except OutputError:
        raise
    except Exception as e:
        if _WRITING.depth > 1:
            raise
        code = _errno_of(e)
        if code is None and not isinstance(e, OSError):
            raise
        reason = os.strerror(code) if code else str(e)
        if error is not None:
            raise error(Path(out), OSError(code, reason, getattr(e, "filename", None))) from None
        # The file inside the output that failed, by the name it would have had, not its temporary's.
        where = Path(str(getattr(e, "filename", None) or "")).name
        temporary = _TEMPORARY_OF.fullmatch(where)
        where = temporary.group(1) if temporary else where
        name = "" if where in ("", Path(out).name) else f" ({where})"
        advice = _ADVICE.get(code or 0, "choose another output path")
        raise OutputError(f"could not write {out}{name}: {reason}; {advice}") from None
    finally:
        _WRITING.depth -= 1


# ---- what a directory is ---------------------------------------------------------------------------------------


def kind_of(path: Path | str) -> str | None:
    """What a directory is to prolip: "empty", "run", "export", "bench" or "eval" (one it may take over), else None."""
    path = Path(path)
    try:
        entries = list(os.scandir(path))
    except OSError:
        return None
    if not entries:
        return "empty"
    for kind, test in (("run", _is_run), ("export", _is_export), ("bench", _is_bench), ("eval", _is_eval)):
        if test(path, entries):
            return kind
    return None


def _read_json(path: Path):
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_run(path: Path, entries) -> bool:
    manifest = _read_json(path / "manifest.json")
    if not (isinstance(manifest, dict) and manifest.get("format") == RUN_FORMAT):
        return False
    # Only run files: a run directory someone put other things into is no longer ours to delete.
    return all(
        e.is_file(follow_symlinks=False) and (e.name.endswith((".json", ".safetensors")) or e.name == RUN_CARD)
        for e in entries
    )


def _is_eval(path: Path, entries) -> bool:
    report = _read_json(path / EVAL_FILES[0])
    if not (isinstance(report, dict) and report.get("format") == EVAL_FORMAT):
        return False
    return all(e.is_file(follow_symlinks=False) and e.name in EVAL_FILES for e in entries)


def _export_listed(path: Path) -> set[str] | None:
    """The files a valid export marker lists; None when there is no valid marker."""
    marker = _read_json(path / EXPORT_MARKER)
    if isinstance(marker, dict) and marker.get("format") == EXPORT_FORMAT and isinstance(marker.get("files"), list):
        return {f for f in marker["files"] if isinstance(f, str)}
    return None


def is_exported_checkpoint(path: Path | str) -> bool:
    """A .safetensors file written by prolip's export: its header metadata says so."""
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return False
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= _SAFETENSORS_HEADER_LIMIT:
                return False
            metadata = json.loads(f.read(size)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return metadata.get("exported_by") == "prolip" or "adapted" in metadata  # "adapted": exports before the marker


def _is_head_file(entry) -> bool:
    if entry.name == HEAD_FILES[0]:
        return True
    meta = _read_json(Path(entry.path))
    return isinstance(meta, dict) and {"classnames", "templates"} <= set(meta)


def _is_export(path: Path, entries) -> bool:
    listed = _export_listed(path)

    def ours(e) -> bool:
        if _OUR_TEMPORARY.fullmatch(e.name):  # what an interrupted export writer left behind
            return not e.is_symlink()
        if listed is not None and (e.name == EXPORT_MARKER or e.name in listed):
            return not e.is_symlink()
        if not e.is_file(follow_symlinks=False):
            return False
        if e.name in HEAD_FILES:
            return _is_head_file(e)
        return e.name.endswith(".safetensors") and is_exported_checkpoint(e.path)

    return all(ours(e) for e in entries)


def _is_bench(path: Path, entries) -> bool:
    # Bench and report writers only add or rewrite their own named files, so one of them identifies the folder.
    return any(e.name in BENCH_ANCHORS and e.is_file(follow_symlinks=False) for e in entries)


# ---- the checks ------------------------------------------------------------------------------------------------


def ensure_outside_data(out: Path | str, data_paths: Iterable[Path | str] = (), *, may_contain: bool = False) -> None:
    """Refuse an output equal to, inside, or (unless ``may_contain``) containing a data path being read."""
    out = Path(out).expanduser()
    target = out.resolve()
    for data in data_paths:
        if data is None or str(data) == "":
            continue
        read = Path(data).expanduser().resolve()
        if target == read:
            raise OutputError(f"output {out} is the data being read ({data}); choose another output path")
        if target.is_relative_to(read):
            raise OutputError(
                f"output {out} is inside the data being read ({data}): it would become part of "
                f"the data; choose a path outside it"
            )
        if read.is_relative_to(target) and not may_contain:
            raise OutputError(f"output {out} contains the data being read ({data}); choose a path outside it")


def _check_parent(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a writable folder, so the directory can be created."""
    ancestor = out.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: no permission to write in {ancestor}")


def _describe(path: Path) -> str:
    mode = os.lstat(path).st_mode
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISREG, "a file"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    ):
        if test(mode):
            return name
    return "not a folder"


def _check_existing(out: Path, force: bool, kind: str, update: bool) -> None:
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"cannot write {out}: it exists and is {_describe(out)}, not a folder prolip wrote")
    found = kind_of(out)
    if found not in ("empty", kind):
        what = f"a prolip {found}, not a {kind}" if found else "not empty and not written by prolip"
        raise OutputError(
            f"will not write into {out}: it is {what}; prolip only replaces an empty folder or one "
            f"of its own {kind} folders: choose another output path"
        )
    if not force and not update:
        raise OutputExistsError(
            f"{out} already exists; pass --force to overwrite it (CLI) or force=True, or choose another output path"
        )


def check_writable(
    out: Path | str,
    force: bool = False,
    data_paths: Iterable[Path | str] = (),
    *,
    kind: str = "run",
    update: bool = False,
) -> Path:
    """Pre-flight for an output directory, cheap enough to run before any extraction or training.

    ``kind`` is what will be written there ("run", "export" or "bench"). ``update``: the writer adds or rewrites
    its own named files instead of replacing the folder (bench records, reports, an export's classifier head),
    so an existing folder of that kind needs no force. Raises :class:`OutputError` naming the path.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {KINDS}")
    out = Path(out).expanduser()
    ensure_outside_data(out, data_paths, may_contain=update)
    _check_parent(out)
    if out.exists() or out.is_symlink():
        _check_existing(out, force, kind, update)
    return out


# ---- one writer per output -------------------------------------------------------------------------------------

_HELD: dict[tuple[int, int, str], int] = {}  # (pid, thread, lock file) -> depth: re-entry within one thread


def _lock_dir() -> Path:
    """A private per-user folder for lock files, so outputs and their parents stay free of them."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    folder = Path(tempfile.gettempdir()) / f"prolip-locks-{uid}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != uid):
        raise OutputError(f"lock folder {folder} is not a folder owned by this user; remove it and retry")
    return folder


def lock_path(out: Path | str) -> Path:
    """The lock file of an output: keyed by its absolute path, so every spelling of it shares one lock."""
    key = str(Path(out).expanduser().resolve())
    return _lock_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.lock"


@contextmanager
def output_lock(out: Path | str) -> Iterator[None]:
    """Hold ``out``'s lock, or raise OutputError at once if another prolip process is writing it.

    An flock: released by the kernel when its holder dies, so a killed writer never blocks the next one.
    """
    from filelock import FileLock, Timeout

    try:
        path = lock_path(out)
    except OSError as e:
        raise OutputError(f"cannot lock {out}: {e}") from None
    key = (os.getpid(), threading.get_ident(), str(path))
    if key in _HELD:  # this thread already holds it (the CLI's pre-flight, then the writer itself)
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputError(
            f"another prolip process is writing {out}; wait for it to finish or choose another output path"
        ) from None
    except OSError as e:
        raise OutputError(f"cannot lock {out}: {e}") from None
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        lock.release()


@contextmanager
def reserve(
    out: Path | str,
    force: bool = False,
    data_paths: Iterable[Path | str] = (),
    *,
    kind: str = "run",
    update: bool = False,
    lock: bool = True,
) -> Iterator[Path]:
    """:func:`check_writable` under the output's lock, held until the block ends (a command's whole run)."""
    held = output_lock(out) if lock else _nothing()
    with held:
        yield check_writable(out, force, data_paths, kind=kind, update=update)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ---- atomic writes ---------------------------------------------------------------------------------------------


def write_directory(
    out: Path | str,
    fill: Callable[[Path], None],
    *,
    force: bool = False,
    data_paths: Iterable[Path | str] = (),
    kind: str = "run",
) -> Path:
    """Create or replace the directory ``out`` with what ``fill(tmp)`` writes into a fresh temporary directory.

    ``out`` is always either its old complete content or the new complete one (atomic swap where the OS has it).
    """
    out = Path(out).expanduser()
    with reserve(out, force, data_paths, kind=kind), writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        _sweep_dead_temporaries(out)
        tmp = _make_temp_dir(out)
        try:
            fill(tmp)
            normal_permissions(tmp)
            _put_in_place(tmp, out)
        except BaseException:
            _remove(tmp)
            raise
    return out


def write_file(
    path: Path | str,
    fill: Callable[[Path], None],
    *,
    force: bool = False,
    is_ours: Callable[[Path], bool],
    data_paths: Iterable[Path | str] = (),
) -> Path:
    """Create or (with force, if ``is_ours``) replace the file ``path`` with what ``fill(tmp)`` writes."""
    path = Path(path).expanduser()
    with output_lock(path):
        check_file(path, force, is_ours=is_ours, data_paths=data_paths)
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, fill)
    return path


def check_file(
    path: Path | str, force: bool = False, *, is_ours: Callable[[Path], bool], data_paths: Iterable[Path | str] = ()
) -> Path:
    """Pre-flight for one output file, cheap enough to run before any work: :func:`write_file`'s rules."""
    path = Path(path).expanduser()
    ensure_outside_data(path, data_paths)
    _check_parent(path)
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file():
            raise OutputError(f"cannot write {path}: it exists and is {_describe(path)}")
        if not is_ours(path):
            raise OutputError(f"will not overwrite {path}: prolip did not write it; choose another path")
        if not force:
            raise OutputExistsError(f"{path} already exists; pass force=True (CLI: --force) to overwrite it")
    return path


def replace_atomically(path: Path, fill: Callable[[Path], None]) -> None:
    """``fill(tmp)`` writes a temporary beside ``path``, which then takes its place in one rename (normal
    permissions); an interrupted write leaves ``path`` as it was and no temporary behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    with writing(path):
        try:
            fill(tmp)
            normal_permissions(tmp)
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise


def _umask() -> int:
    """The process umask, read without setting it where the OS allows (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: Path) -> None:
    """Files 0666 and folders 0777 less the umask, as any program's output: some writers (safetensors,
    tempfile) create private 0600/0700 files, which would make a shared run unreadable to the rest of a team."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _make_temp_dir(out: Path) -> Path:
    # os.mkdir applies the umask (tempfile.mkdtemp would make it 0700, and the run would keep that mode).
    # The pid in the name lets a later write tell a dead writer's leftovers from a live one's work in progress.
    while True:
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def _put_in_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
    elif _exchange(tmp, out):  # one atomic step: `out` is always the old or the new complete content
        _remove(tmp)
    else:
        # No atomic swap here: move the old one aside first, so a crash between the two renames still leaves
        # it complete on disk (Run.load points at it).
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # the second rename failed: the old output goes back under its name
            raise
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _sweep_dead_temporaries(out: Path) -> None:
    """Remove temporaries of earlier writes of ``out`` whose writer died (kill -9, power loss)."""
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):
        pid = leftover.name[len(f".{out.name}.tmp-") :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
