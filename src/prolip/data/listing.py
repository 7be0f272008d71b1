"""A dataset's file listing, scanned once: one ``os.scandir`` pass per folder, remembered on disk.

Listing an ImageNet-sized folder (1.3 M files) with ``Path.rglob`` and a ``stat`` per file took tens of seconds on
every run. Here each folder is listed by ``os.scandir``, whose entries already say what kind of file each one is
(no ``stat`` per file), and what a folder held is remembered in ``<cache_dir>/listing-v1/<root>.json`` under the
folder's identity: its inode, device, modification and change times. Adding, removing or renaming a file changes its
folder's times, so that folder, and only that one, is listed again; the change time also moves when a folder is
replaced by a copy that kept the old modification time, or its permissions change. A folder changed within
``_RACY_NS`` of the scan is listed but not trusted next time: on a coarse clock a later change could leave its times
as they were.

What is remembered is names and kinds (regular file, symlink, folder, other), nothing about a file's content: an
image whose bytes change keeps its name and kind, and its content hash comes from its own size and mtime when it is
read (``prolip.features.identity``). Symlinks are followed at every listing, since their targets change without
their folder changing. A memo that does not parse, names another root, or holds anything a listing would not write
is ignored and rewritten, never used; one that cannot be written costs a scan next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from prolip.data.images import IMAGE_EXTENSIONS, image_names, is_image_name
from prolip.data.types import ListedItems
from prolip.outputs import OutputError, replace_atomically, writing

LISTING_DIR = "listing-v1"
FORMAT = "prolip-listing/1"
# A listing of fewer entries is scanned in about the time its memo takes to read and write: not remembered (and
# the many small folders of tests and demos leave no files behind).
MIN_ENTRIES = 5_000
# A folder whose modification or change time is this close to the scan may change again without its times moving.
_RACY_NS = 2_000_000_000

Key = tuple[int, int, int, int]  # (inode, device, mtime_ns, ctime_ns) of a folder


def default_cache_dir() -> Path:
    """Where prolip keeps what it remembers: ``$PROLIP_CACHE_DIR`` or ``~/.cache/prolip``, the feature cache's
    default (``prolip.features.cache.default_cache_dir``, which imports torch; the data readers do not)."""
    return Path(os.environ.get("PROLIP_CACHE_DIR", Path.home() / ".cache" / "prolip"))


@dataclass(frozen=True)
class Folder:
    """What one folder held when it was listed: its entries' names by kind, each list sorted. ``key``: the folder's
    identity then; None when it changed too recently (or could not be read) to be trusted again."""

    key: Key | None
    images: list[str]  # regular files (not symlinks) with an image's name (prolip.data.images.image_names)
    files: list[str]  # the other regular files
    links: list[str]  # symlinks, whatever they point to: followed at each listing
    dirs: list[str]  # folders (not symlinks)
    other: list[str]  # FIFOs, sockets, devices, entries whose kind could not be read

    def size(self) -> int:
        return len(self.images) + len(self.files) + len(self.links) + len(self.dirs) + len(self.other)


def _key(st: os.stat_result) -> Key:
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)


def _kind(entry: os.DirEntry) -> int:
    """The index of ``entry``'s list among a Folder's (regular) files, links, dirs and other entries, from the
    directory entry's own type: no stat for a file on file systems that report types (most do)."""
    try:
        if entry.is_symlink():
            return 1
        if entry.is_dir(follow_symlinks=False):
            return 2
        return 0 if entry.is_file(follow_symlinks=False) else 3
    except OSError:
        return 3


def list_folder(path: Path, started_ns: int) -> Folder:
    """``path``'s entries now, trusted again only if the folder last changed before ``started_ns - _RACY_NS``."""
    try:
        st = os.stat(path)  # before listing: a change made after this shows as a newer key next time
        with os.scandir(path) as it:
            entries = list(it)
    except (OSError, ValueError):  # unreadable: no entries (as rglob and os.walk see it), and listed again next time
        return Folder(None, [], [], [], [], [])
    kinds: tuple[list[str], ...] = ([], [], [], [])
    for entry in entries:
        kinds[_kind(entry)].append(entry.name)
    files, links, dirs, other = (sorted(k) for k in kinds)
    images = image_names(files)
    if len(images) < len(files):
        taken = set(images)
        files = [n for n in files if n not in taken]
    else:
        files = []
    trusted = max(st.st_mtime_ns, st.st_ctime_ns) < started_ns - _RACY_NS
    return Folder(_key(st) if trusted else None, images, files, links, dirs, other)


def _usable(names: list) -> bool:
    """Strings that each name one entry of a folder: none empty, ``.`` or ``..`` and none holding ``/`` or NUL, so
    a memo can name nothing outside the folder it describes."""
    try:
        joined = "\0" + "\0".join(names) + "\0"
    except TypeError:  # a name that is not a string
        return False
    return not ("/" in joined or "\0\0" in joined or "\0.\0" in joined or "\0..\0" in joined)


def _names_ok(names: object) -> bool:
    """Entry names as a listing writes them: a sorted list of usable names."""
    if not isinstance(names, list):
        return False
    return not names or (_usable(names) and names == sorted(names))


def _folder_from(rel: object, record: object) -> Folder | None:
    """A memo's record of a folder, or None if it is not one a listing writes."""
    if not (isinstance(rel, str) and _usable(rel.split("/")) and isinstance(record, list) and len(record) == 6):
        return None
    key, *names = record
    if key is not None and not (isinstance(key, list) and len(key) == 4 and all(type(k) is int for k in key)):
        return None
    # The other regular files hold no image's name (a few, usually); the images, a million maybe, are not told
    # apart again: the memo was written under the same extensions (its head says) and its digest holds.
    if not all(_names_ok(n) for n in names) or image_names(names[1]):
        return None
    return Folder(None if key is None else (key[0], key[1], key[2], key[3]), *names)


def _head(root: str, body: str) -> dict:
    """A memo's first line: its format, the root it lists, the image extensions its images were told apart by and
    the digest of the rest (JSON with ``ensure_ascii``: plain ASCII)."""
    digest = hashlib.blake2b(body.encode(), digest_size=16).hexdigest()
    return {"format": FORMAT, "root": root, "extensions": sorted(IMAGE_EXTENSIONS), "digest": digest}


def memo_text(root: str, records: dict) -> str:
    """A memo: its head line, then the folders' records as one JSON object."""
    body = json.dumps(records, separators=(",", ":"))
    return json.dumps(_head(root, body)) + "\n" + body


def _read_memo(file: Path, root: str) -> dict[str, Folder]:
    """The folders a memo remembers; nothing at all if any part of it is not what :meth:`Listing.save` writes (a
    changed byte anywhere fails its digest)."""
    try:
        head, _, body = file.read_text(encoding="utf-8").partition("\n")
        if json.loads(head) != _head(root, body):
            return {}
        records = json.loads(body)
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(records, dict):
        return {}
    out: dict[str, Folder] = {}
    for rel, record in records.items():
        folder = _folder_from(rel, record)
        if folder is None:
            return {}
        out[rel] = folder
    return out


def _target_kind(path: Path) -> str:
    """What a symlink leads to now: ``image`` or ``file`` (a regular file, by the link's name), ``linked dir`` or
    ``other`` (dangling, a FIFO…)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return "other"
    if stat.S_ISREG(mode):
        return "image" if is_image_name(path.name) else "file"
    return "linked dir" if stat.S_ISDIR(mode) else "other"


class Listing:
    """The folders under ``root`` (names relative to it, ``/``-separated) as listed in this process: each taken from
    the memo in ``cache_dir`` (default :func:`default_cache_dir`) while its identity is unchanged, else listed.
    ``save()`` remembers them; ``listed`` counts the folders listed rather than remembered."""

    def __init__(self, root: Path, cache_dir: Path | str | None = None, *, min_entries: int | None = None):
        self.root, self.min_entries = Path(root), MIN_ENTRIES if min_entries is None else min_entries
        self.started = time.time_ns()
        self.listed = 0
        self._seen: dict[str, Folder] = {}
        self._changed = False
        try:
            self._where: str | None = str(self.root.resolve())
        except (OSError, RuntimeError, ValueError):
            self._where = None
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        digest = hashlib.blake2b(str(self._where).encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()
        self.file = cache / LISTING_DIR / f"{digest}.json"
        self._known = _read_memo(self.file, self._where) if self._where is not None else {}

    def folder(self, rel: str) -> Folder:
        path = self.root / rel
        known = self._known.get(rel)
        if known is not None and known.key is not None:
            try:
                same = _key(os.stat(path)) == known.key
            except (OSError, ValueError):
                same = False
            if same:
                self._seen[rel] = known
                return known
        fresh = list_folder(path, self.started)
        self.listed += 1
        self._changed |= fresh != known
        self._seen[rel] = fresh
        return fresh

    def save(self) -> None:
        """Remember the folders listed in this process (only those: a folder no longer read is forgotten). A memo
        that cannot be written is only a scan again next time."""
        if self._where is None or not (self._changed or self._seen.keys() != self._known.keys()):
            return
        if sum(f.size() for f in self._seen.values()) < self.min_entries:
            return
        records = {
            rel: [None if f.key is None else list(f.key), f.images, f.files, f.links, f.dirs, f.other]
            for rel, f in self._seen.items()
        }
        text = memo_text(self._where, records)

        def fill(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")

        with suppress(OSError, OutputError), writing(self.file):
            self.file.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(self.file, fill)
        self._known, self._changed = dict(self._seen), False

    def collect(self, rel: str, label: int, found: Found, *, enter_hidden: bool, files_first: bool) -> int:
        """Add to ``found`` the images under folder ``rel`` (regular files, symlinks followed, with an image name)
        under ``label``, and the visible files left out, recursively; never through a symlinked folder (a loop
        could recurse forever). Returns how many images it added.

        ``enter_hidden``: whether hidden sub-folders are entered. ``files_first``: a folder's files, by name, before
        its sub-folders, by name (``os.walk``'s order), else every entry by name, each sub-folder's where its name
        falls (``sorted(folder.rglob("*"))``'s order).
        """
        before = len(found.names)
        self._collect(rel, self.root / rel, label, found, enter_hidden, files_first)
        return len(found.names) - before

    def _collect(self, rel: str, base: Path, label: int, found: Found, enter_hidden: bool, files_first: bool) -> None:
        f = self.folder(rel)
        if not (f.links or f.dirs or f.other):  # the common case, a folder of plain files: no name looked at
            found.ignored += [base / n for n in f.files if not n.startswith(".")]
            found.add(base, f.images, label)
            return
        kinds = {n: "image" for n in f.images} | {n: "file" for n in f.files} | {n: "dir" for n in f.dirs}
        kinds |= {n: "other" for n in f.other} | {n: _target_kind(base / n) for n in f.links}
        run: list[str] = []  # the images of this folder since the last sub-folder entered
        later = []  # sub-folders entered after the files (files_first)
        for name in sorted(kinds):
            kind = kinds[name]
            if kind == "image":
                run.append(name)
            elif kind == "dir":
                if not enter_hidden and name.startswith("."):
                    continue
                if files_first:
                    later.append(name)
                    continue
                found.add(base, run, label)
                run = []
                self._collect(f"{rel}/{name}", base / name, label, found, enter_hidden, files_first)
            elif kind != "linked dir" and not name.startswith("."):
                found.ignored.append(base / name)
        found.add(base, run, label)
        for name in later:
            self._collect(f"{rel}/{name}", base / name, label, found, enter_hidden, files_first)


class Found:
    """Images found in listed folders, kept as :class:`ListedItems` keeps them, and the visible files left out."""

    def __init__(self) -> None:
        self.folders: list[Path] = []
        self.at: list[int] = []
        self.names: list[str] = []
        self.labels: list[int] = []
        self.ignored: list[Path] = []

    def add(self, folder: Path, names: list[str], label: int) -> None:
        if not names:
            return
        if not self.folders or self.folders[-1] is not folder:
            self.folders.append(folder)
        self.at += [len(self.folders) - 1] * len(names)
        self.names += names
        self.labels += [label] * len(names)

    def items(self) -> ListedItems:
        return ListedItems(self.folders, self.at, self.names, self.labels)
