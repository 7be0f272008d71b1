"""The library does what the CLI does: the front door (``import prolip``), saved runs that predict and evaluate
themselves, and the refusals that used to live only in the CLI (an emptied class, another class set, a split the
data lacks, a run scored on its own support images)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import prolip
from prolip.cli import main
from prolip.data import read_image_folder, resolve_data
from prolip.data.folder import DataError
from prolip.errors import ProlipError
from prolip.features import FeatureCache
from prolip.inference import eval_images, evaluate_run
from prolip.pipeline import FitConfig, fit
from prolip.run import RunError
from prolip.tta import TTAConfig

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = {"shots": 2, "views": 2, "hyperparameters": {"steps": 5}}


@pytest.fixture(scope="module")
def fitted(tiny_vit, tiny_image_folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("front_door_cache")
    result = prolip.fit(tiny_image_folder, tiny_vit, cache_dir=cache, **FAST)
    run_dir = tmp_path_factory.mktemp("front_door") / "run"
    result.run.save(run_dir)
    return result, run_dir, cache


def test_import_prolip_stays_light_and_lists_its_front_door():
    code = (
        "import sys, prolip; assert 'torch' not in sys.modules; print(sorted(set(dir(prolip)) & {'fit', 'load_run'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "['fit', 'load_run']"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        prolip.nope  # noqa: B018


def test_fit_refuses_an_option_it_does_not_take(tiny_vit, tiny_image_folder):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['shot'\]"):
        prolip.fit(tiny_image_folder, tiny_vit, shot=2)


def test_run_predict_is_what_the_cli_prints(fitted, tiny_image_folder):
    _, run_dir, _ = fitted
    images = sorted(tiny_image_folder.rglob("*.jpg"))[:3]
    run = prolip.load_run(run_dir)
    ours = run.predict(images, top_k=2)
    r = CliRunner().invoke(main, ["predict", str(run_dir), *map(str, images), "--top-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == ours
    assert [len(p["predictions"]) for p in ours] == [2, 2, 2]
    assert run.backbone() is run.backbone()  # loaded once per device


def test_run_predict_with_test_time_adaptation_changes_the_numbers_not_the_shape(fitted, tiny_image_folder):
    _, run_dir, _ = fitted
    image = sorted(tiny_image_folder.rglob("*.jpg"))[:1]
    run = prolip.load_run(run_dir)
    plain = run.predict(image, top_k=4)[0]["predictions"]
    adapted = run.predict(image, top_k=4, tta=TTAConfig(views=4, lr=1e-1))[0]["predictions"]
    assert {p["class"] for p in plain} == {p["class"] for p in adapted}
    assert [p["probability"] for p in plain] != [p["probability"] for p in adapted]


def test_evaluate_leaves_the_runs_own_images_out_and_matches_the_cli(fitted, tiny_image_folder, tmp_path):
    result, run_dir, cache = fitted
    report = prolip.evaluate(run_dir, tiny_image_folder, cache_dir=cache)
    support = len(result.run.manifest["data"]["support"])
    assert report["excluded_run_images"] == support == 8
    assert report["eval_images"] == 24 - support and "left out" in report["eval_set"]
    r = CliRunner().invoke(
        main, ["eval", str(run_dir), "--data", str(tiny_image_folder), "--cache-dir", str(cache), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == json.loads(json.dumps(report))


def test_evaluate_on_only_the_runs_own_images_is_refused(fitted, tiny_image_folder):
    _, run_dir, _ = fitted
    run = prolip.load_run(run_dir)
    splits = resolve_data(str(tiny_image_folder))
    run.manifest["data"]["validation"] = [[str(it.path), it.label] for it in splits.train.items]
    with pytest.raises(DataError, match="every image is one of the run's support or validation images") as e:
        eval_images(run, splits)
    assert e.value.option == "--data"


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_split_the_data_lacks_is_refused_by_name(fitted, tiny_image_folder, split):
    _, run_dir, _ = fitted
    with pytest.raises(DataError, match=rf"split '{split}': the data \(.*\) has no {split} split") as e:
        eval_images(prolip.load_run(run_dir), resolve_data(str(tiny_image_folder)), split)
    assert e.value.option == "--split" and isinstance(e.value, ProlipError)


def test_data_with_other_classes_is_refused_naming_them(fitted, tiny_image_folder, tmp_path):
    _, run_dir, _ = fitted
    other = tmp_path / "other"
    shutil.copytree(tiny_image_folder, other)
    first = sorted(p for p in other.iterdir())[0]
    first.rename(other / "zebra")
    with pytest.raises(DataError, match=r"classes differ from the run's .*not in the run: \['zebra'\]"):
        evaluate_run(prolip.load_run(run_dir), resolve_data(str(other)))


def test_evaluate_run_encodes_directly_without_a_cache(fitted, tiny_image_folder):
    _, run_dir, cache = fitted
    run = prolip.load_run(run_dir)
    splits = resolve_data(str(tiny_image_folder))
    direct = evaluate_run(run, splits)
    cached = evaluate_run(run, splits, cache=FeatureCache(cache, run.backbone()))
    assert direct["accuracy"] == cached["accuracy"] and direct["eval_images"] == cached["eval_images"]


def test_a_run_with_a_foreign_method_is_refused_for_test_time_adaptation(fitted, tiny_vit, tiny_image_folder, tmp_path):
    cache = fitted[2]
    result = prolip.fit(tiny_image_folder, tiny_vit, cache_dir=cache, method="tip-adapter", shots=2, views=2)
    with pytest.raises(RunError, match="test-time adaptation needs one"):
        result.run.predict(sorted(tiny_image_folder.rglob("*.jpg"))[:1], tta=TTAConfig(views=2), backbone=tiny_vit)


def _unreadable_class(tiny_image_folder, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_image_folder, data)
    victim = sorted(p for p in data.iterdir())[1]
    for image in victim.iterdir():
        image.write_bytes(b"not an image")
    return data


def test_fit_refuses_a_class_whose_every_support_image_was_skipped(tiny_vit, tiny_image_folder, tmp_path):
    data = _unreadable_class(tiny_image_folder, tmp_path)
    victim = sorted(p.name for p in data.iterdir())[1]
    cache = FeatureCache(tmp_path / "cache", tiny_vit, on_bad_image="skip")
    with pytest.raises(DataError, match=rf"class\(es\) \['{victim}'\] is unreadable .*silently drop the class"):
        fit(tiny_vit, resolve_data(str(data)), cache, FitConfig(**FAST))


def test_fit_refuses_evaluation_images_of_other_classes(tiny_vit, tiny_image_folder, tmp_path):
    other = tmp_path / "val"
    shutil.copytree(tiny_image_folder, other)
    sorted(p for p in other.iterdir())[0].rename(other / "zebra")
    cache = FeatureCache(tmp_path / "cache", tiny_vit)
    with pytest.raises(DataError, match=r"classes differ from the training classes .*zebra") as e:
        fit(
            tiny_vit,
            resolve_data(str(tiny_image_folder)),
            cache,
            FitConfig(**FAST),
            eval_images=read_image_folder(other),
        )
    assert e.value.option == "--val"


def test_the_readmes_python_section_runs_as_written(tiny_image_folder, tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"Python API.*?```python\n(.*?)```", text, re.S)
    assert block, "README.md has no Python API section"
    code = block.group(1)
    image = sorted(tiny_image_folder.rglob("*.jpg"))[0]
    # The tiny random-weights model and the test's folders stand in for CLIP and the user's data; each stand-in
    # must find what it replaces, so a README edit that drops one fails here rather than running something else.
    stand_ins = {
        '"ViT-B-16", "openai"': '"test-vit-tiny", "none"',
        '"path/to/folder"': repr(str(tiny_image_folder)),
        '"path/to/test-folder"': repr(str(tiny_image_folder)),
        "shots=16": "shots=2, views=2, hyperparameters={'steps': 5}",
        '"runs/mine"': repr(str(tmp_path / "runs" / "mine")),
        '"photo.jpg"': repr(str(image)),
    }
    for written, stand_in in stand_ins.items():
        assert written in code, f"the README's Python section no longer says {written}"
        code = code.replace(written, stand_in)
    monkeypatch.setenv("PROLIP_CACHE_DIR", str(tmp_path / "cache"))
    printed: list = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *a: printed.append(a)})  # noqa: S102
    accuracy, zero_shot = printed[0]
    assert 0 <= accuracy <= 100 and 0 <= zero_shot <= 100
    assert printed[1][0][0]["image"] == str(image) and len(printed[1][0][0]["predictions"]) == 3
    assert (tmp_path / "runs" / "mine" / "manifest.json").is_file()
    assert isinstance(printed[2][1], list) and torch.is_tensor(torch.tensor(printed[2][0]))
