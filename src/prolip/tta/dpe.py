"""DPE (Zhang et al., NeurIPS 2024), dual prototype evolution: textual prototypes averaged over the confident part
of the stream and visual prototypes (per-class means of a TDA-style cache), both refined per image by residuals
learnt in one step, on embeddings already projected once per batch.

DPE (github.com/zhangce01/DPE-CLIP, ``main_dpe.py``, ``utils.py``, ``configs/*.yaml``): a stream of test images, one
at a time (batch 1, shuffled, utils.py ``build_test_data_loader``). On ImageNet and its variants 64 views (63 AugMix
+ the image, utils.py ``get_preprocess``; crop-and-flip views here), elsewhere the image alone (CLIP's preprocess).
Per image (main_dpe.py ``run_test_dpe``), with T the global text prototypes [C, D] (CLIP's classifier at first):

1. residuals Rt = 0 [C, D] (``TextResidue``); Tw = normalize(T + Rt) per class; the image as TDA sees it under Tw
   (``get_clip_logits``, utils.py, gradients kept): one view as is, or the 10% lowest-entropy views averaged (their
   mean embedding f, not renormalised; their mean logits; the entropy of their mean probability);
2. the cache (TDA's ``update_cache``, capacity 3) takes [f, entropy / log2(C)] under the predicted class; the visual
   prototypes P [K, D] are the per-class means of the cached f, classes in increasing order (``cache_key_value``);
   residuals Rp = 0 [K, D] (``PositiveCacheResidue``), Pw = normalize(P + Rp) per prototype;
3. one AdamW step (``steps = 1``; lr ``learning_rate.text`` / ``.image``, eps 1e-3, weight decay 0.1, a fresh
   optimiser per image) on Rt and Rp of entropy(softmax(logits + α·exp(−β(1 − f·Pwᵀ))·onehot)) +
   ``align`` · InfoNCE(Pw, Tw[cached classes]) at temperature 0.01 (``InfoNCELoss``; info-nce-pytorch without
   negatives: cross-entropy of the K×K cosine matrix / 0.01 against its diagonal, mean). From zero, that step is
   exactly R = −lr · g / (|g| + eps) elementwise (the decay of a zero is zero; Adam's bias corrections cancel);
4. the prediction (``torch.no_grad``): Tw' = normalize(T + Rt'), Pw' = normalize(P + Rp'); on ImageNet-A the views
   re-read under Tw' (selection included), elsewhere view 0 alone; logits + α·exp(−β(1 − f'·Pw'ᵀ))·onehot;
5. textual evolution: if that prediction's entropy / log2(C) < 0.1, with n the number of such images so far
   (n ← n + 1), T ← T · n/(n+1) + Tw' / (n+1) (cumulative average, T not renormalised).

The residuals are discarded after each image; what evolves is T and the cache. α, β, the learning rates and
``align`` are per dataset (configs/<dataset>.yaml, :data:`DPE_CONFIG`). Where the original re-runs the image
encoder with gradients on every image (twice on ImageNet-A), here each batch's views are projected once, in one
matmul, and the per-image step touches only [C, D] and [K, D] tensors. Streams are seeded and recorded as TDA's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.functional import entropy, project
from prolip.tta.base import Scene
from prolip.tta.functional import marginal_entropy
from prolip.tta.registry import register
from prolip.tta.tda import MANY_VIEWS, SeededStream, TDACache


@dataclass(frozen=True)
class DPESettings:
    """One dataset's DPE configuration (configs/<dataset>.yaml) and the fixed rules of main_dpe.py."""

    alpha: float = 6.0  # configs/imagenet.yaml positive.alpha
    beta: float = 5.0  # configs/imagenet.yaml positive.beta
    capacity: int = 3  # configs/*.yaml positive.shot_capacity
    lr_text: float = 6e-4  # configs/imagenet.yaml learning_rate.text
    lr_image: float = 6e-4  # configs/imagenet.yaml learning_rate.image
    align: float = 0.5  # configs/imagenet.yaml learning_rate.align
    views: int = 1  # utils.py build_test_data_loader: 64 on ImageNet and its variants, else one
    reselect: bool = False  # main_dpe.py: dataset_name == 'A' re-reads every view for the prediction
    confident_ratio: float = 0.1  # utils.py get_clip_logits
    temperature: float = 0.01  # main_dpe.py InfoNCELoss
    eps: float = 1e-3  # main_dpe.py AdamW eps
    weight_decay: float = 0.1  # main_dpe.py AdamW weight_decay (no effect on a first step from zero)
    evolve_below: float = 0.1  # main_dpe.py: get_entropy(loss, clip_weights) < 0.1

    def as_record(self) -> dict:
        return asdict(self)


# configs/<dataset>.yaml (alpha, beta, learning_rate.text, learning_rate.image, learning_rate.align).
DPE_CONFIG = {
    "Caltech101": (15.0, 5.0, 6e-4, 6e-4, 0.2),
    "DescribableTextures": (6.0, 3.0, 6e-4, 6e-4, 0.2),
    "EuroSAT": (3.0, 8.0, 5e-5, 5e-5, 0.2),
    "FGVCAircraft": (6.0, 2.0, 6e-4, 6e-4, 0.2),
    "Food101": (3.0, 1.0, 2e-4, 2e-4, 0.2),
    "ImageNet": (6.0, 5.0, 6e-4, 6e-4, 0.5),
    "OxfordFlowers": (2.5, 5.0, 1e-4, 1e-4, 0.2),
    "OxfordPets": (4.0, 7.0, 5e-5, 5e-5, 0.2),
    "StanfordCars": (3.0, 7.0, 1e-4, 1e-4, 1.5),
    "SUN397": (6.0, 3.0, 2e-4, 2e-4, 0.2),
    "UCF101": (9.0, 8.0, 4e-4, 4e-4, 0.2),
    "ImageNetA": (6.0, 5.0, 3e-4, 3e-4, 2.5),
    "ImageNetR": (3.0, 8.0, 6e-4, 6e-4, 0.0),
    "ImageNetSketch": (7.0, 7.45, 6e-4, 6e-4, 0.2),
    "ImageNetV2": (3.0, 8.0, 5e-4, 5e-4, 0.5),
}
DPE_MANY_VIEWS = ("ImageNet", *MANY_VIEWS)  # utils.py build_test_data_loader: get_preprocess() for I/A/V/R/S


def dpe_settings(dataset: str) -> tuple[DPESettings, str]:
    """The settings DPE's configs give ``dataset`` and where they come from (ImageNet's for other data)."""
    known = dataset in DPE_CONFIG
    alpha, beta, lr_text, lr_image, align = DPE_CONFIG[dataset if known else "ImageNet"]
    settings = DPESettings(
        alpha=alpha,
        beta=beta,
        lr_text=lr_text,
        lr_image=lr_image,
        align=align,
        views=64 if dataset in DPE_MANY_VIEWS else 1,
        reselect=dataset == "ImageNetA",
    )
    return settings, f"DPE configs for {dataset}" if known else "DPE configs/imagenet.yaml (no config for this data)"


@dataclass
class DPEState:
    """What evolves over one stream: the text prototypes T [C, D], how many images updated them, the cache (image
    positions by class) and the cached embeddings [N, D] by stream position."""

    text: Tensor
    cache: TDACache
    features: Tensor
    updates: int = 0
    updated_at: list[int] = field(default_factory=list)

    def visual_prototypes(self) -> tuple[Tensor, Tensor]:
        """The cached classes [K] (increasing) and their prototypes [K, D], the mean of each class's items."""
        classes = sorted(self.cache.items)
        means = [self.features[[i for _, i in self.cache.items[c]]].mean(0) for c in classes]
        return torch.tensor(classes), torch.stack(means)


def _read(views: Tensor, text: Tensor, scale: float, ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """utils.py get_clip_logits for one image's views [V, D] under text [C, D]: embedding [D], logits [C], entropy."""
    logits = scale * views @ text.T
    if views.shape[0] == 1:
        return views[0], logits[0], entropy(logits[0])
    keep = max(1, int(views.shape[0] * ratio))  # the original would keep none below ten views
    chosen = torch.argsort(entropy(logits.detach()), stable=True)[:keep]
    return views[chosen].mean(0), logits[chosen].mean(0), marginal_entropy(logits[chosen][None])[0]


def _cache_logits(f: Tensor, prototypes: Tensor, classes: Tensor, settings: DPESettings, n_classes: int) -> Tensor:
    """``α · exp(−β (1 − f·Pᵀ)) · onehot(classes)`` (compute_cache_logits), as [C]."""
    weights = settings.alpha * torch.exp(-settings.beta * (1 - prototypes @ f))
    return torch.zeros(n_classes, dtype=f.dtype).index_add(0, classes, weights)


def info_nce(query: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """info-nce-pytorch's InfoNCE without negatives: the i-th key is the i-th query's positive, the others its
    negatives; mean cross-entropy of the cosine matrix / temperature."""
    logits = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(query)))


def _first_adamw_step(grad: Tensor, lr: float, eps: float) -> Tensor:
    """torch.optim.AdamW's first step from a zero parameter (the decay of zero is zero; bias corrections cancel)."""
    return -lr * grad / (grad.abs() + eps)


def dpe_image(views: Tensor, position: int, state: DPEState, settings: DPESettings, scale: float) -> Tensor:
    """DPE on one image's normalised view embeddings [V, D] (view 0 the image), the ``position``-th of the stream:
    updates ``state`` and returns its final logits [C]."""
    n_classes = state.text.shape[0]
    text_residual = torch.zeros_like(state.text, requires_grad=True)
    text = F.normalize(state.text + text_residual, dim=-1)
    f, logits, item_entropy = _read(views, text, scale, settings.confident_ratio)
    state.cache.offer(int(logits.argmax()), float(item_entropy.detach()) / math.log2(n_classes), position)
    state.features[position] = f.detach()
    classes, prototypes = state.visual_prototypes()
    image_residual = torch.zeros_like(prototypes, requires_grad=True)
    visual = F.normalize(prototypes + image_residual, dim=-1)
    final = logits + _cache_logits(f, visual, classes, settings, n_classes)
    loss = entropy(final) + settings.align * info_nce(visual, text[classes], settings.temperature)
    grad_text, grad_image = torch.autograd.grad(loss, [text_residual, image_residual])
    with torch.no_grad():
        text = F.normalize(state.text + _first_adamw_step(grad_text, settings.lr_text, settings.eps), dim=-1)
        visual = F.normalize(prototypes + _first_adamw_step(grad_image, settings.lr_image, settings.eps), dim=-1)
        if settings.reselect:
            f, logits, _ = _read(views, text, scale, settings.confident_ratio)
        else:
            f, logits = views[0], scale * text @ views[0]
        final = logits + _cache_logits(f, visual, classes, settings, n_classes)
        if float(entropy(final)) / math.log2(n_classes) < settings.evolve_below:
            state.updates += 1
            n = state.updates
            state.text = state.text * (n / (n + 1)) + text / (n + 1)
            state.updated_at.append(position)
    return final


def dpe_stream(
    embeddings: Tensor, classifier: Tensor, scale: float, order: Tensor, settings: DPESettings
) -> tuple[Tensor, DPEState]:
    """DPE's final logits [N, C] (rows in the original image order) for normalised view embeddings [N, V, D] and the
    stream ``order``, and the state at the end of the stream."""
    state = DPEState(
        text=classifier.clone(),
        cache=TDACache(settings.capacity),
        features=embeddings.new_zeros(embeddings.shape[0], embeddings.shape[-1]),
    )
    out = embeddings.new_empty(embeddings.shape[0], classifier.shape[0])
    for position, index in enumerate(order.tolist()):
        out[index] = dpe_image(embeddings[index], position, state, settings, scale)
    return out, state


@register
class DPE(SeededStream):
    """The "dpe" row, from zero-shot CLIP's W0: each batch's views are projected and kept, then the stream runs once
    per seeded order (``orders``); recorded as TDA's rows are, each order with how many images evolved the text."""

    name = "dpe"

    def views_read(self, views: int, dataset: str) -> int:
        return min(dpe_settings(dataset)[0].views, views)

    def start(self, scene: Scene, W: Tensor) -> None:
        super().start(scene, W)
        settings, self.source = dpe_settings(scene.dataset)
        self.settings = replace(settings, views=self.views_read(scene.views, scene.dataset))
        self.parts: list[Tensor] = []

    def observe(self, z: Tensor) -> None:
        z = z[:, : self.settings.views]
        self.parts.append(F.normalize(project(z, self.W, self.scene.bias), dim=-1).detach())

    def gathered(self) -> Tensor:
        return torch.cat(self.parts)

    def run(self, gathered: Tensor, order: Tensor) -> tuple[Tensor, dict[str, Any]]:
        logits, state = dpe_stream(gathered, self.scene.classifier, self.scene.logit_scale, order, self.settings)
        return logits, {"text_updates": state.updates}
