"""Training inside CLIP's image encoder on the support images: the one image-level training path (full fine-tuning
and last-layer fine-tuning of paper Table 6; any method that trains encoder parameters reuses it).

Given a frozen backbone, the names of the parameters to train, the support images and the text classifier,
:func:`train_image_encoder` returns a trained *copy* of the backbone; the given one is never modified (the copy
shares every tensor it does not train with it, so a last-layer copy costs one block of memory). As the reference
(``methods/Full_FT.py``, ``methods/Last_Layer_FT.py``):

- mini-batches of the support set, reshuffled every epoch (``shuffle: True``), the last one partial
  (``build_data_loader`` has ``drop_last=False``);
- every image augmented on the fly (RandomResizedCrop 0.5–1 + flip); here view e of an image is seeded by
  (aug_seed, image, e), so epoch e sees exactly the feature cache's view e of each image and training is
  deterministic for a seed; the images are decoded once and kept in memory (a few-shot support is small);
- Adam (eps 1e-4), cosine to 0 over epochs × batches, stepped per iteration (``CosineAnnealingLR``);
- the model stays in eval mode (``model.eval()``, Full_FT.py:43): BatchNorm statistics are frozen;
- training logits ``s · (z Wᵀ + b) · Tᵀ`` with the image features NOT normalised (Full_FT.py:76-85), and
  cross-entropy, plus an optional pull ``λ · Σ ‖θ − θ0‖²`` (a sum) toward the pretrained values.

The trained encoder scores center crops with CLIP's logits ``s · normalize(z W + b) · Tᵀ``: the same argmax as the
reference's unnormalised test logits (Full_FT.py:121-131; it normalises on ImageNet, :156), and exactly zero-shot
CLIP before any step. Training runs in float32 (the reference runs the float16 model).

Methods that train something else through the encoders (CLIP-LoRA) use the same loop with a few settings: an
``adapt`` hook that installs new modules on the trained copy and names their parameters (put in training mode
while training, so their own dropout acts; the rest of the model stays in eval mode), a text classifier recomputed
from the copy at every step (when the text encoder trains too), AdamW with weight decay, a floor under the cosine,
a number of iterations rather than epochs, CLIP's normalised logits and another augmentation.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from prolip.backbones.base import Backbone, ProjectionSite
from prolip.backbones.loading import fingerprint
from prolip.constraints import HyperparameterError
from prolip.data.images import load_image
from prolip.features import encode_images, image_key
from prolip.functional import clip_logits, project
from prolip.optim import REFERENCE_EPS, cosine_lr
from prolip.transforms import DEFAULT_AUGMENTATION, augment_transform, augmented_view, view_seed

# Which parameters of a backbone train, by their names in ``backbone.model.named_parameters()``.
ParameterChooser = Callable[[Backbone], Sequence[str]]
# Installs new trainable modules on a trainable copy and returns the names of their parameters.
Adapter = Callable[[Backbone], Sequence[str]]
# The normalised text classifier [C, D] recomputed from the trained copy at every step (a trained text encoder).
ClassifierFn = Callable[[Backbone], Tensor]
SCORING_BATCH = 64  # images per forward pass when scoring with a trained encoder


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """How the encoder trains. ``proximal`` is λ of ``λ · Σ ‖θ − θ0‖²`` over the trained parameters (0: plain
    cross-entropy); ``workers`` threads prepare the augmented views (their seeds make the result the same for any
    number)."""

    lr: float
    epochs: int
    batch_size: int = 16
    eps: float = REFERENCE_EPS
    seed: int = 0
    aug_seed: int = 0
    proximal: float = 0.0
    workers: int = 0
    optimizer: str = "adam"  # "adam" (the reference's) or "adamw"
    weight_decay: float = 0.0
    min_lr: float = 0.0  # CosineAnnealingLR's eta_min
    iterations: int | None = None  # train this many steps (as many epochs as they need) instead of ``epochs``
    head: str = "reference"  # "reference": s·(zW+b)·Tᵀ un-normalised; "clip": s·normalize(zW+b)·Tᵀ
    augmentation: str = DEFAULT_AUGMENTATION  # prolip.transforms.AUGMENTATIONS
    # Epochs are numbered from here: a run that goes on where another, of epochs 0..first_epoch-1, stopped (its
    # shuffles and views are those the longer run would have had at these epochs; 2SFS's second stage).
    first_epoch: int = 0


# ----------------------------------------------------------------------------------------------- pure pieces


def epoch_batches(num_images: int, batch_size: int, epoch_count: int, seed: int) -> list[list[Tensor]]:
    """Per epoch, the support indices of each mini-batch: a fresh permutation from one generator seeded once,
    cut into batches of ``batch_size``, the last one partial (a shuffled loader with ``drop_last=False``)."""
    generator = torch.Generator().manual_seed(seed)
    return [list(torch.randperm(num_images, generator=generator).split(batch_size)) for _ in range(epoch_count)]


def training_steps(num_images: int, settings: FinetuneSettings) -> list[tuple[int, Tensor]]:
    """(epoch, support indices) of every optimiser step: ``settings.epochs`` epochs, or, with ``iterations``, the
    first that many steps of as many epochs as they need; epochs from ``settings.first_epoch`` on."""
    if settings.iterations is None:
        epochs = settings.epochs
    else:
        epochs = math.ceil(settings.iterations / math.ceil(num_images / settings.batch_size))
    first = settings.first_epoch
    steps = [
        (epoch, indices)
        for epoch, batches in enumerate(epoch_batches(num_images, settings.batch_size, first + epochs, settings.seed))
        if epoch >= first
        for indices in batches
    ]
    return steps if settings.iterations is None else steps[: settings.iterations]


def step_lr(settings: FinetuneSettings, step: int, total: int) -> float:
    """CosineAnnealingLR(T_max=total, eta_min=min_lr) at 0-based ``step``."""
    return settings.min_lr + float(cosine_lr(settings.lr - settings.min_lr, step, total))


def training_logits(z: Tensor, W: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float) -> Tensor:
    """``s · (z W + b) · Tᵀ``: the reference's training logits, image features not normalised."""
    return logit_scale * project(z, W, bias) @ classifier.T


def squared_distance(params: Mapping[str, Tensor], originals: Mapping[str, Tensor]) -> Tensor:
    """``Σ ‖θ − θ0‖²`` over every named tensor (a sum, as ProLIP's penalty)."""
    terms = [(params[k] - originals[k].to(params[k].dtype)).pow(2).sum() for k in params]
    return torch.stack(terms).sum() if terms else torch.zeros(())


# ----------------------------------------------------------------------------------------------- which parameters


def model_parameters(backbone: Backbone) -> dict[str, Tensor]:
    """The backbone model's parameters by name (the names of its state dict)."""
    return dict(backbone.model.named_parameters())


def image_encoder_parameters(backbone: Backbone) -> list[str]:
    """Every parameter the image embedding depends on, projection included (the family's image prefixes: open_clip's
    ``visual.*``, a Hugging Face CLIPModel's ``vision_model.*`` and ``visual_projection.*``)."""
    return [n for n in model_parameters(backbone) if n.startswith(backbone.family.image_prefixes)]


def last_layer_parameters(backbone: Backbone) -> list[str]:
    """The parameters of the family's last image block (a ResNet's attention pool, a ViT's last transformer block;
    Last_Layer_FT.py:53-59); the projection stays W0."""
    prefix = backbone.family.last_image_block(backbone.model)
    return [n for n in model_parameters(backbone) if n.startswith(prefix)]


# ----------------------------------------------------------------------------------------------- the encoder copy


def trainable_copy(backbone: Backbone, names: Sequence[str]) -> Backbone:
    """A copy of ``backbone`` whose parameters ``names`` are its own tensors (requires_grad on); every other
    parameter and buffer is the frozen backbone's own object, shared, never written to.

    The whole backbone is deep-copied in one pass with its model, so every module any of its attributes reference
    (a site's linear, a MAP head's pool, the backbone an output site wraps) is the copied model's own: the copy's
    hooks and forward passes run in the copy. Only the shared tensors and the helpers each backbone declares
    (``Backbone.copy_shares``: a tokenizer, ...) are the frozen backbone's objects."""
    params = model_parameters(backbone)
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise ValueError(f"{backbone.info.describe()} has no parameter(s) {unknown[:5]}")
    chosen = set(names)
    shared: dict[int, object] = {id(p): p for n, p in params.items() if n not in chosen}
    shared.update({id(b): b for b in backbone.model.buffers()})
    shared.update(_shared_helpers(backbone))
    encoder = copy.deepcopy(backbone, shared)
    for name, p in encoder.model.named_parameters():
        if name in chosen:
            p.requires_grad_(True)
    return encoder


def _shared_helpers(backbone: Backbone) -> dict[int, object]:
    """The attributes ``backbone`` (and any backbone it wraps) declares in ``copy_shares``, by id (a deep-copy memo)."""
    out: dict[int, object] = {}
    for name, value in vars(backbone).items():
        if isinstance(value, Backbone):
            out.update(_shared_helpers(value))
        elif name in type(backbone).copy_shares and value is not None:
            out[id(value)] = value
    return out


def trained_parameters(encoder: Backbone, names: Sequence[str]) -> dict[str, Tensor]:
    params = model_parameters(encoder)
    return {n: params[n] for n in names}


def encode_pre_with_grad(encoder: Backbone, images: Tensor) -> Tensor:
    """The backbone's own ``encode_pre`` without its no_grad decorator: the same computation, differentiable."""
    return inspect.unwrap(type(encoder).encode_pre)(encoder, images)


def trainable_site(backbone: Backbone) -> ProjectionSite:
    """The backbone's projection site, refused in one line where image-level training cannot train through it (a
    site that is no parameter of the model); checked before any copy or image is made."""
    site = backbone.projection()
    if site.kind != "native":
        raise HyperparameterError(
            f"{backbone.info.describe()}: image-level training trains the model's own projection, and the "
            f"{site.kind} site is no parameter of the model; fit it at the native site",
            option="--site",
        )
    return site


def projection_parameters(encoder: Backbone) -> tuple[Tensor, Tensor | None]:
    """The projection W (right layout [D_pre, D]) and bias as views of the live parameters (``projection()`` hands
    back detached tensors), so a trained projection gets its gradient; a site's frozen residual rows
    (``ProjectionSite.residual_rows``, no parameter of the model) are appended as the constants they are."""
    site = trainable_site(encoder)
    params = model_parameters(encoder)
    weight = params[site.param_name]
    W = weight if site.native_layout == "right" else weight.t()
    if site.residual_rows:
        W = torch.cat([W, site.weight[-site.residual_rows :].to(W)])
    if site.bias is None:
        return W, None
    bias_name = site.param_name.rsplit(".", 1)[0] + ".bias"
    return W, params[bias_name]


def frozen_result(encoder: Backbone, names: Sequence[str]) -> Backbone:
    """The trained copy, frozen again, with a fingerprint of its own (its features are not the base model's, so a
    feature cache must never file them under the base model's)."""
    encoder.model.requires_grad_(False)
    state = {n: p.detach() for n, p in trained_parameters(encoder, names).items()}
    encoder.info.fingerprint = fingerprint({"fine-tuned from": encoder.info.fingerprint}, state)
    return encoder


def encoder_with(backbone: Backbone, tensors: Mapping[str, Tensor]) -> Backbone:
    """A frozen copy of ``backbone`` with the named parameters set to ``tensors`` (a saved fine-tuning)."""
    encoder = trainable_copy(backbone, list(tensors))
    with torch.no_grad():
        for name, p in trained_parameters(encoder, list(tensors)).items():
            if tuple(p.shape) != tuple(tensors[name].shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(tensors[name].shape)}, the model's is {tuple(p.shape)}"
                )
            p.copy_(tensors[name].to(p.dtype))
    return frozen_result(encoder, list(tensors))


# ----------------------------------------------------------------------------------------------- training


class AugmentedSupport:
    """The support images, decoded once, and their seeded augmented views: view e of image i is the cache's."""

    def __init__(
        self,
        paths: Sequence[Path | str],
        backbone: Backbone,
        aug_seed: int,
        workers: int = 0,
        augmentation: str = DEFAULT_AUGMENTATION,
    ):
        self.images = [load_image(p) for p in paths]
        self.keys = [image_key(p) for p in paths]
        self.prep, self.aug_seed = backbone.preprocessing, aug_seed
        self.transform = augment_transform(self.prep, augmentation)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="prolip-views") if workers > 0 else None

    def view(self, i: int, epoch: int) -> Tensor:
        return augmented_view(self.images[i], self.prep, view_seed(self.aug_seed, self.keys[i], epoch), self.transform)

    def batch(self, indices: Tensor, epoch: int) -> Tensor:
        """Views [B, 3, H, W] of the images ``indices`` for ``epoch``."""

        def make(i: Tensor) -> Tensor:
            return self.view(int(i), epoch)

        return torch.stack(list(self.pool.map(make, indices) if self.pool else map(make, indices)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def adapted_copy(backbone: Backbone, names: Sequence[str], adapt: Adapter | None = None) -> tuple[Backbone, list[str]]:
    """A trainable copy of ``backbone`` with its parameters ``names`` its own and, when given, the modules
    ``adapt`` installs; returns it and the names of every parameter that trains."""
    encoder = trainable_copy(backbone, names)
    return encoder, list(names) + (list(adapt(encoder)) if adapt is not None else [])


def _modules_owning(encoder: Backbone, names: Sequence[str]) -> list[torch.nn.Module]:
    """The modules that directly hold the parameters ``names`` (an installed adapter's own modules)."""
    modules = dict(encoder.model.named_modules())
    return list({id(m): m for m in (modules[n.rsplit(".", 1)[0]] for n in names)}.values())


def _fixed(classifier: Tensor) -> ClassifierFn:
    """The same text classifier at every step, whatever the encoder."""
    return lambda encoder: classifier


def _optimizer(params: Sequence[Tensor], settings: FinetuneSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay)
    return torch.optim.Adam(params, lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay)


def train_image_encoder(
    backbone: Backbone,
    choose: ParameterChooser,
    paths: Sequence[Path | str],
    labels: Tensor,
    classifier: Tensor | ClassifierFn,
    logit_scale: float,
    settings: FinetuneSettings,
    adapt: Adapter | None = None,
) -> Backbone:
    """A copy of ``backbone`` with the parameters ``choose(backbone)`` names (and those of the modules ``adapt``
    installs) trained on the images ``paths`` (labels [N]) against the text classifier [C, D], or the one
    ``classifier(copy)`` computes at each step; the given backbone is left as it was."""
    trainable_site(backbone)
    chosen = list(choose(backbone))
    encoder, names = adapted_copy(backbone, chosen, adapt)
    params = trained_parameters(encoder, names)
    originals = {n: p.detach() for n, p in model_parameters(backbone).items() if n in chosen}
    adapters = _modules_owning(encoder, [n for n in names if n not in chosen])
    device = torch.device(backbone.device)
    labels = labels.to(device)
    classifier_of = classifier if callable(classifier) else _fixed(classifier.to(device, torch.float32))
    steps = training_steps(len(paths), settings)
    optimizer = _optimizer(list(params.values()), settings)
    support = AugmentedSupport(paths, backbone, settings.aug_seed, settings.workers, settings.augmentation)
    for module in adapters:
        module.train()
    try:
        for step, (epoch, indices) in enumerate(
            tqdm(steps, desc="fine-tuning", unit="step", disable=None, leave=False)
        ):
            for group in optimizer.param_groups:
                group["lr"] = step_lr(settings, step, len(steps))
            T = classifier_of(encoder)
            images = support.batch(indices, epoch).to(device)
            loss = _loss(encoder, images, labels[indices.to(device)], T, logit_scale, settings, params, originals)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        support.close()
        for module in adapters:
            module.eval()
    return frozen_result(encoder, names)


def _loss(
    encoder: Backbone,
    images: Tensor,
    labels: Tensor,
    classifier: Tensor,
    logit_scale: float,
    settings: FinetuneSettings,
    params: Mapping[str, Tensor],
    originals: Mapping[str, Tensor],
) -> Tensor:
    W, bias = projection_parameters(encoder)
    z = encode_pre_with_grad(encoder, images)
    if settings.head == "clip":
        logits = clip_logits(z, W, bias, classifier, logit_scale)
    else:
        logits = training_logits(z, W, bias, classifier, logit_scale)
    loss = F.cross_entropy(logits, labels)
    if settings.proximal:
        loss = loss + settings.proximal * squared_distance({n: params[n] for n in originals}, originals)
    return loss


# ----------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def encoder_logits(encoder: Backbone, paths: Sequence[Path | str], classifier: Tensor, logit_scale: float) -> Tensor:
    """CLIP logits [N, C] of the center crops of image files through a (trained) encoder and its projection."""
    site = encoder.projection()
    z = encode_images(encoder, list(paths), batch_size=SCORING_BATCH)
    bias = None if site.bias is None else site.bias.float().cpu()
    return clip_logits(z, site.weight.float().cpu(), bias, classifier.float().cpu(), logit_scale)
