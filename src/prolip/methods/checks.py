"""``check_method(cls)``: the contract every few-shot method keeps, runnable by a new method's author (as
scikit-learn's ``check_estimator``), so the CLI, the bench and saved runs can rely on what a method declares.

Each check is a small function that raises :class:`MethodContractError` naming the method and the broken promise;
``check_method`` runs them on a small seeded problem of random features (no images, no CLIP weights) and returns
the names of the checks it ran. What a method declares in its ``capabilities`` is held to what it does, the center
crops included: the bench extracts the support's center crops only for methods that declare they read them, so a
false declaration would make the plan and the run disagree. Methods that train inside the image encoder
(``encodes_images``) need a backbone and images, so only their declaration is checked here (the returned names say
so).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.constraints import HyperparameterError, check_declared
from prolip.functional import clip_logits
from prolip.methods.base import Method, Support, Task, TensorViews, Validation


class MethodContractError(AssertionError):
    """A method breaks a promise of the Method interface; the message names the method and the promise."""


@dataclass
class ContractProblem:
    """A small seeded few-shot problem: a task with a text side, support views, validation and test features."""

    task: Task
    support: Support
    val: Validation
    test: Tensor


def contract_problem(classes: int = 4, shots: int = 4, d_pre: int = 16, d: int = 8, seed: int = 0) -> ContractProblem:
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    means = randn(classes, d_pre) * 3
    labels = torch.arange(classes).repeat_interleave(shots)
    text_proj, text_pre = randn(12, d) * 0.3, randn(classes, 2, 12)
    classifier = F.normalize(text_pre.mean(1) @ text_proj, dim=-1)
    task = Task(randn(d_pre, d) * 0.2, randn(d) * 0.01, classifier, 100.0, shots, text_pre, text_proj, classifier * 10)
    views = means[labels] + randn(3, len(labels), d_pre)
    support = Support(TensorViews(views), labels, center=means[labels] + randn(len(labels), d_pre) * 0.5)
    val = Validation(means[labels] + randn(len(labels), d_pre), labels)
    return ContractProblem(task, support, val, means.repeat(2, 1) + randn(2 * classes, d_pre))


def _fail(cls: type[Method], promise: str) -> None:
    raise MethodContractError(
        f"{getattr(cls, 'name', cls.__name__)!r} ({cls.__module__}.{cls.__qualname__}): {promise}"
    )


def check_declaration(cls: type[Method]) -> None:
    """A name; every hyperparameter a keyword with a default that its constraint accepts, stored under its own
    name; unknown hyperparameters refused."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        _fail(cls, "declares no name")
    try:
        check_declared(cls.name, cls.param_names(), cls.constraints)
    except TypeError as e:
        _fail(cls, str(e))
    defaults = cls.defaults()
    if any(v is inspect.Parameter.empty for v in defaults.values()):
        _fail(cls, f"every hyperparameter needs a default (got {defaults})")
    try:  # a rule names hyperparameters: one that is not the method's fails here, not in the bench's plan
        cls.capabilities.reads_center_crops(defaults, 1)
    except Exception as e:  # noqa: BLE001 - whatever the rule raises is the broken promise
        _fail(cls, f"capabilities.reads_center fails on its default hyperparameters ({type(e).__name__}: {e})")
    method = cls()
    method.check_params()
    if method.get_params() != defaults:
        _fail(cls, f"__init__ must store each hyperparameter unchanged under its name ({method.get_params()})")
    try:
        cls(no_such_hyperparameter=1)  # type: ignore[call-arg]
    except (TypeError, HyperparameterError):
        pass
    else:
        _fail(cls, "accepts an unknown hyperparameter")


def _fitted(cls: type[Method], p: ContractProblem, hp: dict[str, Any], seed: int = 0, **task: Any) -> Method:
    return cls(**hp).fit(dataclasses.replace(p.task, **task), p.support, p.val, seed=seed)


def _fit_watching_center(
    cls: type[Method], hp: dict[str, Any], task: Task, support: Support, val: Validation | None
) -> tuple[Method, bool]:
    """``cls`` fitted on ``support``, and whether the fit called ``support.center_features()``."""
    read: list[bool] = []

    def center() -> Tensor:
        read.append(True)
        return support.center_features()

    method = cls(**hp).fit(task, dataclasses.replace(support, center=center), val, seed=0)
    return method, bool(read)


def check_fit_and_logits(cls: type[Method], p: ContractProblem, hp: dict[str, Any]) -> tuple[Method, bool]:
    """Logits [N, C], finite; the same seed gives the same numbers; the config is JSON. Returns the fitted method
    and whether its fit read the support's center crops."""
    method, read = _fit_watching_center(cls, hp, p.task, p.support, p.val)
    logits = method.logits(p.test)
    if tuple(logits.shape) != (len(p.test), p.task.num_classes) or not torch.isfinite(logits).all():
        _fail(cls, f"logits must be finite [N, C] = {(len(p.test), p.task.num_classes)}, got {tuple(logits.shape)}")
    if not torch.equal(_fitted(cls, p, hp).logits(p.test), logits):
        _fail(cls, "two fits with the same seed must give the same logits")
    try:
        json.dumps(method.config())
    except TypeError as e:
        _fail(cls, f"config() must be JSON ({e})")
    return method, read


def check_state_round_trip(cls: type[Method], p: ContractProblem, hp: dict[str, Any], method: Method) -> None:
    """``state_dict`` holds exactly what ``state_shapes`` declares, and loading it gives the same logits."""
    state, shapes = method.state_dict(), method.state_shapes(p.task)
    if set(state) != set(shapes):
        _fail(cls, f"state_dict keys {sorted(state)} differ from state_shapes {sorted(shapes)}")
    loaded = cls(**hp).load_state_dict(p.task, state)
    if not torch.allclose(loaded.logits(p.test), method.logits(p.test), atol=1e-5, rtol=1e-5):
        _fail(cls, "a method rebuilt from its state_dict must give the logits it gave")


def check_capabilities(cls: type[Method], p: ContractProblem, hp: dict[str, Any], method: Method) -> None:
    """What the method declares is what it does: a projection that reproduces its logits, another classifier
    accepted or refused, the text side required, no learning when it says it learns nothing."""
    t, can = p.task, cls.capabilities
    if can.exposes_projection:
        W = method.projection()
        if W is None or tuple(W.shape) != tuple(t.W0.shape):
            _fail(cls, "exposes_projection: projection() must return W [D_pre, D]")
        elif not torch.allclose(clip_logits(p.test, W, t.bias, t.classifier, t.logit_scale), method.logits(p.test)):
            _fail(cls, "exposes_projection: its logits must be CLIP's with projection() as W")
    other = F.normalize(torch.randn(t.num_classes + 1, t.classifier.shape[1], generator=torch.Generator()), dim=-1)
    try:
        shape = tuple(method.logits(p.test, classifier=other).shape)
    except ValueError:
        if can.accepts_classifier:
            _fail(cls, "accepts_classifier: logits(z, classifier=T) must score another class set")
    else:
        if not can.accepts_classifier or shape != (len(p.test), t.num_classes + 1):
            _fail(cls, f"logits(z, classifier=T) gave {shape} though accepts_classifier={can.accepts_classifier}")
    try:  # the base class refuses a declared text side's absence; an undeclared one would crash deep inside
        _fitted(cls, p, hp, text_pre=None, text_proj=None)
    except ValueError:
        if not can.uses_text_side:
            _fail(cls, "needs the text side (task.text_pre, task.text_proj) but does not declare uses_text_side")
    except (TypeError, AttributeError, RuntimeError) as e:
        _fail(cls, f"reads the text side (task.text_pre, task.text_proj) without declaring uses_text_side ({e})")
    else:
        if can.uses_text_side:
            _fail(cls, "uses_text_side: fitting without the text side must be refused")
    if not can.learns:
        again = cls(**hp).fit(p.task, contract_problem(seed=1).support, p.val, seed=1)
        if not torch.equal(again.logits(p.test), method.logits(p.test)):
            _fail(cls, "learns=False: its logits must not depend on the support set or the seed")


def check_center_crops(cls: type[Method], p: ContractProblem, hp: dict[str, Any], read: bool) -> None:
    """Fitting calls ``support.center_features()`` exactly when ``capabilities.reads_center`` says so for these
    hyperparameters: on the problem's support (``read``: what the first fit did) and, for a rule (which may depend
    on the view count), on one of a single view too."""
    params = {**cls.defaults(), **hp}
    cases = [(p.support.views.num_views, read)]
    if callable(cls.capabilities.reads_center):
        one_view = dataclasses.replace(p.support, views=TensorViews(p.support.views.view(0)))
        cases.append((1, _fit_watching_center(cls, hp, p.task, one_view, p.val)[1]))
    for views, did in cases:
        declared = cls.capabilities.reads_center_crops(params, views)
        if did != declared:
            _fail(
                cls,
                f"capabilities.reads_center says {declared} for {views} view(s), but fitting "
                f"{'reads' if did else 'does not read'} support.center_features() (the bench plans center-crop "
                "passes from the declaration)",
            )


def check_validation(cls: type[Method], p: ContractProblem, hp: dict[str, Any]) -> None:
    """A method that ``selects`` does so on a validation set, with its ``validation_params`` set (none: it selects
    whenever it is given one), and records how in ``selected_``."""
    if not cls.capabilities.selects:
        return
    method = cls(**{**hp, **cls.validation_params}).fit(p.task, p.support, p.val, seed=0)
    if method.selected_.get("how") != "validation":
        _fail(
            cls,
            f"selects: fitting on a validation set must record selected_['how'] = 'validation' ({method.selected_})",
        )


CHECKS: tuple[str, ...] = (
    "declaration",
    "fit_and_logits",
    "state_round_trip",
    "capabilities",
    "center_crops",
    "validation",
)


def check_method(cls: type[Method], hyperparameters: dict[str, Any] | None = None) -> list[str]:
    """Run every contract check on ``cls`` (with ``hyperparameters`` over its defaults, e.g. a short budget);
    returns the checks run. A broken promise is a :class:`MethodContractError` naming it."""
    hp = dict(hyperparameters or {})
    check_declaration(cls)
    # trains inside the image encoder: needs images and a backbone (tests/test_finetune.py)
    if cls.capabilities.encodes_images:
        return ["declaration"]
    p = contract_problem()
    method, read = check_fit_and_logits(cls, p, hp)
    steps: dict[str, Callable[[], None]] = {
        "state_round_trip": lambda: check_state_round_trip(cls, p, hp, method),
        "capabilities": lambda: check_capabilities(cls, p, hp, method),
        "center_crops": lambda: check_center_crops(cls, p, hp, read),
        "validation": lambda: check_validation(cls, p, hp),
    }
    for step in steps.values():
        step()
    return ["declaration", "fit_and_logits", *steps]
