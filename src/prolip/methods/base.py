"""The one interface every adaptation method shares (scikit-learn style), so the harness can swap them.

A method sees only cached features and frozen CLIP pieces (a :class:`Task`), never images or test labels.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor


class ViewSource(Protocol):
    """Augmented views of the support set's pre-projection features: V views of N images, each [N, D_pre].

    Implementations: an in-memory tensor, or memory-mapped cache shards streamed one view at a time.
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
        if views.dim() == 2:
            views = views.unsqueeze(0)
        self.views = views

    @property
    def num_views(self) -> int:
        return self.views.shape[0]

    @property
    def num_images(self) -> int:
        return self.views.shape[1]

    def view(self, t: int) -> Tensor:
        return self.views[t % self.num_views].float()


@dataclass
class Task:
    """Frozen CLIP pieces a method may use. W0 is in right layout [D_pre, D]."""

    W0: Tensor
    bias: Tensor | None
    classifier: Tensor  # [C, D], rows normalised
    logit_scale: float
    shots: int
    # Optional text side, for methods that adapt the text projection (pre-projection text features per
    # template [C, n_templates, D_text_pre] and the text projection [D_text_pre, D]).
    text_pre: Tensor | None = None
    text_proj: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.classifier.shape[0]


@dataclass
class Support:
    """The few-shot training set: augmented views and labels. ``center`` = un-augmented features [N, D_pre]."""

    views: ViewSource
    labels: Tensor
    center: Tensor | None = None


@dataclass
class Validation:
    """A few-shot validation set (center-crop features and labels) for methods that select hyperparameters."""

    features: Tensor
    labels: Tensor


class Method(ABC):
    """fit on a support set, then produce logits for pre-projection features.

    Subclasses set ``name`` and register with :func:`prolip.methods.register`. After ``fit``,
    ``selected_`` holds any hyperparameters chosen (and how: "validation" or "rule").
    """

    name: ClassVar[str]

    def __init__(self, **hyperparameters: Any):
        self.hyperparameters = hyperparameters
        self.selected_: dict[str, Any] = {}

    @abstractmethod
    def fit(self, task: Task, support: Support, val: Validation | None = None, seed: int = 0) -> "Method":
        ...

    @abstractmethod
    def logits(self, z: Tensor, classifier: Tensor | None = None) -> Tensor:
        """Logits [N, C] for features z [N, D_pre]. ``classifier`` swaps in another text classifier
        (cross-dataset, base-to-new) for methods where that is meaningful; others raise ValueError."""

    def predict(self, z: Tensor) -> Tensor:
        return self.logits(z).argmax(dim=-1)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that, with ``config()``, rebuild the fitted method (saved as safetensors)."""
        return {}

    def load_state_dict(self, task: Task, state: dict[str, Tensor]) -> "Method":
        raise NotImplementedError(f"{self.name} cannot be reloaded from a saved run")

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "hyperparameters": self.hyperparameters, "selected": self.selected_}
