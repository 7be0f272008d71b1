"""A few-shot method written in one file (tests/toy_method.py) keeps the Method contract and runs through `prolip
fit`, `prolip predict`, `prolip bench` (its plan included) and `prolip report` with nothing else changed; the
registry refuses a second class under its name."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from prolip.cli import main
from prolip.methods import available, check_method, method_class, register
from prolip.tiny import DIGIT_TEMPLATES, SHIPPED_WEIGHTS, TINY_MODEL, write_digit_folder
from toy_method import Centroids  # noqa: E402  (tests/ is on sys.path, as for toy_tta)

TINY = ["--model", TINY_MODEL, "--pretrained", str(SHIPPED_WEIGHTS)]


def test_the_toy_is_registered_keeps_the_contract_and_its_name_is_taken():
    assert "toy-centroids" in available() and method_class("toy-centroids") is Centroids
    assert check_method(Centroids)
    another = type("Another", (Centroids,), {"__module__": __name__})  # another class under the toy's name
    with pytest.raises(ValueError, match="'toy-centroids' is already registered"):
        register(another)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("toy_method") / "noisy", "noisy")


def test_a_method_from_one_file_fits_predicts_benches_and_reports(digits, tmp_path):
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    fit = ["fit", "--data", str(digits), *TINY, "--method", "toy-centroids", "--hp", "blend=0.7"]
    r = CliRunner().invoke(main, [*fit, "--shots", "2", "--views", "2", "--cache-dir", cache, "--out", str(run)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"]["method"] == "toy-centroids" and manifest["method"]["hyperparameters"] == {"blend": 0.7}
    image = next((digits / "seven").iterdir())
    r = CliRunner().invoke(main, ["predict", str(run), str(image)])
    assert r.exit_code == 0 and str(image.name) in r.output, r.output
    experiment = {
        "model": TINY_MODEL,
        "pretrained": str(SHIPPED_WEIGHTS),
        "datasets": [str(digits)],
        "templates": DIGIT_TEMPLATES[:1],
        "methods": ["zeroshot", {"name": "toy-centroids", "blend": 0.7}],
        "shots": [2],
        "seeds": [1],
        "views": 2,
        "cache_dir": cache,
        "out": str(tmp_path / "res"),
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(experiment))
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "exp.yaml"), "--plan"], catch_exceptions=False)
    assert r.exit_code == 0 and "2 to run" in r.output, r.output
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "exp.yaml")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path / "res"), "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    assert "toy-centroids" in (tmp_path / "report" / "results.md").read_text()
