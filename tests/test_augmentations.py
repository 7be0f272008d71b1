"""Methods train on the augmented views their originals used: ProLIP's RandomResizedCrop(0.5–1) for the ProLIP
family, Tip-Adapter and LP++; Dassl's (0.08–1) for CLIP-Adapter, TaskRes and ZS-LP/CLAP. Each kind of view lives in
its own cache namespace, and the reference's keep their old one."""

from __future__ import annotations

import json

import pytest
import torch

from prolip.episode import EpisodeBuilder, EpisodeSpec
from prolip.features import FeatureCache
from prolip.methods import create, method_class
from prolip.transforms import AUGMENTATIONS, augment_transform


def test_the_two_augmentations_crop_as_declared(tiny_vit):
    prep = tiny_vit.preprocessing
    assert augment_transform(prep).scale == (0.5, 1.0) and augment_transform(prep, "dassl").scale == (0.08, 1.0)
    assert set(AUGMENTATIONS) == {"prolip", "dassl"}
    with pytest.raises(ValueError, match="unknown augmentation 'rand'"):
        augment_transform(prep, "rand")
    assert {
        m: method_class(m).capabilities.augmentation for m in ("clip-adapter", "taskres", "zs-lp", "clap")
    } == dict.fromkeys(("clip-adapter", "taskres", "zs-lp", "clap"), "dassl")
    assert (
        method_class("prolip").capabilities.augmentation
        == method_class("tip-adapter-f").capabilities.augmentation
        == "prolip"
    )


def test_dassl_views_have_their_own_namespace_and_the_reference_keeps_its_own(tiny_vit, tiny_image_folder, tmp_path):
    cache = FeatureCache(tmp_path, tiny_vit, progress=False)
    paths = sorted(tiny_image_folder.glob("*/*.jpg"))[:4]
    prolip = cache.views(paths, 3).to_tensor()
    dassl = cache.views(paths, 3, augmentation="dassl").to_tensor()
    assert not torch.equal(prolip, dassl)
    namespaces = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert cache.namespace_dir("augment", 0).name in namespaces
    assert cache.namespace_dir("augment", 0, "dassl").name in namespaces
    # the reference's namespace is named as before this option existed
    assert cache.namespace_dir("augment", 0) == cache.namespace_dir("augment", 0, "prolip")


def test_an_episode_gives_each_method_its_views(tiny_vit, tiny_image_folder, tmp_path):
    from prolip.data import resolve_data

    builder = EpisodeBuilder(tiny_vit, FeatureCache(tmp_path, tiny_vit, progress=False))
    episode = builder.build(resolve_data(str(tiny_image_folder)), EpisodeSpec(shots=2, seed=1, views=2))
    taskres, prolip = create("taskres"), create("prolip")
    assert episode.support_for(prolip) is episode.support
    dassl = episode.support_for(taskres)
    assert dassl is episode.support_for(taskres) and torch.equal(dassl.labels, episode.support.labels)
    assert not torch.equal(dassl.views.view(0), episode.support.views.view(0))


def test_a_run_records_the_views_it_trained_on(tiny_image_folder, tmp_path):
    from click.testing import CliRunner

    from prolip.cli import main

    r = CliRunner().invoke(
        main,
        [
            "fit",
            "--data",
            str(tiny_image_folder),
            "--shots",
            "2",
            "--views",
            "2",
            "--method",
            "taskres",
            "--hp",
            "epochs=2",
            "--model",
            "test-vit-tiny",
            "--pretrained",
            "none",
            "--cache-dir",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "run"),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["data"]["augmentation"] == "dassl"


def augmentation_literals(source: str) -> list[int]:
    """Lines where an ``augmentation`` argument default, field or assignment is a string literal."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        pairs = []
        if isinstance(node, ast.arguments):
            args = [*node.posonlyargs, *node.args]
            pairs += list(zip(args[len(args) - len(node.defaults) :], node.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True) if d is not None]
            pairs = [(a.arg, d) for a, d in pairs]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            pairs = [(node.target.id, node.value)]
        found += [v.lineno for name, v in pairs if name == "augmentation" and isinstance(v, ast.Constant) and v.value]
    return found


def test_the_default_augmentation_is_declared_once():
    from pathlib import Path

    import prolip

    assert augmentation_literals('def f(x, augmentation: str = "prolip"): ...\nclass C:\n    augmentation: str = "x"\n')
    src = Path(prolip.__file__).parent
    offenders = {
        str(p.relative_to(src)): lines for p in src.rglob("*.py") if (lines := augmentation_literals(p.read_text()))
    }
    assert not offenders, f"write prolip.transforms.DEFAULT_AUGMENTATION, not a literal: {offenders}"
