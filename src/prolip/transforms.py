"""Image transforms: the test-time center crop and the seeded augmented views cached for training (the reference's
augmentations)."""

from __future__ import annotations

import hashlib
import math

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from prolip.backbones.base import Preprocessing


def _normalize_from(mean, std):
    return [T.ToTensor(), T.Normalize(mean, std)]


def _normalize(prep: Preprocessing):
    return _normalize_from(prep.mean, prep.std)


class ResizeCenterCrop:
    """torchvision's ``Resize(size)`` (short side, bicubic) then ``CenterCrop(size)``, in memory bounded by the output.

    Resizing first makes a very elongated image huge before the crop throws most of it away (20000x1 becomes
    4,480,000x224, gigabytes). When the resized image would exceed ``max_ratio`` times the output area, only the
    source region that maps onto the output is resampled (PIL's ``resize(box=...)``: same scale, same filter,
    pixels within a few levels of the full resize, as PIL may run its two passes in the other order).
    Up to that the torchvision operations run unchanged: every image up to a 64:1 aspect ratio gives bitwise the
    same pixels as before, so feature caches built from them stay valid, and the resized image still takes at most
    64x the output (13 MB at 224 px).
    """

    def __init__(
        self, size: int, interpolation: InterpolationMode = InterpolationMode.BICUBIC, max_ratio: float = 64.0
    ):
        self.size, self.interpolation, self.max_ratio = size, interpolation, max_ratio

    def __call__(self, image):
        width, height = image.size
        new_h, new_w = TF._compute_resized_output_size((height, width), [self.size])
        if new_w * new_h <= self.max_ratio * self.size * self.size:
            resized = TF.resize(image, [new_h, new_w], self.interpolation, antialias=True)
            return TF.center_crop(resized, [self.size, self.size])
        return self._crop_then_resize(image, width, height, new_w, new_h)

    def _crop_then_resize(self, image, width: int, height: int, new_w: int, new_h: int):
        # CenterCrop's offsets in the resized image, mapped back to source coordinates.
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, min((left + self.size) * sx, width), min((top + self.size) * sy, height))
        resample = TF.pil_modes_mapping[self.interpolation]
        return image.resize((self.size, self.size), resample, box=box)


def center_transform(prep: Preprocessing) -> T.Compose:
    """Resize the short side (bicubic) + center crop + CLIP normalisation, in memory bounded by the output."""
    return T.Compose([ResizeCenterCrop(prep.image_size, InterpolationMode.BICUBIC), *_normalize(prep)])


class SeededCropFlip:
    """RandomResizedCrop + horizontal flip + CLIP normalisation, drawn from a private generator seeded per call.

    The same draws, in the same order, as torchvision's ``RandomResizedCrop`` and ``RandomHorizontalFlip`` after
    ``torch.manual_seed(seed)``, so the views are those of the reference; but the global RNG is never touched, which
    makes views safe to prepare in parallel threads (seeding the global RNG per view would race between threads).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float],
        interpolation: InterpolationMode,
        mean,
        std,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation
        self.normalize = T.Compose(_normalize_from(mean, std))

    def params(self, width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) of one view; mirrors ``RandomResizedCrop.get_params``."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=generator).item()
            aspect = torch.exp(
                torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)
            ).item()
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
                j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
                break
        else:  # torchvision's fallback: the largest central crop within the ratio range
            in_ratio = width / height
            if in_ratio < min(self.ratio):
                w, h = width, int(round(width / min(self.ratio)))
            elif in_ratio > max(self.ratio):
                w, h = int(round(height * max(self.ratio))), height
            else:
                w, h = width, height
            i, j = (height - h) // 2, (width - w) // 2
        flip = bool(torch.rand(1, generator=generator) < 0.5)
        return i, j, h, w, flip

    def __call__(self, image, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        width, height = image.size
        i, j, h, w, flip = self.params(width, height, generator)
        view = TF.resized_crop(image, i, j, h, w, [self.size, self.size], self.interpolation, antialias=True)
        return self.normalize(TF.hflip(view) if flip else view)


# The crop scales of the cached training views, by name: "prolip" is the ProLIP reference's (and Tip-Adapter's,
# LP++'s) RandomResizedCrop(scale=(0.5, 1)); "dassl" is Dassl's INPUT.RRCROP_SCALE default (0.08, 1), the
# transform the Dassl-based baselines (CoOp-config CLIP-Adapter, TaskRes, ZS-LP/CLAP) train on. Both bicubic + flip.
AUGMENTATIONS = {"prolip": (0.5, 1.0), "dassl": (0.08, 1.0)}
DEFAULT_AUGMENTATION = "prolip"  # what a method trains on unless it declares otherwise, and the cache's oldest names


def augment_transform(prep: Preprocessing, augmentation: str = DEFAULT_AUGMENTATION) -> SeededCropFlip:
    """RandomResizedCrop (bicubic, the named scale range) + horizontal flip + CLIP normalisation."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; known: {', '.join(AUGMENTATIONS)}")
    return SeededCropFlip(prep.image_size, AUGMENTATIONS[augmentation], InterpolationMode.BICUBIC, prep.mean, prep.std)


def augmented_view(image, prep: Preprocessing, seed: int, transform: SeededCropFlip | None = None) -> torch.Tensor:
    """One augmented view, fully determined by ``seed`` (thread-safe: the global RNG is not used)."""
    return (transform or augment_transform(prep))(image, seed)


def view_seed(aug_seed: int, image_key: str, view_index: int) -> int:
    """A seed per (image, view), stable across processes and runs, so views are shared by every request."""
    digest = hashlib.blake2b(f"{aug_seed}:{image_key}:{view_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
