"""The full pipeline on real images (../shared/data/dtd10, CoOp layout) with the real ViT-B-16 architecture at
random init, on a small subset; and the demo on a tiny model."""
from pathlib import Path

import pytest
import torch

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
    result = pipeline.fit(vit_b16_backbone, splits, cache,
                          pipeline.FitConfig(shots=1, views=2, hyperparameters={"steps": 10}))
    assert result.metrics["eval_images"] == 20 and result.metrics["eval_set"] == "test split"
    W = result.run.method_state["W"]
    assert W.shape == (768, 512)
    assert result.run.manifest["backbone"]["weights"] == str(vit_b16_file)
    assert cache.stats.forward_passes == 10 * 2 + 20


def test_demo_runs_on_a_tiny_model(tmp_path):
    from prolip.demo import DemoConfig, run_demo

    lines = []
    result = run_demo(tmp_path, DemoConfig(model="test-vit-tiny", pretrained="none", shots=(1, 2), views=2,
                                           test_per_class=3, pool_per_class=2), echo=lines.append)
    assert any("RANDOMLY" in l or "RANDOM" in l for l in lines)
    assert [r["shots"] for r in result["rows"]] == [1, 2]
    assert "| 2 |" in result["table"] and "RANDOM" in result["caption"]
    assert result["plot"].stat().st_size > 1000
    assert (tmp_path / "digits" / "seven").is_dir() and len(list((tmp_path / "digits").iterdir())) == 11
    assert (result["run"] / "manifest.json").is_file()
