"""Images are their bytes: a dataset copied to another path, with new modification times, as a folder, tar shards
or a Hugging Face dataset on disk, gives bitwise the same cached features and fitted runs with no re-extraction; a
changed pixel is a new image; hashes are remembered per (path, size, mtime) and shared by processes; a path-keyed
cache from before is told about once; the same fit at 1 and 2 threads agrees to a stated tolerance."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from prolip.features import FeatureCache, image_key
from prolip.features.identity import ContentIndex, environment_fingerprint, image_set_fingerprint

CLASSES = ("cat", "dog", "fox")
PAST = 1_500_000_000  # a modification time long before any file these tests write (2017)
# Fits at 1 and 2 torch threads may differ in their last float32 bits where a GEMM splits its sums by thread: the
# README promises agreement to this on W. Measured on this tiny ViT (30 steps): bitwise equal, its GEMMs too small
# to split, so the test holds the promise without testing its margin.
THREADS_ATOL = 1e-5


def png(label: int, i: int) -> bytes:
    rng = np.random.default_rng(100 * label + i)
    pixels = (np.zeros((26 + i, 30, 3)) + 70 * label + rng.integers(0, 60, (26 + i, 30, 3))).clip(0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


SAMPLES = [(png(label, i), label) for i in range(4) for label in range(3)]


def write_source(kind: str, root: Path) -> str:
    """The 12 images as ``kind`` under ``root``; the --data spec that reads them."""
    if kind == "folder":
        for j, (blob, label) in enumerate(SAMPLES):
            (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
            (root / CLASSES[label] / f"{j:02d}.png").write_bytes(blob)
        return str(root)
    if kind == "tar":
        root.mkdir(parents=True)
        for s in range(3):
            with tarfile.open(root / f"train-{s:06d}.tar", "w") as tar:
                for j in range(4 * s, 4 * s + 4):
                    blob, label = SAMPLES[j]
                    for name, data in ((f"s{j:04d}.png", blob), (f"s{j:04d}.cls", str(label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
        return str(root / "train-{000000..000002}.tar")
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    rows = {"image": [{"bytes": b, "path": None} for b, _ in SAMPLES], "label": [y for _, y in SAMPLES]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(train=ds.select(range(9)), test=ds.select(range(9, 12))).save_to_disk(str(root))
    return f"hf:{root}"


def copy_with_new_times(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    for i, f in enumerate(sorted(p for p in dst.rglob("*") if p.is_file())):
        os.utime(f, ns=(PAST * 10**9 + i, PAST * 10**9 + i))


@pytest.fixture(scope="module")
def backbone():
    from prolip.backbones import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone("test-vit-tiny", "none")


def fit_and_save(backbone, spec: str, cache_dir: Path, out: Path):
    from prolip import pipeline
    from prolip.data import resolve_data

    cache = FeatureCache(cache_dir, backbone, progress=False)
    config = pipeline.FitConfig(shots=2, views=3, hyperparameters={"steps": 30, "lr": 1e-3})
    result = pipeline.fit(backbone, resolve_data(spec), cache, config)
    result.run.save(out)
    return result, cache


@pytest.mark.parametrize("kind", ["folder", "tar", "hf"])
def test_a_copied_dataset_gives_bitwise_the_same_features_and_run_without_extraction(kind, backbone, tmp_path):
    spec_a = write_source(kind, tmp_path / "a" / "data")
    first, cache_a = fit_and_save(backbone, spec_a, tmp_path / "cache", tmp_path / "run_a")
    assert cache_a.stats.forward_passes > 0
    copy_with_new_times(tmp_path / "a", tmp_path / "b")
    spec_b = spec_a.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    second, cache_b = fit_and_save(backbone, spec_b, tmp_path / "cache", tmp_path / "run_b")
    assert cache_b.stats.forward_passes == 0  # the copy's images are the cache's: nothing re-extracted
    support_a = [it.path for it in first.episode.images.support.items]
    support_b = [it.path for it in second.episode.images.support.items]
    assert [str(p).replace(str(tmp_path / "a"), str(tmp_path / "b")) for p in support_a] == list(map(str, support_b))
    assert torch.equal(cache_b.views(support_a, 3).to_tensor(), cache_b.views(support_b, 3).to_tensor())
    assert cache_b.stats.forward_passes == 0
    state_a, state_b = (
        load_file(tmp_path / "run_a" / "method.safetensors"),
        load_file(tmp_path / "run_b" / "method.safetensors"),
    )
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert first.metrics["accuracy"] == second.metrics["accuracy"]
    assert image_set_fingerprint(support_a) == image_set_fingerprint(support_b)
    # The runs say so themselves: the same support, validation and evaluation images, by content.
    assert first.run.manifest["images"] == second.run.manifest["images"]
    assert first.run.manifest["images"]["support"] == image_set_fingerprint(support_a)


def test_a_changed_pixel_is_a_new_image_and_a_byte_copy_is_the_same(backbone, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    a.write_bytes(SAMPLES[0][0])
    shutil.copyfile(a, b)
    pixels = np.asarray(Image.open(a)).copy()
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(c)
    assert image_key(a) == image_key(b) != image_key(c)
    cache = FeatureCache(tmp_path / "cache", backbone, progress=False)
    cache.views([a], 2)
    passes = cache.stats.forward_passes
    cache.views([b], 2)
    assert cache.stats.forward_passes == passes  # the copy is the image already cached
    cache.views([c], 2)
    assert cache.stats.forward_passes == passes + 2  # the changed one is extracted as the new image it is


def test_hashes_are_remembered_per_path_size_and_mtime(tmp_path):
    files = []
    for j, (blob, _) in enumerate(SAMPLES):
        files.append(tmp_path / "img" / f"{j}.png")
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_bytes(blob)
        os.utime(files[-1], ns=(PAST * 10**9, PAST * 10**9))
    first = ContentIndex(tmp_path / "cache")
    keys = first.keys(files)
    assert first.hashed == 12 and keys == [image_key(f) for f in files]
    again = ContentIndex(tmp_path / "cache")
    assert again.keys(files) == keys and again.hashed == 0  # unchanged files are not read again
    files[3].write_bytes(SAMPLES[4][0])  # same path, new bytes: a new (size, mtime), hashed again
    os.utime(files[3], ns=(PAST * 10**9 + 5, PAST * 10**9 + 5))
    changed = ContentIndex(tmp_path / "cache")
    assert changed.keys(files)[3] == keys[4] and changed.hashed == 1
    # A file just written may change again within its mtime tick: used, not remembered.
    fresh = tmp_path / "img" / "fresh.png"
    fresh.write_bytes(SAMPLES[5][0])
    ContentIndex(tmp_path / "cache").keys([fresh])
    later = ContentIndex(tmp_path / "cache")
    assert later.keys([fresh]) == [keys[5]] and later.hashed == 1
    assert sorted(p.suffix for p in (tmp_path / "cache" / "identity-v1").iterdir()) == [".json"]  # no lock left


def test_processes_share_the_index(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for j, (blob, _) in enumerate(SAMPLES):
        (folder / f"{j:02d}.png").write_bytes(blob)
        os.utime(folder / f"{j:02d}.png", ns=(PAST * 10**9, PAST * 10**9))
    code = (
        "import sys; from pathlib import Path; from prolip.features.identity import ContentIndex\n"
        "files = sorted(Path(sys.argv[1]).glob('*.png'))[int(sys.argv[2])::2]\n"
        "ContentIndex(sys.argv[3]).keys(files)\n"
    )
    runs = [
        subprocess.Popen([sys.executable, "-c", code, str(folder), str(half), str(tmp_path / "cache")])
        for half in (0, 1)
    ]
    assert [r.wait(timeout=120) for r in runs] == [0, 0]
    index = ContentIndex(tmp_path / "cache")
    index.keys(sorted(folder.glob("*.png")))
    # Both halves were merged into the one group file (a rare lost race would only cost a re-hash here).
    assert index.hashed <= 6
    (group,) = (tmp_path / "cache" / "identity-v1").glob("*.json")
    assert len(json.loads(group.read_text())["entries"]) >= 6


def test_a_path_keyed_cache_from_before_is_told_once(backbone, tmp_path):
    from safetensors.torch import save_file

    old = tmp_path / "cache" / "0123456789abcdef01234567"
    old.mkdir(parents=True)
    meta = {"keys": json.dumps(["ab" * 16]), "views": "1", "checksum": "0"}
    save_file({"features": torch.zeros(1, 1, 8, dtype=torch.float16)}, str(old / "unit.safetensors"), metadata=meta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FeatureCache(tmp_path / "cache", backbone, progress=False)
        FeatureCache(tmp_path / "cache", backbone, progress=False).center([])
    told = [str(w.message) for w in caught if "keyed by file path" in str(w.message)]
    assert len(told) == 1 and "\n" not in told[0] and old.name in told[0] and "no longer read" in told[0]
    assert old.is_dir()  # left for the user (an older prolip may share the directory)


def test_the_same_fit_at_one_and_two_threads_agrees_within_tolerance(backbone, tmp_path):
    spec = write_source("folder", tmp_path / "data")
    threads = torch.get_num_threads()
    try:
        states = []
        for n in (1, 2):
            torch.set_num_threads(n)
            result, _ = fit_and_save(backbone, spec, tmp_path / f"cache{n}", tmp_path / f"run{n}")
            assert result.run.manifest["environment"]["threads"] == n
            states.append(load_file(tmp_path / f"run{n}" / "method.safetensors"))
    finally:
        torch.set_num_threads(threads)
    one, two = states
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=THREADS_ATOL, rtol=0)


def test_environment_fingerprint_names_what_computed_a_result():
    env = environment_fingerprint("cpu", "fp32")
    assert {"prolip", "commit", "torch", "device", "dtype", "threads", "fingerprint"} <= env.keys()
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env == environment_fingerprint("cpu", "fp32") != environment_fingerprint("cuda", "fp32")
    assert env["commit"] is None or len(env["commit"]) == 40
