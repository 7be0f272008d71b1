"""Decoding threads and the extraction dtype: threads change nothing but speed; bf16 has its own cache entries."""

from __future__ import annotations

import pytest
import torch

from prolip.features import FeatureCache
from prolip.features.extraction import ordered_map
from reliability.conftest import make_images


def test_ordered_map_keeps_order_and_propagates_errors():
    assert list(ordered_map(lambda x: x * x, range(50), workers=3)) == [x * x for x in range(50)]
    assert list(ordered_map(lambda x: -x, range(5), workers=0)) == [0, -1, -2, -3, -4]

    def boom(x):
        if x == 7:
            raise RuntimeError("bad item 7")
        return x

    with pytest.raises(RuntimeError, match="bad item 7"):
        list(ordered_map(boom, range(20), workers=2))


@pytest.mark.parametrize("workers", [1, 3])
def test_decoding_threads_give_bitwise_the_same_cache(tmp_path, tiny_vit, workers):
    paths = make_images(tmp_path / "img", n=10)
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    paths.insert(4, tmp_path / "img" / "broken.png")
    kw = dict(batch_size=3, unit_images=4, progress=False, on_bad_image="skip")  # batches straddle images and units
    inline = FeatureCache(tmp_path / "a", tiny_vit, num_workers=0, **kw)
    threaded = FeatureCache(tmp_path / "b", tiny_vit, num_workers=workers, **kw)
    a, b = inline.views(paths, 5), threaded.views(paths, 5)
    assert a.to_tensor().shape == (5, 10, tiny_vit.dim_pre) and torch.equal(a.to_tensor(), b.to_tensor())
    center = threaded.center(paths)
    assert torch.equal(inline.center(paths).features, center.features)
    for result in (a, b, center):  # each request reports its own skips
        assert [p.name for p, _ in result.skipped] == ["broken.png"] and result.kept == [0, 1, 2, 3, *range(5, 11)]
    assert threaded.stats.forward_passes == inline.stats.forward_passes == 10 * 5 + 10


def test_bf16_extraction_has_its_own_namespace_and_close_features(tmp_path, tiny_vit):
    paths = make_images(tmp_path / "img", n=4)
    fp32 = FeatureCache(tmp_path / "c", tiny_vit, progress=False)
    bf16 = FeatureCache(tmp_path / "c", tiny_vit, progress=False, compute_dtype="bf16")
    assert fp32.compute_dtype == "fp32"  # auto on a CPU backbone
    assert fp32.namespace_dir("center", 0) != bf16.namespace_dir("center", 0)
    z32, z16 = fp32.center(paths).features, bf16.center(paths).features
    assert bf16.stats.forward_passes == 4  # not served from the fp32 entries
    assert not torch.equal(z32, z16)
    torch.testing.assert_close(z16, z32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(compute_dtype="fp16"), "compute_dtype must be one of .* got 'fp16'"),
        (dict(num_workers=-1), "num_workers must be >= 0, got -1"),
        (dict(batch_size=0), "batch_size must be positive, got 0"),
        (dict(on_bad_image="ignore"), "on_bad_image must be 'error' or 'skip'"),
    ],
)
def test_bad_extraction_options_name_the_value(tmp_path, tiny_vit, kw, message):
    # Library errors name the parameter; the CLI's own option types name its flags (tests/test_cli.py).
    with pytest.raises(ValueError, match=message):
        FeatureCache(tmp_path, tiny_vit, **kw)
    with pytest.raises(ValueError, match="num_views must be positive, got 0"):
        FeatureCache(tmp_path, tiny_vit).views([], 0)


@pytest.mark.parametrize("shape", [(50, 60), (300, 40), (40, 300), (224, 224)])
def test_seeded_views_are_torchvisions_draws_without_the_global_rng(shape, tiny_vit):
    # The views must stay those of the reference pipeline (torchvision transforms after torch.manual_seed(seed)),
    # while leaving the global RNG alone so threads cannot interleave their draws.
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from prolip.transforms import augment_transform, augmented_view
    from prolip.tta import tta_view_transform

    prep = tiny_vit.preprocessing
    img = Image.fromarray(np.random.default_rng(shape[0]).integers(0, 255, (*shape, 3), dtype=np.uint8))
    reference = {
        "cache": (
            augment_transform(prep),
            T.Compose(
                [
                    T.RandomResizedCrop(prep.image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(),
                    T.ToTensor(),
                    T.Normalize(prep.mean, prep.std),
                ]
            ),
        ),
        "tta": (
            tta_view_transform(prep),
            T.Compose(
                [
                    T.RandomResizedCrop(prep.image_size, scale=(0.08, 1.0)),
                    T.RandomHorizontalFlip(),
                    T.ToTensor(),
                    T.Normalize(prep.mean, prep.std),
                ]
            ),
        ),
    }
    for ours, theirs in reference.values():
        for seed in range(12):
            torch.manual_seed(seed)
            expected = theirs(img)
            state = torch.get_rng_state()
            got = augmented_view(img, prep, seed, ours)
            assert torch.equal(torch.get_rng_state(), state)
            assert torch.equal(got, expected), seed
