"""`prolip fit` and `prolip bench` build their few-shot episodes on one path: the same data, shots, seed and
sampler draw the same support images and give the same accuracy, ImageNet's 2N-then-split draw included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from prolip.bench.experiment import parse_experiment
from prolip.bench.protocols import run_experiment
from prolip.bench.records import read_records
from prolip.cli import main
from prolip.data import resolve_data, sample_few_shot

WNIDS = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """A miniature ImageNet in CoOp's layout: 3 classes, 6 training and 2 validation images each."""
    root = tmp_path_factory.mktemp("in")
    (root / "imagenet").mkdir()
    (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, "abc", strict=True)))
    rng = np.random.default_rng(0)
    for part, k in (("train", 6), ("val", 2)):
        for c, w in enumerate(WNIDS):
            (root / "imagenet" / "images" / part / w).mkdir(parents=True)
            for i in range(k):
                pixels = np.clip(60 * c + rng.integers(0, 90, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "imagenet" / "images" / part / w / f"{w}_{i}.JPEG")
    return root


CASES = {"dtd": ("dtd10", "dtd"), "imagenet": (None, "imagenet")}
# linear-probe trains on the support's center crops: under `fit` it once trained on augmented view 0 instead.
METHODS = {"prolip": {"steps": 5, "lr": 1e-2}, "linear-probe": {}}


@pytest.mark.parametrize("case, method", [("dtd", "prolip"), ("dtd", "linear-probe"), ("imagenet", "prolip")])
def test_fit_and_bench_draw_the_same_support_and_score_the_same(
    case, method, tmp_path, shared_data, imagenet_root, tiny_vit
):
    root = shared_data / CASES[case][0] if CASES[case][0] else imagenet_root
    dataset, cache, hp = CASES[case][1], tmp_path / "cache", METHODS[method]
    hp_args = [arg for k, v in hp.items() for arg in ("--hp", f"{k}={v}")]
    r = CliRunner().invoke(
        main,
        [
            "fit",
            "--data",
            dataset,
            "--data-root",
            str(root),
            "--shots",
            "2",
            "--seed",
            "3",
            "--method",
            method,
            *hp_args,
            "--views",
            "2",
            "--model",
            "test-vit-tiny",
            "--pretrained",
            "none",
            "--cache-dir",
            str(cache),
            "--out",
            str(tmp_path / "run"),
            "--json",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    fit_metrics = json.loads(r.stdout)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())

    exp = parse_experiment(
        {
            "model": "test-vit-tiny",
            "pretrained": "none",
            "data_root": str(root),
            "datasets": [dataset],
            "shots": [2],
            "seeds": [3],
            "views": 2,
            "cache_dir": str(cache),
            "out": str(tmp_path / "res"),
            "methods": [{"name": method, **hp}],
        }
    )
    (record,) = read_records(run_experiment(exp, echo=lambda line: None, backbone=tiny_vit))

    assert record["support_digest"] == manifest["data"]["support_digest"]
    assert record["accuracy"] == fit_metrics["accuracy"] and record["eval_images"] == fit_metrics["eval_images"]
    if case == "imagenet":  # 2N per class from train in one draw: the first N are the support
        splits = resolve_data(dataset, root=root)
        few = sample_few_shot(splits.train.labels, 2, 3, imagenet_style=True)
        assert [p for p, _ in manifest["data"]["support"]] == [
            str(splits.train.items[i].path) for i in few.train_indices
        ]
