"""The on-disk feature cache: pre-projection features per (image, view), shared by every run, seed and protocol.

Layout: ``<cache_dir>/<namespace>/<unit>.safetensors`` (the unit format is in storage.py). The namespace hashes the
backbone's weight fingerprint, its preprocessing, the transform kind, the augmentation seed and (for bf16) the
compute dtype. Images are keyed by the hash of their bytes (identity.py), remembered per (path, size, mtime) in
``<cache_dir>/identity-v1``: a copied dataset finds its features, and a changed image is a new one.

Work is planned deterministically: the requested images, sorted by key, are chunked into units of ``unit_images``
(fewer where their views would not fit ``UNIT_BYTES`` in memory while the unit is computed: ``--views 1000000``);
a unit whose images are all cached is skipped, otherwise its missing images are encoded (extraction.py) and the
unit is written atomically. An interrupted extraction therefore resumes with exactly the same units (bitwise-equal
features). torchrun ranks split the units between them; processes that merely share the directory take each unit
under its lock (locking.py).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from prolip.choices import ON_BAD_IMAGE
from prolip.data import listing
from prolip.data.images import BadImageError
from prolip.distributed import rank_world
from prolip.features import storage
from prolip.features.engine import encoder_for, resolve_engine
from prolip.features.extraction import Extractor, ViewMaker, augmented_views, center_views, image_key
from prolip.features.identity import ContentIndex
from prolip.features.locking import remove_finished_locks, unit_lock
from prolip.features.storage import CacheError, Entry
from prolip.transforms import DEFAULT_AUGMENTATION

__all__ = [
    "AUGMENT_VERSION",
    "CacheError",
    "CacheStats",
    "CachedViews",
    "CenterFeatures",
    "FeatureCache",
    "Lookup",
    "Request",
    "Survey",
    "default_cache_dir",
    "extract_dataset",
    "image_key",
    "plan_units",
    "rank_share",
    "unit_images_for",
]

UNIT_BYTES = 1 << 29  # float32 features of one unit in memory (1.5× that at the peak, with its float16 copy)
# Bump when the views change, so stale ones are never reused. v2: images keyed (and views seeded) by their content,
# no longer by path, size and mtime; v1 namespaces are left alone and never read (note_legacy_caches).
AUGMENT_VERSION = "augment:v2"
CENTER_VERSION = "center:v2"

Skipped = list[tuple[Path, str]]  # (path, reason) of the unreadable images a request left out


default_cache_dir = listing.default_cache_dir  # one default for features and listings (written where torch is not)


_NOTED: set[Path] = set()


def note_legacy_caches(root: Path) -> list[Path]:
    """Say once per process and cache directory, in one line, that its path-keyed namespaces (before content
    identity) are never read again and are left for the user to delete (an older prolip may still share them)."""
    key = root.resolve() if root.exists() else root
    if key in _NOTED:
        return []
    _NOTED.add(key)
    try:
        old = storage.legacy_namespaces(root)
    except OSError:
        return []
    if old:
        size = sum(f.stat().st_size for ns in old for f in ns.glob("*.safetensors"))
        warnings.warn(
            f"feature cache {root}: {len(old)} folder(s) ({size / 1e6:.1f} MB) hold features keyed by file path "
            f"(prolip before content identity); they are no longer read and will be recomputed as needed; delete "
            f"{', '.join(ns.name for ns in old)} to free the space",
            stacklevel=3,
        )
    return old


@dataclass
class CacheStats:
    forward_passes: int = 0  # images × views actually encoded by the backbone
    images_extracted: int = 0
    images_reused: int = 0

    def __str__(self) -> str:
        return (
            f"{self.forward_passes} forward passes, {self.images_extracted} images extracted, "
            f"{self.images_reused} reused from cache"
        )


class CachedViews:
    """A ViewSource over cached augmented views, streamed one view at a time from the unit files on disk.

    ``kept``: indices into the request of the images it holds (in that order); ``skipped``: the unreadable images
    this request left out.
    """

    def __init__(
        self, entries: Sequence[Entry], num_views: int, kept: Sequence[int], skipped: Sequence[tuple[Path, str]] = ()
    ):
        self.entries, self._num_views = list(entries), num_views
        self.kept, self.skipped = list(kept), list(skipped)
        self._reader = storage.ViewReader()
        rows: dict[Path, list[tuple[int, int]]] = {}
        for i, e in enumerate(self.entries):
            rows.setdefault(e.file, []).append((i, e.row))
        self._groups = {f: (torch.tensor([i for i, _ in g]), torch.tensor([r for _, r in g])) for f, g in rows.items()}

    @property
    def num_views(self) -> int:
        return self._num_views

    @property
    def num_images(self) -> int:
        return len(self.entries)

    def view(self, t: int, dtype=torch.float32) -> Tensor:
        """View t (modulo the number of views) of every image, [N, D_pre]."""
        t = t % self._num_views
        out = None
        for f, (dest, rows) in self._groups.items():
            block = self._reader.read(f, t)  # [n_in_unit, D]
            if out is None:
                out = torch.empty(self.num_images, block.shape[-1], dtype=dtype)
            out[dest] = block[rows].to(dtype)
        # With no images there is no feature width to shape a result; no caller reads views of an empty set
        # (FeatureCache.center answers an empty request itself, fitting refuses an emptied class).
        assert out is not None, "CachedViews.view of no images"
        return out

    def to_tensor(self) -> Tensor:
        """All views in memory, [V, N, D] float16."""
        return torch.stack([self.view(t, dtype=torch.float16) for t in range(self._num_views)])


@dataclass(frozen=True)
class CenterFeatures:
    features: Tensor  # [n_kept, D_pre] float32
    kept: list[int]  # indices into the request of the images that were usable
    skipped: Skipped


@dataclass(frozen=True)
class Lookup:
    """Where the features of a request's usable images are (``entries[j]`` for image ``kept[j]``)."""

    entries: list[Entry]
    kept: list[int]
    skipped: Skipped


# -- planning (pure) ------------------------------------------------------------------------------------------------
def plan_units(keys: Sequence[str], unit_images: int) -> list[list[str]]:
    """Sorted image keys chunked into units: the same request always gives the same units."""
    keys = sorted(keys)
    return [keys[i : i + unit_images] for i in range(0, len(keys), unit_images)]


def unit_images_for(limit: int, num_views: int, dim: int) -> int:
    """Images per unit: ``limit``, or fewer (at least one) where their float32 views would pass ``UNIT_BYTES``.
    Ordinary requests (32 images × 300 views × 768 = 30 MB) keep ``limit``, so their units never change."""
    return max(1, min(limit, UNIT_BYTES // (4 * max(num_views, 1) * dim)))


def rank_share(units: list[list[str]], todo: list[list[str]], rank: int, world: int) -> list[list[str]]:
    """The units of ``todo`` this rank computes.

    Ranks split the full unit list, not the still-missing one: what is missing depends on when each rank looked,
    and a rank that looked later would otherwise skip a unit nobody else takes. The rotation (the same on every
    rank) spreads requests of a single unit (val, test sets) over the ranks.
    """
    pending = {id(u) for u in todo}
    first = int(units[0][0][:8], 16) % world if units else 0
    return [u for i, u in enumerate(units) if (i + first) % world == rank and id(u) in pending]


def _cached(index: dict[str, Entry], key: str, num_views: int) -> bool:
    return key in index and index[key].views >= num_views


@dataclass(frozen=True)
class Request:
    """Features a run will ask the cache for: ``views`` augmented views of each image (0: the center crop)."""

    paths: tuple[Path, ...]
    views: int = 0
    aug_seed: int = 0
    augmentation: str = DEFAULT_AUGMENTATION


@dataclass
class Survey:
    """What a set of requests needs from the cache, found without extracting or writing anything: per namespace,
    the distinct images requested, those whose features are not there yet, and how many views each needs."""

    requested: dict[Path, set[str]]
    missing: dict[Path, set[str]]
    views: dict[Path, int]
    unreadable: Skipped
    bytes_per_pass: int  # one float16 feature row

    @property
    def forward_passes(self) -> int:
        """Backbone forward passes the requests will cost: each missing (image, view) once, whatever asks for it."""
        return sum(len(keys) * self.views[ns] for ns, keys in self.missing.items())

    @property
    def cached_passes(self) -> int:
        return sum((len(self.requested[ns]) - len(self.missing[ns])) * self.views[ns] for ns in self.requested)

    @property
    def images(self) -> int:
        return len(set().union(*self.requested.values())) if self.requested else 0

    def disk_bytes(self) -> int:
        """Bytes the namespaces' unit files hold now."""
        return sum(f.stat().st_size for ns in self.requested if ns.is_dir() for f in ns.glob("*.safetensors"))


def _read_only_index(namespace: Path) -> dict[str, Entry]:
    """The namespace's index as :func:`storage.read_index` builds it, minus its repairs: a unit whose header does
    not read is counted as missing here and left for the run to set aside."""
    index: dict[str, Entry] = {}
    for f in sorted(namespace.glob("*.safetensors")) if namespace.is_dir() else ():
        try:
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {}
            keys, views = json.loads(meta["keys"]), int(meta["views"])
        except Exception:  # noqa: BLE001 - any unreadable header: the run would recompute the unit
            continue
        for row, k in enumerate(keys):
            if k not in index or index[k].views < views:
                index[k] = Entry(f, row, views)
    return index


class FeatureCache:
    """Features of image files, computed once per (image, view) and kept on disk (README, "Large extractions")."""

    def __init__(
        self,
        cache_dir: Path | str | None,
        backbone,
        *,
        batch_size: int = 64,
        num_workers: int | None = None,
        on_bad_image: str = "error",
        progress: bool = True,
        unit_images: int = 32,
        compute_dtype: str = "auto",
        engine: str | None = None,
    ):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        if unit_images <= 0:
            raise ValueError(f"unit_images must be positive, got {unit_images}")
        self.root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.engine = resolve_engine(engine)  # torch, or ONNX Runtime (engine.py; $PROLIP_ENGINE)
        if self.engine != "torch" and compute_dtype == "bf16":
            raise ValueError(f"compute_dtype bf16 is PyTorch's autocast; engine {self.engine!r} computes in fp32")
        self.extractor = Extractor(
            encoder_for(backbone, self.engine, self.root),
            batch_size=batch_size,
            num_workers=num_workers,
            compute_dtype=compute_dtype,
        )
        self.backbone, self.on_bad_image = backbone, on_bad_image
        self.progress, self.unit_images = progress, unit_images
        self.stats = CacheStats()  # cumulative over this object's requests
        self._verified: set[Path] = set()
        self.identity = ContentIndex(self.root, workers=max(1, self.extractor.num_workers))
        note_legacy_caches(self.root)

    @property
    def batch_size(self) -> int:
        return self.extractor.batch_size

    @property
    def num_workers(self) -> int:
        return self.extractor.num_workers

    @property
    def compute_dtype(self) -> str:
        return self.extractor.compute_dtype

    # -- public API -------------------------------------------------------------------------------------------------
    def views(
        self,
        paths: Sequence[Path | str],
        num_views: int,
        aug_seed: int = 0,
        *,
        augmentation: str = DEFAULT_AUGMENTATION,
        rank: int | None = None,
        world: int | None = None,
    ) -> CachedViews:
        """Features of ``num_views`` augmented views of each image (view t seeded per image and t), streamed from
        disk. Under torchrun the missing units are split between the ranks (default: the current process group)."""
        if num_views <= 0:
            raise ValueError(f"num_views must be positive, got {num_views}")
        found = self.fill(paths, num_views, aug_seed, augmentation=augmentation, rank=rank, world=world)
        return CachedViews(found.entries, num_views, found.kept, found.skipped)

    def center(self, paths: Sequence[Path | str]) -> CenterFeatures:
        """Center-crop features [n_kept, D_pre] float32 (unreadable images left out under on_bad_image='skip')."""
        found = self.fill(paths)
        if not found.entries:
            return CenterFeatures(torch.empty(0, self.backbone.dim_pre), found.kept, found.skipped)
        return CenterFeatures(CachedViews(found.entries, 1, found.kept).view(0), found.kept, found.skipped)

    def fill(
        self,
        paths: Sequence[Path | str],
        num_views: int = 0,
        aug_seed: int = 0,
        *,
        augmentation: str = DEFAULT_AUGMENTATION,
        rank: int | None = None,
        world: int | None = None,
    ) -> Lookup:
        """Cache ``num_views`` augmented views of each image (0: the center crop) and say where they are."""
        if num_views < 0:
            raise ValueError(f"num_views must be >= 0, got {num_views}")
        if rank is None or world is None:
            rank, world = rank_world()
        kind, views = ("augment", num_views) if num_views else ("center", 1)
        files = [Path(p) for p in paths]
        skipped: Skipped = []
        keys = self._keys(files, skipped)
        ns = self.namespace_dir(kind, aug_seed, augmentation)
        wanted = sorted({k for k in keys if k is not None})
        index = self._checked_index(ns, wanted, views)
        self.stats.images_reused += sum(_cached(index, k, views) for k in wanted)
        units = plan_units(wanted, unit_images_for(self.unit_images, views, self.backbone.dim_pre))
        todo = [u for u in units if not all(_cached(index, k, views) for k in u)]
        mine = [[k for k in u if not _cached(index, k, views)] for u in rank_share(units, todo, rank, world)]
        prep = self.backbone.preprocessing
        make_view = augmented_views(prep, aug_seed, augmentation) if kind == "augment" else center_views(prep)
        key_to_path = {k: p for k, p in zip(keys, files, strict=True) if k is not None}
        bad = self._compute(ns, mine, key_to_path, views, make_view, skipped, kind)
        remove_finished_locks(ns)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        return self._lookup(ns, keys, files, views, bad, world, skipped)

    def namespace_dir(self, kind: str, aug_seed: int, augmentation: str = DEFAULT_AUGMENTATION) -> Path:
        prep = self.backbone.preprocessing
        ident = json.dumps(
            {
                "weights": self.backbone.info.fingerprint,
                "prep": [prep.image_size, list(prep.mean), list(prep.std), prep.interpolation],
                "kind": AUGMENT_VERSION if kind == "augment" else CENTER_VERSION,
                "aug_seed": aug_seed if kind == "augment" else None,
            },
            sort_keys=True,
        )
        if kind == "augment" and augmentation != DEFAULT_AUGMENTATION:  # other views; the default keeps its old names
            ident += f"|augmentation:{augmentation}"
        if self.compute_dtype != "fp32":  # other numerics, other features; fp32 namespaces keep their old names
            ident += f"|compute:{self.compute_dtype}"
        if self.engine != "torch":  # equal to torch's to float32 rounding, not bitwise: never mixed with them
            ident += f"|engine:{self.engine}"
        return self.root / hashlib.blake2b(ident.encode(), digest_size=12).hexdigest()

    def survey(self, requests: Sequence[Request]) -> Survey:
        """Read-only: which (image, view) features these requests would make the cache compute, after removing
        what they share with each other and what is already there (no extraction, no locks, no checksums)."""
        requested: dict[Path, set[str]] = {}
        views: dict[Path, int] = {}
        unreadable: Skipped = []
        for r in requests:
            kind, n = ("augment", r.views) if r.views else ("center", 1)
            ns = self.namespace_dir(kind, r.aug_seed, r.augmentation)
            found = ContentIndex(self.root, persist=False, workers=self.identity.workers).keys(r.paths)
            unreadable += [(k.path, k.reason) for k in found if isinstance(k, BadImageError)]
            keys = {k for k in found if isinstance(k, str)}
            requested.setdefault(ns, set()).update(keys)
            views[ns] = max(views.get(ns, 0), n)
        missing = {}
        for ns, keys in requested.items():
            index = _read_only_index(ns)
            missing[ns] = {k for k in keys if not _cached(index, k, views[ns])}
        return Survey(requested, missing, views, unreadable, self.backbone.dim_pre * 2)

    # -- internals --------------------------------------------------------------------------------------------------
    def _keys(self, paths: list[Path], skipped: Skipped) -> list[str | None]:
        """Each image's key (None for an unreadable one, listed in ``skipped``; raised under on_bad_image='error')."""
        keys: list[str | None] = []
        for k in self.identity.keys(paths):
            if isinstance(k, BadImageError):
                if self.on_bad_image == "error":
                    raise k
                skipped.append((k.path, k.reason))
                keys.append(None)
            else:
                keys.append(k)
        return keys

    def _checked_index(self, ns: Path, wanted: list[str], num_views: int) -> dict[str, Entry]:
        """The namespace's index, less the units (holding wanted images) that fail their checksum."""
        index = storage.read_index(ns)
        for f in sorted({index[k].file for k in wanted if _cached(index, k, num_views)}):
            if f in self._verified:
                continue
            if storage.verify(f):
                self._verified.add(f)
            else:
                index = {k: e for k, e in index.items() if e.file != f}
        return index

    def _compute(
        self,
        ns: Path,
        units: list[list[str]],
        key_to_path: dict[str, Path],
        num_views: int,
        make_view: ViewMaker,
        skipped: Skipped,
        kind: str,
    ) -> dict[str, str]:
        """Compute and write this process's units (each the list of its missing keys); the keys found unreadable,
        with why."""
        bar = tqdm(
            total=sum(map(len, units)) * num_views,
            desc=f"extracting {kind} features",
            unit="view",
            disable=not self.progress or not units,
        )
        bad: dict[str, str] = {}
        with bar:  # closed on failure too, so an error starts on a line of its own
            for missing in units:
                bad |= self._compute_unit(ns, missing, key_to_path, num_views, make_view, skipped, bar)
        return bad

    def _compute_unit(self, ns, missing, key_to_path, num_views, make_view, skipped, bar) -> dict[str, str]:
        target = storage.unit_file(ns, missing, num_views)
        storage.make_dir(ns)
        with unit_lock(target) as needed:
            if not needed:  # another process wrote it while we waited
                bar.update(len(missing) * num_views)
                return {}
            storage.discard_temporaries(target)  # of a writer killed mid-write: only the lock holder may
            before = self.extractor.forward_passes
            encoded = self.extractor.encode(
                [(key_to_path[k], k) for k in missing],
                num_views,
                make_view,
                skip_bad=self.on_bad_image == "skip",
                progress=bar.update,
            )
            self.stats.forward_passes += self.extractor.forward_passes - before
            self.stats.images_extracted += len(encoded.kept)
            skipped.extend(encoded.skipped)
            good = [missing[i] for i in encoded.kept]
            if good:  # [n, V, D] → [V, n, D]: view t of the unit is contiguous on disk
                features = encoded.features.transpose(0, 1).to(torch.float16).contiguous()
                storage.write_unit(target, features, good, num_views)
            failed = sorted(set(range(len(missing))) - set(encoded.kept))
            return {missing[i]: reason for i, (_, reason) in zip(failed, encoded.skipped, strict=True)}

    def _lookup(self, ns, keys, paths, num_views, bad, world, skipped) -> Lookup:
        index = storage.read_index(ns)
        entries, kept = [], []
        reported = {p for p, _ in skipped}
        for i, (k, p) in enumerate(zip(keys, paths, strict=True)):
            if k is not None and k in bad and p not in reported:  # a copy of an unreadable image it decoded once
                skipped.append((p, bad[k]))
                reported.add(p)
            if k is None or k in bad:
                continue
            if not _cached(index, k, num_views):
                if world == 1:
                    raise CacheError(f"features of {p} are missing from {ns} after extraction")
                continue  # an unreadable image that another rank skipped
            entries.append(index[k])
            kept.append(i)
        return Lookup(entries, kept, skipped)


def extract_dataset(
    backbone,
    paths,
    *,
    num_views: int,
    cache_dir=None,
    aug_seed: int = 0,
    batch_size: int = 64,
    num_workers: int | None = None,
    on_bad_image: str = "error",
    compute_dtype: str = "auto",
    engine: str | None = None,
) -> CacheStats:
    """Fill the cache for ``paths`` (num_views 0: center crops only); under torchrun the ranks split the units."""
    rank, world = rank_world()
    cache = FeatureCache(
        cache_dir,
        backbone,
        batch_size=batch_size,
        num_workers=num_workers,
        on_bad_image=on_bad_image,
        progress=rank == 0,
        compute_dtype=compute_dtype,
        engine=engine,
    )
    cache.fill(paths, num_views, aug_seed, rank=rank, world=world)
    return cache.stats
