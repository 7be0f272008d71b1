"""Class names a user can rely on: `--classnames` reaches the run, the run remembers what the data called each
class, and evaluating the same data later maps its folder names through the run's names without asking again."""

from __future__ import annotations

import json

import pytest

from .conftest import cli, fit_cli, make_folder

pytestmark = pytest.mark.reliability("bad_input")

WNIDS = ("n01440764", "n01443537", "n01484850")
NAMES = ("tench", "goldfish", "great white shark")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    data = make_folder(root / "data", classes=WNIDS, per_class=6)
    names = root / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    val = make_folder(root / "val", classes=WNIDS, per_class=2, seed=1)
    r = fit_cli(
        data, root / "run", root / "cache", "--classnames", names, "--val", val, "--json", shots=2, views=2, steps=3
    )
    assert r.exit_code == 0, r.output
    return root, data, names, json.loads(r.stdout)


def test_the_run_keeps_the_names_and_what_the_data_called_them(fitted, tally):
    root, *_ = fitted
    assert json.loads((root / "run" / "classnames.json").read_text()) == list(NAMES)
    assert json.loads((root / "run" / "manifest.json").read_text())["data"]["class_ids"] == list(WNIDS)
    tally.input("--classnames renaming WordNet folders")
    tally.handled_ok("names and folder ids recorded")


def test_eval_maps_folder_names_through_the_run_without_the_names_file(fitted, tally):
    root, data, names, _ = fitted
    without = cli("eval", root / "run", "--data", data, "--cache-dir", root / "cache", "--json")
    with_names = cli(
        "eval", root / "run", "--data", data, "--classnames", names, "--cache-dir", root / "cache", "--json"
    )
    assert without.exit_code == 0 and with_names.exit_code == 0, without.output + with_names.output
    assert json.loads(without.stdout)["accuracy"] == json.loads(with_names.stdout)["accuracy"]
    tally.input("eval on WordNet folders without --classnames")
    tally.handled_ok("mapped through the run's names")


def test_the_val_folder_takes_the_names_file_too(fitted, tally):
    *_, metrics = fitted
    assert metrics["eval_set"] == "given images" and metrics["eval_images"] == 6
    tally.input("--val with --classnames")
    tally.handled_ok("--val renamed like --data")


@pytest.mark.parametrize(
    "classes, message",
    [
        (("n01440764", "n01443537", "n99999999"), r"not in the run: \['n99999999'\]"),
        (("n01440764", "n01443537"), r"the run's classes missing here: \['great white shark'\]"),
    ],
)
def test_eval_on_other_classes_names_the_classes_at_fault(fitted, classes, message, tmp_path, tally):
    root, *_ = fitted
    other = make_folder(tmp_path / "other", classes=classes, per_class=2)
    r = cli("eval", root / "run", "--data", other, "--cache-dir", root / "cache")
    tally.cli_error(r, message, input=f"eval on classes {classes}")
