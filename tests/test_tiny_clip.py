"""prolip-tiny, the in-house CLIP the demo and the behavioural tests run on: the shipped weights load through the normal
``--pretrained PATH`` path, say what they are everywhere, know the held-out digits, and are what
``prolip pretrain-tiny`` writes, byte for byte.

The full regeneration (about a minute on one core) is kept out of the default suite; run it with

    PROLIP_REGENERATE_TINY=1 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_tiny_clip.py -m slow
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict

import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    from prolip.tiny import load_tiny

    return load_tiny()


def _header(path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def test_shipped_weights_are_small_labelled_and_regenerable():
    from prolip.backbones import PROVENANCE_KEY
    from prolip.tiny import SHIPPED_WEIGHTS, TINY_LABEL, TINY_MODEL

    assert SHIPPED_WEIGHTS.is_file() and SHIPPED_WEIGHTS.stat().st_size < 5_000_000  # 4.5 MB (float16)
    metadata = _header(SHIPPED_WEIGHTS)["__metadata__"]
    assert metadata[PROVENANCE_KEY] == TINY_LABEL
    assert metadata["prolip.model"] == TINY_MODEL
    assert metadata["prolip.regenerate"] == "prolip pretrain-tiny --out DIR --seed 0"
    assert json.loads(metadata["prolip.pretrain"])["seed"] == 0


def test_shipped_weights_load_labelled_everywhere(tiny):
    from prolip.tiny import SHIPPED_WEIGHTS, TINY_LABEL, TINY_MODEL

    info = tiny.info
    assert not info.random_weights and info.arch == TINY_MODEL and info.weights == str(SHIPPED_WEIGHTS)
    assert TINY_LABEL in info.describe() and str(SHIPPED_WEIGHTS) in info.describe()
    assert asdict(info)["provenance"] == TINY_LABEL  # what a run manifest records
    site = tiny.projection()
    assert site.param_name == "visual.proj" and tuple(site.weight.shape) == (128, 64)


def test_shipped_weights_know_the_held_out_digits(tiny):
    from prolip.tiny import held_out_zero_shot

    # Measured: 95.8% on the 500 held-out digits (chance: 10%).
    assert held_out_zero_shot(tiny) >= 90.0


def test_a_checkpoint_without_a_label_is_described_by_its_path(tmp_path, tiny_vit_file):
    from prolip.backbones import BackboneInfo, load_backbone

    backbone = load_backbone("test-vit-tiny", str(tiny_vit_file))
    assert type(backbone.info) is BackboneInfo and "prolip-tiny" not in backbone.info.describe()


def test_untrained_token_rows_are_zero_and_captions_tokenise_within_the_context():
    import open_clip
    from safetensors.torch import load_file

    from prolip.tiny import SHIPPED_WEIGHTS, TINY_MODEL, caption_tokens, used_token_ids

    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    embedding = load_file(str(SHIPPED_WEIGHTS))["token_embedding.weight"]
    nonzero = torch.nonzero(embedding.abs().sum(dim=1)).flatten()
    assert torch.equal(nonzero, used_token_ids(tokenizer))
    tokens, _ = caption_tokens(tokenizer)
    assert (tokens[:, -1] == 0).all()  # every caption ends before the context does: nothing was truncated


def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    from click.testing import CliRunner

    from prolip.cli import main
    from prolip.tiny import TINY_LABEL

    runner = CliRunner()
    outputs = []
    for name in ("a", "b"):
        result = runner.invoke(main, ["pretrain-tiny", "--out", str(tmp_path / name), "--steps", "3"])
        assert result.exit_code == 0, result.output
        assert TINY_LABEL in result.output
        outputs.append((tmp_path / name / "prolip-tiny-vit.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


def test_adapts_exports_and_adapts_at_test_time_unchanged(tmp_path, tiny):
    """ProLIP, export and test-time adaptation run on prolip-tiny as on any CLIP (the site is visual.proj)."""
    from safetensors.torch import load_file

    from prolip import pipeline
    from prolip.data import read_image_folder
    from prolip.data.types import DatasetSplits
    from prolip.export import export_open_clip
    from prolip.features import FeatureCache
    from prolip.tiny import DIGIT_TEMPLATES, write_digit_folder
    from prolip.tta import tta_logits

    images = read_image_folder(write_digit_folder(tmp_path / "digits", "inverted"))
    splits = DatasetSplits("digits", images.classnames, DIGIT_TEMPLATES, train=images.subset(list(range(0, 500, 5))))
    cache = FeatureCache(tmp_path / "cache", tiny, progress=False)
    result = pipeline.fit(tiny, splits, cache, pipeline.FitConfig(shots=1, views=2, hyperparameters={"lr": 1e-2}))
    assert result.run.manifest["backbone"]["provenance"] == "prolip-tiny (trained in-house on digits, not OpenAI CLIP)"
    W = result.method.projection()
    assert not torch.equal(W, tiny.projection().weight)
    exported = export_open_clip(tiny, W, tmp_path / "adapted.safetensors")
    assert torch.equal(load_file(str(exported))["visual.proj"], W)
    task = result.episode.task
    logits = tta_logits(
        tiny, W, task.bias, task.classifier, task.logit_scale, [it.path for it in images.items[:3]], views=8
    )
    assert logits.shape == (3, 10)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("PROLIP_REGENERATE_TINY"),
    reason="regenerating the shipped weights takes about a minute; set PROLIP_REGENERATE_TINY=1",
)
def test_pretrain_tiny_regenerates_the_shipped_weights_bit_for_bit(tmp_path):
    from click.testing import CliRunner

    from prolip.cli import main
    from prolip.tiny import SHIPPED_WEIGHTS

    result = CliRunner().invoke(main, ["pretrain-tiny", "--out", str(tmp_path), "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / SHIPPED_WEIGHTS.name).read_bytes() == SHIPPED_WEIGHTS.read_bytes()
