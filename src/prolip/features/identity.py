"""What an image is, and what a set of images and a run's environment are: identities that travel between machines.

An image is the hash of its bytes (``prolip.data.images.content_digest``), so a copied, moved or re-unpacked
dataset keeps its images' identities: the same augmented views, the same cache entries, the same numbers.
Hashing reads every byte, so :class:`ContentIndex` remembers the hash of each file (or container member) under
its (resolved path, size, modification time): an unchanged file is never read again to be identified.

The index lives beside the feature cache, ``<cache_dir>/identity-v1/<group>.json``, one small JSON file per
folder (or per container file), so a request reads only the groups it touches. Each file is replaced atomically
(temporary, fsync, rename) under its own lock, after merging what other processes wrote meanwhile, so several
processes (torchrun ranks, parallel runs) share it safely; a file that does not parse is only a lost memo.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

from prolip.data.images import BadImageError, content_digest, stored_member
from prolip.features.locking import LockError, held
from prolip.features.storage import IDENTITY
from prolip.outputs import OutputError, writing

INDEX_DIR = "identity-v1"
# A file modified within this long before it was hashed may change again within the same mtime tick without its
# (size, mtime) changing (filesystems with coarse timestamps): such a hash is used but not remembered.
_RACY_NS = 2_000_000_000

Stat = tuple[str, str, int, int]  # (group, name in the group, size, mtime_ns)


def _stat(path: Path) -> Stat | None:
    """Where ``path``'s hash is remembered, or None for what is not a regular file (never remembered: hashing it
    raises its own error)."""
    member = stored_member(path)
    target = member.container if member is not None else path
    try:
        st = os.stat(target)
        resolved = target.resolve()
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if member is not None:
        return str(resolved), member.name, st.st_size, st.st_mtime_ns
    return str(resolved.parent), resolved.name, st.st_size, st.st_mtime_ns


def _digest(path: Path) -> str | BadImageError:
    try:
        return content_digest(path)
    except BadImageError as e:
        return e


class ContentIndex:
    """Content hashes of images, remembered per (path, size, mtime_ns) under ``root`` (None: remembered nowhere).

    ``persist=False`` reads the index but writes nothing (read-only surveys).
    """

    def __init__(self, root: Path | str | None, *, persist: bool = True, workers: int = 4):
        self.dir = Path(root) / INDEX_DIR if root is not None else None
        self.persist, self.workers = persist and root is not None, workers
        self.hashed = 0  # images read and hashed (not found in the index) by this object

    def keys(self, paths: Sequence[Path | str]) -> list[str | BadImageError]:
        """The content hash of each image, or the BadImageError that says why it has none, in order."""
        files = [Path(p) for p in paths]
        stats = [_stat(p) for p in files]
        out: list[str | BadImageError | None] = [None] * len(files)
        groups: dict[str, list[int]] = {}
        for i, st in enumerate(stats):
            if st is not None:
                groups.setdefault(st[0], []).append(i)
        for group, members in groups.items():
            known = self._read(group)
            if self.persist and self._file(group).with_suffix(".lock").exists():
                with suppress(OSError, LockError), held(self._file(group).with_suffix(".lock")):
                    pass  # what a writer killed after its rename left: taking the lock removes it
            for i in members:
                _, name, size, mtime = stats[i]  # type: ignore[misc]
                hit = known.get(name)
                if hit is not None and hit[0] == size and hit[1] == mtime:
                    out[i] = hit[2]
        todo = [i for i, k in enumerate(out) if k is None]
        with ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="prolip-hash") as pool:
            # Threads: hashlib and file reads release the GIL.
            for i, key in zip(todo, pool.map(_digest, [files[i] for i in todo]), strict=True):
                out[i] = key
        self.hashed += len(todo)
        if self.persist:
            self._remember(files, stats, out, todo)
        return [k for k in out if k is not None]

    def _remember(self, files, stats, out, todo) -> None:
        """Write the new hashes of regular files that did not change while they were read."""
        now = time.time_ns()
        new: dict[str, dict[str, list]] = {}
        for i in todo:
            st, key = stats[i], out[i]
            if st is None or not isinstance(key, str) or st[3] > now - _RACY_NS or _stat(files[i]) != st:
                continue
            new.setdefault(st[0], {})[st[1]] = [st[2], st[3], key]
        for group, entries in new.items():
            with suppress(OSError, OutputError, LockError):  # a memo: unwritable, it costs hashing again next time
                self._merge(group, entries)

    def _file(self, group: str) -> Path:
        assert self.dir is not None
        return self.dir / f"{hashlib.blake2b(group.encode(), digest_size=12).hexdigest()}.json"

    def _read(self, group: str) -> dict[str, list]:
        if self.dir is None:
            return {}
        try:
            data = json.loads(self._file(group).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("group") != group or not isinstance(data.get("entries"), dict):
            return {}
        return data["entries"]

    def _merge(self, group: str, entries: dict[str, list]) -> None:
        with writing(self._file(group).parent):
            self._write_merged(group, entries)

    def _write_merged(self, group: str, entries: dict[str, list]) -> None:
        target = self._file(group)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Two writers can in rare races both hold the lock (locking.held removes its file): one's new entries are
        # then lost, a memo only, and each file still holds one writer's complete JSON.
        with held(target.with_suffix(".lock")):
            for leftover in target.parent.glob(f".{target.name}.*.tmp"):  # of a writer killed mid-write
                leftover.unlink(missing_ok=True)
            merged = {**self._read(group), **entries}
            data = json.dumps({"group": group, "identity": IDENTITY, "entries": merged}, separators=(",", ":"))
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "w") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)


# -- fingerprints of what produced a result --------------------------------------------------------------------------
def keys_fingerprint(keys: Iterable[str]) -> str:
    """A hash over content hashes, in order: two image sets share it iff they hold the same images in the same
    order, wherever their files are."""
    h = hashlib.blake2b(digest_size=16)
    for k in keys:
        h.update(k.encode() + b"\n")
    return h.hexdigest()


def image_set_fingerprint(paths: Sequence[Path | str], cache_dir: Path | str | None = None) -> str:
    """The fingerprint of an ordered set of images (files, tar members, dataset rows): :func:`keys_fingerprint`
    over their content hashes, an unreadable image counting as ``unreadable`` (results leave it out and list it).
    ``cache_dir``: where the hashes are remembered (the feature cache's directory), so images the cache has seen
    are not read again."""
    return keys_fingerprint(k if isinstance(k, str) else "unreadable" for k in ContentIndex(cache_dir).keys(paths))


def git_commit() -> str | None:
    """The commit of the checkout prolip is imported from, read from ``.git`` without running git; None when it is
    not a checkout or anything about it is unusual (never raises)."""
    try:
        here = Path(__file__).resolve()
        for parent in here.parents:
            git = parent / ".git"
            if git.is_file():  # a worktree or submodule: "gitdir: <path>"
                git = (parent / git.read_text().split(":", 1)[1].strip()).resolve()
            if git.is_dir():
                return _head(git)
    except Exception:  # noqa: BLE001 - provenance is best effort, never a failure
        return None
    return None


def _head(git: Path) -> str | None:
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head or None
    ref = head[4:].strip()
    common = git / "commondir"
    roots = [git] + ([(git / common.read_text().strip()).resolve()] if common.is_file() else [])
    for root in roots:
        if (root / ref).is_file():
            return (root / ref).read_text().strip()
        packed = root / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
    return None


def environment_fingerprint(device: str, dtype: str) -> dict:
    """What computed a result: prolip's version and commit (if known), torch, device, dtype and torch's thread
    count, with ``fingerprint`` hashing them all."""
    import torch

    from prolip.version import __version__

    env = {
        "prolip": __version__,
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
    }
    env["fingerprint"] = hashlib.blake2b(json.dumps(env, sort_keys=True).encode(), digest_size=16).hexdigest()
    return env


def result_fingerprints(images, cache, device: str) -> dict:
    """The fields a result (run manifest, bench record) carries to say what produced it: ``images``, the
    fingerprints of its support, validation and evaluation sets (an ``EpisodeImages``), and ``environment``.
    ``cache``: the FeatureCache that extracted them (its directory remembers the hashes, its compute dtype is the
    features' dtype)."""
    root = getattr(cache, "root", None)
    sets = {"support": images.support, "validation": images.validation, "evaluation": images.evaluation}
    return {
        "images": {name: image_set_fingerprint([it.path for it in s.items], root) for name, s in sets.items()},
        "environment": environment_fingerprint(device, getattr(cache, "compute_dtype", "fp32")),
    }
