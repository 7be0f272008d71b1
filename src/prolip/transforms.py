"""Image transforms: the test-time center crop and the seeded augmented views cached for training (SPEC §1)."""
from __future__ import annotations

import hashlib

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from prolip.backbones.base import Preprocessing


def _normalize(prep: Preprocessing):
    return [T.ToTensor(), T.Normalize(prep.mean, prep.std)]


def center_transform(prep: Preprocessing) -> T.Compose:
    """Resize the short side (bicubic) + center crop + CLIP normalisation."""
    return T.Compose([T.Resize(prep.image_size, interpolation=InterpolationMode.BICUBIC),
                      T.CenterCrop(prep.image_size), *_normalize(prep)])


def augment_transform(prep: Preprocessing) -> T.Compose:
    """RandomResizedCrop(scale 0.5–1, bicubic) + horizontal flip + CLIP normalisation (the reference's views)."""
    return T.Compose([T.RandomResizedCrop(prep.image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), *_normalize(prep)])


def augmented_view(image, prep: Preprocessing, seed: int, transform: T.Compose | None = None) -> torch.Tensor:
    """One augmented view, fully determined by ``seed`` (the global RNG is left as it was)."""
    transform = transform or augment_transform(prep)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def view_seed(aug_seed: int, image_key: str, view_index: int) -> int:
    """A seed per (image, view), stable across processes and runs, so views are shared by every request."""
    digest = hashlib.blake2b(f"{aug_seed}:{image_key}:{view_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
