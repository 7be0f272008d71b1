"""Image transforms: the test-time center crop and the seeded augmented views cached for training (SPEC §1)."""
from __future__ import annotations

import hashlib
import math

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.transforms import InterpolationMode

from prolip.backbones.base import Preprocessing


def _normalize_from(mean, std):
    return [T.ToTensor(), T.Normalize(mean, std)]


def _normalize(prep: Preprocessing):
    return _normalize_from(prep.mean, prep.std)


def center_transform(prep: Preprocessing) -> T.Compose:
    """Resize the short side (bicubic) + center crop + CLIP normalisation."""
    return T.Compose([T.Resize(prep.image_size, interpolation=InterpolationMode.BICUBIC),
                      T.CenterCrop(prep.image_size), *_normalize(prep)])


class SeededCropFlip:
    """RandomResizedCrop + horizontal flip + CLIP normalisation, drawn from a private generator seeded per call.

    The same draws, in the same order, as torchvision's ``RandomResizedCrop`` and ``RandomHorizontalFlip`` after
    ``torch.manual_seed(seed)``, so the views are those of the reference; but the global RNG is never touched, which
    makes views safe to prepare in parallel threads (seeding the global RNG per view would race between threads).
    """

    def __init__(self, size: int, scale: tuple[float, float], interpolation: InterpolationMode,
                 mean, std, ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation
        self.normalize = T.Compose(_normalize_from(mean, std))

    def params(self, width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) of one view; mirrors ``RandomResizedCrop.get_params``."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=generator).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
                j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
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


def augment_transform(prep: Preprocessing) -> SeededCropFlip:
    """RandomResizedCrop(scale 0.5–1, bicubic) + horizontal flip + CLIP normalisation (the reference's views)."""
    return SeededCropFlip(prep.image_size, (0.5, 1.0), InterpolationMode.BICUBIC, prep.mean, prep.std)


def augmented_view(image, prep: Preprocessing, seed: int, transform: SeededCropFlip | None = None) -> torch.Tensor:
    """One augmented view, fully determined by ``seed`` (thread-safe: the global RNG is not used)."""
    return (transform or augment_transform(prep))(image, seed)


def view_seed(aug_seed: int, image_key: str, view_index: int) -> int:
    """A seed per (image, view), stable across processes and runs, so views are shared by every request."""
    digest = hashlib.blake2b(f"{aug_seed}:{image_key}:{view_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
