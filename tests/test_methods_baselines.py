"""Baselines and complements: each trains, beats chance, behaves as defined, reloads, and never reads test labels."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from prolip.functional import accuracy, clip_logits
from prolip.methods import available, create, method_class
from prolip.methods.base import Validation
from synthetic import make_problem

# Small budgets keep the suite fast; the structure of each method is unchanged.
FAST = {
    "zs-lp": dict(epochs=30),
    "clap": dict(epochs=30),
    "clip-adapter": dict(epochs=20, lr=2e-2),
    "taskres": dict(epochs=30),
    "tip-adapter-f": dict(epochs=5),
    "lp++": dict(epochs=100),
    "linear-adapter": dict(steps=50),
    "prolip": dict(steps=50, lr=1e-3),
    "prolip-text": dict(steps=50, lr=1e-3),
    "prolip+tip-adapter-f": dict(steps=50, lr=1e-3),
    "prolip+taskres": dict(steps=50, lr=1e-3),
    "clip-adapter-prolip": dict(steps=50, lr=1e-2),
    "proker": dict(beta_grid=(0.5, 3.0, 5), lam_grid=(0.001, 1.0, 4)),  # its search: 20 x 10 kernel solves by default
}
# Methods that train inside the image encoder need images, not the synthetic features: tests/test_finetune.py.
ALL = [m for m in available() if not method_class(m).capabilities.encodes_images]


@pytest.fixture(scope="module")
def problem():
    p = make_problem(bias=True, seed=3)
    # A text side for prolip-text: per-template pre-projection features whose projection by P0 are noisy
    # versions of the task's classifier, so T(P0) ≈ the classifier.
    g = torch.Generator().manual_seed(0)
    d = p.task.classifier.shape[1]
    P0 = torch.randn(48, d, generator=g) * 0.05
    targets = p.task.classifier[:, None, :] + 0.05 * torch.randn(p.task.num_classes, 3, d, generator=g)
    p.task = dataclasses.replace(p.task, text_proj=P0, text_pre=targets @ torch.linalg.pinv(P0))
    return p


def fit(name, problem, val=None, seed=0, **hp):
    return create(name, **(FAST.get(name, {}) | hp)).fit(problem.task, problem.support, val, seed=seed)


def zero_shot_logits(problem, z):
    t = problem.task
    return clip_logits(z, t.W0, t.bias, t.classifier, t.logit_scale)


@pytest.mark.parametrize("name", ALL)
def test_trains_beats_chance_and_reloads(problem, name):
    task_before = copy.deepcopy(problem.task)
    m = fit(name, problem, problem.val)
    z, y = problem.test.features, problem.test.labels
    acc = accuracy(m.logits(z), y)
    assert acc > 100 / problem.task.num_classes + 20, (name, acc)
    for field in ("W0", "bias", "classifier", "text_pre", "text_proj"):
        assert torch.equal(getattr(problem.task, field), getattr(task_before, field)), (name, field)
    reloaded = create(name, **FAST.get(name, {})).load_state_dict(problem.task, m.state_dict())
    torch.testing.assert_close(reloaded.logits(z), m.logits(z))
    assert m.config()["method"] == name
    assert "how" in str(m.selected_) or name == "zeroshot"


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("zeroshot",)])
def test_adaptation_beats_zero_shot(problem, name):
    zs = accuracy(zero_shot_logits(problem, problem.test.features), problem.test.labels)
    acc = accuracy(fit(name, problem, problem.val).logits(problem.test.features), problem.test.labels)
    assert acc > zs, (name, acc, zs)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_numbers(problem, name):
    a = fit(name, problem, problem.val, seed=5).logits(problem.test.features)
    b = fit(name, problem, problem.val, seed=5).logits(problem.test.features)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_selection_never_depends_on_test_labels(problem, name):
    # fit() has no test argument; permuting the test labels (and even the test features) changes nothing.
    a = fit(name, problem, problem.val)
    shuffled = copy.copy(problem)
    shuffled.test = Validation(
        problem.test.features.flip(0), problem.test.labels[torch.randperm(len(problem.test.labels))]
    )
    b = create(name, **FAST.get(name, {})).fit(shuffled.task, shuffled.support, shuffled.val)
    assert a.selected_ == b.selected_


@pytest.mark.parametrize(
    "name, hp",
    [
        ("zs-lp", dict(epochs=0)),
        ("clap", dict(epochs=0)),
        ("taskres", dict(epochs=0)),
        ("linear-adapter", dict(steps=0)),
        ("prolip-text", dict(steps=0)),
        ("tip-adapter", dict(alpha=0.0, search=False)),
    ],
)
def test_starts_at_zero_shot(problem, name, hp):
    m = create(name, **hp).fit(problem.task, problem.support, problem.val)
    z = problem.test.features
    expected = zero_shot_logits(problem, z)
    if name == "prolip-text":  # its T(P0) approximates the task classifier; compare with that one
        from prolip.methods.complements import text_classifier

        T0 = text_classifier(problem.task.text_pre, problem.task.text_proj)
        expected = clip_logits(z, problem.task.W0, problem.task.bias, T0, problem.task.logit_scale)
    torch.testing.assert_close(m.logits(z), expected, rtol=1e-4, atol=1e-4)


def test_linear_probe_ignores_text(problem):
    m1 = fit("linear-probe", problem, problem.val)
    other_task = dataclasses.replace(
        problem.task, classifier=F.normalize(torch.randn_like(problem.task.classifier), dim=-1)
    )
    m2 = create("linear-probe").fit(other_task, problem.support, problem.val)
    assert torch.equal(m1.predict(problem.test.features), m2.predict(problem.test.features))
    assert m1.selected_ == m2.selected_
    with pytest.raises(ValueError, match="another text classifier"):
        m1.logits(problem.test.features, classifier=problem.task.classifier)


def test_tip_adapter_search_uses_validation_and_grid(problem):
    m = create("tip-adapter").fit(problem.task, problem.support, problem.val)
    assert m.selected_["how"] == "validation"
    assert accuracy(m.logits(problem.val.features), problem.val.labels) == pytest.approx(m.selected_["val_accuracy"])
    rule = create("tip-adapter").fit(problem.task, problem.support)
    assert rule.selected_ == {"alpha": 1.17, "beta": 1.0, "how": "rule"}  # configs/imagenet.yaml init_alpha


def test_clap_multipliers_come_from_zero_shot_performance(problem):
    from prolip.methods.clap import zero_shot_class_performance

    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    perf = zero_shot_class_performance(logits, torch.tensor([0, 0, 1]), 2)
    p = torch.tensor([10.0, 0.0]).softmax(0)
    torch.testing.assert_close(perf, torch.stack([(p[0] + p[1]) / 2, p[1]]))
    # The constraint keeps CLAP's prototypes closer to the text embeddings than ZS-LP's.
    clap, zslp = fit("clap", problem), fit("zs-lp", problem)
    dist = lambda m: (m.prototypes - problem.task.classifier).norm()
    assert dist(clap) < dist(zslp)
    adaptive = fit("clap", problem, adaptive=True)
    assert adaptive.selected_["multipliers_mean"] != clap.selected_["multipliers_mean"]


def test_linear_adapter_pull_toward_identity(problem):
    weak = fit("linear-adapter", problem, lam=0.0, lr=1e-2)
    strong = fit("linear-adapter", problem, lam=10.0, lr=1e-2)
    eye = torch.eye(weak.A.shape[0])
    assert (strong.A - eye).norm() < (weak.A - eye).norm()


def test_prolip_text_needs_text_side(problem):
    bare = dataclasses.replace(problem.task, text_pre=None, text_proj=None)
    with pytest.raises(ValueError, match="text_side=True"):
        create("prolip-text").fit(bare, problem.support)


def test_unknown_hyperparameter_is_rejected():
    with pytest.raises(ValueError, match="clap: unknown hyperparameter.*nope"):
        create("clap", nope=1)
