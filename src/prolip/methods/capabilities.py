"""What a few-shot method can do and what it needs, declared once per method class as one frozen value
(``capabilities = Capabilities(...)``), so the CLI, the bench, the pipeline and export read one place and no code
outside ``methods/`` compares method names. :func:`prolip.methods.check_method` holds each declaration to what the
method does.

Hyperparameter declarations stay beside the hyperparameters on the class (``constraints``, ``dataset_defaults``,
``validation_params``): they are values of ``__init__`` arguments, checked by the constraints and merged under the
caller's settings, and a subclass that changes its hyperparameters changes them with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prolip.transforms import DEFAULT_AUGMENTATION

NO_CACHED_VIEWS = "none"  # a method's ``augmentation`` when it trains on the images, not on cached views

# Whether fitting reads the support's center crops, from the method's full hyperparameters and the number of cached
# views its support holds (ProKeR reads the crops exactly when it uses one view).
CenterRule = Callable[[Mapping[str, Any], int], bool]


@dataclass(frozen=True)
class Capabilities:
    """A method's declared capabilities.

    - ``uses_text_side``: it needs the text encoder's pre-projection features (``task.text_pre``, ``task.text_proj``);
    - ``accepts_classifier``: ``logits(z, classifier=T)`` scores another class set with another text classifier
      (base-to-new, cross-dataset); other methods learn class-specific weights and refuse;
    - ``exposes_projection``: predictions are exactly CLIP's with an adapted visual projection W, which
      ``projection()`` returns (test-time adaptation starts from it, export merges it into a checkpoint);
    - ``learns``: it learns from the support set (zero-shot does not, so its results depend on no shots or seed);
    - ``encodes_images``: it trains inside the image encoder, on the support images (``support.images``, with the
      backbone in ``task.backbone``), so it scores images (``image_logits``), not the cached features;
    - ``augmentation``: which cached augmented views it trains on (``prolip.transforms.AUGMENTATIONS``): "prolip"
      (RandomResizedCrop scale 0.5–1, the ProLIP reference's) or "dassl" (scale 0.08–1, what the Dassl-based
      originals train on); or ``NO_CACHED_VIEWS`` for a method that trains on the images themselves (its support's
      views are the center crops) or reads no support at all;
    - ``selects``: what it selects on a few-shot validation set ("" = nothing: validation-free by design; the
      hyperparameters that switch it on are the class's ``validation_params``);
    - ``reads_center``: whether fitting reads the support's un-augmented center crops (``support.center_features()``,
      extracted only for methods that do, so the bench plans their passes): a bool, or a :data:`CenterRule` of the
      hyperparameters and the support's view count.
    """

    uses_text_side: bool = False
    accepts_classifier: bool = False
    exposes_projection: bool = False
    learns: bool = True
    encodes_images: bool = False
    augmentation: str = DEFAULT_AUGMENTATION
    selects: str = ""
    reads_center: bool | CenterRule = False

    def __post_init__(self) -> None:
        flags = ("uses_text_side", "accepts_classifier", "exposes_projection", "learns", "encodes_images")
        wrong = [f for f in flags if not isinstance(getattr(self, f), bool)]
        if wrong:
            raise TypeError(f"Capabilities: {', '.join(wrong)} must be True or False")
        if not isinstance(self.augmentation, str) or not self.augmentation or not isinstance(self.selects, str):
            raise TypeError("Capabilities: augmentation must name a view set and selects must be a string")
        if not (isinstance(self.reads_center, bool) or callable(self.reads_center)):
            raise TypeError("Capabilities: reads_center must be a bool or a function (hyperparameters, views) -> bool")
        if self.encodes_images and self.augmentation != NO_CACHED_VIEWS:
            # it trains on the images with its own augmentation: caching views for it would be wasted work
            raise TypeError(
                f"Capabilities: a method that encodes_images reads no cached views (augmentation={NO_CACHED_VIEWS!r})"
            )

    def reads_center_crops(self, hyperparameters: Mapping[str, Any], views: int) -> bool:
        """Whether a fit with these (full) hyperparameters, on a support of ``views`` cached views, reads the
        support's center crops."""
        rule = self.reads_center
        return bool(rule(hyperparameters, views)) if callable(rule) else rule


__all__ = ["NO_CACHED_VIEWS", "Capabilities", "CenterRule"]
