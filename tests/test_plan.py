"""`prolip bench --plan`: the forward passes it announces are the ones the run then makes (every protocol, a cold
cache and a partly filled one; both read one list, each protocol's declared requests, and scoring alone reads
exactly that list), and planning extracts nothing and writes nothing."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from prolip.bench import protocols
from prolip.bench.experiment import parse_experiment
from prolip.bench.plan import format_plan, plan_experiment, plan_sites
from prolip.cli import main


def _experiment(dtd10_experiment, **overrides):
    # zero-shot (no support features), ProLIP (its views), the linear probe (the support's center crops),
    # CLAP (views of its own augmentation)
    methods = ["zeroshot", {"name": "prolip", "steps": 3}, "linear-probe", {"name": "clap", "epochs": 1}]
    return parse_experiment(dtd10_experiment(**{"shots": [1, 2], "methods": methods, **overrides}))


def _run_passes(exp, backbone, monkeypatch, prefetch: bool = True) -> int:
    """Forward passes the run's feature cache made. Without ``prefetch`` the run does not fill the cache with what
    its protocol declares first, so every pass counted is one its scoring itself asked for."""
    caches = []
    original = protocols.Bench.__init__

    def keep_cache(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.append(self.cache)

    monkeypatch.setattr(protocols.Bench, "__init__", keep_cache)
    if not prefetch:
        monkeypatch.setattr(protocols.Bench, "prefetch", lambda self, requests: None)
    protocols.run_experiment(exp, echo=lambda _: None, backbone=backbone)
    return caches[0].stats.forward_passes


LIGHT = ["zeroshot", {"name": "prolip", "steps": 2}]


@pytest.mark.parametrize(
    "protocol, overrides",
    [
        ("fewshot", {"shots": [1]}),
        ("fewshot-val", {"shots": [1], "methods": [{"name": "prolip", "steps": 1}]}),
        # methods that train on the images: the support's center crops, no cached views (alone and beside ProLIP)
        ("fewshot", {"shots": [1], "methods": ["zeroshot", {"name": "last-layer-ft", "epochs": 1}]}),
        ("fewshot", {"shots": [1], "methods": [{"name": "full-ft", "epochs": 1}, {"name": "prolip", "steps": 2}]}),
        ("fewshot", {"shots": [1], "methods": ["zeroshot"]}),
        ("base2new", {"shots": [2], "methods": LIGHT}),
        (
            "sensitivity",
            {"methods": [{"name": "prolip", "steps": 2}], "sensitivity": {"lrs": [1e-3], "lams": [0.0, 1.0]}},
        ),
        ("cross-dataset", {"targets": ["dtd"], "shots": [1], "methods": LIGHT}),
        ("tta", {"shots": [1], "methods": LIGHT, "tta": {"views": 3, "max_images": 4}}),
    ],
)
def test_plan_counts_the_forward_passes_the_run_makes(
    tmp_path, tiny_vit, monkeypatch, protocol, overrides, dtd10_experiment
):
    exp = _experiment(dtd10_experiment, protocol=protocol, **overrides)
    plan = plan_experiment(exp, tiny_vit, time_batch=False)
    assert plan.survey.forward_passes > 0 and plan.survey.cached_passes == 0
    assert plan.reference_passes >= plan.survey.forward_passes  # the reference's runs share nothing
    assert not (tmp_path / "cache").exists() and not (tmp_path / "res").exists()  # nothing extracted or written
    # What scoring reads by itself is what the protocol declares: neither more (the run would extract it anyway)
    # nor less (the run would prefetch it unread).
    assert _run_passes(exp, tiny_vit, monkeypatch, prefetch=False) == plan.survey.forward_passes
    after = plan_experiment(exp, tiny_vit, time_batch=False)
    assert (after.pending, after.survey.forward_passes) == (0, 0)
    if protocol == "tta":
        assert plan.tta_passes == 4 * 3  # the test-time views, beside the cached count


def test_an_experiment_at_both_sites_is_planned_and_listed_once_per_site(tiny_vit, dtd10_experiment):
    """``site: [native, output]``: one plan per site; the native cells are those a native-only experiment lists (the
    same ids: its results folder keeps its cells), the output site's are its own, labelled with the site.
    (tests/test_experiment_files.py runs such a file end to end.)"""
    native = _experiment(dtd10_experiment, shots=[1], methods=LIGHT)
    both = _experiment(dtd10_experiment, shots=[1], methods=LIGHT, site=["native", "output"])
    plans = plan_sites(both, tiny_vit, name="x", time_batch=False)
    assert [(p.experiment, p.pending) for p in plans] == [("x (native site)", 2), ("x (output site)", 2)]

    def cells(exp):
        b = protocols.Bench(exp, echo=lambda _: None, backbone=tiny_vit)
        return [c.record for g in protocols.protocol_class(exp.protocol)(b).groups() for c in g.cells]

    at_native, at_output = (cells(one) for one in both.per_site())
    assert [r.cell for r in at_native] == [r.cell for r in cells(native)]
    assert [f"{r.label} (output site)" for r in at_native] == [r.label for r in at_output]
    assert {r.site for r in at_output} == {"output"} and not {r.cell for r in at_native} & {r.cell for r in at_output}
    with pytest.raises(ValueError, match="a Bench runs at one site"):
        protocols.Bench(both, backbone=tiny_vit)


def test_plan_leaves_out_what_is_cached_and_recorded(tiny_vit, monkeypatch, dtd10_experiment):
    _run_passes(_experiment(dtd10_experiment, shots=[1], methods=LIGHT), tiny_vit, monkeypatch)
    more = _experiment(dtd10_experiment, shots=[1, 2], seeds=[1, 2], methods=LIGHT)
    plan = plan_experiment(more, tiny_vit)
    assert plan.pending == plan.cells - 2  # the two 1-shot seed-1 cells are recorded
    assert plan.survey.cached_passes > 0  # the test set's center crops, at least
    assert plan.seconds_per_pass and plan.seconds_per_pass > 0 and plan.timed_batch > 0
    text = format_plan(plan)
    assert f"{plan.survey.forward_passes:,} to compute" in text and "estimated extraction time" in text
    assert _run_passes(more, tiny_vit, monkeypatch) == plan.survey.forward_passes


def test_cli_plan_prints_and_writes_nothing(tmp_path, dtd10_experiment):
    spec = dtd10_experiment(methods=["zeroshot", {"name": "prolip", "steps": 2}])
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(main, ["bench", str(path), "--out", str(tmp_path / "res"), "--plan"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "forward passes:" in r.output and "reference code's structure" in r.output and "cache:" in r.output
    assert not (tmp_path / "res").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "methods", [["zeroshot"], ["zeroshot", {"name": "last-layer-ft", "epochs": 1}], [{"name": "clip-lora", "steps": 1}]]
)
def test_experiments_whose_methods_train_on_no_cached_views_extract_none(tiny_vit, methods, dtd10_experiment):
    """Zero-shot and the image-level methods read center crops (or nothing): no augmented view is planned, so none
    is extracted (plan = run above); before, every episode cached --views views of its support regardless."""
    exp = _experiment(dtd10_experiment, protocol="fewshot", shots=[1], views=50, methods=methods)
    survey = plan_experiment(exp, tiny_vit, time_batch=False).survey
    assert survey.forward_passes and set(survey.views.values()) == {1}
