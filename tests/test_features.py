"""The feature cache: determinism, sharing across requests, staleness, streaming, resume.

Faults (kills, concurrent writers, corrupt shards, full or read-only disks) and bad images are in tests/reliability/.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from prolip.features import CacheError, FeatureCache
from prolip.transforms import augment_transform, augmented_view, view_seed
from reliability.conftest import make_images


def cache_of(tmp_path, backbone, **kw):
    kw.setdefault("unit_images", 4)
    kw.setdefault("batch_size", 8)
    return FeatureCache(tmp_path / "cache", backbone, progress=False, **kw)


def test_views_are_seeded_per_image_and_view(tiny_vit):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    prep = tiny_vit.preprocessing
    a = augmented_view(img, prep, view_seed(0, "k", 3))
    assert torch.equal(a, augmented_view(img, prep, view_seed(0, "k", 3), augment_transform(prep)))
    assert not torch.equal(a, augmented_view(img, prep, view_seed(0, "k", 4)))
    assert view_seed(0, "k", 1) != view_seed(1, "k", 1) != view_seed(0, "j", 1)


def test_reuse_prefix_and_sharing(tmp_path, tiny_vit):
    paths = make_images(tmp_path / "img")
    c = cache_of(tmp_path, tiny_vit)
    v = c.views(paths[:4], 3)
    assert c.stats.forward_passes == 12 and v.num_views == 3 and v.num_images == 4
    again = cache_of(tmp_path, tiny_vit)
    v2 = again.views(paths[:4], 2)  # a prefix of what is cached: no work
    assert again.stats.forward_passes == 0
    assert torch.equal(v2.to_tensor(), v.to_tensor()[:2])
    more = cache_of(tmp_path, tiny_vit)
    more.views(paths[:8], 3)  # the 4 already cached images are reused; only 4 new ones are encoded
    assert more.stats.forward_passes == 12 and more.stats.images_reused == 4
    assert torch.equal(more.views(paths[:4], 3).to_tensor(), v.to_tensor())


def test_streaming_equals_in_memory_and_order_follows_request(tmp_path, tiny_vit):
    paths = make_images(tmp_path / "img")
    c = cache_of(tmp_path, tiny_vit)
    full = c.views(paths, 3)
    for t in range(3):
        assert torch.equal(full.view(t), full.to_tensor()[t].float())
    rev = c.views(paths[::-1], 3)
    assert torch.equal(rev.to_tensor(), full.to_tensor().flip(1))


def test_center_matches_direct_encoding(tmp_path, tiny_vit):
    from prolip.features import encode_images

    paths = make_images(tmp_path / "img", n=5)
    z = cache_of(tmp_path, tiny_vit).center(paths)
    assert z.shape == (5, tiny_vit.dim_pre)
    assert torch.allclose(z, encode_images(tiny_vit, paths), atol=2e-3 * z.abs().max())


def test_changed_image_or_model_is_never_stale(tmp_path, tiny_vit, tiny_vit_file):
    from prolip.backbones import load_backbone

    paths = make_images(tmp_path / "img", n=4)
    first = cache_of(tmp_path, tiny_vit).center(paths)
    Image.fromarray(np.zeros((40, 45, 3), dtype=np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    c = cache_of(tmp_path, tiny_vit)
    second = c.center(paths)
    assert c.stats.forward_passes == 1 and not torch.equal(first[0], second[0])
    assert torch.equal(first[1:], second[1:])
    other = cache_of(tmp_path, load_backbone("test-vit-tiny", str(tiny_vit_file)))
    other.center(paths)
    assert other.stats.forward_passes == 4
