"""The feature cache: determinism, sharing across requests, staleness, streaming, resume, concurrency, faults."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prolip.features import CacheError, FeatureCache
from prolip.transforms import augment_transform, augmented_view, view_seed


def images(root: Path, n=12, size=40, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size + 5, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


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
    paths = images(tmp_path / "img")
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
    paths = images(tmp_path / "img")
    c = cache_of(tmp_path, tiny_vit)
    full = c.views(paths, 3)
    for t in range(3):
        assert torch.equal(full.view(t), full.to_tensor()[t].float())
    rev = c.views(paths[::-1], 3)
    assert torch.equal(rev.to_tensor(), full.to_tensor().flip(1))


def test_center_matches_direct_encoding(tmp_path, tiny_vit):
    from prolip.features import encode_images

    paths = images(tmp_path / "img", n=5)
    z = cache_of(tmp_path, tiny_vit).center(paths)
    assert z.shape == (5, tiny_vit.dim_pre)
    assert torch.allclose(z, encode_images(tiny_vit, paths), atol=2e-3 * z.abs().max())


def test_changed_image_or_model_is_never_stale(tmp_path, tiny_vit, tiny_vit_file):
    from prolip.backbones import load_backbone

    paths = images(tmp_path / "img", n=4)
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


def test_bitflip_and_truncation_are_detected_and_recomputed(tmp_path, tiny_vit):
    paths = images(tmp_path / "img", n=4)
    reference = cache_of(tmp_path, tiny_vit).views(paths, 2).to_tensor()
    (unit,) = list((tmp_path / "cache").rglob("*.safetensors"))
    data = bytearray(unit.read_bytes())
    data[-3] ^= 0xFF
    unit.write_bytes(bytes(data))
    c = cache_of(tmp_path, tiny_vit)
    with pytest.warns(UserWarning, match="corrupt"):
        again = c.views(paths, 2).to_tensor()
    assert c.stats.forward_passes == 8 and torch.equal(again, reference)
    (unit,) = list((tmp_path / "cache").rglob("*.safetensors"))
    unit.write_bytes(unit.read_bytes()[:100])
    with pytest.warns(UserWarning, match="corrupt"):
        assert torch.equal(cache_of(tmp_path, tiny_vit).views(paths, 2).to_tensor(), reference)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_dir_is_a_clear_error(tmp_path, tiny_vit):
    paths = images(tmp_path / "img", n=2)
    (tmp_path / "cache").mkdir()
    os.chmod(tmp_path / "cache", 0o500)
    try:
        with pytest.raises(CacheError, match="cache"):
            cache_of(tmp_path, tiny_vit).center(paths)
    finally:
        os.chmod(tmp_path / "cache", 0o700)


def test_unwritable_cache_leaves_no_partial_entries(tmp_path, tiny_vit, monkeypatch):
    import prolip.features.cache as cache_mod

    paths = images(tmp_path / "img", n=2)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "fsync", full_disk)
    with pytest.raises(CacheError, match="full"):
        cache_of(tmp_path, tiny_vit).center(paths)
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []


def test_bad_image_error_and_skip(tmp_path, tiny_vit):
    from prolip.data import BadImageError

    paths = images(tmp_path / "img", n=3)
    paths[1].write_bytes(b"garbage")
    with pytest.raises(BadImageError, match="img_001"):
        cache_of(tmp_path, tiny_vit).center(paths)
    c = cache_of(tmp_path, tiny_vit, on_bad_image="skip")
    z = c.center(paths)
    assert z.shape[0] == 2 and c.last_kept == [0, 2] and c.skipped[0][0] == paths[1]
    v = c.views(paths, 2)
    assert v.kept == [0, 2] and v.num_images == 2


EXTRACT = """
import sys, torch
from pathlib import Path
from prolip.backbones import load_backbone
from prolip.features import FeatureCache
paths = sorted(Path(sys.argv[1]).glob('*.png'))
c = FeatureCache(sys.argv[2], load_backbone('test-vit-tiny', 'none'), progress=False, unit_images=2, batch_size=4)
torch.save(c.views(paths, 3).to_tensor(), sys.argv[3])
print('forward', c.stats.forward_passes)
"""


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-c", EXTRACT, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


@pytest.mark.slow
def test_kill_minus_nine_then_resume_is_bitwise_equal(tmp_path):
    paths = images(tmp_path / "img", n=16)
    ref = _spawn(tmp_path / "img", tmp_path / "ref_cache", tmp_path / "ref.pt")
    assert ref.wait(120) == 0
    reference = torch.load(tmp_path / "ref.pt")
    rng = np.random.default_rng(0)
    cache = tmp_path / "cache"
    for attempt in range(3):
        p = _spawn(tmp_path / "img", cache, tmp_path / "out.pt")
        time.sleep(float(rng.uniform(2.0, 4.0)))
        p.send_signal(signal.SIGKILL)
        p.wait()
    units_before = {f.name for f in cache.rglob("*.safetensors")}
    p = _spawn(tmp_path / "img", cache, tmp_path / "out.pt")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0
    assert torch.equal(torch.load(tmp_path / "out.pt"), reference)
    # only unfinished units were recomputed: 16 images x 3 views minus what survived the kills
    assert int(out.split()[-1]) == (16 - 2 * len(units_before)) * 3
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.lock"))
    assert unit_contents(cache) == unit_contents(tmp_path / "ref_cache")


@pytest.mark.slow
def test_two_processes_share_one_cache(tmp_path):
    images(tmp_path / "img", n=12)
    a = _spawn(tmp_path / "img", tmp_path / "cache", tmp_path / "a.pt")
    b = _spawn(tmp_path / "img", tmp_path / "cache", tmp_path / "b.pt")
    out_a, _ = a.communicate(timeout=180)
    out_b, _ = b.communicate(timeout=180)
    assert a.returncode == 0 and b.returncode == 0
    assert torch.equal(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt"))
    total = int(out_a.split()[-1]) + int(out_b.split()[-1])
    assert total <= 12 * 3 + 2 * 3  # no double work beyond one unit
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6


def test_uncreatable_cache_dir_is_a_clear_error(tmp_path, tiny_vit):
    paths = images(tmp_path / "img", n=2)
    (tmp_path / "blocker").write_text("a file where the cache dir should go")
    with pytest.raises(CacheError, match="blocker"):
        FeatureCache(tmp_path / "blocker" / "cache", tiny_vit, progress=False).center(paths)


DIST = """
import sys, torch, torch.distributed as dist
from pathlib import Path
from prolip.backbones import load_backbone
from prolip.features import extract_dataset
dist.init_process_group('gloo')
paths = sorted(Path(sys.argv[1]).glob('*.png'))
stats = extract_dataset(load_backbone('test-vit-tiny', 'none'), paths, num_views=2, cache_dir=sys.argv[2],
                        batch_size=4)
Path(sys.argv[2] + f'.rank{dist.get_rank()}').write_text(str(stats.forward_passes))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_processes_make_the_same_cache_as_one(tmp_path):
    from prolip.backbones import load_backbone
    from prolip.features import extract_dataset

    paths = images(tmp_path / "img", n=80)  # 3 units of 32 images: ranks split them
    extract_dataset(load_backbone("test-vit-tiny", "none"), paths, num_views=2, cache_dir=tmp_path / "one",
                    batch_size=4)
    script = tmp_path / "dist.py"
    script.write_text(DIST)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script), str(tmp_path / "img"), str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    per_rank = sorted(int((tmp_path / f"two.rank{r}").read_text()) for r in range(2))
    assert len(per_rank) == 2 and all(n > 0 for n in per_rank) and sum(per_rank) == 80 * 2
    assert unit_contents(tmp_path / "one") == unit_contents(tmp_path / "two")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit_contents(root):
    """Unit files by name → (metadata, feature bytes); safetensors orders header keys arbitrarily, so not raw bytes."""
    from safetensors import safe_open

    out = {}
    for f in root.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out[f.relative_to(root)] = (h.metadata(), h.get_tensor("features").numpy().tobytes())
    return out
