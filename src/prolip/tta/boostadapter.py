"""BoostAdapter (Zhang et al., NeurIPS 2024): TDA's caches, plus regional bootstrapping, the test image's own most
confident augmented views joining a per-image copy of the positive cache.

BoostAdapter (github.com/taolinzhang/BoostAdapter, ``runner.py``, ``utils.py``, ``configs/*.yaml``,
``scripts/run.sh``), run with ``--mode boostadapter`` (scripts/run.sh). A stream of test images, one at a time
(batch 1, shuffled, utils.py ``build_test_data_loader``), 64 views each (``--views 64``, scripts/run.sh; view 0 the
image, views 1..63 RandomResizedCrop + flip without AugMix, ``get_cross_dataset_preprocess`` /
``get_ood_preprocess`` with ``augmix=False``; datasets/resize_crop.py keeps torchvision's defaults, so prolip's shared
views are the same recipe); on ImageNet itself one view (CLIP's preprocess, ``build_test_data_loader``). Per image:

- the image as TDA sees it (``get_clip_logits``, utils.py): on the ten fine-grained datasets view 0 alone
  (``infer_ori_image``, runner.py ``run_test_tda``); on ImageNet-A/-V2/-R/-Sketch the 10% lowest-entropy views,
  averaged as TDA does (:func:`prolip.tta.tda_inputs`);
- the positive cache takes it by TDA's entropy rule (``update_cache(..., fifo=False)``: append, sort by entropy,
  keep ``shot_capacity``, the same list TDA's replace-the-worst rule keeps);
- boosting (runner.py, ``mode == "boostadapter"``): of *all* the views (view 0 included), the ``int(V · 0.1)``
  lowest-entropy ones (``select_confident_samples(ori_feat, ori_output, 0.1)``, utils.py; none for V < 10) are
  offered, in increasing entropy, each under its own argmax class, to a copy of the positive cache whose capacity is
  ``shot_capacity + delta`` (``cfg['delta']`` per dataset); the copy scores this image and is then dropped;
- the negative cache is TDA's, with one difference the code makes: it is first in, first out
  (``update_cache(neg_cache, ..., True)`` sets ``include_prob_map``; ``fifo`` keeps its default True), where TDA
  keeps the lowest-entropy items; ``negative_fifo=False`` gives TDA's rule;
- the logits: CLIP's + the boosted positive term − the negative term, as in TDA (``compute_cache_logits``).

α⁺, β⁺ per dataset are TDA's (configs/*.yaml, the same values); ``delta`` per dataset from configs/*.yaml. Without
boosting views (fewer than ten views, or ImageNet) and with ``negative_fifo=False`` it is TDA, logit for logit.
Streams are seeded and recorded as TDA's (:func:`prolip.tta.stream_order`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.functional import entropy, project
from prolip.tta.base import Scene
from prolip.tta.registry import register
from prolip.tta.tda import (
    MANY_VIEWS,
    TDA_POSITIVE,
    SeededStream,
    TDACache,
    TDAInputs,
    TDASettings,
    tda_inputs,
)

BOOST_RATIO = 0.1  # runner.py: select_confident_samples(ori_feat, ori_output, 0.1)
BOOST_VIEWS = 64  # scripts/run.sh --views 64
# configs/<dataset>.yaml delta, by the readers' dataset names; the repository has no configs/imagenet.yaml (ImageNet
# gets one view there, so nothing to boost) and data without a config take scripts/run.sh's --delta 3.
BOOST_DELTA = {
    "Caltech101": 2,
    "DescribableTextures": 0,
    "EuroSAT": 0,
    "FGVCAircraft": 2,
    "Food101": 3,
    "OxfordFlowers": 0,
    "OxfordPets": 0,
    "StanfordCars": 3,
    "SUN397": 1,
    "UCF101": 0,
    "ImageNetA": 3,
    "ImageNetR": 3,
    "ImageNetSketch": 1,
    "ImageNetV2": 1,
}
DEFAULT_DELTA = 3  # scripts/run.sh --delta 3
ONE_VIEW = ("ImageNet",)  # utils.py build_test_data_loader: CLIP's preprocess, a single view


@dataclass(frozen=True)
class BoostSettings:
    """One dataset's BoostAdapter configuration: TDA's settings (``tda.views`` the views the image is seen with), the
    extra positive capacity of the boosted copy, how many views an image has and the negative cache's rule."""

    tda: TDASettings
    delta: int = 0
    views: int = BOOST_VIEWS
    boost_ratio: float = BOOST_RATIO
    negative_fifo: bool = True  # runner.py: update_cache(neg_cache, ..., True) leaves fifo at its default True

    def as_record(self) -> dict:
        record = asdict(self)
        record["tda"] = self.tda.as_record()
        return record


def boost_settings(dataset: str) -> tuple[BoostSettings, str]:
    """The settings BoostAdapter's configs give ``dataset`` and where they come from."""
    known = dataset in BOOST_DELTA or dataset in ONE_VIEW
    alpha, beta = TDA_POSITIVE[dataset if dataset in TDA_POSITIVE else "ImageNet"]
    tda = TDASettings(positive_alpha=alpha, positive_beta=beta, views=BOOST_VIEWS if dataset in MANY_VIEWS else 1)
    views = 1 if dataset in ONE_VIEW else BOOST_VIEWS
    settings = BoostSettings(tda=tda, delta=BOOST_DELTA.get(dataset, 0 if known else DEFAULT_DELTA), views=views)
    source = f"BoostAdapter configs for {dataset}" if known else "BoostAdapter scripts/run.sh (no config for this data)"
    return settings, source


@dataclass
class BoostViews:
    """Each image's boosting views: embeddings [N, k, D], entropies [N, k] and argmax classes [N, k], in increasing
    entropy (k may be 0)."""

    embeddings: Tensor
    entropies: Tensor
    predictions: Tensor

    @staticmethod
    def concat(parts: list[BoostViews]) -> BoostViews:
        return BoostViews(*(torch.cat([getattr(p, k) for p in parts]) for k in BoostViews.__dataclass_fields__))


def boost_views(embeddings: Tensor, logit_scale: float, classifier: Tensor, ratio: float = BOOST_RATIO) -> BoostViews:
    """The ``int(V · ratio)`` lowest-entropy of all views [B, V, D] of each image (no minimum: the original keeps
    none below ten views)."""
    logits = logit_scale * embeddings @ classifier.T
    keep = int(embeddings.shape[1] * ratio)
    view_entropy = entropy(logits)
    chosen = torch.argsort(view_entropy, dim=1, stable=True)[:, :keep]
    picked = torch.gather(embeddings, 1, chosen[..., None].expand(-1, -1, embeddings.shape[-1]))
    chosen_logits = torch.gather(logits, 1, chosen[..., None].expand(-1, -1, logits.shape[-1]))
    return BoostViews(picked, torch.gather(view_entropy, 1, chosen), chosen_logits.argmax(-1))


class FIFOCache(TDACache):
    """BoostAdapter's negative cache: per predicted class the last ``capacity`` items, oldest dropped first."""

    def offer(self, label: int, item_entropy: float, index: int) -> None:
        items = self.items.setdefault(label, [])
        items.append((item_entropy, index))
        if len(items) > self.capacity:
            del items[0]


def _boosted(positive: TDACache, boost: BoostViews, index: int, first: int, capacity: int) -> TDACache:
    """A copy of the positive cache, capacity ``capacity``, offered image ``index``'s boosting views (pool indices
    from ``first``)."""
    copy = TDACache(capacity)
    copy.items = {label: list(items) for label, items in positive.items.items()}
    k = boost.entropies.shape[1]
    for j in range(k):
        copy.offer(int(boost.predictions[index, j]), float(boost.entropies[index, j]), first + index * k + j)
    return copy


def boost_stream(inputs: TDAInputs, boost: BoostViews, order: Tensor, settings: BoostSettings) -> Tensor:
    """BoostAdapter's final logits [N, C] (rows in the original image order) for the stream ``order``."""
    tda = settings.tda
    positive = TDACache(tda.positive_capacity)
    negative = (FIFOCache if settings.negative_fifo else TDACache)(tda.negative_capacity)
    n, classes = inputs.logits.shape
    # One pool of keys and their classes: the images (0..N−1), then every image's boosting views.
    keys = torch.cat([inputs.embeddings, boost.embeddings.flatten(0, 1)])
    key_classes = torch.cat([inputs.predictions, boost.predictions.flatten()])
    mask = (inputs.probabilities > tda.mask_window[0]) & (inputs.probabilities < tda.mask_window[1])
    normalised_entropy = inputs.entropies / math.log2(classes)
    out = torch.empty_like(inputs.logits)
    for index in order.tolist():
        label, item_entropy = int(inputs.predictions[index]), float(inputs.entropies[index])
        positive.offer(label, item_entropy, index)
        if tda.entropy_window[0] < float(normalised_entropy[index]) < tda.entropy_window[1]:
            negative.offer(label, item_entropy, index)
        f = inputs.embeddings[index]
        cached = _boosted(positive, boost, index, n, tda.positive_capacity + settings.delta).indices()
        weights = tda.positive_alpha * torch.exp(-tda.positive_beta * (1 - keys[cached] @ f))
        logits = inputs.logits[index].index_add(0, key_classes[cached], weights)
        cached = negative.indices()
        if cached:
            weights = tda.negative_alpha * torch.exp(-tda.negative_beta * (1 - keys[cached] @ f))
            logits = logits - weights @ mask[cached].to(f.dtype)
        out[index] = logits
    return out


@register
class BoostAdapter(SeededStream):
    """The "boostadapter" row, from zero-shot CLIP's W0: each image's TDA inputs and boosting views are collected,
    then the stream runs once per seeded order (``orders``); recorded as TDA's rows are (every order's seed, digest
    and accuracy, their mean and worst, the dataset's settings)."""

    name = "boostadapter"

    def views_read(self, views: int, dataset: str) -> int:
        return min(boost_settings(dataset)[0].views, views)

    def start(self, scene: Scene, W: Tensor) -> None:
        super().start(scene, W)
        self.settings, self.source = boost_settings(scene.dataset)
        self.parts: list[tuple[TDAInputs, BoostViews]] = []

    def observe(self, z: Tensor) -> None:
        z = z[:, : self.views_read(z.shape[1], self.scene.dataset)]
        embeddings = F.normalize(project(z, self.W, self.scene.bias), dim=-1)
        scale, classifier = self.scene.logit_scale, self.scene.classifier
        inputs = tda_inputs(embeddings, scale, classifier, self.settings.tda)
        self.parts.append((inputs, boost_views(embeddings, scale, classifier, self.settings.boost_ratio)))

    def gathered(self) -> tuple[TDAInputs, BoostViews]:
        return TDAInputs.concat([p[0] for p in self.parts]), BoostViews.concat([p[1] for p in self.parts])

    def run(self, gathered: tuple[TDAInputs, BoostViews], order: Tensor) -> tuple[Tensor, dict[str, Any]]:
        return boost_stream(*gathered, order, self.settings), {}
