"""``prolip.methods.check_method``: every registered method keeps the Method contract, and each check catches the
broken promise it is about (a toy method broken one way at a time)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from prolip.constraints import POSITIVE
from prolip.functional import clip_logits
from prolip.methods import available, check_method, method_class
from prolip.methods.base import Capabilities, Method
from prolip.methods.checks import CHECKS, MethodContractError

# Their 7×7 validation grids at 300 steps are the slowest checks by far; the contract does not depend on the steps.
SHORT = {name: {"steps": 30} for name in ("linear-adapter", "prolip", "prolip+tip-adapter-f", "prolip+taskres")}


@pytest.mark.parametrize("name", available())
def test_every_registered_method_keeps_the_contract(name):
    cls = method_class(name)
    ran = check_method(cls, SHORT.get(name))
    assert ran == (["declaration"] if cls.capabilities.encodes_images else list(CHECKS))


class Toy(Method):
    """A correct method: CLIP with W scaled by a learnt per-fit factor (the support's mean norm, so it learns)."""

    name = "toy"
    capabilities = Capabilities(accepts_classifier=True, exposes_projection=True, reads_center=True)
    constraints = {"scale": POSITIVE}

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.W: Tensor | None = None

    def _fit(self, task, support, val, seed):
        self.W = task.W0 * self.scale * (1 + support.center_features().norm(dim=-1).mean() / 1e3)
        self.selected_ = {"how": "rule"}

    def _logits(self, z, classifier):
        return clip_logits(z, self.W, self.task.bias, classifier, self.task.logit_scale)

    def projection(self):
        return self.W

    def state_dict(self):
        return {"W": self.W}

    def state_shapes(self, task):
        return {"W": tuple(task.W0.shape)}

    def _load(self, task, state):
        self.W = state["W"]


def broken(**attributes):
    return type("Broken", (Toy,), {"__module__": __name__, **attributes})


def declaring(**capabilities):
    """The toy declaring other capabilities than it has."""
    return broken(capabilities=replace(Toy.capabilities, **capabilities))


def _fit_on_views(self, task, support, val, seed):
    # reads the center crops only when its support has one view (as ProKeR does): a rule must say so
    x = support.center_features() if support.views.num_views == 1 else support.views.view(0)
    self.W = task.W0 * self.scale * (1 + x.norm(dim=-1).mean() / 1e3)
    self.selected_ = {"how": "rule"}


def _init_doubling(self, scale: float = 1.0):
    self.scale, self.W = scale * 2, None


BROKEN = {
    "an unconstrained hyperparameter": (broken(constraints={}), "needs a constraint"),
    "a hyperparameter stored under another value": (broken(__init__=_init_doubling), "unchanged under its name"),
    "logits of the wrong shape": (
        broken(_logits=lambda self, z, c: torch.zeros(len(z), c.shape[0] + 1)),
        r"finite \[N, C\]",
    ),
    "non-finite logits": (broken(_logits=lambda self, z, c: torch.full((len(z), c.shape[0]), float("nan"))), "finite"),
    "a fit that ignores its seed": (
        broken(_logits=lambda self, z, c: torch.randn(len(z), c.shape[0])),
        "same seed must give the same logits",
    ),
    "a state that does not rebuild it": (
        broken(_load=lambda self, task, state: setattr(self, "W", state["W"] * 2)),
        "rebuilt from its state_dict",
    ),
    "state shapes that miss a tensor": (broken(state_shapes=lambda self, task: {}), "differ from state_shapes"),
    "a projection that is not what it scores with": (
        broken(projection=lambda self: self.task.W0),
        "logits must be CLIP's with projection",
    ),
    "another class set scored with its own": (
        broken(_logits=lambda self, z, c: clip_logits(z, self.W, self.task.bias, self.task.classifier, 100.0)),
        "accepts_classifier=True",
    ),
    "learning while saying it learns nothing": (declaring(learns=False), "learns=False"),
    "selecting without recording how": (declaring(selects="everything"), "selected_"),
    "the center crops read while saying it reads none": (
        declaring(reads_center=False),
        "reads_center says False for 3 view.*but fitting reads support.center_features",
    ),
    "no center crop read while saying it reads them": (
        broken(_fit=_fit_on_views),
        "reads_center says True for 3 view.*but fitting does not read",
    ),
    "a center-crop rule naming no hyperparameter of the method": (
        declaring(reads_center=lambda hp, views: hp["augment_views"] == 1),
        "reads_center fails on its default hyperparameters",
    ),
    "a center-crop rule that misses the view count": (
        broken(_fit=_fit_on_views, capabilities=replace(Toy.capabilities, reads_center=lambda hp, views: False)),
        "reads_center says False for 1 view",
    ),
    "the text side read without saying so": (
        broken(_fit=lambda self, task, support, val, seed: setattr(self, "W", task.W0 + task.text_pre.sum() * 0)),
        "without declaring uses_text_side",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_check_catches_its_broken_promise(case):
    cls, promise = BROKEN[case]
    with pytest.raises(MethodContractError, match=promise):
        check_method(cls)


def test_the_correct_toy_passes_every_check():
    assert check_method(Toy) == list(CHECKS)
    rule = replace(Toy.capabilities, reads_center=lambda hp, views: views == 1)
    assert check_method(broken(_fit=_fit_on_views, capabilities=rule)) == list(CHECKS)


def test_a_capability_set_as_a_loose_class_attribute_is_refused():
    """One source of truth: the old way of declaring a capability would be silently ignored, so it is refused."""
    with pytest.raises(TypeError, match=r"declare learns in capabilities = Capabilities"):
        broken(learns=False)
    with pytest.raises(TypeError, match="capabilities must be"):
        broken(capabilities={"learns": False})


def test_the_bench_plans_center_crops_from_the_declaration():
    """ProKeR reads the center crops exactly when it uses one view: with augment_views=1 or one cached view."""
    can = method_class("proker").capabilities
    params = method_class("proker").defaults()
    assert not can.reads_center_crops(params, 10)
    assert can.reads_center_crops(params, 1) and can.reads_center_crops({**params, "augment_views": 1}, 10)
    assert method_class("linear-probe").capabilities.reads_center_crops({}, 10)
    assert not method_class("prolip").capabilities.reads_center_crops({}, 10)
