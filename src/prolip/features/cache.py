"""The on-disk feature cache: pre-projection features per (image, view), shared by every run, seed and protocol.

Layout: ``<cache_dir>/<namespace>/<unit>.safetensors``. The namespace hashes the backbone's weight fingerprint, its
preprocessing, the transform kind and the augmentation seed; a unit file holds float16 features [V, n, D] of a block
of images (view t of the block is contiguous) with the images' identity keys and a checksum in its header. The index
(image key → unit, row) is rebuilt from headers, so there is no separate mutable index to corrupt.

Work is planned deterministically: the requested images (sorted by key) are chunked into units; a unit whose images
are all cached is skipped, otherwise its missing images are encoded in fixed batches and written atomically. An
interrupted extraction therefore resumes with exactly the same units (bitwise-equal features), and processes that
share the directory (or torchrun ranks) split units between them with lock files.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from prolip.data.images import BadImageError, load_image
from prolip.distributed import rank_world
from prolip.transforms import augment_transform, augmented_view, center_transform, view_seed

COMPUTE_DTYPES = ("fp32", "bf16")  # what the backbone computes in while extracting (cached features are float16)
AUGMENT_VERSION = "augment:v1"  # bump when the augmentation changes, so stale views are never reused


class CacheError(OSError):
    """The cache directory cannot be used (read-only, full, ...); the message names it."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("PROLIP_CACHE_DIR", Path.home() / ".cache" / "prolip"))


def image_key(path: Path | str) -> str:
    """Identity of an image file: resolved path, size and modification time."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise BadImageError(p, "file not found") from None
    return hashlib.blake2b(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=16).hexdigest()


def _checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class CacheStats:
    forward_passes: int = 0  # images × views actually encoded by the backbone
    images_extracted: int = 0
    images_reused: int = 0

    def __str__(self) -> str:
        return (f"{self.forward_passes} forward passes, {self.images_extracted} images extracted, "
                f"{self.images_reused} reused from cache")


@dataclass
class _Entry:
    file: Path
    row: int
    views: int


class CachedViews:
    """A ViewSource over cached augmented views, streamed one view at a time from the unit files on disk."""

    def __init__(self, entries: list[_Entry], num_views: int, kept: list[int], paths: list[Path]):
        self.entries, self._num_views, self.kept, self.paths = entries, num_views, kept, paths
        self._handles: dict[Path, object] = {}
        groups: dict[Path, list[tuple[int, int]]] = {}
        for i, e in enumerate(entries):
            groups.setdefault(e.file, []).append((i, e.row))
        self._groups = {f: (torch.tensor([i for i, _ in g]), torch.tensor([r for _, r in g])) for f, g in groups.items()}

    @property
    def num_views(self) -> int:
        return self._num_views

    @property
    def num_images(self) -> int:
        return len(self.entries)

    def _layout(self, f: Path) -> tuple[int, tuple[int, int, int]]:
        """Byte offset of the features tensor in a unit file, and its shape [V, n, D] (from the safetensors header)."""
        if f not in self._handles:
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(header_len))
            spec = header["features"]
            self._handles[f] = (8 + header_len + spec["data_offsets"][0], tuple(spec["shape"]))
        return self._handles[f]

    def _read_view(self, f: Path, t: int) -> torch.Tensor:
        # Plain positional reads rather than mmap: only view t's bytes are touched and nothing stays resident, so
        # streaming 300 views of an ImageNet-sized support set keeps memory bounded by one view.
        offset, (_, n, d) = self._layout(f)
        nbytes = n * d * 2
        with open(f, "rb") as fh:
            fh.seek(offset + t * nbytes)
            data = bytearray(fh.read(nbytes))
        return torch.frombuffer(data, dtype=torch.float16).view(n, d)

    def view(self, t: int, dtype=torch.float32) -> torch.Tensor:
        t = t % self._num_views
        out = None
        for f, (dest, rows) in self._groups.items():
            block = self._read_view(f, t)  # [n_in_unit, D]
            if out is None:
                out = torch.empty(self.num_images, block.shape[-1], dtype=dtype)
            out[dest] = block[rows].to(dtype)
        return out

    def to_tensor(self) -> torch.Tensor:
        """All views in memory, [V, N, D] float16."""
        return torch.stack([self.view(t, dtype=torch.float16) for t in range(self._num_views)])


class FeatureCache:
    def __init__(self, cache_dir: Path | str | None, backbone, *, batch_size: int = 64, num_workers: int | None = None,
                 on_bad_image: str = "error", progress: bool = True, unit_images: int = 32,
                 compute_dtype: str = "auto"):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"--on-bad-image must be 'error' or 'skip', got {on_bad_image!r}")
        if batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"--workers must be ≥ 0, got {num_workers}")
        on_gpu = torch.device(backbone.device).type == "cuda"
        if compute_dtype == "auto":
            compute_dtype = "bf16" if on_gpu else "fp32"
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"--extract-dtype must be one of auto, {', '.join(COMPUTE_DTYPES)}; got {compute_dtype!r}")
        self.root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.backbone = backbone
        # Decoding threads: on a GPU they are the bottleneck, on a CPU they would only steal the GEMMs' cores.
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else (min(16, os.cpu_count() or 1) if on_gpu else 0)
        self.compute_dtype = compute_dtype
        self.on_bad_image, self.progress, self.unit_images = on_bad_image, progress, unit_images
        self.stats = CacheStats()
        self.skipped: list[tuple[Path, str]] = []
        self.last_kept: list[int] | None = None
        self._verified: set[Path] = set()

    # -- public API -----------------------------------------------------------------------------------------
    def views(self, paths: Sequence[Path | str], num_views: int, aug_seed: int = 0, *, rank: int | None = None,
              world: int | None = None) -> CachedViews:
        """Features of ``num_views`` augmented views of each image (view t seeded per image and t).

        Under torchrun the missing units are split between the ranks (default: the current process group)."""
        if num_views <= 0:
            raise ValueError(f"--views must be positive, got {num_views}")
        if rank is None or world is None:
            rank, world = rank_world()
        entries, kept, kept_paths = self._ensure(paths, "augment", num_views, aug_seed, rank, world)
        return CachedViews(entries, num_views, kept, kept_paths)

    def center(self, paths: Sequence[Path | str]) -> torch.Tensor:
        """Center-crop features [N, D_pre] float32 (rows of skipped bad images are dropped; see last_kept)."""
        entries, kept, kept_paths = self._ensure(paths, "center", 1, 0, *rank_world())
        self.last_kept = kept
        if not entries:
            return torch.empty(0, self.backbone.dim_pre)
        return CachedViews(entries, 1, kept, kept_paths).view(0)

    # -- internals ------------------------------------------------------------------------------------------
    def namespace_dir(self, kind: str, aug_seed: int) -> Path:
        prep = self.backbone.preprocessing
        ident = json.dumps({"weights": self.backbone.info.fingerprint, "prep": [prep.image_size, list(prep.mean),
                            list(prep.std), prep.interpolation],
                            "kind": AUGMENT_VERSION if kind == "augment" else "center:v1",
                            "aug_seed": aug_seed if kind == "augment" else None}, sort_keys=True)
        if self.compute_dtype != "fp32":  # other numerics, other features; fp32 namespaces keep their old names
            ident += f"|compute:{self.compute_dtype}"
        return self.root / hashlib.blake2b(ident.encode(), digest_size=12).hexdigest()

    def _index(self, ns: Path) -> dict[str, _Entry]:
        index: dict[str, _Entry] = {}
        if not ns.is_dir():
            return index
        for f in sorted(ns.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as h:
                    meta = h.metadata() or {}
                keys, views = json.loads(meta["keys"]), int(meta["views"])
            except Exception:  # truncated or foreign file: set aside, its images get recomputed
                self._quarantine(f, "unreadable header")
                continue
            for row, k in enumerate(keys):
                if k not in index or index[k].views < views:
                    index[k] = _Entry(f, row, views)
        return index

    def _quarantine(self, f: Path, why: str) -> None:
        warnings.warn(f"feature cache file {f} is corrupt ({why}); it will be recomputed")
        try:
            f.unlink()
        except OSError:
            pass

    def _verify(self, f: Path) -> bool:
        if f in self._verified:
            return True
        try:
            with safe_open(str(f), framework="pt") as h:
                expected = (h.metadata() or {}).get("checksum")
                data = h.get_tensor("features").contiguous()
            ok = expected == _checksum(data.numpy().tobytes())
        except Exception:
            ok = False
        if ok:
            self._verified.add(f)
        else:
            self._quarantine(f, "checksum mismatch")
        return ok

    def _ensure(self, paths, kind, num_views, aug_seed, rank, world):
        paths = [Path(p) for p in paths]
        keys: list[str | None] = []
        for p in paths:
            try:
                keys.append(image_key(p))
            except BadImageError as e:
                keys.append(self._bad(e))
        ns = self.namespace_dir(kind, aug_seed)
        index = self._index(ns)
        wanted = sorted({k for k in keys if k is not None})
        for f in {index[k].file for k in wanted if k in index and index[k].views >= num_views}:
            if not self._verify(f):
                index = {k: e for k, e in index.items() if e.file != f}
        key_to_path = {k: p for k, p in zip(keys, paths) if k is not None}
        units = [wanted[i:i + self.unit_images] for i in range(0, len(wanted), self.unit_images)]
        todo = [u for u in units if any(k not in index or index[k].views < num_views for k in u)]
        reused = sum(1 for k in wanted if k in index and index[k].views >= num_views)
        self.stats.images_reused += reused
        bad: set[str] = set()
        # Ranks split the full unit list, not the still-missing one: what is missing depends on when each rank
        # looked, and a rank that looked later would otherwise skip a unit nobody else takes.
        pending = {id(u) for u in todo}
        # The rotation (the same on every rank) spreads requests of a single unit (val, test sets) over the ranks.
        first = int(units[0][0][:8], 16) % world if units else 0
        mine = [u for i, u in enumerate(units) if (i + first) % world == rank and id(u) in pending]
        missing_count = sum(1 for u in mine for k in u if k not in index or index[k].views < num_views)
        bar = tqdm(total=missing_count * num_views, desc=f"extracting {kind} features",
                   unit="view", disable=not self.progress or not mine)
        for unit in mine:
            missing = [k for k in unit if k not in index or index[k].views < num_views]
            bad |= self._compute_unit(ns, unit, missing, key_to_path, kind, num_views, aug_seed, bar)
        bar.close()
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        index = self._index(ns)
        entries, kept, kept_paths = [], [], []
        for i, (k, p) in enumerate(zip(keys, paths)):
            if k is None or k in bad or k not in index or index[k].views < num_views:
                if k is not None and k not in bad and world == 1:
                    raise CacheError(f"features of {p} are missing from {ns} after extraction")
                continue
            entries.append(index[k])
            kept.append(i)
            kept_paths.append(p)
        return entries, kept, kept_paths

    def _bad(self, error: BadImageError):
        if self.on_bad_image == "error":
            raise error
        self.skipped.append((error.path, error.reason))
        return None

    def _compute_unit(self, ns, unit, missing, key_to_path, kind, num_views, aug_seed, bar) -> set[str]:
        name = hashlib.blake2b(json.dumps([missing, num_views]).encode(), digest_size=12).hexdigest()
        target = ns / f"{name}.safetensors"
        lock = ns / f"{name}.lock"
        try:
            ns.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create feature cache directory {ns}: {e.strerror}; pass a writable "
                             f"--cache-dir") from None
        if not self._acquire(lock, target):
            bar.update(len(missing) * num_views)
            return set()  # another process wrote it meanwhile
        try:
            feats, good, bad = self._encode(missing, key_to_path, kind, num_views, aug_seed, bar)
            if good:
                self._write(target, feats, good, num_views)
            return bad
        finally:
            lock.unlink(missing_ok=True)

    def _acquire(self, lock: Path, target: Path) -> bool:
        """Take the unit's lock; wait for a live holder, break a dead one's. False if the unit appeared meanwhile."""
        while True:
            if target.exists():
                return False
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._lock_is_stale(lock):
                    lock.unlink(missing_ok=True)
                    continue
                time.sleep(0.2)
                continue
            except OSError as e:
                raise _write_error(lock.parent, e) from None
            try:
                os.write(fd, str(os.getpid()).encode())
            except OSError as e:
                # A lock we could not fill would look "held by nobody we can check" to everyone else: remove it.
                lock.unlink(missing_ok=True)
                raise _write_error(lock.parent, e) from None
            finally:
                os.close(fd)
            # Units left half-written by a holder killed mid-write can only be ours to clean now we hold the lock.
            for leftover in lock.parent.glob(f".{target.name}.*.tmp"):
                leftover.unlink(missing_ok=True)
            return not target.exists() or (lock.unlink() and False)

    @staticmethod
    def _lock_is_stale(lock: Path) -> bool:
        try:
            text = lock.read_text()
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return True
        try:
            pid = int(text)
        except ValueError:
            pid = 0
        if pid <= 0:
            # Empty: its owner was killed between creating and filling it (a live owner fills it at once).
            return age > 2.0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True  # its owner died
        except PermissionError:
            pass
        return False

    def _encode(self, keys, key_to_path, kind, num_views, aug_seed, bar):
        prep = self.backbone.preprocessing
        transform = augment_transform(prep) if kind == "augment" else center_transform(prep)
        decoded = threading.local()  # one decode per image per worker, however many view chunks it serves

        def decode(k):
            if getattr(decoded, "key", None) != k:
                try:
                    decoded.key, decoded.image = k, load_image(key_to_path[k])
                except BadImageError as e:
                    decoded.key, decoded.image = k, e
            return decoded.image

        def make_views(job):
            k, views = job
            image = decode(k)
            if isinstance(image, BadImageError):
                return k, image
            if kind == "center":
                return k, [transform(image)]
            return k, [augmented_view(image, prep, view_seed(aug_seed, k, t), transform) for t in views]

        # Jobs of at most one batch of views each: workers then prepare the next batches while the backbone runs.
        chunk = max(1, self.batch_size)
        jobs = [(k, range(t, min(t + chunk, num_views))) for k in keys for t in range(0, num_views, chunk)]
        good, bad, batch, out = [], set(), [], []
        for k, views in ordered_map(make_views, jobs, self.num_workers):
            if k in bad:
                continue
            if isinstance(views, BadImageError):
                self._bad(views)
                bad.add(k)
                continue
            if not good or good[-1] != k:
                good.append(k)
            for view in views:
                batch.append(view)
                if len(batch) == self.batch_size:  # fixed batches: a resumed unit is computed exactly as before
                    out.append(self._forward(batch))
                    bar.update(len(batch))
                    batch.clear()
        if batch:
            out.append(self._forward(batch))
            bar.update(len(batch))
        self.stats.images_extracted += len(good)
        if not good:
            return None, good, bad
        z = torch.cat(out).float().cpu().reshape(len(good), num_views, -1).transpose(0, 1)  # [V, n, D]
        return z.to(torch.float16).contiguous(), good, bad

    def _forward(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """Pre-projection features of one batch, left on the backbone's device (one copy back per unit)."""
        device = torch.device(self.backbone.device)
        images = torch.stack(batch)
        if device.type == "cuda":
            # Pinned host memory lets the copy overlap compute; channels_last is the layout cuDNN's convs prefer.
            images = images.pin_memory().to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                    enabled=self.compute_dtype == "bf16"):
            z = self.backbone.encode_pre(images)
        self.stats.forward_passes += len(batch)
        return z

    def _write(self, target: Path, feats: torch.Tensor, keys: list[str], num_views: int) -> None:
        meta = {"keys": json.dumps(keys), "views": str(num_views), "checksum": _checksum(feats.numpy().tobytes())}
        data = safetensors_bytes({"features": feats}, metadata=meta)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _write_error(target.parent, e) from None


def ordered_map(fn, items, workers: int):
    """``map(fn, items)`` in order, computed ``workers`` at a time in threads (inline when workers is 0).

    Threads, not processes: PIL decoding and resampling release the GIL, and nothing has to be pickled. At most
    2·workers results wait at once, so memory stays bounded by a few batches of images.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="prolip-decode") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _write_error(directory: Path, e: OSError) -> CacheError:
    # EFBIG: a file-size limit (ulimit -f, RLIMIT_FSIZE) is a full disk as far as the user is concerned.
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CacheError(f"feature cache directory {directory} is full ({e.strerror}); free space or pass "
                          f"another --cache-dir")
    return CacheError(f"feature cache directory {directory} is not writable ({e.strerror}); pass a writable "
                      f"--cache-dir")


def encode_images(backbone, paths: Sequence[Path | str], batch_size: int = 32) -> torch.Tensor:
    """Center-crop pre-projection features of image files, without the cache (for one-off predictions)."""
    transform = center_transform(backbone.preprocessing)
    out = []
    for i in range(0, len(paths), batch_size):
        batch = torch.stack([transform(load_image(p)) for p in paths[i:i + batch_size]]).to(backbone.device)
        with torch.inference_mode():
            out.append(backbone.encode_pre(batch).float().cpu())
    return torch.cat(out)


def extract_dataset(backbone, paths, *, num_views: int, cache_dir=None, aug_seed: int = 0, batch_size: int = 64,
                    num_workers: int | None = None, on_bad_image: str = "error",
                    compute_dtype: str = "auto") -> CacheStats:
    """Fill the cache for ``paths``; under torch.distributed each rank takes every world-th unit."""
    rank, world = rank_world()
    cache = FeatureCache(cache_dir, backbone, batch_size=batch_size, num_workers=num_workers,
                         on_bad_image=on_bad_image, progress=rank == 0, compute_dtype=compute_dtype)
    if num_views > 0:
        cache.views(paths, num_views, aug_seed, rank=rank, world=world)
    else:
        cache._ensure(paths, "center", 1, 0, rank, world)
    return cache.stats
