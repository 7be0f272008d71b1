"""End to end through the `prolip` command: fit → predict → eval → export on a generated folder, tiny model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from prolip.cli import main

TINY = ["--model", "test-vit-tiny", "--pretrained", "none"]


def make_folder(root: Path, classes=("cat", "dog", "fox"), per_class=6, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((40, 40, 3)) + 60 * c
            img = (base + rng.integers(0, 80, (40, 40, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.jpg")
    return root


@pytest.fixture()
def folder(tmp_path):
    return make_folder(tmp_path / "imgs")


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def fit_args(folder, cache, out, *extra):
    return [
        "fit",
        "--data",
        folder,
        "--shots",
        2,
        "--views",
        3,
        "--steps",
        30,
        "--lr",
        1e-3,
        "--cache-dir",
        cache,
        "--out",
        out,
        *TINY,
        *extra,
    ]


def test_fit_predict_eval_export(folder, tmp_path):
    cache = tmp_path / "cache"
    r = invoke(*fit_args(folder, cache, tmp_path / "run", "--json"))
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["eval_images"] == 3 * (6 - 2)  # held-out images only
    assert 0 <= metrics["accuracy"] <= 100

    r = invoke("predict", tmp_path / "run", folder / "dog" / "0.jpg", folder / "cat" / "1.jpg", "--json", "-k", 2)
    assert r.exit_code == 0, r.output
    preds = json.loads(r.stdout)
    assert [p["image"] for p in preds] == [str(folder / "dog" / "0.jpg"), str(folder / "cat" / "1.jpg")]
    assert all(len(p["predictions"]) == 2 for p in preds)
    assert all(q["class"] in {"cat", "dog", "fox"} for p in preds for q in p["predictions"])

    r = invoke("eval", tmp_path / "run", "--data", folder, "--cache-dir", cache, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval_images"] == 18 - 3 * 2  # the run's support images are left out

    r = invoke("export", tmp_path / "run", "--out", tmp_path / "exported")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "exported" / "open_clip_model.safetensors").is_file()
    r = invoke("export", tmp_path / "run", "--out", tmp_path / "exported")
    assert r.exit_code != 0 and "--force" in r.output


def test_same_seed_same_numbers_and_cache_reuse(folder, tmp_path):
    from prolip import pipeline
    from prolip.backbones import load_backbone
    from prolip.data import resolve_data
    from prolip.features import FeatureCache

    backbone = load_backbone("test-vit-tiny", "none")
    splits = resolve_data(str(folder))
    cfg = pipeline.FitConfig(shots=2, views=3, hyperparameters={"steps": 30, "lr": 1e-3})
    first_cache = FeatureCache(tmp_path / "cache", backbone, progress=False)
    a = pipeline.fit(backbone, splits, first_cache, cfg)
    assert first_cache.stats.forward_passes > 0
    second_cache = FeatureCache(tmp_path / "cache", backbone, progress=False)
    b = pipeline.fit(backbone, splits, second_cache, cfg)
    assert second_cache.stats.forward_passes == 0  # everything came from the cache
    assert torch.equal(a.run.method_state["W"], b.run.method_state["W"])
    assert a.metrics["accuracy"] == b.metrics["accuracy"]
    c = pipeline.fit(
        backbone,
        splits,
        second_cache,
        pipeline.FitConfig(shots=2, views=3, seed=2, hyperparameters={"steps": 30, "lr": 1e-3}),
    )
    assert c.run.manifest["data"]["support"] != a.run.manifest["data"]["support"]


def test_zero_steps_is_zero_shot(folder, tmp_path):
    r = invoke(*fit_args(folder, tmp_path / "cache", tmp_path / "run", "--json"), "--steps", 0)
    # --steps given twice: click keeps the last
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["accuracy"] == metrics["zero_shot_accuracy"]


@pytest.mark.parametrize("case", ["missing", "too_many_shots", "zero_shots", "empty_class", "corrupt"])
def test_bad_input_names_the_culprit(folder, tmp_path, case):
    data, extra, expect = folder, [], None
    if case == "missing":
        data, expect = tmp_path / "nope", "nope"
    elif case == "too_many_shots":
        extra, expect = ["--shots", 50], "--allow-fewer"
    elif case == "zero_shots":
        extra, expect = ["--shots", 0], "--shots"
    elif case == "empty_class":
        (folder / "empty").mkdir()
        expect = "empty"
    elif case == "corrupt":
        for i in range(6):
            (folder / "fox" / f"{i}.jpg").write_bytes(b"not a jpeg at all")
        expect = "fox"
    r = invoke(*fit_args(data, tmp_path / "cache", tmp_path / "run"), *extra)
    assert r.exit_code != 0
    assert expect in r.output, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_existing_out_needs_force(folder, tmp_path):
    (tmp_path / "run").mkdir()
    r = invoke(*fit_args(folder, tmp_path / "cache", tmp_path / "run"))
    assert r.exit_code != 0 and "--force" in r.output


def test_unknown_pretrained_tag_fails_fast(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = invoke(
        "fit",
        "--data",
        folder,
        "--model",
        "test-vit-tiny",
        "--pretrained",
        "openai",
        "--out",
        tmp_path / "r",
        "--cache-dir",
        tmp_path / "c",
    )
    assert r.exit_code != 0
    assert "--pretrained" in r.output and "Traceback" not in r.output


def test_hf_backbone_fit_predict_export(folder, tmp_path, tiny_hf_dir):
    from transformers import CLIPModel

    from prolip.backbones import load_backbone
    from prolip.features import encode_images
    from prolip.functional import clip_logits
    from prolip.run import Run

    r = invoke(
        "fit",
        "--data",
        folder,
        "--shots",
        2,
        "--views",
        2,
        "--steps",
        20,
        "--lr",
        1e-3,
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "run",
        "--model",
        f"hf:{tiny_hf_dir}",
    )
    assert r.exit_code == 0, r.output
    r = invoke("predict", tmp_path / "run", folder / "fox" / "0.jpg", "--json")
    assert r.exit_code == 0, r.output
    r = invoke("export", tmp_path / "run", "--out", tmp_path / "hf_export")
    assert r.exit_code == 0, r.output
    run = Run.load(tmp_path / "run")
    exported = CLIPModel.from_pretrained(tmp_path / "hf_export").eval()
    W = run.method_state["W"]
    assert torch.allclose(exported.visual_projection.weight.detach().t(), W)
    backbone = load_backbone(f"hf:{tiny_hf_dir}", "none")
    z = encode_images(backbone, [folder / "fox" / "0.jpg", folder / "dog" / "1.jpg"])
    ours = clip_logits(z, W, None, run.classifier, float(run.manifest["logit_scale"]))
    assert torch.equal(ours.argmax(-1), run_method_logits(backbone, run, z).argmax(-1))


def run_method_logits(backbone, run, z):
    from prolip import pipeline

    return pipeline.method_from_run(backbone, run).logits(z)


def test_predict_names_a_non_image_file(folder, tmp_path):
    assert invoke(*fit_args(folder, tmp_path / "cache", tmp_path / "run")).exit_code == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    r = invoke("predict", tmp_path / "run", notes)
    assert r.exit_code != 0 and "notes.txt" in r.output and "Traceback" not in r.output


def test_val_folder_is_used_for_evaluation(folder, tmp_path):
    val = make_folder(tmp_path / "val", per_class=2, seed=5)
    r = invoke(*fit_args(folder, tmp_path / "cache", tmp_path / "run", "--json"), "--val", val)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval_images"] == 6


def test_validate_grid_and_reference_precision(folder, tmp_path):
    from prolip.run import Run

    make_folder(folder, per_class=8)  # 2 support + 2 validation + 4 held out per class
    r = invoke(*fit_args(folder, tmp_path / "cache", tmp_path / "grid", "--json"), "--validate")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval_images"] == 3 * 4  # validation images are not evaluated on
    selected = Run.load(tmp_path / "grid").manifest["method"]["selected"]
    assert selected and "lr" in json.dumps(selected)
    r = invoke(*fit_args(folder, tmp_path / "cache", tmp_path / "ref"), "--precision", "reference")
    assert r.exit_code == 0, r.output
    assert Run.load(tmp_path / "ref").manifest["method"]["hyperparameters"]["precision"] == "reference"


def test_eval_and_predict_with_tta(folder, tmp_path):
    assert invoke(*fit_args(folder, tmp_path / "cache", tmp_path / "run")).exit_code == 0
    plain = invoke("eval", tmp_path / "run", "--data", folder, "--cache-dir", tmp_path / "cache", "--json")
    r = invoke("eval", tmp_path / "run", "--data", folder, "--tta", "--tta-views", 10, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["tta"] is True and out["eval_images"] == json.loads(plain.stdout)["eval_images"] == 18 - 3 * 2
    r = invoke("predict", tmp_path / "run", folder / "cat" / "0.jpg", "--tta", "--tta-views", 10, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["predictions"][0]["class"] in {"cat", "dog", "fox"}


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_answers_help(command):
    """--help on each subcommand is click's own exit, never reported as a bug."""
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output, r.output
    assert "a bug in prolip" not in r.output
