"""Pure tensor code the test-time methods share: per-image logits over views, the confident-view selection and the
entropy of the mean prediction (TPT's objective, which test-time ProLIP minimises too)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prolip.functional import cosine_logits, entropy, project


def select_confident(logits: Tensor, ratio: float) -> Tensor:
    """Indices [B, k] of the k = max(1, int(V·ratio)) lowest-entropy views of each image (logits [B, V, C])."""
    k = max(1, int(logits.shape[1] * ratio))
    return entropy(logits).argsort(dim=1)[:, :k]


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean prediction over views, per image: logits [B, k, C] → [B] (TPT's avg_entropy)."""
    logp = logits.log_softmax(dim=-1)
    mean_logp = logp.logsumexp(dim=1) - math.log(logits.shape[1])
    mean_logp = mean_logp.clamp(min=torch.finfo(mean_logp.dtype).min)
    return -(mean_logp.exp() * mean_logp).sum(dim=-1)


def batched_logits(z: Tensor, W: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float) -> Tensor:
    """z [B, V, D_pre] with per-image W [B, D_pre, D] → logits [B, V, C]."""
    return cosine_logits(project(z, W, bias), classifier, logit_scale)
