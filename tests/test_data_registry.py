"""Datasets are registered by name (issue 21): a benchmark is one class, anywhere imported before use, and
tests/toy_dataset.py, written in the test folder alone, is read by name, by its folder and by `prolip fit`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from prolip.cli import main
from prolip.data import BENCHMARKS, TEMPLATES, Benchmark, DataError, paths_read, register_benchmark, resolve_data
from prolip.data.catalog import canonical_name
from toy_dataset import ToyShapes, write_toy_shapes  # noqa: E402  (tests/ is on sys.path, as for toy_tta)

BUILT_IN = ["Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101", "FGVCAircraft", "SUN397"]
BUILT_IN += ["DescribableTextures", "EuroSAT", "UCF101", "ImageNet", "ImageNetV2", "ImageNetSketch"]
BUILT_IN += ["ImageNetA", "ImageNetR"]


def test_the_built_in_benchmarks_are_registered_in_order_with_their_names():
    assert list(BENCHMARKS)[: len(BUILT_IN)] == BUILT_IN and BENCHMARKS["ToyShapes"] is ToyShapes
    assert TEMPLATES["ToyShapes"] == ["a toy photo of a {} square."]
    names = {"flowers102": "OxfordFlowers", "DTD": "DescribableTextures", "imagenet-r": "ImageNetR"}
    assert {n: canonical_name(n) for n in [*names, "Toy-Shapes", "toyshapes"]} == names | {
        "Toy-Shapes": "ToyShapes",
        "toyshapes": "ToyShapes",
    }
    with pytest.raises(DataError, match="unknown benchmark 'cifar11'; known: Caltech101, .*ToyShapes"):
        canonical_name("cifar11")


def test_a_taken_name_or_alias_is_refused_and_nothing_of_it_registered():
    for name, aliases, taken in [("imagenet", (), "imagenet"), ("Textures", ("textures", "DTD"), "dtd")]:
        attrs = {"name": name, "aliases": aliases, "folder": "another", "templates": ("a photo of a {}.",)}
        with pytest.raises(ValueError, match=f"a benchmark named {taken!r} is already registered"):
            register_benchmark(type("Another", (Benchmark,), attrs))
        with pytest.raises(DataError, match="unknown benchmark"):
            canonical_name("textures")  # an alias before the taken one: not registered either
    assert "Textures" not in BENCHMARKS
    assert register_benchmark(ToyShapes) is ToyShapes  # the same class again (its module reloaded) replaces itself
    with pytest.raises(ValueError, match="must declare its templates"):

        @register_benchmark
        class NoTemplates(Benchmark):
            name, folder = "NoTemplates", "none"


def test_a_dataset_from_one_file_is_read_by_name_and_by_its_folder(tmp_path):
    folder = write_toy_shapes(tmp_path)
    by_name = resolve_data("toy-shapes", root=tmp_path, cache_dir=tmp_path / "cache")
    assert (by_name.name, by_name.classnames, by_name.templates) == (
        "ToyShapes",
        ["blue", "green", "red"],
        ["a toy photo of a {} square."],
    )
    assert (len(by_name.train), len(by_name.test)) == (9, 6) and by_name.train.templates == by_name.templates
    by_folder = resolve_data(str(folder), cache_dir=tmp_path / "cache")
    assert [it.path for it in by_folder.test.items] == [it.path for it in by_name.test.items]
    assert paths_read("toy-shapes", root=tmp_path) == [folder]
    with pytest.raises(DataError, match="ToyShapes: dataset folder .*elsewhere/toy_shapes is missing"):
        resolve_data("ToyShapes", root=tmp_path / "elsewhere")


def test_prolip_fit_runs_on_a_dataset_from_one_file(tmp_path):
    write_toy_shapes(tmp_path)
    args = ["fit", "--data", "toy-shapes", "--data-root", tmp_path, "--shots", 1, "--views", 1, "--steps", 2]
    args += ["--cache-dir", tmp_path / "cache", "--out", tmp_path / "run", "--json"]
    args += ["--model", "test-vit-tiny", "--pretrained", "none"]
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval_images"] == 6  # its test split
    assert "a toy photo of a {} square." in (tmp_path / "run" / "templates.json").read_text()  # its own templates
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["data"]["name"] == "ToyShapes"
