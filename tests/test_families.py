"""Backbone families declare what they can do; the registry refuses duplicates; a family written in one file (here
``tests/toy_family.py``) is picked up by the front door, the CLI, saved runs, fine-tuning and export."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from prolip.backbones import (
    HF_CLIP,
    OPEN_CLIP,
    BackboneLoadError,
    family_named,
    load_backbone,
    load_backbone_for,
    register_family,
)
from prolip.cli import main
from prolip.image_training import image_encoder_parameters, last_layer_parameters
from toy_family import TOY  # noqa: E402  (tests/ is on sys.path: the suite's rootdir-relative imports)


def test_the_registry_refuses_a_second_family_of_a_name_or_prefix():
    with pytest.raises(ValueError, match="'open_clip' is already registered"):
        register_family(dataclasses.replace(OPEN_CLIP, prefix="other:"))
    with pytest.raises(ValueError, match="prefixed 'hf:' are already hf's"):
        register_family(dataclasses.replace(HF_CLIP, name="hf2"))
    with pytest.raises(ValueError, match="unknown backbone family 'nope'"):
        family_named("nope")
    with pytest.raises(BackboneLoadError, match="unknown backbone family 'nope'"):
        load_backbone_for({"family": "nope", "arch": "x", "weights": "none"})


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn", "tiny_hf"])
def test_a_backbone_is_rebuilt_from_its_info_by_its_family(fixture, request):
    backbone = request.getfixturevalue(fixture)
    again = load_backbone_for(vars(backbone.info))
    assert again.info.fingerprint == backbone.info.fingerprint and type(again) is type(backbone)
    assert backbone.family is family_named(backbone.info.family)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn", "tiny_hf"])
def test_trainable_blocks_come_from_the_family(fixture, request):
    backbone = request.getfixturevalue(fixture)
    image = image_encoder_parameters(backbone)
    last = last_layer_parameters(backbone)
    assert image and set(last) < set(image)
    assert all(n.startswith(backbone.family.image_prefixes) for n in image)
    assert backbone.projection().param_name in image
    # A ViT's last block stops before the projection; a ResNet's attention pool ends in it (Last_Layer_FT.py:53-55).
    assert (backbone.projection().param_name in last) == (fixture == "tiny_rn")


def test_a_family_from_one_file_runs_fit_predict_and_export(tmp_path, tiny_image_folder):
    backbone = load_backbone("toy:test-vit-tiny", "none")
    assert backbone.info.family == "toy" and backbone.family is TOY
    assert image_encoder_parameters(backbone) == image_encoder_parameters(load_backbone("test-vit-tiny", "none"))
    run = tmp_path / "run"
    args = ["fit", "--data", tiny_image_folder, "--shots", 2, "--views", 2, "--steps", 5]
    args += ["--model", "toy:test-vit-tiny", "--pretrained", "none", "--cache-dir", tmp_path / "c", "--out", run]
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["backbone"]["family"] == "toy"
    r = CliRunner().invoke(main, ["predict", str(run), str(next(tiny_image_folder.rglob("*.jpg"))), "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "exported")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "exported" / "open_clip_model.safetensors").is_file()  # the family's export format
