"""Test-time methods behind one interface (prolip.tta): the registry refuses a taken name and a setting without a
constraint; an experiment naming an unknown test-time method is refused with the available ones; and a method
written in one file (tests/toy_tta.py) runs through `prolip bench` (records, declared cost, settings) and
`prolip report` with nothing else changed."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from torch import Tensor

from prolip.bench.experiment import ExperimentError, parse_experiment
from prolip.bench.records import read_records
from prolip.cli import main
from prolip.constraints import HyperparameterError
from prolip.tta import PerImageMethod, Scene, available, create, method_class, register
from toy_tta import MeanViews, mean_view_logits  # noqa: E402  (tests/ is on sys.path, as for toy_family)

BUILT_IN = ["tta", "zeroshot", "tpt", "ensemble", "zero", "tda"]


def test_the_built_in_methods_are_registered_in_the_order_flags_list_their_rows():
    assert available()[: len(BUILT_IN)] == BUILT_IN
    assert [n for n in BUILT_IN if method_class(n).starts_from_fit] == ["tta"]
    assert [n for n in BUILT_IN if method_class(n).streams] == ["tda"]


def test_the_registry_refuses_a_second_class_under_a_taken_name_and_an_unconstrained_setting():
    class AnotherTPT(PerImageMethod):
        name = "tpt"

        def __init__(self) -> None:
            pass

        def logits(self, z: Tensor, W: Tensor, scene: Scene) -> Tensor:
            raise NotImplementedError

    with pytest.raises(ValueError, match="'tpt' is already registered"):
        register(AnotherTPT)
    assert method_class("tpt") is not AnotherTPT

    class Loose(AnotherTPT):
        name = "loose"

        def __init__(self, k: int = 1) -> None:
            self.k = k

    with pytest.raises(TypeError, match=r"every hyperparameter needs a constraint \(none for \['k'\]\)"):
        register(Loose)
    Loose.constraints = {"k": MeanViews.constraints["first"]}
    Loose.shared = ("k",)
    with pytest.raises(TypeError, match="'shared' only the tta section's"):
        register(Loose)
    assert "loose" not in available()
    assert register(MeanViews) is MeanViews  # the same class again (its module reloaded) replaces itself
    with pytest.raises(HyperparameterError, match="unknown test-time method 'nope'; choose one of: tta, zeroshot"):
        create("nope")
    with pytest.raises(HyperparameterError, match="mean-views: hyperparameter first must be >= 1"):
        create("mean-views", first=0)


def test_an_unknown_test_time_method_is_an_experiment_error_listing_the_available_ones():
    base = {"datasets": ["dtd"], "methods": ["zeroshot"], "protocol": "tta"}
    with pytest.raises(ExperimentError, match=r"t.yaml: tta: methods\[1\]: unknown test-time method 'tpd'") as e:
        parse_experiment({**base, "tta": {"methods": ["tpt", "tpd"]}}, "t.yaml")
    assert "choose from zeroshot, tpt, ensemble, zero, tda" in str(e.value)
    with pytest.raises(ExperimentError, match=r"unknown key\(s\) \['tpd'\]"):
        parse_experiment({**base, "tta": {"tpd": True}}, "t.yaml")
    with pytest.raises(ExperimentError, match=r"methods\[0\]: each test-time method is a name or a one-key mapping"):
        parse_experiment({**base, "tta": {"methods": [{"tda": {}, "zero": {}}]}}, "t.yaml")
    with pytest.raises(ExperimentError, match=r"\['zero'\] listed twice"):
        parse_experiment({**base, "tta": {"methods": ["zero"], "zero": True}}, "t.yaml")
    with pytest.raises(ExperimentError, match="zero: bad settings: .*gamma must be <= 1"):
        parse_experiment({**base, "tta": {"methods": [{"zero": {"gamma": 2}}]}}, "t.yaml")


def _digits_experiment(tmp_path, tta: dict) -> dict:
    from prolip.tiny import DIGIT_TEMPLATES, SHIPPED_WEIGHTS, TINY_MODEL, write_digit_folder

    folder = write_digit_folder(tmp_path / "noisy", "noisy")
    return {
        "model": TINY_MODEL,
        "pretrained": str(SHIPPED_WEIGHTS),
        "datasets": [str(folder)],
        "templates": DIGIT_TEMPLATES[:1],
        "methods": ["zeroshot"],
        "protocol": "tta",
        "cache_dir": str(tmp_path / "cache"),
        "out": str(tmp_path / "res"),
        "tta": tta,
    }


def _expected_accuracy(raw: dict, first: int) -> float:
    """The toy's accuracy computed outside the bench: its logits on the same views, W0 and classifier."""
    from prolip.bench.tta import balanced_subset
    from prolip.data import resolve_data
    from prolip.episode import evaluation_images
    from prolip.functional import accuracy, ensemble_classifier
    from prolip.tiny import load_tiny
    from prolip.tta import view_features

    backbone = load_tiny()
    splits = resolve_data(raw["datasets"][0])
    images = balanced_subset(evaluation_images(splits), raw["tta"]["max_images"])
    z = view_features(backbone, [it.path for it in images.items], raw["tta"]["views"], seed=0)
    T = ensemble_classifier(backbone.encode_text_templates(list(splits.classnames), raw["templates"]).float())
    site = backbone.projection()
    bias = None if site.bias is None else site.bias.detach().float()
    logits = mean_view_logits(z[:, :first], site.weight.detach().float(), bias, T, float(backbone.logit_scale))
    import torch

    return accuracy(logits, torch.tensor(images.labels))


def test_a_test_time_method_from_one_file_runs_through_bench_and_report(tmp_path):
    raw = _digits_experiment(tmp_path, {"views": 6, "max_images": 30, "methods": [{"mean-views": {"first": 4}}]})
    raw["tta"]["methods"].append("zeroshot")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, ["bench", str(path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    by_label = {rec["label"]: rec for rec in read_records(tmp_path / "res")}
    assert set(by_label) == {"tta+zeroshot", "mean-views", "zeroshot"}
    toy = by_label["mean-views"]
    assert toy["method"] == "zeroshot" and toy["shots"] == 0  # it starts from W0, as it does not declare a fit
    assert toy["forward_passes"] == 30 * 4 and toy["trainable_parameters"] == 0  # what it declares, not 6 views
    assert toy["views_averaged"] == 4 and "text_forward_passes" not in toy
    assert toy["setting"]["tta"]["mean-views"] is True and toy["setting"]["tta"]["mean-views_first"] == 4
    assert toy["start_accuracy"] == by_label["zeroshot"]["accuracy"]  # the same W0 on the same center crops
    assert toy["accuracy"] == pytest.approx(_expected_accuracy(raw, 4))
    assert toy["accuracy"] != by_label["zeroshot"]["accuracy"]  # four views are not the center crop alone

    r = CliRunner().invoke(main, ["bench", str(path), "--plan"], catch_exceptions=False)
    assert r.exit_code == 0 and "0 to run" in r.output, r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path / "res")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "| mean-views |" in r.output and f"{toy['accuracy']:.2f}" in r.output
