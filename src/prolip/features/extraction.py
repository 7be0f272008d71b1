"""Images → pre-projection features: the one path used by the cache, by one-off predictions and by test-time views.

Decoding and the transforms run in an ordered thread pool while the backbone computes; the views of a request go
through the backbone in fixed batches, so the same request always meets the same batches (a resumed cache unit is
computed exactly as an uninterrupted one). On a GPU, batches go through pinned memory, channels_last and, by
default, bf16 autocast (README, "Large extractions").
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from prolip.data.images import BadImageError, content_digest, load_image
from prolip.transforms import (
    DEFAULT_AUGMENTATION,
    SeededCropFlip,
    augment_transform,
    augmented_view,
    center_transform,
    view_seed,
)

COMPUTE_DTYPES = ("fp32", "bf16")  # what the backbone computes in (the cache stores float16 either way)

# (decoded image, image key, view index) → one preprocessed view [3, H, W]
ViewMaker = Callable[[object, Hashable, int], Tensor]


def image_key(path: Path | str) -> str:
    """Identity of an image: the hash of its bytes (``content_digest``), for a file, a tar member or a dataset row
    alike, so a copy anywhere is the same image and a changed byte is a new one. Reads the image; the feature
    cache remembers keys per (path, size, mtime) instead (identity.ContentIndex)."""
    return content_digest(path)


# -- which views (pure: each view is a function of the image, its key and the view index) ------------------------
def center_views(prep) -> ViewMaker:
    """The un-augmented view: short-side resize and center crop (one view per image)."""
    transform = center_transform(prep)
    return lambda image, key, t: transform(image)


def augmented_views(prep, aug_seed: int, augmentation: str = DEFAULT_AUGMENTATION) -> ViewMaker:
    """The cached training views: view t seeded per (aug_seed, image key, t), so any request, and any copy of the
    image, gets the same views."""
    transform = augment_transform(prep, augmentation)
    # The cache asks for augmented views by image key (image_key's string); ViewMaker's keys are any Hashable.
    return lambda image, key, t: augmented_view(image, prep, view_seed(aug_seed, cast(str, key), t), transform)


def test_time_views(prep, seed: int, augment: SeededCropFlip) -> ViewMaker:
    """Test-time views: view 0 the center crop, views 1..V-1 ``augment`` seeded per (seed, image key, view)."""
    center = center_transform(prep)

    def make(image, key, t):
        return center(image) if t == 0 else augmented_view(image, prep, view_seed(seed, key, t), augment)

    return make


# -- encoding ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    features: Tensor  # [n_kept, V, D_pre] float32, on the CPU
    kept: list[int]  # indices into the request of the images that decoded
    skipped: list[tuple[Path, str]]  # (path, reason) of those that did not, in request order


class Extractor:
    """Encodes images with one backbone; ``forward_passes`` counts the views it has put through the backbone."""

    def __init__(self, backbone, *, batch_size: int = 64, num_workers: int | None = None, compute_dtype: str = "auto"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        on_gpu = torch.device(backbone.device).type == "cuda"
        if compute_dtype == "auto":
            compute_dtype = "bf16" if on_gpu else "fp32"
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of auto, {', '.join(COMPUTE_DTYPES)}; got {compute_dtype!r}")
        self.backbone, self.batch_size, self.compute_dtype = backbone, batch_size, compute_dtype
        # Decoding threads: on a GPU they are the bottleneck, on a CPU they would only steal the GEMMs' cores.
        self.num_workers = num_workers if num_workers is not None else (min(16, os.cpu_count() or 1) if on_gpu else 0)
        self.forward_passes = 0

    def encode(
        self,
        images: Sequence[tuple[Path, Hashable]],
        num_views: int,
        make_view: ViewMaker,
        *,
        skip_bad: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Encoded:
        """Features of views 0..num_views-1 of each (path, key) image, image-major.

        An image that cannot be decoded raises its BadImageError, or with ``skip_bad`` is left out and listed.
        """
        jobs = view_jobs(len(images), num_views, self.batch_size)
        kept: list[int] = []
        failed: dict[int, BadImageError] = {}
        batch: list[Tensor] = []
        out = _Rows(len(images) * num_views)
        for i, views in ordered_map(_preparer(images, make_view), jobs, self.num_workers):
            if i in failed:
                continue
            if isinstance(views, BadImageError):
                if not skip_bad:
                    raise views
                failed[i] = views
                continue
            if not kept or kept[-1] != i:
                kept.append(i)
            for view in views:
                batch.append(view)
                if len(batch) == self.batch_size:  # fixed batches, whatever images they straddle
                    out.add(self._forward(batch, progress))
                    batch = []
        if batch:
            out.add(self._forward(batch, progress))
        skipped = [(e.path, e.reason) for _, e in sorted(failed.items())]
        if out.filled == 0:
            return Encoded(torch.empty(0, num_views, self.backbone.dim_pre), kept, skipped)
        # One copy back per call: the rows stay on the device until here.
        features = out.rows().float().cpu().reshape(len(kept), num_views, -1)
        return Encoded(features, kept, skipped)

    def _forward(self, batch: list[Tensor], progress) -> Tensor:
        """Pre-projection features of one batch of views, left on the backbone's device."""
        device = torch.device(self.backbone.device)
        images = torch.stack(batch)
        if device.type == "cuda":
            # Pinned host memory lets the copy overlap compute; channels_last is the layout cuDNN's convs prefer.
            images = images.pin_memory().to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        else:
            images = images.to(device)
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.compute_dtype == "bf16"),
        ):
            z = self.backbone.encode_pre(images)
        self.forward_passes += len(batch)
        if progress is not None:
            progress(len(batch))
        return z


class _Rows:
    """Batches of features written into one preallocated [capacity, D] block as they come. Keeping the batches
    themselves would keep what they are views of: open_clip's pooled feature is x[:, 0] of the whole token tensor,
    197 times its size on ViT-B/16 (5.8 GB held for a unit of 32 images × 300 views)."""

    def __init__(self, capacity: int):
        self.capacity, self.filled = capacity, 0
        self.block: Tensor | None = None

    def add(self, z: Tensor) -> None:
        if self.block is None:
            self.block = torch.empty(self.capacity, z.shape[-1], dtype=z.dtype, device=z.device)
        self.block[self.filled : self.filled + len(z)] = z
        self.filled += len(z)

    def rows(self) -> Tensor:
        assert self.block is not None
        return self.block[: self.filled]


def view_jobs(num_images: int, num_views: int, batch_size: int) -> list[tuple[int, range]]:
    """(image index, views) work items of at most one batch of views each, in order: decoding threads then
    prepare the next batches while the backbone runs, and the order of views never depends on the threads."""
    return [
        (i, range(t, min(t + batch_size, num_views)))
        for i in range(num_images)
        for t in range(0, num_views, batch_size)
    ]


def _preparer(images: Sequence[tuple[Path, Hashable]], make_view: ViewMaker):
    """The per-job work: decode (once per image per thread, however many jobs it serves) and make the views."""
    decoded = threading.local()

    def decode(i: int):
        if getattr(decoded, "index", None) != i:
            try:
                decoded.image = load_image(images[i][0])
            except BadImageError as e:
                decoded.image = e
            decoded.index = i
        return decoded.image

    def prepare(job: tuple[int, range]):
        i, views = job
        image = decode(i)
        if isinstance(image, BadImageError):
            return i, image
        return i, [make_view(image, images[i][1], t) for t in views]

    return prepare


def ordered_map(fn, items: Iterable, workers: int):
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


def encode_images(
    backbone,
    paths: Sequence[Path | str],
    batch_size: int = 32,
    *,
    num_workers: int | None = None,
    compute_dtype: str = "auto",
) -> Tensor:
    """Center-crop pre-projection features [N, D_pre] float32 of image files, without the cache (one-off
    predictions). An unreadable image raises its BadImageError."""
    extractor = Extractor(backbone, batch_size=batch_size, num_workers=num_workers, compute_dtype=compute_dtype)
    encoded = extractor.encode([(Path(p), None) for p in paths], 1, center_views(backbone.preprocessing))
    return encoded.features[:, 0]
