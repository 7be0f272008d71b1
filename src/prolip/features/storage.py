"""The cache's files: safetensors units, the index rebuilt from their headers, checksums, quarantine, atomic writes.

A unit file holds one float16 tensor ``features`` [V, n, D] for a block of n images (view t of the block is
contiguous, so streaming view t reads one run of bytes) and, as safetensors metadata, the images' identity keys
(JSON list), the number of views and a checksum of the tensor's bytes. The index (image key → unit, row, views) is
rebuilt from the headers, so there is no separate mutable index to corrupt; a unit that fails to open or fails its
checksum is set aside and its images are recomputed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from prolip.errors import ProlipError
from prolip.outputs import writing

FEATURES = "features"
# What a unit's keys are: content hashes of the images' bytes. Units written before content identity lack the
# field; their namespaces are never read again (legacy_namespaces finds them).
IDENTITY = "content:blake2b-128"


class CacheError(ProlipError, OSError):
    """The cache directory cannot be used (read-only, full, ...); the message names it."""

    option = "--cache-dir"


@dataclass(frozen=True)
class Entry:
    """Where one image's features live: its unit file, its row there, and how many views the unit holds."""

    file: Path
    row: int
    views: int


def checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def unit_file(namespace: Path, keys: Sequence[str], num_views: int) -> Path:
    """The unit's file: its name hashes what it holds, so every process and every resume plans the same names."""
    name = hashlib.blake2b(json.dumps([list(keys), num_views]).encode(), digest_size=12).hexdigest()
    return namespace / f"{name}.safetensors"


# -- reading -------------------------------------------------------------------------------------------------------
def read_index(namespace: Path) -> dict[str, Entry]:
    """Image key → entry, from the headers of the namespace's units; where two units hold an image, the one with
    more views wins. Units whose header cannot be read are quarantined."""
    index: dict[str, Entry] = {}
    if not namespace.is_dir():
        return index
    for f in sorted(namespace.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {}
            keys, views = json.loads(meta["keys"]), int(meta["views"])
        except Exception:  # truncated or foreign file: set aside, its images get recomputed
            quarantine(f, "unreadable header")
            continue
        for row, k in enumerate(keys):
            if k not in index or index[k].views < views:
                index[k] = Entry(f, row, views)
    return index


def legacy_namespaces(root: Path) -> list[Path]:
    """The namespaces under ``root`` written before images were keyed by content (their units have no identity
    field): one header read per namespace."""
    found = []
    for ns in sorted(root.iterdir()) if root.is_dir() else ():
        first = next(iter(sorted(ns.glob("*.safetensors"))), None) if ns.is_dir() else None
        if first is None:
            continue
        try:
            with safe_open(str(first), framework="pt") as h:
                meta = h.metadata() or {}
        except Exception:  # noqa: BLE001 - an unreadable unit says nothing about its namespace's age
            continue
        if "identity" not in meta:
            found.append(ns)
    return found


def verify(f: Path) -> bool:
    """Whether the unit's features match its checksum; a unit that does not is quarantined."""
    try:
        with safe_open(str(f), framework="pt") as h:
            expected = (h.metadata() or {}).get("checksum")
            data = h.get_tensor(FEATURES).contiguous()
        ok = expected == checksum(data.numpy().tobytes())
    except Exception:
        ok = False
    if not ok:
        quarantine(f, "checksum mismatch")
    return ok


def quarantine(f: Path, why: str) -> None:
    warnings.warn(f"feature cache file {f} is corrupt ({why}); it will be recomputed", stacklevel=2)
    try:
        f.unlink()
    except OSError:
        pass


class ViewReader:
    """Reads view t of unit files, one positional read each; only the layout comes from safetensors' header.

    Not mmap: a mapping that stays open keeps every page it touched resident (streaming 1.8 GB of views through
    cached ``safe_open`` handles peaked at 2.5 GB RSS), and a ``safe_open(...).get_slice`` per read measured 3.5-4x
    the time of a positional read. Reading only view t's bytes keeps streaming 300 views of an ImageNet-sized
    support set bounded by about one view of memory (benchmarks/bench_memory.py).
    """

    def __init__(self):
        self._layouts: dict[Path, tuple[int, int, int]] = {}

    def layout(self, f: Path) -> tuple[int, int, int]:
        """(byte offset of the features, n, D) of a unit file."""
        if f not in self._layouts:
            with safe_open(str(f), framework="pt") as h:
                names, spec = list(h.keys()), h.get_slice(FEATURES)
                _, n, d = spec.get_shape()
                dtype = spec.get_dtype()
            if names != [FEATURES] or dtype != "F16":
                raise CacheError(f"feature cache file {f} is not a unit file ({names}, {dtype})")
            with open(f, "rb") as fh:
                # The safetensors layout: an 8-byte little-endian header length, the header, then the byte buffer;
                # the only tensor starts at the buffer's first byte.
                header_len = int.from_bytes(fh.read(8), "little")
            self._layouts[f] = (8 + header_len, n, d)
        return self._layouts[f]

    def read(self, f: Path, t: int) -> torch.Tensor:
        """View t of the unit: float16 [n, D]."""
        offset, n, d = self.layout(f)
        nbytes = n * d * 2
        with open(f, "rb") as fh:
            fh.seek(offset + t * nbytes)
            data = bytearray(fh.read(nbytes))
        return torch.frombuffer(data, dtype=torch.float16).view(n, d)


# -- writing -------------------------------------------------------------------------------------------------------
def make_dir(namespace: Path) -> None:
    with writing(namespace, error=_create_error):
        namespace.mkdir(parents=True, exist_ok=True)


def _create_error(namespace: Path, e: OSError) -> CacheError:
    return CacheError(
        f"cannot create feature cache directory {namespace}: {e.strerror}; use a writable cache directory"
    )


def write_unit(target: Path, features: torch.Tensor, keys: Sequence[str], num_views: int) -> None:
    """Write a unit atomically: a temporary beside it, fsync, then rename over the name (readers see all or none)."""
    meta = {
        "keys": json.dumps(list(keys)),
        "views": str(num_views),
        "checksum": checksum(features.numpy().tobytes()),
        "identity": IDENTITY,
    }
    data = safetensors_bytes({FEATURES: features}, metadata=meta)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with writing(target.parent, error=write_error):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def discard_temporaries(target: Path) -> None:
    """Remove what writers of ``target`` killed mid-write left; only the holder of the unit's lock may call this."""
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


def write_error(directory: Path, e: OSError) -> CacheError:
    """What a failed cache write says (the output layer's ``error`` for the cache)."""
    # EFBIG: a file-size limit (ulimit -f, RLIMIT_FSIZE) is a full disk as far as the user is concerned.
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CacheError(
            f"feature cache directory {directory} is full ({e.strerror}); free space or use another cache directory"
        )
    return CacheError(
        f"feature cache directory {directory} is not writable ({e.strerror}); use a writable cache directory"
    )
