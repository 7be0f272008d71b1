"""`prolip report` on synthetic records: aggregation over seeds and datasets, paper numbers only where the setting
matches, random weights labelled, CSV/JSON/markdown and PNG plots."""
import csv
import json

import pytest
from click.testing import CliRunner

from prolip.bench.reference import ELEVEN, OOD
from prolip.bench.report import aggregate, write_report
from prolip.cli import main

RN50_PROLIP = {"lr": 1e-5, "lam": "1/N", "steps": 300, "precision": "fp32", "grid": False, "grid_chunk": 49}


def rec(dataset, seed, acc, *, protocol="fewshot", model="RN50", weights="openai", random=False, label="prolip",
        method="prolip", shots=1, hp=None, **extra):
    return {"protocol": protocol, "model": model, "weights": weights, "random_weights": random, "sampler": "lpp",
            "templates_name": "dataset", "source": None, "label": label, "method": method, "shots": shots,
            "dataset": dataset, "seed": seed, "accuracy": acc, "hyperparameters": hp or dict(RN50_PROLIP), **extra}


def eleven(**kw):
    return [rec(d, s, 60.0 + s + i, **kw) for i, d in enumerate(sorted(ELEVEN)) for s in (1, 2)]


def _average(rows, **match):
    return next(r for r in rows if "datasets" in r and all(r.get(k) == v for k, v in match.items()))


def test_mean_and_std_over_seeds_then_over_datasets():
    rows = aggregate([rec("A", 1, 60.0), rec("A", 2, 62.0), rec("B", 1, 70.0), rec("B", 2, 80.0)])
    a = next(r for r in rows if r["dataset"] == "A")
    assert (a["mean"], a["std"], a["seeds"]) == (61.0, 1.0, [1, 2])
    avg = _average(rows)
    assert avg["dataset"] == "average (2)" and avg["mean"] == pytest.approx(68.0)
    assert avg["std"] == pytest.approx(3.0)  # per-seed averages 65 and 71
    # Swap B's seeds: per-dataset stds unchanged (1 and 5, mean 3), per-seed averages now 70 and 66.
    rows = aggregate([rec("A", 1, 60.0), rec("A", 2, 62.0), rec("B", 1, 80.0), rec("B", 2, 70.0)])
    assert _average(rows)["std"] == pytest.approx(2.0)


def test_paper_number_only_where_the_setting_matches():
    assert _average(aggregate(eleven()))["paper"] == 64.28
    assert _average(aggregate(eleven(shots=16)))["paper"] == 75.20
    assert "paper" not in _average(aggregate(eleven(shots=3)))  # no 3-shot number in the paper
    assert "paper" not in _average(aggregate(eleven(random=True, weights="none")))
    assert "paper" not in _average(aggregate(eleven(model="ViT-B-16")))
    assert "paper" not in _average(aggregate(eleven(protocol="fewshot-val")))
    assert "paper" not in _average(aggregate(eleven(hp={**RN50_PROLIP, "lam": "1/N2"}, label="prolip-1/N2")))
    assert "paper" not in _average(aggregate(eleven()[:-2]))  # 10 datasets: not the paper's average
    zs = _average(aggregate(eleven(label="zeroshot", method="zeroshot", hp={}, shots=8)))
    assert zs["paper"] == 58.89
    imagenet = next(r for r in aggregate(eleven(shots=16)) if r["dataset"] == "ImageNet")
    assert imagenet["paper"] == 64.48 and "2410.05270" in imagenet["paper_source"]


def test_base2new_and_tta_references():
    b2n = [rec(d, 1, 80.0, protocol="base2new", model="ViT-B-16", shots=16, base=85.0, new=75.0, hm=79.69)
           for d in sorted(ELEVEN)]
    for r in b2n:
        r["accuracy"] = r["hm"]
    avg = _average(aggregate(b2n))
    assert (avg["paper_base"], avg["paper_new"], avg["paper_hm"]) == (84.01, 73.86, 78.61)
    single = [{**r, "templates_name": "single"} for r in b2n]
    avg = _average(aggregate(single))
    assert avg.get("paper_hm") == 79.08 and "paper_base" not in avg
    tta = [rec(d, None, 50.0, protocol="tta", label="tta+zeroshot", method="zeroshot", shots=0, hp={})
           for d in sorted(OOD)]
    assert _average(aggregate(tta))["paper"] == 47.44


def test_report_files_label_random_weights_and_paper(tmp_path):
    records = eleven() + eleven(model="test-vit-tiny", weights="none", random=True)
    records += [rec(d, 1, 40.0 + lr * 100 + lam, protocol="sensitivity", shots=1,
                    hp={**RN50_PROLIP, "lr": lr, "lam": lam}, model="test-vit-tiny", weights="none", random=True)
                for d in ("A", "B") for lr in (1e-3, 1e-2) for lam in (0.0, 1.0)]
    records += [rec("A", s, 50.0, shots=k, model="test-vit-tiny", weights="none", random=True)
                for s in (1, 2) for k in (2, 4)]
    paths = write_report(records, tmp_path / "rep")
    md = paths["markdown"].read_text()
    assert "64.28 (paper)" in md and md.count("(paper)") == 1
    assert "## fewshot — test-vit-tiny [RANDOM weights]" in md and "RANDOM weights: numbers from" in md
    assert "## fewshot — RN50 [openai]" in md
    assert "| lr \\ λ | 0 | 1 |" in md and "prolip lr=0.01 λ=1.0" in md
    rows = list(csv.DictReader(open(paths["csv"])))
    assert {"mean", "std", "paper", "lr", "lam"} <= set(rows[0])
    assert any(r["paper"] == "64.28" for r in rows)
    assert all(r["paper"] == "" for r in rows if r["random_weights"] == "True")
    assert json.loads(paths["json"].read_text())
    for key in ("plot_fewshot", "heatmap"):
        assert paths[key].stat().st_size > 5000 and paths[key].read_bytes()[:4] == b"\x89PNG"


def test_report_cli(tmp_path):
    from prolip.bench.records import append_record

    for r in eleven():
        append_record(tmp_path / "records.jsonl", r)
    result = CliRunner().invoke(main, ["report", str(tmp_path / "records.jsonl"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "64.28 (paper)" in result.output and (tmp_path / "out" / "accuracy_vs_shots.png").is_file()
    result = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "no records found" in result.output
