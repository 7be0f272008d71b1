"""Runs that are damaged or tampered with: Run.load checks everything in one place and names the file and key at
fault (missing manifest keys, wrong types, class names, templates, classifier shape, NaN/Inf in any tensor);
Run.save refuses to write what Run.load would refuse. Never a crash further on, in predict or eval.
"""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from prolip.constraints import Schema
from prolip.run import MANIFEST_SCHEMA, Run, RunError

from .conftest import cli, digest, fake_run, fit_cli, make_folder

pytestmark = pytest.mark.reliability("bad_input")


def _leaves(schema: Schema, prefix: str = "") -> list[str]:
    """Every required manifest key as a dotted path, e.g. backbone.fingerprint."""
    out = []
    for key in schema.required:
        out.append(prefix + key)
        sub = schema.fields[key]
        if isinstance(sub, Schema):
            out += _leaves(sub, f"{prefix}{key}.")
    return out


REQUIRED = [k for k in _leaves(MANIFEST_SCHEMA) if k != "format"]  # a missing format has its own message


def _edit_manifest(run: Path, key: str, value=...) -> None:
    """Set (or, with no value, delete) the dotted ``key`` of the run's manifest."""
    manifest = json.loads((run / "manifest.json").read_text())
    *parents, last = key.split(".")
    obj = manifest
    for p in parents:
        obj = obj[p]
    if value is ...:
        del obj[last]
    else:
        obj[last] = value
    (run / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def saved(tmp_path) -> Path:
    fake_run(tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("key", REQUIRED)
def test_each_missing_manifest_key_is_named(saved, key, tally):
    _edit_manifest(saved, key)
    with tally.raises(RunError, match=rf"manifest\.json: key '{re.escape(key)}' is missing", input=f"no {key}"):
        Run.load(saved)


@pytest.mark.parametrize(
    "key,value",
    [
        ("backbone", "open_clip"),
        ("backbone.fingerprint", 12),
        ("backbone.arch", None),
        ("method.method", ["prolip"]),
        ("method.hyperparameters", "lr=1"),
        ("fit.shots", "16"),
        ("fit.shots", True),
        ("fit.shots", 1.5),
        ("logit_scale", "100"),
        ("logit_scale", float("nan")),
        ("logit_scale", -1.0),
        ("logit_scale", float("inf")),
        ("logit_scale", False),
    ],
)
def test_each_mistyped_manifest_key_is_named(saved, key, value, tally):
    _edit_manifest(saved, key, value)
    with tally.raises(RunError, match=rf"manifest\.json: key '{re.escape(key)}' must be", input=f"{key}={value!r}"):
        Run.load(saved)


@pytest.mark.parametrize(
    "content,error",
    [
        ({"not": "a list"}, r"class names must be a list"),
        (["a", "b", "a"], r"class name 'a' is given twice \(classes 0 and 2\)"),
        (["a", 2, "c"], r"class name 1 is 2, not a string"),
        (["a", "b", ""], r"class name 2 is blank"),
    ],
)
def test_bad_class_names_are_named(saved, content, error, tally):
    (saved / "classnames.json").write_text(json.dumps(content))
    with tally.raises(RunError, match=r"classnames\.json: " + error):
        Run.load(saved)


@pytest.mark.parametrize(
    "content,error",
    [
        ([], r"templates must be a non-empty list"),
        ("a photo of a {}.", r"templates must be a non-empty list"),
        (["a photo of a {0}."], r"template 0: template 'a photo of a \{0\}\.' must contain exactly one"),
        (["{name}"], r"must contain exactly one"),
        (["no placeholder"], r"must contain exactly one"),
        (["{} {}"], r"must contain exactly one"),
        (["a {"], r"is not a valid format string"),
        ([3], r"is not a string"),
    ],
)
def test_bad_templates_are_named(saved, content, error, tally):
    (saved / "templates.json").write_text(json.dumps(content))
    with tally.raises(RunError, match=r"templates\.json.*" + error):
        Run.load(saved)


@pytest.mark.parametrize(
    "tensor,error",
    [
        (torch.zeros(3), r"tensor 'classifier' must be 2-D \[classes, dim\], got \(3,\)"),
        (torch.zeros(3, 4, 1), r"tensor 'classifier' must be 2-D"),
        (torch.zeros(2, 4), r"tensor 'classifier' has 2 rows but there are 3 class names"),
        (torch.tensor([[1.0, float("nan")]] * 3), r"tensor 'classifier' holds NaN or Inf"),
        (torch.tensor([[1.0, float("-inf")]] * 3), r"tensor 'classifier' holds NaN or Inf"),
    ],
)
def test_a_bad_classifier_is_named(saved, tensor, error, tally):
    save_file({"classifier": tensor}, str(saved / "classifier.safetensors"))
    with tally.raises(RunError, match=r"classifier\.safetensors: " + error):
        Run.load(saved)


@pytest.mark.parametrize("name", ["W", "b"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_method_tensors_are_named(saved, name, bad, tally):
    state = load_file(str(saved / "method.safetensors"))
    state[name].view(-1)[0] = bad
    save_file(state, str(saved / "method.safetensors"))
    with tally.raises(RunError, match=rf"method\.safetensors: tensor '{name}' holds NaN or Inf"):
        Run.load(saved)


def test_save_refuses_what_load_would_refuse_and_writes_nothing(tmp_path, tally):
    cases = {
        "NaN in W": lambda r: r.method_state["W"].view(-1).__setitem__(0, float("nan")),
        "Inf in the classifier": lambda r: r.classifier.view(-1).__setitem__(3, float("inf")),
        "duplicate class names": lambda r: r.classnames.__setitem__(2, "a"),
        "a template with {0}": lambda r: r.templates.__setitem__(0, "a {0}"),
        "no backbone key": lambda r: r.manifest.pop("backbone"),
    }
    for name, spoil in cases.items():
        run = fake_run()
        spoil(run)
        with tally.raises(
            ValueError,
            match=r"(tensor '(W|classifier)' holds NaN or Inf|given twice|exactly one|"
            r"key 'backbone' is missing)",
            input=f"Run.save with {name}",
        ):
            run.save(tmp_path / "run")
        assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == []


# ---- generated damage --------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(_leaves(MANIFEST_SCHEMA)), value=json_values)
def test_any_value_at_any_required_key_loads_validly_or_is_a_run_error(tmp_path_factory, key, value, tally):
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    fake_run(run_dir)
    _edit_manifest(run_dir, key, value)
    tally.input(f"{key}={value!r:.40}")
    try:
        run = Run.load(run_dir)
    except RunError as e:
        tally.clear_error(e, "manifest.json", "unknown run format" if key == "format" else f"'{key.split('.')[0]}")
        return
    # Loaded: then every required key has the type the readers of a run rely on.
    m = run.manifest
    assert isinstance(m["backbone"]["fingerprint"], str) and isinstance(m["method"]["hyperparameters"], dict)
    assert isinstance(m["fit"]["shots"], int) and not isinstance(m["fit"]["shots"], bool)
    assert math.isfinite(m["logit_scale"]) and m["logit_scale"] > 0
    tally.handled_ok("a valid value")


# ---- through the CLI -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust_run")
    data = make_folder(root / "data", per_class=3)
    r = fit_cli(data, root / "run", root / "cache", shots=1, views=1, steps=2)
    assert r.exit_code == 0, r.output
    return root / "run"


@pytest.mark.parametrize(
    "damage", ["no logit_scale", "classnames not distinct", "template {0}", "NaN in W", "classifier rows"]
)
def test_predict_and_eval_on_a_damaged_run_name_the_file(fitted, tmp_path, damage, tally):
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    if damage == "no logit_scale":
        _edit_manifest(run, "logit_scale")
    elif damage == "classnames not distinct":
        (run / "classnames.json").write_text(json.dumps(["cat", "cat", "fox"]))
    elif damage == "template {0}":
        (run / "templates.json").write_text(json.dumps(["a photo of a {0}."]))
    else:
        path = run / ("method.safetensors" if damage == "NaN in W" else "classifier.safetensors")
        state = load_file(str(path))
        if damage == "NaN in W":
            state["W"].view(-1)[0] = float("nan")
        else:
            state["classifier"] = state["classifier"][:2].contiguous()
        save_file(state, str(path))
    before = digest(run)
    image = next((fitted.parent / "data" / "cat").iterdir())
    for args in (
        ("predict", run, image),
        ("eval", run, "--data", fitted.parent / "data", "--cache-dir", tmp_path / "cache"),
    ):
        tally.cli_error(cli(*args), re.escape(str(run)), input=f"{args[0]} with {damage}")
    assert tally.lost(int(digest(run) != before)) == 0
