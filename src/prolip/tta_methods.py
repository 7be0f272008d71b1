"""Training-free test-time baselines beside test-time ProLIP and TPT, as pure functions on view logits and
embeddings: ZERO (Farina et al., NeurIPS 2024) and TDA (Karmanov et al., CVPR 2024).

ZERO (github.com/FarinaMatteo/zero, ``ttas/zero.py``, ``ttas/base.py``, ``utils/tools.py``, ``data/augs.py``): per
test image 64 views (``num_views``, ttas/zero.py:22; view 0 the center crop, the others RandomResizedCrop(224)
with torchvision's defaults + flip, data/augs.py:38-55: the views of :func:`prolip.tta.view_features`); the
``gamma`` = 0.3 (ttas/zero.py:23) lowest-entropy views are kept (entropy of softmax at CLIP's temperature,
``confidence_filter``, ttas/base.py:48-53); the temperature is then set to zero, so each kept view votes for its
argmax class, and the votes are summed (ttas/zero.py:70-73). No backpropagation. A tie between classes is broken
greedily (ttas/zero.py:76-86, ``greedy_break``, utils/tools.py:212-218): the first view *not* kept, in increasing
entropy, whose argmax is one of the tied classes wins; if none is, ``break_sample_tie`` (utils/tools.py:203-209)
was meant to take the tied class with the largest logit in the first not-kept view, but it masks ``logit[~ties]``
(a bitwise NOT of the class indices, which indexes from the end); here it does what it was meant to. The winner
gets one more vote. ``k = int(V · gamma)`` views are kept, at least one (the original would keep none for V < 4).

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
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.functional import entropy

ZERO_GAMMA = 0.3  # ttas/zero.py:23


# ----------------------------------------------------------------------------------------------- ZERO


def zero_votes(logits: Tensor, gamma: float = ZERO_GAMMA) -> Tensor:
    """ZERO's votes [B, C] for view logits [B, V, C] at CLIP's temperature; the argmax is the prediction."""
    return torch.stack([_zero_votes_one(image_logits, gamma) for image_logits in logits])


def _zero_votes_one(logits: Tensor, gamma: float) -> Tensor:
    views, classes = logits.shape
    keep = max(1, int(views * gamma))
    by_confidence = torch.argsort(entropy(logits), stable=True)
    votes = F.one_hot(logits[by_confidence[:keep]].argmax(-1), classes).sum(0).float()
    tied = (votes == votes.max()).nonzero().flatten()
    if len(tied) > 1:
        votes[_break_tie(tied, logits[by_confidence[keep:]], logits[by_confidence[0]])] += 1
    else:
        votes[tied[0]] += 1
    return votes


def _break_tie(tied: Tensor, rest: Tensor, most_confident: Tensor) -> int:
    """greedy_break: the first not-kept view (in increasing entropy) voting for a tied class; else the tied class
    with the largest logit in the first not-kept view (or, when every view was kept, in the most confident)."""
    for prediction in rest.argmax(-1).tolist():
        if prediction in tied.tolist():
            return prediction
    reference = rest[0] if len(rest) else most_confident
    return int(tied[reference[tied].argmax()])


# ----------------------------------------------------------------------------------------------- TDA


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
