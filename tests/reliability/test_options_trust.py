"""Options and hyperparameters a user can get wrong: each is refused up front with one line naming the option (or
the method and key), never a traceback after extraction and never a silently wrong number.

Generated over every registered method and every hyperparameter it declares, so a new method is covered by
declaring its constraints."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from prolip.constraints import Number
from prolip.methods import HyperparameterError, available, configure, create, method_class
from prolip.methods.base import FitError

from .conftest import TINY, cli, fit_cli, make_folder

pytestmark = pytest.mark.reliability("bad_input")

SHORT = {"steps": 3, "epochs": 2}  # keeps every method's training to a few steps


def _bad_numbers(constraint: Number) -> list:
    bad = [math.nan, math.inf, -math.inf, "3", True]
    if constraint.low is not None:
        bad.append(constraint.low - 1 if constraint.integer else constraint.low - 0.5)
        if constraint.open_low:
            bad.append(constraint.low)
    if constraint.high is not None:
        bad.append(constraint.high + 1)
    if constraint.integer:
        bad.append(1.5)
    return bad


NUMERIC = [
    (name, key, value)
    for name in available()
    for key, c in method_class(name).constraints.items()
    if isinstance(c, Number)
    for value in _bad_numbers(c)
]


@pytest.mark.parametrize("name, key, value", NUMERIC, ids=lambda x: str(x))
def test_every_bad_numeric_hyperparameter_is_refused_naming_method_and_key(name, key, value, tally):
    with tally.raises(
        HyperparameterError, match=re.escape(f"{name}: hyperparameter {key} "), input=f"{name} {key}={value!r}"
    ):
        create(name, **{key: value})


@pytest.mark.parametrize("name", available())
def test_unknown_hyperparameter_is_refused_listing_the_known_ones(name, tally):
    with tally.raises(
        HyperparameterError,
        match=re.escape(f"{name}: unknown hyperparameter") + ".*its hyperparameters are",
        input=f"{name} learning_rate=1",
    ):
        create(name, learning_rate=1)


@pytest.mark.parametrize("name", available())
def test_validation_is_what_each_method_declares(name, tally):
    cls = method_class(name)
    if cls.capabilities.selects:
        method = configure(name, {}, validate=True)
        assert all(method.get_params()[k] == v for k, v in cls.validation_params.items())
        tally.handled_ok(f"{name} --validate selects {cls.capabilities.selects}")
    else:
        with tally.raises(
            HyperparameterError,
            match=re.escape(f"{name} selects nothing on a validation set"),
            input=f"{name} --validate",
        ):
            configure(name, {}, validate=True)


@pytest.mark.parametrize("name", [n for n in available() if "lr" in method_class(n).param_names()])
def test_an_absurd_learning_rate_is_refused_before_training(name, tally):
    with tally.raises(
        HyperparameterError, match=re.escape(f"{name}: hyperparameter lr must be <= 10"), input=f"{name} lr=1e38"
    ):
        create(name, lr=1e38)


@pytest.mark.parametrize("name", [n for n in available() if method_class(n).capabilities.learns])
def test_training_that_produces_non_finite_weights_fails_loudly(name, tally):
    # A non-finite feature (a corrupt cache row, an overflowing backbone) must never end in a run with NaN weights.
    from synthetic import make_problem

    p = make_problem(num_classes=3, shots=2, d_pre=12, d=6, views=2)
    p.task = dataclasses.replace(p.task, text_pre=torch.randn(3, 1, 8), text_proj=torch.randn(8, 6))
    p.support.views.views[:, 0, 0] = math.nan
    p.support.center[0, 0] = math.nan
    hp = {k: v for k, v in SHORT.items() if k in method_class(name).param_names()}
    tally.input(f"{name} trained on a NaN feature")
    with pytest.raises((FitError, ValueError)) as info:
        create(name, **hp).fit(p.task, p.support, p.val)
    tally.clear_error(info.value, "NaN" if not isinstance(info.value, FitError) else "non-finite")


# ---------------------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("opts") / "data", per_class=6)


def fit(data, out, *extra):
    return fit_cli(data, out, out.parent / "cache", *extra, shots=2, views=2, steps=None)


@pytest.mark.parametrize("name", available())
def test_fit_validate_on_every_method(name, data, tmp_path, tally):
    hp = [arg for k, v in SHORT.items() if k in method_class(name).param_names() for arg in ("--hp", f"{k}={v}")]
    r = fit(data, tmp_path / "run", "--method", name, "--validate", *hp)
    if not method_class(name).capabilities.selects:
        tally.cli_error(
            r, re.escape(f"{name} selects nothing on a validation set"), input=f"fit --method {name} --validate"
        )
        assert not (tmp_path / "cache").exists()  # refused before any extraction
        return
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (
        manifest["data"]["validation"]
        and manifest["method"]["selected"]["how"] == "validation"
        or manifest["method"]["selected"].get("epoch", {}).get("how") == "validation"
    )
    tally.handled_ok(f"fit --method {name} --validate")


BAD_OPTIONS = [
    (("--shots", "0"), "--shots"),
    (("--shots", "-3"), "--shots"),
    (("--views", "0"), "--views"),
    (("--batch-size", "0"), "--batch-size"),
    (("--workers", "-1"), "--workers"),
    (("--lr", "nan"), "hyperparameter lr must be finite"),
    (("--lr", "-1e-3"), "hyperparameter lr must be >"),
    (("--lr", "inf"), "hyperparameter lr must be finite"),
    (("--lam", "-1"), "hyperparameter lam must be >= 0"),
    (("--lam", "inf"), "hyperparameter lam must be finite"),
    (("--lam", "one"), "hyperparameter lam must be a number"),
    (("--steps", "-5"), "hyperparameter steps must be >= 0"),
    (("--hp", "steps"), "expected key=value"),
    (("--hp", "steps=[1,"), "not valid YAML"),
    (("--hp", "stepz=3"), "unknown hyperparameter"),
    (("--hp", "lr=1e-3", "--lr", "1e-2"), "given twice"),
    (("--device", "bogus"), "--device"),
    (("--device", "cuda:7"), "--device"),
    (("--device", "mps"), "--device"),
    (("--method", "prolipp"), "unknown method"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, tuple) else None)
def test_bad_fit_options_fail_before_any_work(args, message, data, tmp_path, tally):
    if "cuda" in args[-1] and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    r = fit(data, tmp_path / "run", *args)
    tally.cli_error(r, message, input="fit " + " ".join(args))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_single_class_dataset_is_refused(tmp_path, tally):
    data = make_folder(tmp_path / "data", classes=("only",), per_class=6)
    tally.cli_error(fit(data, tmp_path / "run"), "single class", input="single-class folder")


def test_shots_beyond_every_class_are_refused_even_with_allow_fewer(data, tmp_path, tally):
    r = fit(data, tmp_path / "run", "--shots", 100000, "--allow-fewer")
    tally.cli_error(r, r"--shots 100000 exceeds the largest class", input="--shots 100000 --allow-fewer")


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("opts_run") / "run"
    assert fit(data, out, "--steps", 2).exit_code == 0
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (("eval", "--split", "val"), "has no val split"),
        (("eval", "--templates", "t.txt"), "No such option"),
        (("eval", "--tta", "--tta-views", "0"), "--tta-views"),
        (("predict", "--top-k", "0"), "--top-k"),
        (("predict", "--top-k", "-2"), "--top-k"),
        (("predict", "--tta", "--tta-views", "-1"), "--tta-views"),
        (("predict", "--device", "nope"), "--device"),
    ],
)
def test_bad_eval_and_predict_options(args, message, run_dir, data, tally):
    command, *rest = args
    target = ["--data", data] if command == "eval" else [data / "cat" / "0.jpg"]
    tally.cli_error(cli(command, run_dir, *target, *rest), message, input=" ".join(map(str, args)))


def test_extract_split_the_data_does_not_have(data, tmp_path, tally):
    r = cli("extract", "--data", data, "--split", "test", "--cache-dir", tmp_path / "cache", *TINY)
    tally.cli_error(r, "has no test split", input="extract --split test on a folder")


def test_views_beyond_the_cache_disk_are_refused_before_extraction(data, tmp_path, monkeypatch, tally):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))  # 1 MB free
    r = fit(data, tmp_path / "run", "--views", 100000)
    tally.cli_error(
        r,
        r"caching 100000 views of 6 support images needs up to .* which has 1\.0 MB free",
        "lower --views",
        input="--views 100000 on a 1 MB disk",
    )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("available_mb", [1, 40])
def test_views_one_image_cannot_hold_in_memory_are_refused_before_extraction(
    data, tmp_path, monkeypatch, tally, available_mb
):
    """``--views 1000000`` once grew one unit's features to 12 GB in memory before anything said so."""
    from prolip import episode

    monkeypatch.setattr(episode, "available_memory", lambda: available_mb * 10**6)
    r = fit(data, tmp_path / "run", "--views", 100000)
    tally.cli_error(
        r,
        r"--views 100000 holds .* of features per image in memory",
        f"{available_mb}.0 MB available",
        "lower --views",
        input=f"--views 100000 with {available_mb} MB of memory",
    )
    assert not (tmp_path / "cache").exists()


def test_units_hold_fewer_images_when_their_views_would_not_fit_in_memory(data, tmp_path, monkeypatch):
    """Units shrink (to one image at the least) so a unit's features stay bounded; the features are the same."""
    import warnings

    from prolip.backbones import load_backbone
    from prolip.data import read_image_folder
    from prolip.features import FeatureCache, cache
    from prolip.features.cache import unit_images_for

    assert unit_images_for(32, 300, 768) == 32  # ordinary requests keep their units (and existing caches)
    assert unit_images_for(32, 10**6, 768) == 1 and unit_images_for(32, 1000, 64) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("test-vit-tiny", "none")
    paths = [it.path for it in read_image_folder(data).items[:5]]
    default = FeatureCache(tmp_path / "default", backbone, progress=False).views(paths, 3)
    monkeypatch.setattr(cache, "UNIT_BYTES", 4 * 3 * backbone.dim_pre * 2)  # two images' views per unit
    small = FeatureCache(tmp_path / "small", backbone, progress=False).views(paths, 3)
    assert len(list((tmp_path / "small").rglob("*.safetensors"))) == 3  # 5 images in units of 2, 2, 1
    assert len(list((tmp_path / "default").rglob("*.safetensors"))) == 1
    for t in range(3):
        assert torch.equal(small.view(t), default.view(t))


def test_fit_says_what_extraction_will_do(data, tmp_path, tally):
    r = fit(data, tmp_path / "run", "--views", 3, "--steps", 2)
    assert r.exit_code == 0, r.output
    assert "features: up to 36 forward passes (6 support images × 3 views + 18 center crops" in r.stderr
    tally.handled_ok("plan announced before extraction")
