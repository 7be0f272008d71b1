"""Protocols declare themselves (prolip.bench.protocols): one registry, read by the experiment parser, that refuses a
taken name; each protocol's checks of an experiment file are its own; and a protocol written in one file
(tests/toy_protocol.py) runs through `prolip bench` (its plan included) and `prolip report` with nothing else
changed."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from prolip.bench.experiment import ExperimentError, parse_experiment
from prolip.bench.protocols import FewShot, Protocol, available, protocol_class, register
from prolip.bench.records import load_records
from prolip.cli import main
from toy_protocol import SupportAccuracy  # noqa: E402  (tests/ is on sys.path, as for toy_tta)

BUILT_IN = ["fewshot", "fewshot-val", "sensitivity", "base2new", "cross-dataset", "domain-generalisation", "tta"]


def test_the_built_in_protocols_are_registered_in_order_and_the_parser_lists_them():
    assert available()[: len(BUILT_IN)] == BUILT_IN
    with pytest.raises(ExperimentError, match="'protocol' must be one of fewshot, fewshot-val, sensitivity") as e:
        parse_experiment({"datasets": ["dtd"], "methods": ["zeroshot"], "protocol": "few-shot"}, "t.yaml")
    assert "support-accuracy" in str(e.value)  # the toy, registered by importing its module


def test_the_registry_refuses_a_second_class_under_a_taken_name():
    with pytest.raises(ValueError, match="protocol named 'fewshot' is already registered"):

        class AnotherFewShot(Protocol):
            name = "fewshot"

    assert protocol_class("fewshot") is FewShot
    assert register(SupportAccuracy) is SupportAccuracy  # the same class again (its module reloaded) replaces itself
    with pytest.raises(ExperimentError, match="unknown protocol 'nope'; choose one of: fewshot"):
        protocol_class("nope")


def test_a_protocol_checks_its_own_experiments():
    base = {"datasets": ["dtd"], "methods": ["zeroshot"], "protocol": "support-accuracy"}
    assert parse_experiment(base, "t.yaml").protocol == "support-accuracy"
    with pytest.raises(ExperimentError, match="t.yaml: protocol support-accuracy scores methods fitted without"):
        parse_experiment({**base, "validation": True}, "t.yaml")
    with pytest.raises(ExperimentError, match="t.yaml: protocol domain-generalisation trains on one source"):
        parse_experiment({**base, "protocol": "domain-generalisation", "datasets": ["a", "b"]}, "t.yaml")
    assert parse_experiment({**base, "protocol": "fewshot-val"}, "t.yaml").validation is True  # its settle


def _digits_experiment(tmp_path) -> dict:
    from prolip.tiny import DIGIT_TEMPLATES, SHIPPED_WEIGHTS, TINY_MODEL, write_digit_folder

    return {
        "model": TINY_MODEL,
        "pretrained": str(SHIPPED_WEIGHTS),
        "datasets": [str(write_digit_folder(tmp_path / "noisy", "noisy"))],
        "templates": DIGIT_TEMPLATES[:1],
        "methods": ["zeroshot", {"name": "prolip", "steps": 3, "lr": 1e-3}, "linear-probe"],
        "protocol": "support-accuracy",
        "shots": [2],
        "seeds": [1, 2],
        "views": 2,
        "cache_dir": str(tmp_path / "cache"),
        "out": str(tmp_path / "res"),
    }


def test_a_protocol_from_one_file_runs_through_bench_its_plan_and_report(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_digits_experiment(tmp_path)))
    r = CliRunner().invoke(main, ["bench", str(path), "--plan"], catch_exceptions=False)
    assert r.exit_code == 0 and "6 to run" in r.output, r.output
    planned = int(r.output.split("forward passes: ")[1].split(" to compute")[0].replace(",", ""))
    r = CliRunner().invoke(main, ["bench", str(path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"cache: {planned} forward passes" in r.output  # the plan is the run's (the same declared requests)
    records = load_records(tmp_path / "res")
    assert len(records) == 6 and {rec.protocol for rec in records} == {"support-accuracy"}
    zeroshot = [rec for rec in records if rec.method == "zeroshot"]
    assert all(0 <= rec.results["support_accuracy"] <= 100 for rec in records)
    assert all(rec.results["forward_passes"] == 0 for rec in zeroshot)  # what Bench.fit measures, as for any
    probe = [rec for rec in records if rec.method == "linear-probe"]
    assert all(rec.results["support_accuracy"] >= rec.accuracy for rec in probe)  # it fits its support

    r = CliRunner().invoke(main, ["bench", str(path), "--plan"], catch_exceptions=False)
    assert r.exit_code == 0 and "0 to run" in r.output, r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path / "res")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "## support-accuracy — prolip-tiny-vit" in r.output and "support_accuracy in results.json" in r.output
    rows = json.loads((tmp_path / "res" / "report" / "results.json").read_text())
    zs = next(row for row in rows if row["kind"] == "dataset" and row["method"] == "zeroshot")
    expected = sum(rec.results["support_accuracy"] for rec in zeroshot) / 2
    assert zs["support_accuracy"] == pytest.approx(expected) and zs["support_accuracy_scored"] == 2
