"""The one interface every adaptation method shares (scikit-learn style), so the harness can swap them.

A method sees only cached features and frozen CLIP pieces (a :class:`Task`), never images or test labels. It
declares what it can do once, as ``capabilities = Capabilities(...)`` (:mod:`prolip.methods.capabilities`: text
side, other classifiers, an adapted projection, learning, training inside the image encoder, its cached views, what
it selects on validation, whether it reads the center crops), so no code outside ``methods/`` ever compares method
names. What the bench measures of a fit it asks the method: ``trainable_parameters()`` and ``forward_passes()``;
what export merges, ``checkpoint_tensors``.

Hyperparameters are stored once, as attributes named like the ``__init__`` arguments, and read back from the
signature (``get_params``); ``constraints`` declares a check per hyperparameter, applied at ``create`` and ``fit``;
``validation_params`` the hyperparameters that switch on what it ``selects`` (ProLIP: ``grid=True``);
``dataset_defaults`` the hyperparameters its original sets per benchmark dataset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from prolip.constraints import Configurable, Constraint, HyperparameterError, check_known
from prolip.errors import ProlipError
from prolip.methods.capabilities import NO_CACHED_VIEWS, Capabilities

_CAPABILITY_NAMES = frozenset(f.name for f in fields(Capabilities))


class ViewSource(Protocol):
    """Augmented views of the support set's pre-projection features: V views of N images, each [N, D_pre].

    Implementations: an in-memory tensor, or cached unit files streamed one view at a time.
    """

    @property
    def num_views(self) -> int: ...

    @property
    def num_images(self) -> int: ...

    def view(self, t: int) -> Tensor:
        """View t of every support image, [N, D_pre] float32."""
        ...


class TensorViews:
    """A :class:`ViewSource` over an in-memory tensor [V, N, D_pre]."""

    def __init__(self, views: Tensor):
        self.views = views.unsqueeze(0) if views.dim() == 2 else views

    @property
    def num_views(self) -> int:
        return self.views.shape[0]

    @property
    def num_images(self) -> int:
        return self.views.shape[1]

    def view(self, t: int) -> Tensor:
        return self.views[t % self.num_views].float()


@dataclass(frozen=True)
class Task:
    """Frozen CLIP pieces a method may use (a different task is ``dataclasses.replace(task, ...)``). W0 is in right
    layout [D_pre, D]."""

    W0: Tensor
    bias: Tensor | None
    classifier: Tensor  # [C, D], rows normalised
    logit_scale: float
    shots: int
    # The text side, for methods that adapt the text projection: pre-projection text features per template
    # [C, n_templates, D_text_pre] and the text projection [D_text_pre, D].
    text_pre: Tensor | None = None
    text_proj: Tensor | None = None
    # The unnormalised mean over templates of the text embeddings [C, D]: where TaskRes, ZS-LP and CLAP start.
    text_mean: Tensor | None = None
    # The frozen backbone itself, for methods that train inside the image encoder (``encodes_images``).
    backbone: Any = None
    # W's last rows that no method trains (a MAP head's residual, ``ProjectionSite.residual_rows``; 0 elsewhere):
    # they stay at W0's (:func:`prolip.methods._common.split_rows`).
    frozen_rows: int = 0

    @property
    def num_classes(self) -> int:
        return self.classifier.shape[0]


@dataclass
class Support:
    """The few-shot training set: augmented views, labels, and the un-augmented (center-crop) features.

    ``center`` is a tensor [N, D_pre] or a zero-argument callable producing it, so the center crops are only
    extracted for methods that read them (the linear probe).
    """

    views: ViewSource
    labels: Tensor
    center: Tensor | Callable[[], Tensor]
    # The support images themselves (paths and labels, in the order of ``labels``), for methods that train inside
    # the image encoder; None for feature-only support sets (synthetic problems).
    images: Any = None

    def center_features(self) -> Tensor:
        if callable(self.center):
            self.center = self.center()
        return self.center


@dataclass
class Validation:
    """A few-shot validation set (center-crop features and labels) for methods that select hyperparameters."""

    features: Tensor
    labels: Tensor


class FitError(ProlipError, RuntimeError):
    """Training failed in a way the user must hear about (e.g. it produced non-finite weights)."""


class Method(Configurable, ABC):
    """fit on a support set, then produce logits for pre-projection features.

    Subclasses set ``name``, register with :func:`prolip.methods.register`, take their hyperparameters as keyword
    arguments of ``__init__`` stored unchanged under the same names, and implement ``_fit`` and ``_logits``. After
    ``fit``, ``selected_`` records what was chosen and how ("validation", "rule" or "given").
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    constraints: ClassVar[dict[str, Constraint]] = {}
    # The hyperparameters that switch on what it ``selects`` on a validation set (none: it selects whenever given
    # one); applied by ``configure(validate=True)``.
    validation_params: ClassVar[dict[str, Any]] = {}
    # Hyperparameters the method's original code sets per benchmark dataset (by the readers' dataset names), each
    # cited where it is declared; the harness applies them under whatever the experiment sets.
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    selected_: dict[str, Any]
    task: Task | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # One source of truth: a capability set as a loose class attribute (the old way) would be silently ignored.
        super().__init_subclass__(**kwargs)
        loose = sorted(_CAPABILITY_NAMES & set(vars(cls)))
        if loose:
            raise TypeError(
                f"{cls.__qualname__}: declare {', '.join(loose)} in capabilities = Capabilities(...), "
                "not as class attributes"
            )
        if not isinstance(cls.capabilities, Capabilities):
            raise TypeError(f"{cls.__qualname__}: capabilities must be a prolip.methods.Capabilities")

    # -- hyperparameters (param_names, defaults, get_params, check_params: Configurable) ----------------------
    def set_params(self, **params: Any) -> Method:
        check_known(self.name, list(params), self.param_names())
        for key, value in params.items():
            setattr(self, key, value)
        return self

    # -- fitting and predicting ------------------------------------------------------------------------------
    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> Method:
        self.check_params()
        if self.capabilities.uses_text_side and (task.text_pre is None or task.text_proj is None):
            raise ValueError(
                f"{self.name} needs the text side (task.text_pre, task.text_proj): build the task with text_side=True"
            )
        _check_inputs_finite(self.name, support, val)
        self.task, self.selected_ = task, {}
        self._fit(task, support, val, seed)
        self._check_finite("training")
        return self

    def fit_each(self, task: Task, support: Support, settings: Sequence[dict[str, Any]], seed: int = 0) -> list[Method]:
        """One fitted copy per hyperparameter setting (a validation-free sweep); methods that can train several
        settings in one computation override this."""
        return [type(self)(**{**self.get_params(), **s}).fit(task, support, None, seed) for s in settings]

    @abstractmethod
    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None: ...

    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        """Logits [N, C] for pre-projection features z [N, D_pre]; ``classifier`` swaps in another text
        classifier, for methods whose capabilities say ``accepts_classifier``."""
        if self.task is None:
            raise RuntimeError(f"{self.name}: call fit() or load_state_dict() before logits()")
        if classifier is not None and not self.capabilities.accepts_classifier:
            raise ValueError(
                f"{self.name} learns class-specific weights from the support set; it cannot score "
                "another class set with another text classifier"
            )
        return self._logits(z.float(), self.task.classifier if classifier is None else classifier)

    @abstractmethod
    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor: ...

    def image_logits(self, paths: Sequence[Any], classifier: Tensor | None = None) -> Tensor:
        """Logits [N, C] for image files, through the method's own (adapted) image encoder; only for methods that
        ``encodes_images``."""
        raise NotImplementedError(f"{self.name} scores cached features: use logits()")

    def predict(self, z: Tensor) -> Tensor:
        return self.logits(z).argmax(dim=-1)

    def projection(self) -> Tensor | None:
        """The adapted W [D_pre, D] when predictions are exactly CLIP's with W; None for other methods."""
        return None

    # -- what the bench measures of a fit --------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        """Numbers the fit learned: by default the size of its fitted state less the frozen task tensors it keeps
        (ProLIP's W0, a projection bias); 0 for a method that learns nothing. A method whose state holds other
        fixed tensors (a frozen classifier, a cache of support features) counts its own."""
        if not self.capabilities.learns:
            return 0
        task = self.task
        kept = (task.W0, task.bias, task.classifier, task.text_mean) if task is not None else ()
        frozen = {id(t) for t in kept if t is not None}
        return sum(v.numel() for v in self.state_dict().values() if id(v) not in frozen)

    def forward_passes(self) -> int | None:
        """Encoder forward passes the last fit ran itself, beyond the cached features it was handed (the bench
        counts those as it hands them over): 0 for a method on cached features; None when not known (a method
        that trains inside the image encoder and does not count its own)."""
        return None if self.capabilities.encodes_images else 0

    def classifier_head(self) -> Tensor | None:
        """The classifier [C, D] this fitted method's predictions use in place of the task's text classifier (a
        method that re-encodes its prompts through a tuned text encoder, or learns one): the head ``prolip export``
        writes beside the checkpoint. None: the task's own (the zero-shot head)."""
        return None

    def checkpoint_tensors(self, backbone: Any) -> dict[str, Tensor] | None:
        """The tensors of ``backbone``'s checkpoint this fitted method changes, named as in the model's state dict
        and in its native layout (``prolip export`` merges them); None when its predictions are not those of a
        CLIP checkpoint. By default: the adapted projection of a method that ``exposes_projection``."""
        W = self.projection() if self.capabilities.exposes_projection else None
        if W is None:
            return None
        site = backbone.projection()
        return {site.param_name: site.to_native(W)}

    # -- saving and loading ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that, with ``config()``, rebuild the fitted method (saved as safetensors)."""
        return {}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor ``state_dict`` holds, for a method fitted on ``task`` (-1: any size)."""
        return {}

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> Method:
        """Rebuild a fitted method; refuses missing, extra, misshapen or non-finite tensors by name."""
        self.check_params()
        expected = self.state_shapes(task)
        extra = sorted(set(state) - set(expected))
        if extra:
            raise ValueError(f"{self.name} state has unexpected tensor(s) {extra}: was it saved by another method?")
        for key, shape in expected.items():
            if key not in state:
                raise ValueError(f"{self.name} state has no tensor {key!r} (it holds {sorted(state)})")
            got = tuple(state[key].shape)
            if len(got) != len(shape) or any(want not in (-1, have) for want, have in zip(shape, got, strict=True)):
                raise ValueError(
                    f"{self.name} state tensor {key!r} has shape {got}, expected {shape} (-1: any) for "
                    "this backbone and class set"
                )
        self.task, self.selected_ = task, {"how": "loaded"}
        self._load(task, {k: v.float() for k, v in state.items()})
        self._check_finite("the saved state")
        return self

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        """Set the fitted tensors from a checked state (methods with state override this)."""
        return None

    def _check_finite(self, what: str) -> None:
        bad = [k for k, v in self.state_dict().items() if not torch.isfinite(v).all()]
        if bad:
            hint = " (is the learning rate too large?)" if what == "training" else ""
            raise FitError(f"{self.name}: {what} produced non-finite values in {', '.join(bad)}{hint}")

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "hyperparameters": self.get_params(), "selected": getattr(self, "selected_", {})}


def _check_inputs_finite(name: str, support: Support, val: Validation | None) -> None:
    """Non-finite features (a corrupt cache row, a backbone that overflowed) fail here, by name, rather than deep in
    a solver or as NaN weights; one view stands for the support (each view comes from the same images)."""
    parts = {"support features": support.views.view(0)} if support is not None else {}
    if val is not None:
        parts["validation features"] = val.features
    bad = [what for what, x in parts.items() if not torch.isfinite(x).all()]
    if bad:
        raise FitError(
            f"{name}: the {' and '.join(bad)} contain non-finite values (NaN/Inf); the feature cache or "
            "the backbone produced them, so clear that cache entry or check the model"
        )


__all__ = [
    "NO_CACHED_VIEWS",
    "Capabilities",
    "FitError",
    "HyperparameterError",
    "Method",
    "Support",
    "Task",
    "TensorViews",
    "Validation",
    "ViewSource",
]
