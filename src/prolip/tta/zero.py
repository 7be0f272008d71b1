"""ZERO (Farina et al., NeurIPS 2024), a training-free test-time baseline, as a pure function on view logits.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.functional import entropy
from prolip.tta.base import RATIO, PerImageMethod, Scene
from prolip.tta.functional import batched_logits
from prolip.tta.registry import register

ZERO_GAMMA = 0.3  # ttas/zero.py:23


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


@register
class Zero(PerImageMethod):
    """The "zero" row: ZERO's vote of the ``gamma`` most confident views, from zero-shot CLIP's W0."""

    name = "zero"
    recorded = ("gamma",)
    constraints = {"gamma": RATIO}

    def __init__(self, gamma: float = ZERO_GAMMA) -> None:
        self.gamma = gamma

    def logits(self, z: Tensor, W: Tensor, scene: Scene) -> Tensor:
        return zero_votes(batched_logits(z, W, scene.bias, scene.classifier, scene.logit_scale), self.gamma)
