"""Images → test-time views (the I/O edge): view 0 the center crop, views 1..V−1 random-resized-crop + flip as in
the reference's test-time code (TPT's torchvision defaults: scale 0.08–1, bilinear), seeded per (seed, image, view)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor
from torchvision import transforms as T


def tta_view_transform(prep, scale: tuple[float, float] = (0.08, 1.0)):
    """The test-time views: RandomResizedCrop (bilinear, as torchvision's default in TPT and the reference) + flip."""
    from prolip.transforms import SeededCropFlip

    return SeededCropFlip(prep.image_size, scale, T.InterpolationMode.BILINEAR, prep.mean, prep.std)


def view_features(
    backbone, paths: Sequence[Path | str], views: int, seed: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0)
) -> Tensor:
    """Pre-projection features [B, V, D_pre]: view 0 center-cropped, the rest augmented views seeded per
    (seed, image, view), so an image gets the same views whatever batch it is in."""
    from prolip.features.extraction import Extractor, image_key, test_time_views

    prep = backbone.preprocessing
    make_view = test_time_views(prep, seed, tta_view_transform(prep, crop_scale))
    # One forward pass per image (its V views), in float32: the features of an image never depend on its batch.
    extractor = Extractor(backbone, batch_size=views, compute_dtype="fp32")
    return extractor.encode([(Path(p), image_key(p)) for p in paths], views, make_view).features
