"""Bench protocols on dtd10 with the tiny random ViT: validation isolation, sensitivity sweep, base-to-new,
cross-dataset transfer, TTA, re-runs; and strict experiment validation."""

import json
import re
from pathlib import Path

import pytest
import torch

from prolip.bench.experiment import ExperimentError, load_experiment, parse_experiment
from prolip.bench.protocols import balanced_subset, harmonic_mean, run_experiment
from prolip.bench.records import append_record, read_records
from prolip.data.types import ImageItem, LabeledImages
from prolip.episode import EpisodeSpec, draw_images
from prolip.functional import accuracy, clip_logits

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _exp(dtd10_experiment, **kw):
    return parse_experiment(dtd10_experiment(**kw), "test.yaml")


def _run(exp, backbone):
    lines = []
    path = run_experiment(exp, echo=lines.append, backbone=backbone)
    return read_records(path), lines


# ------------------------------------------------------------------------------------------ experiment files


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_validates(path):
    exp = load_experiment(path)
    assert exp.datasets and exp.methods


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"tta": {"veiws": 3}}, r"test.yaml: tta: unknown key\(s\) \['veiws'\]"),
        ({"sensitivity": {"lrs": "1e-3"}}, r"test.yaml: sensitivity: 'lrs' must be a list of numbers"),
        ({"shots": [1, "4"]}, r"test.yaml: 'shots' must be a list of positive integers"),
        ({"seeds": True}, r"'seeds' must be a list of integers"),
        ({"protocol": "few-shot"}, r"'protocol' must be one of fewshot, fewshot-val"),
        ({"templates": ["no placeholder"]}, r"'templates' must be 'dataset', 'single' or a list"),
        ({"methods": [{"name": "prolip", "lrr": 1}]}, r"methods\[0\] \(prolip\): bad hyperparameters.*lrr"),
        ({"methods": ["prolip", {"name": "prolip", "lam": "1/N2"}]}, r"label\(s\) \['prolip'\] appear twice"),
        ({"methods": [{"nme": "prolip"}]}, r"methods\[0\]: each method is a name or a mapping with 'name'"),
        ({"protocol": "cross-dataset"}, r"cross-dataset needs 'targets'"),
        ({"protocol": "tta", "methods": ["linear-probe"]}, r"tta protocol adapts a projection .* not 'linear-probe'"),
        ({"protocol": "sensitivity", "methods": [{"name": "prolip", "lr": 1e-3}]}, r"sensitivity protocol sweeps"),
        ({"views": 0}, r"'views' must be >= 1, got 0"),
    ],
)
def test_experiment_errors_name_the_file_and_key(raw, message):
    base = {"datasets": ["dtd"], "methods": ["zeroshot"]}
    with pytest.raises(ExperimentError, match=message):
        parse_experiment({**base, **raw}, "test.yaml")


def test_overrides_reach_sections_and_are_validated():
    base = {"datasets": ["dtd"], "methods": ["zeroshot"], "protocol": "tta"}
    exp = parse_experiment(base, "t.yaml", {"tta.views": 8, "shots": [2]})
    assert exp.tta.views == 8 and exp.tta.ratio == 0.1 and exp.shots == [2]
    with pytest.raises(ExperimentError, match="t.yaml: tta: 'views' must be an integer"):
        parse_experiment(base, "t.yaml", {"tta.views": "many"})
    with pytest.raises(ExperimentError, match="only the 'sensitivity' and 'tta' sections"):
        parse_experiment(base, "t.yaml", {"model.name": "x"})


def test_load_experiment_reports_bad_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("datasets: [dtd\n")
    with pytest.raises(ExperimentError, match="bad.yaml: not valid YAML"):
        load_experiment(tmp_path / "bad.yaml")
    with pytest.raises(ExperimentError, match="does not exist"):
        load_experiment(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------ pure pieces


def test_episode_keeps_validation_away_from_test(shared_data):
    from prolip.data import resolve_data

    splits = resolve_data("dtd", root=shared_data / "dtd10")
    sets = draw_images(splits, EpisodeSpec(shots=4, seed=1, validation=True))
    test = {it.path for it in splits.test.items}
    val_split = {it.path for it in splits.val.items}
    assert len(sets.support) == 40 and len(sets.validation) == 40 and sets.evaluation is splits.test
    assert {it.path for it in sets.validation.items} <= val_split
    assert not {it.path for it in sets.validation.items} & test
    assert not {it.path for it in sets.support.items} & test


def test_balanced_subset_takes_classes_in_turn():
    items = [ImageItem(Path(f"{c}{i}.jpg"), c) for c in range(3) for i in range(5)]
    images = LabeledImages(items, ["a", "b", "c"])
    sub = balanced_subset(images, 7)
    assert len(sub) == 7 and sorted(sub.labels) == [0, 0, 0, 1, 1, 2, 2]
    assert balanced_subset(images, None) is images and balanced_subset(images, 99) is images


def test_append_after_a_truncated_line_keeps_the_new_record(tmp_path):
    record = lambda cell: {"cell": cell, "protocol": "fewshot", "dataset": "d", "label": "m", "method": "m", "shots": 1}
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(record("a")) + '\n{"cell": "b", "acc')
    append_record(path, {**record("c"), "accuracy": 1.0})
    assert [r["cell"] for r in read_records(path)] == ["a", "c"]


# ------------------------------------------------------------------------------------------ protocols


def test_validation_grid_sees_only_validation_images(tmp_path, shared_data, tiny_vit, monkeypatch, dtd10_experiment):
    from prolip.bench.protocols import Bench

    seen = []
    real_fit = Bench.fit

    def spy(self, m, hp, episode, seed):
        method, seconds = real_fit(self, m, hp, episode, seed)
        seen.append((m.name, hp, episode.validation, method))
        return method, seconds

    monkeypatch.setattr(Bench, "fit", spy)
    exp = _exp(dtd10_experiment, protocol="fewshot-val", methods=[{"name": "prolip", "steps": 3}])
    records, _ = _run(exp, tiny_vit)
    ((name, hp, val, method),) = seen
    assert hp["grid"] is True and records[0]["validation"] is True
    assert len(method.selected_["grid"]) == 49 and method.selected_["how"] == "validation"

    from prolip.data import resolve_data
    from prolip.features import FeatureCache

    splits = resolve_data("dtd", root=shared_data / "dtd10")
    sets = draw_images(splits, EpisodeSpec(shots=1, seed=1, validation=True))
    cache = FeatureCache(tmp_path / "cache", tiny_vit, progress=False)
    assert torch.equal(val.features, cache.center([it.path for it in sets.validation.items]).features)
    assert val.labels.tolist() == sets.validation.labels
    # The selection is the best validation accuracy, recomputed here from validation data alone.
    best = max(g["val_accuracy"] for g in method.selected_["grid"])
    assert method.selected_["val_accuracy"] == best
    assert accuracy(method.logits(val.features), val.labels) == pytest.approx(best, abs=1e-4)
    z_test = cache.center([it.path for it in splits.test.items]).features
    assert records[0]["accuracy"] == pytest.approx(accuracy(method.logits(z_test), torch.tensor(splits.test.labels)))


def test_sensitivity_sweep_matches_single_runs(tiny_vit, dtd10_experiment):
    from prolip.methods import create

    exp = _exp(
        dtd10_experiment,
        protocol="sensitivity",
        methods=[{"name": "prolip", "steps": 4}],
        sensitivity={"lrs": [1e-4, 1e-1], "lams": [0.0, 1.0]},
    )
    records, lines = _run(exp, tiny_vit)
    assert sorted((r["hyperparameters"]["lr"], r["hyperparameters"]["lam"]) for r in records) == [
        (1e-4, 0.0),
        (1e-4, 1.0),
        (1e-1, 0.0),
        (1e-1, 1.0),
    ]
    assert len({r["cell"] for r in records}) == 4
    assert any("lr 0.1 λ 0.0" in line for line in lines)  # progress lines name the sweep point

    # The batched point (lr 1e-1, λ 0) equals a ProLIP trained alone with that lr and λ.
    from prolip.bench.protocols import Bench

    b = Bench(exp, echo=lambda s: None, backbone=tiny_vit)
    episode = b.episode(b.splits("dtd"), 1, 1)
    alone = create("prolip", lr=1e-1, lam=0.0, steps=4).fit(episode.task, episode.support)
    ev = episode.evaluation
    point = next(r for r in records if r["hyperparameters"]["lr"] == 1e-1 and r["hyperparameters"]["lam"] == 0.0)
    assert point["accuracy"] == pytest.approx(accuracy(alone.logits(ev.features), ev.labels))
    assert b.cache.stats.forward_passes == 0  # everything above came from the shared cache


def test_base2new_uses_each_side_its_own_classifier(tiny_vit, dtd10_experiment):
    exp = _exp(
        dtd10_experiment,
        protocol="base2new",
        shots=[2],
        methods=["zeroshot", {"name": "prolip", "steps": 5, "lr": 1e-2}, "linear-probe"],
    )
    records, _ = _run(exp, tiny_vit)
    by = {r["method"]: r for r in records}
    from prolip.bench.protocols import Bench
    from prolip.episode import restrict_splits

    b = Bench(exp, echo=lambda s: None, backbone=tiny_vit)
    splits = b.splits("dtd")
    base, new = restrict_splits(splits, list(range(5))), restrict_splits(splits, list(range(5, 10)))
    task = b.builder.task(base.classnames, splits.templates, 2)
    for part, key in ((base, "base"), (new, "new")):
        ev = b.builder.center(part.test)
        T = b.builder.classifier(part.classnames, splits.templates)
        assert set(ev.labels.tolist()) == set(range(5)) and T.shape[0] == 5
        zero_shot = clip_logits(ev.features, task.W0, task.bias, T, task.logit_scale)
        assert by["zeroshot"][key] == pytest.approx(accuracy(zero_shot, ev.labels))
    assert by["prolip"]["hm"] == pytest.approx(harmonic_mean(by["prolip"]["base"], by["prolip"]["new"]))
    assert by["prolip"]["accuracy"] == by["prolip"]["hm"]
    assert by["linear-probe"]["new"] is None and "cannot score" in by["linear-probe"]["note"]
    assert by["linear-probe"]["base"] is not None


def test_base2new_samples_all_classes_then_keeps_the_base_ones(shared_data):
    # As the reference: the draws over all classes decide the base support (and validation) images.
    from prolip.data import resolve_data

    splits = resolve_data("dtd", root=shared_data / "dtd10")
    full = draw_images(splits, EpisodeSpec(shots=2, seed=3, validation=True))
    base = draw_images(splits, EpisodeSpec(shots=2, seed=3, validation=True, classes=(0, 1, 2, 3, 4)))
    keep = lambda images: [str(it.path) for it in images.items if it.label < 5]
    assert [str(it.path) for it in base.support.items] == keep(full.support)
    assert [str(it.path) for it in base.validation.items] == keep(full.validation)
    assert set(base.support.labels) == set(range(5))


def test_cross_dataset_evaluates_targets_with_their_classifiers(shared_data, tiny_vit, dtd10_experiment):
    target = str(shared_data / "cifar10-sample")
    exp = _exp(
        dtd10_experiment,
        protocol="cross-dataset",
        targets=[target],
        methods=["zeroshot", {"name": "prolip", "steps": 3}, "tip-adapter"],
    )
    records, _ = _run(exp, tiny_vit)
    assert len(records) == 6 and {r["source"] for r in records} == {"DescribableTextures"}
    cifar = {r["method"]: r for r in records if r["dataset"] != "DescribableTextures"}
    assert cifar["tip-adapter"]["accuracy"] is None and cifar["zeroshot"]["num_classes"] == 10
    assert cifar["zeroshot"]["eval_images"] == 1000

    from prolip.bench.protocols import Bench

    b = Bench(exp, echo=lambda s: None, backbone=tiny_vit)
    splits = b.splits(target)
    ev = b.builder.center(splits.train)
    task = b.builder.task(splits.classnames, splits.templates, 1)
    assert cifar["zeroshot"]["accuracy"] == pytest.approx(
        accuracy(clip_logits(ev.features, task.W0, task.bias, task.classifier, task.logit_scale), ev.labels)
    )


def test_tta_protocol_and_rerun_skips_everything(tiny_vit, dtd10_experiment):
    exp = _exp(
        dtd10_experiment,
        protocol="tta",
        methods=["zeroshot", {"name": "prolip", "steps": 3}],
        tta={"views": 3, "max_images": 6, "ensemble": True},
    )
    records, _ = _run(exp, tiny_vit)
    labels = sorted(r["label"] for r in records)
    assert labels == ["ensemble", "tta+prolip", "tta+zeroshot"]
    assert all(r["eval_images"] == 6 and 0 <= r["accuracy"] <= 100 for r in records)
    zs = next(r for r in records if r["label"] == "tta+zeroshot")
    assert zs["shots"] == 0 and zs["setting"]["tta"]["views"] == 3
    again, lines = _run(exp, tiny_vit)
    assert len(again) == 3 and lines[-1].startswith("0 cells run, 3 already done")


def test_fewshot_rerun_does_no_forward_passes_and_new_cells_reuse_features(tiny_vit, dtd10_experiment):
    exp = _exp(dtd10_experiment, methods=["zeroshot", {"name": "prolip", "steps": 3}])
    records, lines = _run(exp, tiny_vit)
    assert len(records) == 2 and not re.search(r"\b0 forward passes", lines[-1])
    records, lines = _run(exp, tiny_vit)
    assert len(records) == 2 and "0 cells run, 2 already done" in lines[-1]
    assert re.search(r"cache: 0 forward passes", lines[-1])
    # A new method on the same support set: trained and recorded, with every feature read back from the cache.
    exp2 = _exp(dtd10_experiment, methods=["zeroshot", {"name": "prolip", "steps": 3}, "lp++"])
    records, lines = _run(exp2, tiny_vit)
    assert len(records) == 3 and "1 cells run, 2 already done" in lines[-1]
    assert re.search(r"cache: 0 forward passes", lines[-1])


def test_same_seed_same_numbers_in_a_fresh_results_folder(tmp_path, tiny_vit, dtd10_experiment):
    methods = [{"name": "prolip", "steps": 3, "lr": 1e-2}, "linear-probe", "tip-adapter-f"]
    first, _ = _run(_exp(dtd10_experiment, methods=methods, seeds=[1, 2]), tiny_vit)
    second, _ = _run(_exp(dtd10_experiment, methods=methods, seeds=[1, 2], out=str(tmp_path / "again")), tiny_vit)
    key = lambda r: (r["label"], r["seed"])
    assert [(key(r), r["cell"], r["accuracy"]) for r in sorted(first, key=key)] == [
        (key(r), r["cell"], r["accuracy"]) for r in sorted(second, key=key)
    ]
    assert len({r["cell"] for r in first}) == 6


def test_bench_cli_errors_are_one_clear_line(tmp_path):
    from click.testing import CliRunner

    from prolip.cli import main

    bad = tmp_path / "exp.yaml"
    bad.write_text("datasets: [dtd]\nmethods: [zeroshot]\nseed: [1]\n")
    r = CliRunner().invoke(main, ["bench", str(bad)])
    assert r.exit_code == 1 and f"{bad}: unknown key(s) ['seed']" in r.output and "Traceback" not in r.output
    bad.write_text("datasets: [dtd]\nmethods: [zeroshot]\nmodel: test-vit-tiny\n")
    r = CliRunner().invoke(
        main,
        ["bench", str(bad), "--set", f"pretrained={tmp_path / 'missing.safetensors'}", "--out", str(tmp_path / "res")],
    )
    assert r.exit_code == 1 and "missing.safetensors" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["bench", str(bad), "--set", "shots"])
    assert r.exit_code == 2 and "expected key=value" in r.output
