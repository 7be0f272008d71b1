"""torchrun: `prolip fit --validate` and `prolip extract` split their work across processes and give what one gives."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

PROLIP = str(Path(sys.executable).parent / "prolip")
TINY = ["--model", "test-vit-tiny", "--pretrained", "none"]


def make_folder(root: Path, classes=("cat", "dog", "fox"), per_class=8) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = (np.zeros((40, 40, 3)) + 60 * c + rng.integers(0, 80, (40, 40, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.jpg")
    return root


def run(*args: str, procs: int = 1) -> subprocess.CompletedProcess:
    launcher = (
        []
        if procs == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(procs),
            "--no-python",
        ]
    )
    r = subprocess.run(
        [*launcher, PROLIP, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def cache_contents(root: Path) -> dict:
    out = {}
    for f in root.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out[f.relative_to(root)] = (h.metadata(), h.get_tensor("features").numpy().tobytes())
    return out


@pytest.mark.slow
def test_fit_validate_under_torchrun_equals_one_process(tmp_path):
    data = make_folder(tmp_path / "imgs", per_class=24)  # 60 held-out test images: two units to split
    fit = ["fit", "--data", data, "--shots", 2, "--views", 3, "--steps", 15, "--validate", "--json", *TINY]
    one = json.loads(run(*fit, "--cache-dir", tmp_path / "c1", "--out", tmp_path / "r1").stdout)
    two_out = run(*fit, "--cache-dir", tmp_path / "c2", "--out", tmp_path / "r2", procs=2).stdout
    two = json.loads(two_out)  # only rank 0 prints and writes
    m1, m2 = (json.loads((tmp_path / r / "manifest.json").read_text()) for r in ("r1", "r2"))
    s1, s2 = m1["method"]["selected"], m2["method"]["selected"]
    assert (s1.pop("grid_ranks"), s2.pop("grid_ranks")) == (1, 2)
    assert s1 == s2  # every config's validation accuracy, and the winner
    w1, w2 = (load_file(tmp_path / r / "method.safetensors")["W"] for r in ("r1", "r2"))
    assert torch.equal(w2, w1)  # each config trains independently of which others share its batch
    assert not torch.equal(w1, load_file(tmp_path / "r1" / "method.safetensors")["W0"])
    assert two["accuracy"] == one["accuracy"]
    # Extraction was split: rank 0 did part of the forward passes, and the caches are identical.
    assert 0 < two["forward_passes"] < one["forward_passes"]
    assert cache_contents(tmp_path / "c1") == cache_contents(tmp_path / "c2")


@pytest.mark.slow
def test_extract_under_torchrun_shards_and_matches_one_process(tmp_path):
    data = make_folder(tmp_path / "imgs", per_class=24)  # 72 images: 3 units of 32, so both ranks get work
    args = ["extract", "--data", data, "--views", 2, "--split", "train", *TINY]
    run(*args, "--cache-dir", tmp_path / "c1")
    err = run(*args, "--cache-dir", tmp_path / "c2", procs=2).stderr
    passes = {int(r): int(n) for r, n in re.findall(r"rank (\d)/2 train: \d+ images, (\d+) forward passes", err)}
    assert sorted(passes) == [0, 1] and all(n > 0 for n in passes.values()) and sum(passes.values()) == 72 * 2, err
    assert cache_contents(tmp_path / "c1") == cache_contents(tmp_path / "c2")
