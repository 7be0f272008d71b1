"""TDA (Karmanov et al., CVPR 2024), a training-free test-time baseline: dynamic caches over a stream of test
images, as pure functions on embeddings and logits, and the stream method that runs them in the bench.

TDA (github.com/kdiAAA/TDA, ``tda_runner.py``, ``utils.py``, ``configs/*.yaml``): a stream of test images, one at
a time (batch 1, shuffled, tda_runner.py:131-133; utils.py:157-171). Per image: its normalised embedding f, CLIP
logits ``100·f·Tᵀ`` (utils.py:68), their entropy (natural log) and prediction; on ImageNet-A/-V2/-R/-Sketch 64
views (AugMix there, utils.py:118-129; crop-and-flip views here) of which the 10% lowest-entropy are kept and
averaged: f their mean embedding (not renormalised), the logits their mean, the entropy that of their mean
probability, the prediction the argmax of the mean logits (utils.py:70-80). Then (tda_runner.py:81-96):

- the positive cache of the predicted class takes [f, entropy] while it holds fewer than ``shot_capacity`` (3)
  items, or replaces its highest-entropy item when the new one's entropy is lower; items stay sorted by entropy
  (``update_cache``, tda_runner.py:28-39);
- the negative cache takes [f, entropy, probabilities] the same way (capacity 2) when the image's normalised
  entropy, entropy / log2(C) (``get_entropy``, utils.py:19-21: a natural-log entropy over a base-2 maximum, kept),
  lies strictly inside (0.2, 0.5);
- the image is scored after its own cache update: ``logits + α⁺ · exp(−β⁺(1 − f·K⁺)) · onehot(class)
  − α⁻ · exp(−β⁻(1 − f·K⁻)) · [0.03 < p < 1]`` (``compute_cache_logits``, tda_runner.py:42-62).

α⁺, β⁺ are per dataset (configs/<dataset>.yaml, table ``TDA_POSITIVE``); everything else is the same in every
config. The stream order matters; the original draws it once from torch's seed 1. Here each order is a seeded
permutation (:func:`stream_order`), recorded, and results over several orders are reported.
"""

from __future__ import annotations

import hashlib
import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.functional import entropy, expected_calibration_error, project
from prolip.tta.base import Scene, StreamMethod
from prolip.tta.registry import register


@dataclass(frozen=True)
class TDASettings:
    """One dataset's TDA configuration (configs/<dataset>.yaml) and how many views an image contributes."""

    positive_alpha: float = 2.0  # configs/imagenet.yaml positive.alpha
    positive_beta: float = 5.0  # configs/imagenet.yaml positive.beta
    positive_capacity: int = 3  # configs/*.yaml positive.shot_capacity
    negative_alpha: float = 0.117  # configs/*.yaml negative.alpha
    negative_beta: float = 1.0  # configs/*.yaml negative.beta
    negative_capacity: int = 2  # configs/*.yaml negative.shot_capacity
    entropy_window: tuple[float, float] = (0.2, 0.5)  # configs/*.yaml negative.entropy_threshold
    mask_window: tuple[float, float] = (0.03, 1.0)  # configs/*.yaml negative.mask_threshold
    views: int = 1  # utils.py:157-171: one center crop, 64 AugMix views on ImageNet-A/-V2/-R/-Sketch
    confident_ratio: float = 0.1  # utils.py:72

    def as_record(self) -> dict:
        return asdict(self)


# configs/<dataset>.yaml positive (alpha, beta), by the readers' dataset names.
TDA_POSITIVE = {
    "Caltech101": (5.0, 5.0),
    "DescribableTextures": (2.0, 3.0),
    "EuroSAT": (4.0, 8.0),
    "FGVCAircraft": (2.0, 2.0),
    "Food101": (1.0, 1.0),
    "ImageNet": (2.0, 5.0),
    "OxfordFlowers": (1.0, 5.0),
    "OxfordPets": (2.0, 7.0),
    "StanfordCars": (1.0, 7.0),
    "SUN397": (2.0, 3.0),
    "UCF101": (3.0, 8.0),
    "ImageNetA": (2.0, 5.0),
    "ImageNetR": (1.0, 8.0),
    "ImageNetSketch": (2.363, 7.45),
    "ImageNetV2": (1.0, 8.0),
}
MANY_VIEWS = ("ImageNetA", "ImageNetR", "ImageNetSketch", "ImageNetV2")  # utils.py:162-165


def tda_settings(dataset: str) -> tuple[TDASettings, str]:
    """The settings TDA's configs give ``dataset`` and where they come from (ImageNet's for other data)."""
    known = dataset in TDA_POSITIVE
    alpha, beta = TDA_POSITIVE[dataset if known else "ImageNet"]
    settings = TDASettings(positive_alpha=alpha, positive_beta=beta, views=64 if dataset in MANY_VIEWS else 1)
    return settings, f"TDA configs for {dataset}" if known else "TDA configs/imagenet.yaml (no config for this data)"


@dataclass
class TDAInputs:
    """What the stream needs of each test image: embedding [N, D], CLIP logits [N, C], entropy [N], mean
    probabilities [N, C] and prediction [N]."""

    embeddings: Tensor
    logits: Tensor
    entropies: Tensor
    probabilities: Tensor
    predictions: Tensor

    @staticmethod
    def concat(parts: list[TDAInputs]) -> TDAInputs:
        return TDAInputs(*(torch.cat([getattr(p, k) for p in parts]) for k in TDAInputs.__dataclass_fields__))


def tda_inputs(embeddings: Tensor, logit_scale: float, classifier: Tensor, settings: TDASettings) -> TDAInputs:
    """Per image, from the normalised embeddings of its views [B, V, D] (view 0 the center crop)."""
    views = max(1, min(settings.views, embeddings.shape[1]))
    f = embeddings[:, :views]
    logits = logit_scale * f @ classifier.T  # utils.py:68
    if views == 1:
        logits, f = logits[:, 0], f[:, 0]
        return TDAInputs(f, logits, entropy(logits), logits.softmax(-1), logits.argmax(-1))
    keep = int(views * settings.confident_ratio) or 1  # utils.py:72
    chosen = torch.argsort(entropy(logits), dim=1, stable=True)[:, :keep]
    picked = torch.gather(logits, 1, chosen[..., None].expand(-1, -1, logits.shape[-1]))
    mean_f = torch.gather(f, 1, chosen[..., None].expand(-1, -1, f.shape[-1])).mean(1)
    mean_p = picked.softmax(-1).mean(1)
    mean_logits = picked.mean(1)
    return TDAInputs(mean_f, mean_logits, entropy(mean_p.clamp(min=1e-38).log()), mean_p, mean_logits.argmax(-1))


def stream_order(count: int, seed: int) -> Tensor:
    """The order a stream visits ``count`` test images in, a permutation fixed by ``seed``."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


def order_digest(order: Tensor) -> str:
    """A short hash of an order, recorded so two runs can be checked to have streamed the same sequence."""
    return hashlib.blake2b(order.to(torch.int64).numpy().tobytes(), digest_size=8).hexdigest()


class TDACache:
    """One of TDA's caches: per predicted class, up to ``capacity`` image indices sorted by entropy."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: dict[int, list[tuple[float, int]]] = {}

    def offer(self, label: int, item_entropy: float, index: int) -> None:
        """``update_cache``: append while not full, else replace the highest-entropy item if this one is lower."""
        items = self.items.setdefault(label, [])
        if len(items) < self.capacity:
            items.append((item_entropy, index))
        elif item_entropy < items[-1][0]:
            items[-1] = (item_entropy, index)
        items.sort(key=lambda item: item[0])  # stable, as sorted(..., key=itemgetter(1))

    def indices(self) -> list[int]:
        """Every cached image, classes in increasing order (``compute_cache_logits``' key order)."""
        return [index for label in sorted(self.items) for _, index in self.items[label]]


def _affinity(f: Tensor, keys: Tensor, alpha: float, beta: float) -> Tensor:
    """``α · exp(−β (1 − f·Kᵀ))``, one weight per cached key (compute_cache_logits)."""
    return alpha * torch.exp(-beta * (1 - keys @ f))


def _affinity_term(f: Tensor, keys: Tensor, values: Tensor, alpha: float, beta: float) -> Tensor:
    """``α · exp(−β (1 − f·Kᵀ)) · V`` (compute_cache_logits)."""
    return _affinity(f, keys, alpha, beta) @ values


def tda_stream(inputs: TDAInputs, order: Tensor, settings: TDASettings) -> tuple[Tensor, TDACache, TDACache]:
    """TDA's final logits [N, C] (rows in the original image order) for the stream ``order``, and its two caches
    at the end of the stream."""
    positive, negative = TDACache(settings.positive_capacity), TDACache(settings.negative_capacity)
    classes = inputs.logits.shape[1]
    low, high = settings.entropy_window
    mask = (inputs.probabilities > settings.mask_window[0]) & (inputs.probabilities < settings.mask_window[1])
    normalised_entropy = inputs.entropies / math.log2(classes)
    out = torch.empty_like(inputs.logits)
    for index in order.tolist():
        label, item_entropy = int(inputs.predictions[index]), float(inputs.entropies[index])
        positive.offer(label, item_entropy, index)
        if low < float(normalised_entropy[index]) < high:
            negative.offer(label, item_entropy, index)
        f = inputs.embeddings[index]
        cached = positive.indices()
        # One-hot values, summed per class: an index_add rather than a [cached, C] matrix per image.
        weights = _affinity(f, inputs.embeddings[cached], settings.positive_alpha, settings.positive_beta)
        logits = inputs.logits[index].index_add(0, inputs.predictions[cached], weights)
        cached = negative.indices()
        if cached:
            logits = logits - _affinity_term(
                f, inputs.embeddings[cached], mask[cached].to(f.dtype), settings.negative_alpha, settings.negative_beta
            )
        out[index] = logits
    return out, positive, negative


@dataclass(frozen=True)
class Seeds:
    """A non-empty list of integer seeds."""

    def problem(self, value: Any) -> str | None:
        ok = isinstance(value, (list, tuple)) and bool(value)
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return None if ok else f"must list at least one integer seed, got {value!r}"


class SeededStream(StreamMethod):
    """A stream that runs once per seeded order (``orders``) over what was observed; its record holds every order's
    seed, digest and accuracy (and what ``run`` adds), their mean (``accuracy``) and their worst
    (``accuracy_worst``), and the dataset's settings (``selected``). Subclasses set ``settings`` (with
    ``as_record``) and ``source`` in ``start``."""

    recorded = ("orders",)
    record_fields = ("accuracy_worst", "ece", "stream_orders", "selected")
    constraints = {"orders": Seeds()}
    settings: Any
    source: str

    def __init__(self, orders: Sequence[int] = (1, 2, 3)) -> None:
        self.orders = orders

    @abstractmethod
    def gathered(self) -> Any:
        """What the observed batches make, built once for every order."""

    @abstractmethod
    def run(self, gathered: Any, order: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """The logits [N, C] (rows in observation order) of the stream visiting ``order``, and what that order's
        record adds besides its seed, digest and accuracy."""

    def finish(self, labels: Tensor) -> dict[str, Any]:
        gathered = self.gathered()
        orders: list[dict[str, Any]] = []
        for seed in self.orders:
            order = stream_order(len(labels), seed)
            logits, extra = self.run(gathered, order)
            accuracy = 100.0 * int((logits.argmax(-1) == labels).sum()) / len(labels)
            ece = expected_calibration_error(logits, labels)
            orders.append({"seed": seed, "digest": order_digest(order), "accuracy": accuracy, "ece": ece, **extra})
        accuracies = [o["accuracy"] for o in orders]
        return {
            "accuracy": sum(accuracies) / len(accuracies),
            "accuracy_worst": min(accuracies),
            "ece": sum(o["ece"] for o in orders) / len(orders),  # mean over orders, as the accuracy
            "stream_orders": orders,
            "selected": {"how": "rule", "source": self.source, **self.settings.as_record()},
        }


@register
class TDA(SeededStream):
    """The "tda" row, from zero-shot CLIP's W0: its inputs are collected image by image, then the stream runs once
    per seeded order (``orders``), recorded as :class:`SeededStream` says."""

    name = "tda"

    def views_read(self, views: int, dataset: str) -> int:
        """One view unless its dataset uses many (utils.py:157-171)."""
        return min(tda_settings(dataset)[0].views, views)

    def start(self, scene: Scene, W: Tensor) -> None:
        super().start(scene, W)
        self.settings, self.source = tda_settings(scene.dataset)
        self.parts: list[TDAInputs] = []

    def observe(self, z: Tensor) -> None:
        embeddings = F.normalize(project(z, self.W, self.scene.bias), dim=-1)
        self.parts.append(tda_inputs(embeddings, self.scene.logit_scale, self.scene.classifier, self.settings))

    def gathered(self) -> TDAInputs:
        return TDAInputs.concat(self.parts)

    def run(self, gathered: TDAInputs, order: Tensor) -> tuple[Tensor, dict[str, Any]]:
        return tda_stream(gathered, order, self.settings)[0], {}
