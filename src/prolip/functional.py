"""Core maths shared by every method: pure functions on tensors, no I/O, no globals.

Conventions used across prolip:
- ``z``: pre-projection image features, shape [N, D_pre].
- ``W``: the visual projector in *right* layout, shape [D_pre, D]; ``z @ W + b`` maps to the joint space
  (open_clip ViT stores it this way; nn.Linear sites store the transpose and are converted at load/export).
- ``classifier``: the text classifier T, shape [C, D], rows L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def project(z: Tensor, W: Tensor, bias: Tensor | None = None) -> Tensor:
    """Apply the visual projector: ``z @ W (+ b)``. Batched W ([G, D_pre, D]) broadcasts over G."""
    out = z @ W
    return out if bias is None else out + bias


def cosine_logits(embeddings: Tensor, classifier: Tensor, logit_scale: float) -> Tensor:
    """CLIP logits ``s * normalize(e) @ T^T`` (classifier rows already normalised)."""
    return logit_scale * F.normalize(embeddings, dim=-1) @ classifier.transpose(-1, -2)


def clip_logits(z: Tensor, W: Tensor, bias: Tensor | None, classifier: Tensor, logit_scale: float) -> Tensor:
    """ProLIP's logits ``s * normalize(z W + b) T^T``; with W = W0 this is zero-shot CLIP."""
    return cosine_logits(project(z, W, bias), classifier, logit_scale)


def ensemble_classifier(text_embeddings: Tensor) -> Tensor:
    """Text classifier from per-template embeddings [C, n_templates, D]: normalise each, average, normalise."""
    return F.normalize(F.normalize(text_embeddings, dim=-1).mean(dim=1), dim=-1)


def proximal_penalty(W: Tensor, W0: Tensor) -> Tensor:
    """ProLIP's regulariser: the *sum* of squared differences (squared Frobenius norm), per leading batch dim."""
    return (W - W0).pow(2).sum(dim=(-2, -1))


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) over the last dim."""
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return (logits.argmax(dim=-1) == labels).float().mean().item() * 100.0


def harmonic_mean(base: float, new: float) -> float:
    """Base-to-new's HM of two accuracies (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


ECE_BINS = 15  # equal-width confidence bins, as TTA-VLM reports calibration (and Guo et al. 2017 define it)


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error in percent: Σ_b |B_b|/n · |accuracy(B_b) − confidence(B_b)|, the confidence
    being the top softmax probability and bin b holding confidences in (b/bins, (b+1)/bins]."""
    probs = logits.float().softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels).float()
    # ceil(c·bins) − 1 puts c in (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur after a softmax.
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    gap = torch.zeros(bins).index_add_(0, which, correct - confidence).abs()  # per bin: |B|·|accuracy − confidence|
    return float(gap.sum() / max(len(labels), 1) * 100.0)
