"""What the methods that train inside the encoders on the support images share (CLIP-LoRA, CLIP-SVD, 2SFS): the
frozen backbone they copy, the images they train on, the originals' AdamW schedule on the one image-level path
(:func:`prolip.image_training.train_image_encoder`), predicting from images with the classifier they learned, and, for
those that install modules into a copy of the model (:class:`InstalledAdapters`), saving, reloading and merging
them. Each method says only what it trains and how."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from prolip.backbones.base import Backbone
from prolip.data.types import LabeledImages
from prolip.image_training import (
    FinetuneSettings,
    adapted_copy,
    encoder_logits,
    frozen_result,
    model_parameters,
)
from prolip.methods.base import NO_CACHED_VIEWS, Capabilities, Method, Support, Task


class EncoderTraining(Method):
    """A method trained on the support images inside the encoders; ``adapted`` is its trained copy of the backbone
    and :meth:`classifier_head` the classifier it predicts with. Hyperparameters it reads here: lr, batch_size,
    weight_decay, min_lr, aug_seed, template."""

    # trains on the images (RandomResizedCrop 0.08–1 + flip, on the fly), not on cached views
    capabilities = Capabilities(encodes_images=True, augmentation=NO_CACHED_VIEWS)
    predicts_with: ClassVar[str] = "its adapted text encoder's classifier"  # what image_logits says it scores with
    default_template: ClassVar[str] = "a photo of a {}."  # when neither the method nor the dataset names one

    adapted: Backbone | None
    _forward_passes: int | None = None  # what the last fit counted of its own encoder passes (None: not fitted)
    lr: float
    batch_size: int
    weight_decay: float
    min_lr: float
    aug_seed: int
    template: str | None

    def forward_passes(self) -> int | None:
        """The image and text encoder passes the last fit ran (support batches, prompts); None before a fit."""
        return self._forward_passes

    def frozen_backbone(self, task: Task) -> Backbone:
        if task.backbone is None:
            raise ValueError(
                f"{self.name} trains inside the encoders and needs the frozen backbone (task.backbone); build the "
                "task with prolip.episode.EpisodeBuilder or pipeline.task_from_run"
            )
        return task.backbone

    def training_images(self, support: Support) -> LabeledImages:
        if support.images is None:
            raise ValueError(
                f"{self.name} trains on the support images, but this support set holds only features (build it "
                "with prolip.episode.EpisodeBuilder)"
            )
        return support.images

    def prompt(self, images: LabeledImages) -> str:
        """The one template its text side encodes: its own, else the dataset's first."""
        return self.template or (images.templates or [self.default_template])[0]

    def adamw_settings(self, backbone: Backbone, seed: int, iterations: int, first_epoch: int = 0) -> FinetuneSettings:
        """The originals' schedule: AdamW (eps 1e-8, its default), cosine to ``min_lr`` over ``iterations``
        batches of RandomResizedCrop(0.08-1) + flip views, logits of the CLIP head; decoding workers on a GPU."""
        on_gpu = torch.device(backbone.device).type == "cuda"
        return FinetuneSettings(
            lr=self.lr,
            epochs=0,
            batch_size=self.batch_size,
            eps=1e-8,
            seed=seed,
            aug_seed=self.aug_seed,
            workers=min(8, os.cpu_count() or 1) if on_gpu else 0,
            optimizer="adamw",
            weight_decay=self.weight_decay,
            min_lr=self.min_lr,
            iterations=iterations,
            head="clip",
            augmentation="dassl",
            first_epoch=first_epoch,
        )

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        raise ValueError(
            f"{self.name} trains inside the encoders, so features of the frozen encoder cannot show what it "
            "learned: score the images with image_logits(paths)"
        )

    def predicting(self) -> contextlib.AbstractContextManager:
        """What image_logits runs inside (CLIP-SVD: its reparametrised weights computed once per call)."""
        return contextlib.nullcontext()

    def image_logits(self, paths: Sequence[Any], classifier: Tensor | None = None) -> Tensor:
        head = self.classifier_head() if self.adapted is not None else None
        if self.task is None or self.adapted is None or head is None:
            raise RuntimeError(f"{self.name}: call fit() or load_state_dict() before image_logits()")
        if classifier is not None:
            raise ValueError(
                f"{self.name} predicts with {self.predicts_with}; it cannot score another class set with another "
                "text classifier"
            )
        with self.predicting():
            return encoder_logits(self.adapted, paths, head, self.task.logit_scale)


class InstalledAdapters(EncoderTraining):
    """An :class:`EncoderTraining` method that installs trainable modules into a copy of the model (CLIP-LoRA's
    adapters, CLIP-SVD's singular values) and predicts with its tuned text encoder's one-prompt classifier: its
    state is the installed parameters plus that classifier; reloading installs them again (each method merges
    them into plain weights for export: ``checkpoint_tensors``)."""

    text_classifier: Tensor | None

    def installer(self, seed: int = 0) -> Any:
        """What installs the method's modules into a copy of the model (``finetune.adapted_copy``'s ``adapt``)."""
        raise NotImplementedError

    def is_installed(self, name: str) -> bool:
        """Whether the model parameter ``name`` is one the installer added (what the state holds)."""
        raise NotImplementedError

    def classifier_head(self) -> Tensor | None:
        """The one-prompt classifier of the tuned text encoder: what the run predicts with, so the exported head."""
        return self.text_classifier

    def trainable_parameters(self) -> int:
        return sum(t.numel() for k, t in self.state_dict().items() if k != "text_classifier")

    def state_dict(self) -> dict[str, Tensor]:
        if self.adapted is None or self.text_classifier is None:
            return {}
        params = model_parameters(self.adapted)
        state = {n: p.detach().float().cpu() for n, p in params.items() if self.is_installed(n)}
        return {**state, "text_classifier": self.text_classifier}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        encoder, names = adapted_copy(self.frozen_backbone(task), [], self.installer())
        params = model_parameters(encoder)
        with torch.no_grad():
            for n in names:
                params[n].copy_(state[n].to(params[n].dtype))
        self.adapted, self.text_classifier = frozen_result(encoder, names), state["text_classifier"]
