"""The full pipeline on real images (../shared/data/dtd10, CoOp layout) with the real ViT-B-16 architecture at
random init, on a small subset; and the demo on a tiny model."""

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DTD10 = DATA / "dtd10" / "dtd"


@pytest.mark.skipif(not DTD10.is_dir(), reason="../shared/data/dtd10 is absent")
def test_dtd10_vit_b16_random_init(tmp_path, vit_b16_file):
    from prolip import pipeline
    from prolip.backbones import load_backbone
    from prolip.data import resolve_data
    from prolip.features import FeatureCache

    vit_b16_backbone = load_backbone("ViT-B-16", str(vit_b16_file))
    splits = resolve_data(str(DTD10))
    assert len(splits.classnames) == 10 and len(splits.train) == 600
    assert splits.templates == ["{} texture."]
    # A small subset keeps ViT-B/16 on CPU to a few seconds: 1 shot x 10 classes x 2 views + 20 test images.
    splits.test = splits.test.subset(list(range(0, len(splits.test), 18)))
    cache = FeatureCache(tmp_path / "cache", vit_b16_backbone, progress=False)
    result = pipeline.fit(
        vit_b16_backbone, splits, cache, pipeline.FitConfig(shots=1, views=2, hyperparameters={"steps": 10})
    )
    assert result.metrics["eval_images"] == 20 and result.metrics["eval_set"] == "test split"
    W = result.run.method_state["W"]
    assert W.shape == (768, 512)
    assert result.run.manifest["backbone"]["weights"] == str(vit_b16_file)
    assert cache.stats.forward_passes == 10 * 2 + 20


def test_demo_falls_back_to_the_in_house_tiny_clip(tmp_path):
    from prolip.demo import DemoConfig, run_demo
    from prolip.tiny import TINY_LABEL

    lines = []
    # No weights exist for this tag, as none can be had offline: the demo must say so and use prolip-tiny.
    config = DemoConfig(
        model="test-vit-tiny",
        pretrained="openai",
        domains=("inverted",),
        shots=(1, 2),
        views=2,
        test_per_class=3,
        pool_per_class=2,
        baselines=("linear-probe",),
    )
    result = run_demo(tmp_path, config, echo=lines.append)
    assert TINY_LABEL in lines[0] and not any("RANDOM" in line for line in lines)
    assert TINY_LABEL in result["caption"] and result["lr"] == 1e-2
    rows = result["domains"]["inverted"]
    assert [r["shots"] for r in rows] == [1, 2]
    assert set(rows[0]) == {
        "shots",
        "zero-shot",
        "ProLIP (lr 0.01, λ = 1/N)",
        "ProLIP (lr 0.01, λ = 0)",
        "linear probe (baseline)",
    }
    assert "| 2 |" in result["table"] and result["clean_zero_shot"] > 50
    assert result["plot"].stat().st_size > 1000
    assert (tmp_path / "digits-inverted" / "seven").is_dir() and len(list((tmp_path / "digits-clean").iterdir())) == 11
    manifest = (result["runs"][0] / "manifest.json").read_text()
    assert TINY_LABEL in manifest


def test_demo_labels_random_weights_when_asked_for_them(tmp_path):
    from prolip.demo import DemoConfig, run_demo

    config = DemoConfig(
        model="test-vit-tiny",
        pretrained="none",
        domains=("noisy",),
        shots=(1,),
        views=1,
        test_per_class=2,
        pool_per_class=1,
        baselines=(),
    )
    result = run_demo(tmp_path, config, echo=lambda line: None)
    assert "RANDOM" in result["caption"] and "RANDOM" in result["backbone"]
