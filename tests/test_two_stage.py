"""2SFS on the tiny random models and real JPEGs: stage 1 tunes the LayerNorms inside the blocks of both towers and
nothing else; the budget splits at int(M·K·α) and stage 2 goes on from the next epoch; stage 2 starts from the
normalised one-prompt embeddings of the tuned text encoder; a pipeline fit saves, reloads, predicts the same and
exports as a plain open_clip checkpoint; the Method contract holds; the original's published JSONL splits read onto
prolip's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import prolip.methods.two_stage as two_stage
from prolip.constraints import HyperparameterError
from prolip.data import DataError
from prolip.data.fewshot_jsonl import read_jsonl, read_split, split_files, support_images
from prolip.data.types import DatasetSplits, ImageItem, LabeledImages
from prolip.image_training import encoder_logits, model_parameters, step_lr, training_steps
from prolip.methods import check_method, configure, create, method_class
from prolip.methods.lora import one_prompt_classifier
from prolip.methods.two_stage import layer_norm_parameters, stage_iterations
from test_lora import CLASSES, episode

# 2 shots: 5 × 2 = 10 iterations over 8 images in batches of 3 (3 a epoch): stage 1 int(10 · 0.6) = 6 (epochs 0-1)
FAST = {"steps": 5, "batch_size": 3, "lr": 1e-2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_stage_one_tunes_the_block_layer_norms_of_both_towers_only(tiny_vit, tiny_hf, tiny_image_folder):
    names = layer_norm_parameters(tiny_vit, "both")
    vision, text = tiny_vit.model.visual.transformer.resblocks, tiny_vit.model.transformer.resblocks
    expected = [
        f"transformer.resblocks.{i}.ln_{k}.{p}" for i in range(len(text)) for k in (1, 2) for p in ("weight", "bias")
    ]
    expected += [
        f"visual.transformer.resblocks.{i}.ln_{k}.{p}"
        for i in range(len(vision))
        for k in (1, 2)
        for p in ("weight", "bias")
    ]
    assert names == expected  # ln_pre, ln_post, ln_final stay frozen (model_utils.py's second visit)
    width_v, width_t = vision[0].ln_1.weight.numel(), text[0].ln_1.weight.numel()
    count = 4 * (len(vision) * width_v + len(text) * width_t)
    params = model_parameters(tiny_vit)
    assert sum(params[n].numel() for n in names) == count
    assert layer_norm_parameters(tiny_vit, "vision", vision_start=1) == expected[-4:]
    hf = layer_norm_parameters(tiny_hf, "both")
    assert hf and all(".layer_norm" in n for n in hf) and not any("pre_layrnorm" in n or "final" in n for n in hf)

    task, support = episode(tiny_vit, tiny_image_folder)
    m = create("2sfs", **FAST).fit(task, support, seed=1)
    adapted, frozen = model_parameters(m.adapted), model_parameters(tiny_vit)
    moved = [n for n in frozen if not torch.equal(adapted[n], frozen[n])]
    assert sorted(moved) == sorted(names)  # every tuned LayerNorm tensor moved, nothing else did
    assert m.trainable_parameters() == count + len(CLASSES) * task.W0.shape[1]
    assert m.selected_["tuned_layer_norm_tensors"] == len(names)


def test_the_budget_splits_where_the_original_puts_it(tiny_vit, tiny_image_folder, monkeypatch):
    assert stage_iterations(300, 16, 0.6) == (2880, 1920)  # twostage.py:261-262, 296 (M = 300, α = 0.6)
    assert stage_iterations(300, 1, 0.6) == (180, 120)
    seen = []
    real = two_stage.train_image_encoder

    def spy(backbone, choose, paths, labels, classifier, scale, settings, adapt=None):
        seen.append((settings, list(choose(backbone)), adapt is not None))
        return real(backbone, choose, paths, labels, classifier, scale, settings, adapt=adapt)

    monkeypatch.setattr(two_stage, "train_image_encoder", spy)
    task, support = episode(tiny_vit, tiny_image_folder)
    m = create("2sfs", **FAST).fit(task, support, seed=1)
    (s1, chosen1, head1), (s2, chosen2, head2) = seen
    assert (s1.iterations, s1.first_epoch, s2.iterations, s2.first_epoch) == (6, 0, 4, 2)
    assert chosen1 == layer_norm_parameters(tiny_vit, "both") and not head1  # stage 1: the LayerNorms
    assert chosen2 == [] and head2  # stage 2: nothing of the model, the classifier only
    assert (m.selected_["stage1_iterations"], m.selected_["stage2_iterations"]) == (6, 4)
    # Stage 2 is the same run's epochs 2-3: the batches a 10-step run would have had there.
    whole = training_steps(8, type(s1)(**{**vars(s1), "iterations": 12}))
    steps2 = training_steps(8, s2)
    assert [e for e, _ in steps2] == [2, 2, 2, 3]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(steps2, whole[6:], strict=False))
    # Each stage its own cosine from lr to 1e-6 (twostage.py:263, 297); AdamW with weight decay 1e-2 in both.
    assert step_lr(s2, 0, 4) == pytest.approx(1e-2) and step_lr(s1, 0, 6) == pytest.approx(1e-2)
    assert (s1.optimizer, s1.weight_decay, s1.min_lr, s2.weight_decay) == ("adamw", 1e-2, 1e-6, 1e-2)
    assert m.forward_passes() == 3 + 3 + 2 + 3 + 3 + 2 + 3 + 3 + 2 + 3 + 4 * (6 + 1)


def test_stage_two_starts_from_the_tuned_text_embeddings(tiny_vit, tiny_image_folder):
    task, support = episode(tiny_vit, tiny_image_folder)
    only1 = create("2sfs", **FAST, stage1_fraction=1.0).fit(task, support, seed=1)  # no stage-2 step: its init
    with torch.no_grad():
        init = one_prompt_classifier(only1.adapted, CLASSES, "a photo of a {}.")
    torch.testing.assert_close(only1.classifier, init)
    assert torch.allclose(only1.classifier.norm(dim=-1), torch.ones(len(CLASSES)))
    frozen = one_prompt_classifier(tiny_vit, CLASSES, "a photo of a {}.").detach()
    assert not torch.allclose(init, frozen, atol=1e-4)  # the tuned text encoder's, not the frozen one's
    both = create("2sfs", **FAST).fit(task, support, seed=1)
    assert not torch.allclose(both.classifier, only1.classifier, atol=1e-4)  # stage 2 trained it


def test_fit_save_reload_predict_and_export(tiny_vit, tiny_image_folder, tmp_path):
    import open_clip

    from prolip import pipeline
    from prolip.data import resolve_data
    from prolip.export import export_open_clip
    from prolip.features import FeatureCache
    from prolip.run import Run

    before = {k: v.clone() for k, v in tiny_vit.model.state_dict().items()}
    splits = resolve_data(str(tiny_image_folder))
    config = pipeline.FitConfig(shots=2, views=1, method="2sfs", hyperparameters=FAST)
    result = pipeline.fit(tiny_vit, splits, FeatureCache(tmp_path / "cache", tiny_vit, progress=False), config)
    assert all(torch.equal(v, before[k]) for k, v in tiny_vit.model.state_dict().items())  # the frozen one intact
    result.run.save(tmp_path / "run")
    loaded = pipeline.method_from_run(tiny_vit, Run.load(tmp_path / "run"))
    paths = sorted(tiny_image_folder.rglob("*.jpg"))
    logits = result.method.image_logits(paths)
    assert torch.equal(loaded.image_logits(paths), logits)

    path = export_open_clip(tiny_vit, loaded.checkpoint_tensors(tiny_vit), tmp_path / "export.safetensors")
    plain = type(tiny_vit)(open_clip.create_model(tiny_vit.info.arch, pretrained=str(path)).eval(), tiny_vit.info)
    got = encoder_logits(plain, paths, loaded.classifier_head(), loaded.task.logit_scale)
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="class names"):
        loaded.image_logits(paths, classifier=loaded.task.classifier)


def test_defaults_are_the_originals_and_the_contract_holds(tiny_rn, tiny_image_folder):
    m = create("2sfs")
    assert (m.encoder, m.vision_start, m.text_start, m.template) == ("both", 0, 0, "a photo of a {}.")
    assert (m.lr, m.weight_decay, m.batch_size, m.steps, m.stage1_fraction, m.min_lr) == (
        2e-4,
        1e-2,
        32,
        300,
        0.6,
        1e-6,
    )
    assert configure("2sfs", {}, dataset="ImageNet").template == "a photo of a {}."  # fixed across datasets
    assert m.capabilities.encodes_images and not m.capabilities.selects and not m.capabilities.accepts_classifier
    assert check_method(method_class("2sfs")) == ["declaration"]
    with pytest.raises(HyperparameterError):
        create("2sfs", stage1_fraction=1.5)
    task, support = episode(tiny_rn, tiny_image_folder)
    with pytest.raises(HyperparameterError, match="encoder: text"):
        create("2sfs", **FAST).fit(task, support)


# ----------------------------------------------------------------------------------------------- published splits


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def datum(rel, label, name):
    return {"_impath": rel, "_label": label, "_domain": -1, "_classname": name}


def test_the_published_split_files_read_onto_prolips_images(tiny_image_folder, tmp_path):
    train = [ImageItem(tiny_image_folder / c / f"{i}.jpg", y) for y, c in enumerate(CLASSES) for i in range(4)]
    val = [ImageItem(tiny_image_folder / c / f"{i}.jpg", y) for y, c in enumerate(CLASSES) for i in (4, 5)]
    mk = lambda items: LabeledImages(items, CLASSES, ["a photo of a {}."], "tiny")  # noqa: E731
    splits = DatasetSplits("tiny", CLASSES, ["a photo of a {}."], mk(train), mk(val), None)
    root = tmp_path / "tiny"
    # Relative to the datasets root as the original writes them, one absolute, one repeated (a short class).
    rows = [datum(f"tiny/{c}/{i}.jpg", y, c) for y, c in enumerate(CLASSES) for i in (2, 0)]
    rows[1]["_impath"] = str(tiny_image_folder / "red" / "0.jpg")
    rows[-1] = rows[-2]
    train_file = jsonl(root / "split_fewshot" / "shot_2-seed_3_train.jsonl", rows)
    val_file = jsonl(
        root / "split_fewshot" / "shot_2-seed_3_val.jsonl", [datum(f"x/{c}/5.jpg", y, c) for y, c in enumerate(CLASSES)]
    )
    assert split_files(root, 2, 3) == (train_file, val_file) and split_files(root, 4, 1)[1] is None
    assert read_jsonl(train_file)[0] == ("tiny/red/2.jpg", 0, "red")

    split = read_split(splits, train_file, val_file)
    assert (split.convention, split.shots, split.seed, split.val_from) == ("2sfs", 2, 3, "val")
    assert split.train_indices == [2, 0, 6, 4, 10, 8, 14, 14]
    assert split.val_indices == [1, 3, 5, 7]
    support, validation = support_images(splits, split)
    assert [it.path for it in support.items][:2] == [
        tiny_image_folder / "red" / "2.jpg",
        tiny_image_folder / "red" / "0.jpg",
    ]
    assert support.labels == [0, 0, 1, 1, 2, 2, 3, 3] and validation is not None and validation.labels == [0, 1, 2, 3]

    other = jsonl(tmp_path / "mine.jsonl", [datum("red/1.jpg", 0, "red")])
    assert (read_split(splits, other).shots, read_split(splits, other).seed) == (1, 0)
    with pytest.raises(DataError, match="prolip reads"):
        read_split(splits, jsonl(tmp_path / "bad.jsonl", [datum("red/1.jpg", 2, "blue")]))
    with pytest.raises(DataError, match="no image"):
        read_split(splits, jsonl(tmp_path / "missing.jsonl", [datum("red/9.jpg", 0, "red")]))
    with pytest.raises(DataError, match="equally well"):
        read_split(splits, jsonl(tmp_path / "ambiguous.jsonl", [datum("1.jpg", 0, "red")]))
    (tmp_path / "broken.jsonl").write_text('{"_impath": "red/1.jpg", "_label": 0}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(tmp_path / "broken.jsonl")


def test_a_split_trains_2sfs_on_exactly_its_images(tiny_vit, tiny_image_folder, tmp_path):
    """The support a split file names is the support the method trains on (the images, in the file's order)."""
    train = [ImageItem(tiny_image_folder / c / f"{i}.jpg", y) for y, c in enumerate(CLASSES) for i in range(6)]
    splits = DatasetSplits("tiny", CLASSES, ["a photo of a {}."], LabeledImages(train, CLASSES), None, None)
    rows = [datum(f"{c}/{i}.jpg", y, c) for y, c in enumerate(CLASSES) for i in (5, 3)]
    support, _ = support_images(splits, read_split(splits, jsonl(tmp_path / "shot_2-seed_1_train.jsonl", rows)))
    task, base = episode(tiny_vit, tiny_image_folder)
    from dataclasses import replace

    m = create("2sfs", **{**FAST, "steps": 1}).fit(task, replace(base, images=support), seed=1)
    assert m.selected_["stage1_iterations"] == 1 and F.normalize(m.classifier, dim=-1).shape == (4, task.W0.shape[1])


def test_the_exported_head_is_the_one_the_run_predicts_with(tiny_vit, tiny_image_folder, tmp_path, monkeypatch):
    """`prolip export` writes the method's own head (2SFS: the stage-2 classifier) beside the checkpoint, so the
    checkpoint and its head give the run's predictions; a method without one keeps the zero-shot head."""
    from prolip import inference, pipeline
    from prolip.data import resolve_data
    from prolip.export import load_classifier_head
    from prolip.features import FeatureCache
    from prolip.run import Run

    splits = resolve_data(str(tiny_image_folder))
    cache = FeatureCache(tmp_path / "cache", tiny_vit, progress=False)
    for method, hp in (("2sfs", FAST), ("prolip", {"steps": 2})):
        config = pipeline.FitConfig(shots=2, views=1, method=method, hyperparameters=hp)
        pipeline.fit(tiny_vit, splits, cache, config).run.save(tmp_path / method)
        run = Run.load(tmp_path / method)
        fitted = inference.method_from_run(tiny_vit, run)
        head, classnames, templates = inference.export_head(fitted, run)
        expected = fitted.classifier_head() if method == "2sfs" else run.classifier
        assert torch.equal(head, expected) and classnames == run.classnames
        assert templates == (["a photo of a {}."] if method == "2sfs" else run.templates)
    monkeypatch.setattr(inference, "backbone_for", lambda run, device="cpu": tiny_vit, raising=False)
    written, _, _ = load_classifier_head(_export(tmp_path / "2sfs", tmp_path / "export", tiny_vit, monkeypatch))
    assert torch.equal(written, inference.method_from_run(tiny_vit, Run.load(tmp_path / "2sfs")).classifier_head())


def _export(run_dir, out, backbone, monkeypatch):
    from click.testing import CliRunner

    import prolip.cli.export as export_cli
    from prolip.cli import main

    monkeypatch.setattr(export_cli, "backbone_for_run", lambda run, device: backbone)
    r = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_fit_with_a_split_file_trains_on_the_very_images_it_names(tiny_image_folder, tmp_path):
    """`prolip fit --split-file` draws no support set: it trains on the images the published split names, records
    the file, and refuses a --shots the file does not hold in one line."""
    from click.testing import CliRunner

    from prolip.cli import main

    names = sorted(p.name for p in tiny_image_folder.iterdir())
    rows = [datum(f"tiny/{c}/{i}.jpg", y, c) for y, c in enumerate(names) for i in (5, 3)]
    split = jsonl(tmp_path / "split_fewshot" / "shot_2-seed_7_train.jsonl", rows)
    args = ["fit", "--data", str(tiny_image_folder), "--split-file", str(split), "--views", "1", "--steps", "2"]
    args += ["--model", "test-vit-tiny", "--pretrained", "none", "--cache-dir", str(tmp_path / "cache")]
    r = CliRunner().invoke(main, [*args, "--shots", "2", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    support = [(Path(p).parent.name, Path(p).name, label) for p, label in manifest["data"]["support"]]
    assert manifest["fit"]["split_file"] == str(split)
    assert sorted(support) == sorted((c, f"{i}.jpg", y) for y, c in enumerate(names) for i in (5, 3))
    r = CliRunner().invoke(main, [*args, "--shots", "4", "--out", str(tmp_path / "other")])
    assert r.exit_code != 0 and "is a 2-shot split, not 4-shot: pass --shots 2" in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("Error:")]) == 1
