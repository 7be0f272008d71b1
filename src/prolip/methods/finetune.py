"""Fine-tuning inside CLIP's image encoder (paper Table 6): full fine-tuning and last-layer fine-tuning.

Both train on the support images themselves (``support.images``, through the frozen ``task.backbone``) with the one
image-level path of :mod:`prolip.image_training`, and score images through their adapted encoder and projection, so they
can score any class set given its text classifier. Their state is the trained parameters, named as in the
backbone's model; a saved run rebuilds the encoder from the frozen backbone and those tensors, and ``prolip export``
merges them into the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from prolip.backbones.base import Backbone
from prolip.constraints import (
    LEARNING_RATE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Choice,
    Lambda,
    Number,
    resolve_lambda,
)
from prolip.image_training import (
    FinetuneSettings,
    encoder_logits,
    encoder_with,
    image_encoder_parameters,
    last_layer_parameters,
    model_parameters,
    train_image_encoder,
)
from prolip.methods import register
from prolip.methods.base import NO_CACHED_VIEWS, Capabilities, Method, Support, Task, Validation
from prolip.optim import REFERENCE_EPS

PENALTIES = ("reference", "proximal")
# main_imagenet.py:161-163: with shuffle on (every fine-tuning config), the ImageNet loader hard-codes batch 256.
IMAGENET_BATCH = {"ImageNet": {"batch_size": 256}}


class EncoderFinetune(Method):
    """What both fine-tuning methods share: training through :func:`train_image_encoder`, scoring images through
    the trained encoder, and a state made of the trained parameters. Subclasses choose the parameters."""

    # trains on the images (with its own on-the-fly augmentation), not on cached views
    capabilities = Capabilities(encodes_images=True, augmentation=NO_CACHED_VIEWS, accepts_classifier=True)
    dataset_defaults = IMAGENET_BATCH

    lr: float
    epochs: int
    batch_size: int
    eps: float
    aug_seed: int
    encoder: Backbone | None = None

    def trainable(self, backbone: Backbone) -> list[str]:
        raise NotImplementedError

    def proximal_weight(self, task: Task) -> float:
        """λ of the pull toward the pretrained values (0: cross-entropy only)."""
        return 0.0

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        backbone = _backbone(self.name, task)
        if support.images is None:
            raise ValueError(
                f"{self.name} trains on the support images, but this support set holds only features "
                "(build it with prolip.episode.EpisodeBuilder)"
            )
        on_gpu = torch.device(backbone.device).type == "cuda"
        settings = FinetuneSettings(
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            eps=self.eps,
            seed=seed,
            aug_seed=self.aug_seed,
            proximal=self.proximal_weight(task),
            workers=min(8, os.cpu_count() or 1) if on_gpu else 0,
        )
        paths = [it.path for it in support.images.items]
        self.encoder = train_image_encoder(
            backbone, self.trainable, paths, support.labels, task.classifier, task.logit_scale, settings
        )
        self.selected_ = {"how": "rule", "trained_tensors": len(self.trainable(backbone)), "shuffle_seed": seed}

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        raise ValueError(
            f"{self.name} trains inside the image encoder, so features of the frozen encoder cannot show "
            "what it learned: score the images with image_logits(paths)"
        )

    def image_logits(self, paths: Sequence[Any], classifier: Tensor | None = None) -> Tensor:
        if self.task is None or self.encoder is None:
            raise RuntimeError(f"{self.name}: call fit() or load_state_dict() before image_logits()")
        classifier = self.task.classifier if classifier is None else classifier
        return encoder_logits(self.encoder, paths, classifier, self.task.logit_scale)

    def state_dict(self) -> dict[str, Tensor]:
        if self.encoder is None:
            return {}
        params = model_parameters(self.encoder)
        return {n: params[n].detach().float().cpu() for n in self.trainable(self.encoder)}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        backbone = _backbone(self.name, task)
        params = model_parameters(backbone)
        return {n: tuple(params[n].shape) for n in self.trainable(backbone)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.encoder = encoder_with(_backbone(self.name, task), state)

    def checkpoint_tensors(self, backbone: Backbone) -> dict[str, Tensor] | None:
        return self.state_dict() or None


def _backbone(name: str, task: Task) -> Backbone:
    if task.backbone is None:
        raise ValueError(
            f"{name} trains inside the image encoder and needs the frozen backbone (task.backbone); "
            "build the task with prolip.episode.EpisodeBuilder or pipeline.task_from_run"
        )
    return task.backbone


@register
class FullFinetune(EncoderFinetune):
    """Full fine-tuning of the image encoder, as ``methods/Full_FT.py`` (config ``configs/experiments/full_ft.yaml``,
    paper Table 6): every image-encoder parameter trains, the projection included, with plain cross-entropy.

    lr (1e-5, full_ft.yaml:11), epochs (300, full_ft.yaml:12 train_epoch), batch_size (16, full_ft.yaml:13; the
    reference's ImageNet loader hard-codes 256, main_imagenet.py:161-163, applied here on ImageNet as a per-dataset
    default), eps (1e-4, Full_FT.py:58), aug_seed (seeds the augmented views; 0 = the feature cache's default).

    One departure, on ViTs only: the reference's ViT head reads ``state_dict["visual.proj"]``, a detached alias
    (Full_FT.py:82-83), so its projection never moves; here it trains like every other encoder parameter (on
    ResNets the reference trains ``attnpool.c_proj`` too, Full_FT.py:78-80). The reference's scripts run RN50 only.
    """

    name = "full-ft"
    constraints = {
        "lr": LEARNING_RATE,
        "epochs": NON_NEGATIVE_INT,
        "batch_size": POSITIVE_INT,
        "eps": POSITIVE,
        "aug_seed": Number(integer=True),
    }

    def __init__(
        self,
        lr: float = 1e-5,  # full_ft.yaml:11
        epochs: int = 300,  # full_ft.yaml:12 train_epoch
        batch_size: int = 16,  # full_ft.yaml:13 (ImageNet: 256, main_imagenet.py:161-163)
        eps: float = REFERENCE_EPS,  # Full_FT.py:58
        aug_seed: int = 0,
    ):
        self.lr, self.epochs, self.batch_size, self.eps, self.aug_seed = lr, epochs, batch_size, eps, aug_seed
        self.encoder = None

    def trainable(self, backbone: Backbone) -> list[str]:
        return image_encoder_parameters(backbone)


@register
class LastLayerFinetune(EncoderFinetune):
    """Fine-tuning of the image encoder's last layer, as ``methods/Last_Layer_FT.py`` (configs
    ``last_layer_ft_lr1e-4.yaml`` and ``last_layer_ft_lr1e-5.yaml``, paper Table 6): ResNets train the attention
    pool (its output projection c_proj included), ViTs the last transformer block.

    lr (1e-5, last_layer_ft_lr1e-5.yaml:11; the other config has 1e-4), epochs (300, :12), batch_size (16, :13;
    ImageNet 256, main_imagenet.py:161-163), eps (1e-4, Last_Layer_FT.py:71), aug_seed (as full-ft), lam
    ("1/N", Last_Layer_FT.py:78), penalty:

    - "reference" (default): what the reference's penalty does, which is nothing. It sums ``MSELoss(sum)`` over
      ``model.visual.attnpool.state_dict()`` (ViT: ``resblocks[-1].state_dict()``) against the pretrained copy
      (Last_Layer_FT.py:104-122), but ``state_dict()`` returns detached tensors, so the term is a constant: it
      never reaches the gradient, and the method is plain cross-entropy fine-tuning whatever λ is.
    - "proximal": the penalty the reference meant, ``λ · Σ ‖θ − θ0‖²`` (a sum, as ProLIP's) over the trained
      parameters, with λ from ``lam``.
    """

    name = "last-layer-ft"
    constraints = {**FullFinetune.constraints, "lam": Lambda(), "penalty": Choice(PENALTIES)}

    def __init__(
        self,
        lr: float = 1e-5,  # last_layer_ft_lr1e-5.yaml:11 (last_layer_ft_lr1e-4.yaml:11: 1e-4)
        epochs: int = 300,  # last_layer_ft_lr1e-5.yaml:12 train_epoch
        batch_size: int = 16,  # last_layer_ft_lr1e-5.yaml:13 (ImageNet: 256, main_imagenet.py:161-163)
        eps: float = REFERENCE_EPS,  # Last_Layer_FT.py:71
        aug_seed: int = 0,
        lam: str | float = "1/N",  # Last_Layer_FT.py:78 lambda_v = 1/shots
        penalty: str = "reference",
    ):  # Last_Layer_FT.py:104-122 (no effect on the gradient)
        self.lr, self.epochs, self.batch_size, self.eps, self.aug_seed = lr, epochs, batch_size, eps, aug_seed
        self.lam, self.penalty = lam, penalty
        self.encoder = None

    def trainable(self, backbone: Backbone) -> list[str]:
        return last_layer_parameters(backbone)

    def proximal_weight(self, task: Task) -> float:
        # The reference's detached penalty adds a constant to the loss: the same gradients as none at all.
        return resolve_lambda(self.lam, task.shots) if self.penalty == "proximal" else 0.0

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        super()._fit(task, support, val, seed)
        lam = resolve_lambda(self.lam, task.shots)
        self.selected_.update(
            {
                "lam": lam,
                "lam_rule": str(self.lam),
                "penalty": self.penalty,
                "penalty_effect": "none (the reference's detached state_dict penalty)"
                if self.penalty == "reference"
                else "λ·Σ‖θ−θ0‖² on the trained parameters",
            }
        )
