"""The one interface every test-time method shares, so the bench's tta protocol scores them all the same way.

A test-time method sees a :class:`Scene` (what every method of one dataset shares) and, for each batch of test
images, their view features z [B, V, D_pre] (view 0 the center crop) and a projection W [D_pre, D] to start from.
Two kinds, told apart by the ``streams`` capability, both driven through the same three calls
(``start(scene, W)``, ``observe(z)`` per batch, ``finish(labels)`` once every image is seen):

- a :class:`PerImageMethod` scores each batch on its own: ``logits(z, W, scene)`` → [B, C], which ``observe``
  returns; it keeps nothing between images (test-time ProLIP, TPT, ZERO, the view ensemble, plain zero-shot);
- a :class:`StreamMethod` collects what it needs of each batch (``observe`` returns None) and scores the whole
  stream in ``finish`` (TDA: its caches depend on the order the images arrive in).

A method also declares, as class attributes, what the bench reports about it without ever testing its name: the
views it reads per image (``views_read``), the parameters it adapts per image (``adapted_per_image``), its
text-encoder forward passes (``text_passes_per_image``), whether it starts from each few-shot method's fitted W
(``starts_from_fit``: test-time ProLIP) or from zero-shot CLIP's W0, the record fields it writes besides accuracy
(``record_fields``), and how its settings enter a record's ``setting`` (``shared``, ``recorded``,
``recorded_when_off``).

Settings are stored once, as attributes named like the ``__init__`` arguments (as few-shot methods' hyperparameters
are, :mod:`prolip.methods.base`), with one constraint each from :mod:`prolip.constraints`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from prolip.constraints import Configurable, Constraint, Number

# Settings the experiment file's ``tta`` section gives every method that declares them ``shared`` (test-time
# ProLIP's confident ratio, AdamW steps and lr; TPT and the view ensemble reuse the first two).
SECTION_SETTINGS = ("ratio", "steps", "lr")
RATIO = Number(low=0, high=1, open_low=True)  # a share of the views, kept by confidence: at least one always is


@dataclass(frozen=True)
class Scene:
    """What every test-time method of one dataset shares: the text classifier [C, D] (rows normalised), the frozen
    projection bias, the logit scale, the class names, the backbone (text encoder for TPT), the reader's dataset
    name (per-dataset settings, TDA's), and the views extracted per image with the seed they are drawn from."""

    classifier: Tensor
    bias: Tensor | None
    logit_scale: float
    classnames: tuple[str, ...]
    backbone: Any
    dataset: str
    views: int
    view_seed: int = 0


class TestTimeMethod(Configurable, ABC):
    """Scores test images from their views; subclass :class:`PerImageMethod` or :class:`StreamMethod`, set ``name``
    and register with :func:`prolip.tta.register`."""

    __test__ = False  # a library class named Test*: not a pytest test class

    name: ClassVar[str]
    constraints: ClassVar[dict[str, Constraint]] = {}
    streams: ClassVar[bool] = False
    # It adapts each few-shot method's own W (fitted on the support set); otherwise it runs once, from W0.
    starts_from_fit: ClassVar[bool] = False
    # Its settings that the ``tta`` section sets (SECTION_SETTINGS) unless the method's own entry does.
    shared: ClassVar[tuple[str, ...]] = ()
    # Settings a record's ``setting`` names even at their default (records written before this interface named
    # ZERO's gamma and TDA's orders so); other settings are named only when an experiment changes them.
    recorded: ClassVar[tuple[str, ...]] = ()
    # Its row's flag is in every record's ``setting``, false while the row is off (TPT's and the view ensemble's
    # were, before the optional rows existed), so those records keep their cell ids.
    recorded_when_off: ClassVar[bool] = False
    # Record fields ``finish`` writes besides ``accuracy``.
    record_fields: ClassVar[tuple[str, ...]] = ()

    # -- what the bench reports ------------------------------------------------------------------------------
    def views_read(self, views: int, dataset: str) -> int:
        """Views of each image it reads when ``views`` are extracted per image of ``dataset``."""
        return views

    def adapted_per_image(self, scene: Scene, W: Tensor) -> int:
        """Parameters it adapts for each test image (reset before the next)."""
        return 0

    def text_passes_per_image(self, scene: Scene) -> int | None:
        """Text-encoder forward passes per test image; None when it never runs the text encoder."""
        return None

    # -- scoring ---------------------------------------------------------------------------------------------
    def start(self, scene: Scene, W: Tensor) -> None:
        """Begin one dataset's stream of test images, every image starting from W [D_pre, D]."""
        self.scene, self.W = scene, W

    @abstractmethod
    def observe(self, z: Tensor) -> Tensor | None:
        """One batch's view features z [B, V, D_pre]: its logits [B, C], or None when scored in ``finish``."""

    def finish(self, labels: Tensor) -> dict[str, Any]:
        """Record fields once the stream is over (a stream method's ``accuracy`` and its ``record_fields``)."""
        return {}


class PerImageMethod(TestTimeMethod):
    """Each image is scored on its own views alone, starting from the same W: batches are independent."""

    def observe(self, z: Tensor) -> Tensor:
        return self.logits(z, self.W, self.scene)

    @abstractmethod
    def logits(self, z: Tensor, W: Tensor, scene: Scene) -> Tensor:
        """Logits [B, C] for view features z [B, V, D_pre], each image adapted (if at all) from W."""


class StreamMethod(TestTimeMethod):
    """Images arrive one after another and what was seen shapes later predictions; scored when the stream ends."""

    streams = True

    @abstractmethod
    def observe(self, z: Tensor) -> None: ...

    @abstractmethod
    def finish(self, labels: Tensor) -> dict[str, Any]:
        """Must hold ``accuracy`` (%) over ``labels`` [N], in the order the batches were observed."""
