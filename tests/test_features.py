"""The feature cache: determinism, sharing across requests, staleness, streaming, resume.

Faults (kills, concurrent writers, corrupt shards, full or read-only disks) and bad images are in tests/reliability/.
"""

import hashlib
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from prolip.features import FeatureCache, image_key
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
    z = cache_of(tmp_path, tiny_vit).center(paths).features
    assert z.shape == (5, tiny_vit.dim_pre)
    assert torch.allclose(z, encode_images(tiny_vit, paths), atol=2e-3 * z.abs().max())


def test_changed_image_or_model_is_never_stale(tmp_path, tiny_vit, tiny_vit_file):
    from prolip.backbones import load_backbone

    paths = make_images(tmp_path / "img", n=4)
    first = cache_of(tmp_path, tiny_vit).center(paths).features
    Image.fromarray(np.zeros((40, 45, 3), dtype=np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    c = cache_of(tmp_path, tiny_vit)
    second = c.center(paths).features
    assert c.stats.forward_passes == 1 and not torch.equal(first[0], second[0])
    assert torch.equal(first[1:], second[1:])
    other = cache_of(tmp_path, load_backbone("test-vit-tiny", str(tiny_vit_file)))
    other.center(paths)
    assert other.stats.forward_passes == 4


def expected_units(backbone, paths, num_views, aug_seed, unit_images, batch_size):
    """What the cache must hold, recomputed straight through the backbone: keys sorted and chunked into units, each
    unit's views (image-major) in fixed batches, float16 [V, n, D]."""
    from prolip.data.images import load_image

    prep = backbone.preprocessing
    keys = sorted(image_key(p) for p in paths)
    by_key = {image_key(p): p for p in paths}
    units = {}
    for u in range(0, len(keys), unit_images):
        unit = keys[u : u + unit_images]
        views = [
            augmented_view(load_image(by_key[k]), prep, view_seed(aug_seed, k, t))
            for k in unit
            for t in range(num_views)
        ]
        with torch.inference_mode():
            z = torch.cat(
                [backbone.encode_pre(torch.stack(views[b : b + batch_size])) for b in range(0, len(views), batch_size)]
            )
        units[tuple(unit)] = z.float().reshape(len(unit), num_views, -1).transpose(0, 1).to(torch.float16)
    return units


def test_cached_features_are_bitwise_the_backbone_forward_on_the_seeded_views(tmp_path, tiny_vit):
    from safetensors import safe_open

    paths = make_images(tmp_path / "img", n=7)
    c = cache_of(tmp_path, tiny_vit, unit_images=3, batch_size=4)  # batches straddle images
    got = c.views(paths, 3, aug_seed=5)
    expected = expected_units(tiny_vit, paths, 3, 5, unit_images=3, batch_size=4)
    ns = c.namespace_dir("augment", 5)
    assert sorted(f.name for f in ns.iterdir()) == sorted(
        f"{n}.safetensors"
        for n in (hashlib.blake2b(json.dumps([list(u), 3]).encode(), digest_size=12).hexdigest() for u in expected)
    )
    for unit, z in expected.items():  # the unit format: one float16 tensor and four metadata strings
        name = hashlib.blake2b(json.dumps([list(unit), 3]).encode(), digest_size=12).hexdigest()
        with safe_open(str(ns / f"{name}.safetensors"), framework="pt") as h:
            meta, stored = h.metadata(), h.get_tensor("features")
            assert list(h.keys()) == ["features"]
        assert meta == {
            "keys": json.dumps(list(unit)),
            "views": "3",
            "checksum": hashlib.blake2b(z.numpy().tobytes(), digest_size=16).hexdigest(),
            "identity": "content:blake2b-128",
        }
        assert stored.dtype == torch.float16 and torch.equal(stored, z)
    by_key = {k: z[:, i] for unit, z in expected.items() for i, k in enumerate(unit)}
    assert torch.equal(got.to_tensor(), torch.stack([by_key[image_key(p)] for p in paths], dim=1))


@pytest.mark.parametrize("writer", ["save", "save_file"])
def test_unit_written_by_plain_safetensors_is_read_back(tmp_path, tiny_vit, writer):
    """Existing cache directories keep working: a unit as the earlier code wrote it (safetensors.torch.save with
    keys/views/checksum metadata, named by the hash of [keys, views]) is reused without any forward pass."""
    import safetensors.torch

    paths = make_images(tmp_path / "img", n=3)
    keys = sorted(image_key(p) for p in paths)
    feats = torch.randn(2, 3, tiny_vit.dim_pre, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    meta = {
        "keys": json.dumps(keys),
        "views": "2",
        "checksum": hashlib.blake2b(feats.numpy().tobytes(), digest_size=16).hexdigest(),
    }
    c = cache_of(tmp_path, tiny_vit)
    ns = c.namespace_dir("augment", 0)
    ns.mkdir(parents=True)
    target = ns / (hashlib.blake2b(json.dumps([keys, 2]).encode(), digest_size=12).hexdigest() + ".safetensors")
    if writer == "save":
        target.write_bytes(safetensors.torch.save({"features": feats}, metadata=meta))
    else:
        safetensors.torch.save_file({"features": feats}, str(target), metadata=meta)
    got = c.views(paths[::-1], 2)
    assert c.stats.forward_passes == 0 and c.stats.images_reused == 3
    order = [keys.index(image_key(p)) for p in paths[::-1]]
    assert torch.equal(got.to_tensor(), feats[:, order])


def test_results_report_kept_and_skipped_per_request_and_leave_no_lock_or_temporary(tmp_path, tiny_vit):
    import dataclasses

    paths = make_images(tmp_path / "img", n=4)
    paths[2].write_bytes(b"garbage")
    c = cache_of(tmp_path, tiny_vit, on_bad_image="skip")
    center = c.center(paths)
    assert center.kept == [0, 1, 3] and center.features.shape == (3, tiny_vit.dim_pre)
    assert [(p, "not an image PIL can identify") for p in [paths[2]]] == center.skipped
    with pytest.raises(dataclasses.FrozenInstanceError):
        center.kept = []
    clean = c.center(paths[:2])  # a later request does not inherit the earlier one's skips
    assert clean.skipped == [] and clean.kept == [0, 1]
    views = c.views(paths, 2)
    assert views.kept == [0, 1, 3] and [p for p, _ in views.skipped] == [paths[2]]
    assert not hasattr(c, "skipped") and not hasattr(c, "last_kept")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".lock", ".tmp")] == []


def test_extraction_keeps_only_the_features_not_the_tensors_they_are_views_of(tmp_path, tiny_vit, monkeypatch):
    """open_clip's pooled feature is a view of the whole token tensor (197 × its size on ViT-B/16); a unit that kept
    its batches as they came held all their tokens until it was written. Each batch's tokens must be freed before
    the next batch is encoded, and the features must be the same."""
    import gc

    from prolip.features.extraction import Extractor, augmented_views

    paths = make_images(tmp_path / "img", n=3)
    make_view = augmented_views(tiny_vit.preprocessing, 0)
    expected = Extractor(tiny_vit, batch_size=4).encode([(p, str(p)) for p in paths], 5, make_view).features
    original, held_at_next_batch, made = tiny_vit.encode_pre, [], set()

    def ours(o) -> bool:  # a live tensor on one of the stand-in token tensors' storage
        return isinstance(o, torch.Tensor) and (o.untyped_storage().data_ptr(), o.untyped_storage().nbytes()) in made

    def pooled_view_of_tokens(images):
        gc.collect()
        held_at_next_batch.append(sum(map(ours, gc.get_objects())))
        whole = torch.stack([original(images)] * 50, dim=1)  # [B, 50, D], standing in for the token tensor
        made.add((whole.untyped_storage().data_ptr(), whole.untyped_storage().nbytes()))
        return whole[:, 0]

    monkeypatch.setattr(tiny_vit, "encode_pre", pooled_view_of_tokens)
    got = Extractor(tiny_vit, batch_size=4).encode([(p, str(p)) for p in paths], 5, make_view).features
    assert held_at_next_batch == [0, 0, 0, 0]
    assert torch.equal(got, expected)
