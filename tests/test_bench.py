"""`prolip bench` and `prolip report` on dtd10 with a tiny random model; experiment validation; base-to-new maths."""

import json
import re

import pytest
import yaml
from click.testing import CliRunner

from prolip.bench.experiment import ExperimentError, parse_experiment
from prolip.bench.protocols import harmonic_mean
from prolip.bench.records import read_records
from prolip.cli import main
from prolip.episode import restrict_splits


def test_harmonic_mean():
    assert harmonic_mean(84.01, 73.86) == pytest.approx(78.61, abs=0.01)  # the paper's ViT-B/16 row
    assert harmonic_mean(0, 0) == 0


def test_restrict_splits_relabels(shared_data):
    from prolip.data import base_new_split, resolve_data

    splits = resolve_data("dtd", root=shared_data / "dtd10")
    base, new = base_new_split(10)
    assert base == [0, 1, 2, 3, 4] and new == [5, 6, 7, 8, 9]
    b = restrict_splits(splits, new)
    assert b.classnames == splits.classnames[5:]
    assert set(b.test.labels) == set(range(5)) and len(b.test) == 180


def test_experiment_validation():
    with pytest.raises(ExperimentError, match="unknown key.*'shot'"):
        parse_experiment({"datasets": ["dtd"], "methods": ["prolip"], "shot": [1]})
    with pytest.raises(ExperimentError, match="'views' must be an integer"):
        parse_experiment({"datasets": ["dtd"], "methods": ["prolip"], "views": "many"})
    with pytest.raises(ExperimentError, match="unknown method 'prolipp'"):
        parse_experiment({"datasets": ["dtd"], "methods": ["prolipp"]})
    with pytest.raises(ExperimentError, match="'methods' is required"):
        parse_experiment({"datasets": ["dtd"]})
    exp = parse_experiment({"datasets": ["dtd"], "methods": [{"name": "prolip", "lr": 1e-3, "label": "p3"}]})
    assert exp.methods[0].hyperparameters == {"lr": 1e-3} and exp.methods[0].label == "p3"


def test_bench_and_report_on_dtd10(tmp_path, dtd10_experiment):
    exp = dtd10_experiment(
        shots=[1, 4], methods=["zeroshot", {"name": "prolip", "steps": 20, "lr": 1e-3}, "linear-probe", "tip-adapter"]
    )
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    runner = CliRunner()
    r = runner.invoke(main, ["bench", str(path), "--out", str(tmp_path / "res")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    records = read_records(tmp_path / "res")
    assert len(records) == 2 * 4
    assert {r["method"] for r in records} == {"zeroshot", "prolip", "linear-probe", "tip-adapter"}
    assert all(r["random_weights"] and r["sampler"] == "lpp" and r["templates"] == ["{} texture."] for r in records)
    zs = [r["accuracy"] for r in records if r["method"] == "zeroshot"]
    assert zs[0] == zs[1]  # zero-shot does not depend on shots
    r = runner.invoke(main, ["bench", str(path), "--out", str(tmp_path / "res")], catch_exceptions=False)
    assert r.exit_code == 0 and "0 cells run, 8 already done" in r.output and "cache: 0 forward passes" in r.output
    assert len(read_records(tmp_path / "res")) == 8

    r = runner.invoke(
        main,
        [
            "bench",
            str(path),
            "--out",
            str(tmp_path / "res"),
            "--set",
            "protocol=base2new",
            "--set",
            "shots=[2]",
            "--set",
            "methods=[zeroshot, {name: prolip, steps: 10}]",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    b2n = [r for r in read_records(tmp_path / "res") if r["protocol"] == "base2new"]
    assert len(b2n) == 2 and all(r["hm"] == pytest.approx(harmonic_mean(r["base"], r["new"])) for r in b2n)

    r = runner.invoke(main, ["report", str(tmp_path / "res"), "--out", str(tmp_path / "rep")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    table = (tmp_path / "rep" / "results.md").read_text()
    assert "RANDOM weights" in table and "prolip" in table and "average (1)" in table
    assert not re.search(r"\(paper \d", table)  # random weights: never a paper number
    assert (tmp_path / "rep" / "accuracy_vs_shots.png").stat().st_size > 1000
    assert "mean" in (tmp_path / "rep" / "results.csv").read_text().splitlines()[0]
    assert json.loads((tmp_path / "rep" / "results.json").read_text())


def test_truncated_last_record_is_ignored(tmp_path):
    full = '{"cell": "a", "protocol": "fewshot", "dataset": "d", "label": "m", "method": "m", "shots": 1}'
    (tmp_path / "records.jsonl").write_text(full + '\n{"cell": "b", "acc')
    assert [r["cell"] for r in read_records(tmp_path)] == ["a"]


@pytest.mark.slow
def test_every_method_side_by_side_on_dtd10_vit_b16(tmp_path, shared_data, vit_b16_file):
    """All registered methods at 1 and 2 shots through `prolip bench`, real ViT-B-16 architecture (random init),
    on a miniature of dtd10 (its CoOp split with 2 test images per class) so CPU extraction stays short."""
    from prolip.methods import available, method_class

    src = shared_data / "dtd10" / "dtd"
    split = json.loads((src / "split_zhou_DescribableTextures.json").read_text())
    per_class = {}
    split["test"] = [
        row for row in split["test"] if per_class.setdefault(row[1], []).append(row) or len(per_class[row[1]]) <= 2
    ]
    mini = tmp_path / "dtd"
    mini.mkdir()
    (mini / "images").symlink_to(src / "images")
    (mini / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    # Fine-tuning inside ViT-B-16 on a CPU takes minutes per epoch: tests/test_finetune.py covers those on tiny models.
    methods = [m for m in available() if not method_class(m).capabilities.encodes_images]
    # Every method, with its training shortened (steps/epochs) where it has one: this test is about the real
    # architecture's shapes through the harness, not about the defaults (tests/test_methods_* pin those).
    short = {"steps": 20, "epochs": 5}
    entries = [{"name": m, **{k: v for k, v in short.items() if k in method_class(m).param_names()}} for m in methods]
    exp = {
        "model": "ViT-B-16",
        "pretrained": str(vit_b16_file),
        "datasets": [str(mini)],
        "shots": [1, 2],  # two shot counts sharing one cache; more shots only cost ViT-B-16 passes on a CPU
        "seeds": [1],
        "views": 2,
        "cache_dir": str(tmp_path / "cache"),
        "methods": entries,
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    runner = CliRunner()
    r = runner.invoke(
        main, ["bench", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "res")], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    records = read_records(tmp_path / "res")
    assert {(r["method"], r["shots"]) for r in records} == {(m, s) for m in methods for s in (1, 2)}
    r = runner.invoke(main, ["report", str(tmp_path / "res")], catch_exceptions=False)
    table = (tmp_path / "res" / "report" / "results.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
