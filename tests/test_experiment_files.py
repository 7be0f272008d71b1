"""Every shipped experiment file runs end to end on dtd10 with the tiny random ViT, and the report names every one of
its methods entries (and groups). Only the data, the model, shots/seeds/views and the training budgets are shrunk;
labels, groups, lr, λ, precision and the protocol settings are the file's own."""

from pathlib import Path

import pytest
import yaml

from prolip.bench.experiment import load_experiment
from prolip.bench.protocols import run_experiment
from prolip.bench.records import read_records
from prolip.bench.report import write_report

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FILES = sorted(EXPERIMENTS.glob("*.yaml"))
# Training lengths (and the linear probe's C search) cut to seconds on a CPU; every other hyperparameter keeps the
# file's value.
SMALL_BUDGETS = {"steps": 2, "epochs": 2, "search_steps": 1, "max_iter": 100}
TRANSFER = ("cross-dataset", "domain-generalisation")
# Files that run the protocol of the methods' originals rather than the paper's (issue: seeds 1-3, as they report).
ORIGINALS_SEEDS = {"sota2025_vitb16.yaml": [1, 2, 3]}
# Files on models the paper never ran: their own weights, and ProLIP in float32 only (the paper's float16 precision
# reproduces its own runs).
OTHER_MODELS = {"fewshot_siglip2.yaml": "webli"}


def _small_budget(entry) -> dict:
    from prolip.methods import method_class

    entry = {"name": entry} if isinstance(entry, str) else dict(entry)
    params = method_class(entry["name"]).param_names()
    return {**entry, **{k: v for k, v in SMALL_BUDGETS.items() if k in params}}


def _overrides(path: Path, data: Path, cache: Path, out: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    overrides = {
        "model": "test-vit-tiny",
        "pretrained": "none",
        "data_root": str(data),
        "datasets": ["dtd"],
        "shots": [1],
        "seeds": [1],
        "views": 2,
        "cache_dir": str(cache),
        "out": str(out),
        "methods": [_small_budget(m) for m in raw["methods"]],
    }
    if raw.get("protocol") in TRANSFER:
        overrides["targets"] = ["dtd"]
    if raw.get("protocol") == "tta":
        overrides.update({"tta.max_images": 4, "tta.views": 4, "tta.train_on": "dtd"})
    return overrides


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_worker():
    """Two test workers on two cores: one torch thread each, or they spend the run waiting on each other (this
    halves the module's wall time)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One feature cache for every file: the same dtd10 images are extracted once (per test worker)."""
    return tmp_path_factory.mktemp("experiment_files_cache")


def test_every_paper_table_with_a_reference_config_has_a_file():
    names = {p.name for p in FILES}
    assert {
        "fewshot_rn50.yaml",
        "sensitivity_rn50.yaml",
        "cross_dataset_rn50.yaml",
        "tta_rn50.yaml",
        "prolip_text_rn50.yaml",
        "adapters_rn50.yaml",
        "complements_rn50.yaml",
        "smoke_dtd10.yaml",
    } <= names
    for stem in ("rn50", "rn101", "vitb32", "vitb16"):
        assert {f"fewshot_val_{stem}.yaml", f"domain_generalisation_{stem}.yaml"} <= names
    assert {"base2new_rn50.yaml", "base2new_vitb16.yaml"} <= names


@pytest.mark.parametrize("path", [p for p in FILES if p.name != "smoke_dtd10.yaml"], ids=lambda p: p.stem)
def test_paper_files_use_the_papers_seeds_sampler_and_both_precisions(path):
    exp = load_experiment(path)
    assert exp.sampler == "lpp" and exp.pretrained == OTHER_MODELS.get(path.name, "openai") and exp.views == 300
    seeds = ORIGINALS_SEEDS.get(path.name, list(range(1, 11)) if exp.protocol != "tta" else [1])
    assert exp.seeds == seeds
    prolip = [m for m in exp.methods if m.name == "prolip"]
    precisions = [m.hyperparameters.get("precision") for m in prolip]
    if path.name in OTHER_MODELS:
        assert prolip and set(precisions) == {"fp32"}
        return
    assert precisions.count("reference") == precisions.count("fp32") == len(prolip) // 2
    assert all("corrected numerics (float32)" in m.label for m in prolip if m.hyperparameters["precision"] == "fp32")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_experiment_file_runs_end_to_end_on_dtd10(path, shared_data, shared_cache, tiny_vit, tmp_path):
    exp = load_experiment(path, _overrides(path, shared_data / "dtd10", shared_cache, tmp_path / "results"))
    lines: list[str] = []
    records = read_records(run_experiment(exp, echo=lines.append, backbone=tiny_vit))
    assert records and all(r["protocol"] == exp.protocol and r["random_weights"] for r in records), lines
    md = write_report(records, tmp_path / "report")["markdown"].read_text()
    prefix = "tta+" if exp.protocol == "tta" else ""
    for m in exp.methods:
        assert f"| {prefix}{m.label}" in md, f"{m.label!r} missing from the report of {path.name}"
        for site in set(exp.sites) - {"native"}:  # each other site's rows, labelled with it
            assert f"| {prefix}{m.label} ({site} site) |" in md, f"{m.label!r} at {site} missing from {path.name}"
    assert {r["site"] for r in records} == set(exp.sites)
    for group in {m.group for m in exp.methods if m.group}:
        assert f"| {group} |" in md
    assert "RANDOM weights" in md and "nan" not in md
    if any(r.get("ece") is not None for r in records):  # calibration beside accuracy and cost
        assert "| method | shots | accuracy | ECE | seconds |" in md
    if exp.protocol == "tta":  # and what each image costs a test-time method
        assert "| seconds | s / image | forward passes |" in md
    for spec in exp.tta.methods if exp.protocol == "tta" else []:
        assert f"| {spec.name} |" in md, f"test-time method {spec.name} missing from the report of {path.name}"


def test_bench_records_carry_what_the_paper_match_reads(shared_data, shared_cache, tiny_vit, tmp_path):
    """Records as `prolip bench` writes them, with only what a CPU test cannot have put back (the OpenAI RN50, 300
    views and steps, 11 datasets, 10 seeds), get the paper's number: the match reads the fields the bench writes."""
    from prolip.bench.reference import ELEVEN, PAPER_TEMPLATES
    from prolip.bench.report import aggregate

    path = EXPERIMENTS / "fewshot_rn50.yaml"
    exp = load_experiment(path, _overrides(path, shared_data / "dtd10", shared_cache, tmp_path / "results"))
    records = read_records(run_experiment(exp, echo=lambda line: None, backbone=tiny_vit))
    mine = next(r for r in records if r["label"] == "prolip lr 1e-5 λ=1/N")
    paper_setting = {
        **mine,
        "model": "RN50",
        "weights": "openai",
        "random_weights": False,
        "views": 300,
        "hyperparameters": {**mine["hyperparameters"], "steps": 300},
    }
    as_paper = [
        {**paper_setting, "dataset": d, "templates": list(PAPER_TEMPLATES[d]), "seed": s}
        for d in sorted(ELEVEN)
        for s in range(1, 11)
    ]
    average = next(r for r in aggregate(as_paper) if r["kind"] == "average")
    assert average["paper"] == 64.28
