"""Core maths shared by every method: pure functions on tensors, no I/O, no globals.

Conventions used across prolip:
- ``z``: pre-projection image features, shape [N, D_pre].
- ``W``: the visual projector in *right* layout, shape [D_pre, D]; ``z @ W + b`` maps to the joint space
  (open_clip ViT stores it this way; nn.Linear sites store the transpose and are converted at load/export).
- ``classifier``: the text classifier T, shape [C, D], rows L2-normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Elements (float32: 4 bytes each) of one [rows, width] block that row-chunked code builds at once: 2^24 = 64 MB, so
# a test × support block at ImageNet size (50,000 × 16,000) is built about 1,000 rows at a time.
BLOCK_ELEMENTS = 1 << 24
# Fewest rows in a block: a product of a few rows can take another BLAS kernel than the whole (MKL: below about 16
# rows, a different summation order), so blocks stay at least this tall; then each row's products are the bits of
# the unchunked product (checked by tests/test_chunked_memory.py; BLAS promises float32 rounding, not bits).
MIN_ROWS = 64


def chunk_rows(width: int, block_elements: int | None = None) -> int:
    """Rows per chunk so that one [rows, width] block holds at most ``block_elements`` (default
    :data:`BLOCK_ELEMENTS`, read at call time) elements, and at least :data:`MIN_ROWS`."""
    budget = BLOCK_ELEMENTS if block_elements is None else block_elements
    return max(MIN_ROWS, budget // max(1, width))


def row_slices(n: int, rows: int) -> Iterator[slice]:
    """Consecutive slices of ``rows`` rows (at least :data:`MIN_ROWS`) covering 0..n; a last slice shorter than
    that is merged into the one before, so no block but a small whole is short."""
    rows = max(MIN_ROWS, rows)
    starts = list(range(0, n, rows))
    if len(starts) > 1 and n - starts[-1] < MIN_ROWS:
        starts.pop()
    for i, start in enumerate(starts):
        yield slice(start, starts[i + 1] if i + 1 < len(starts) else n)


def map_rows(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    width: int,
    block_elements: int | None = None,
    *,
    recompute_in_backward: bool = False,
) -> Tensor:
    """``fn(x)`` computed ``chunk_rows(width)`` rows of x at a time, for a row-wise ``fn`` whose intermediates are
    [rows, width] (a test × support kernel): the peak holds one block, not N × width, the blocks written into one
    preallocated output. Under autograd (a training batch) it is computed whole by default: backward would keep every
    block's intermediates anyway, and one product keeps the gradient's summation order. ``recompute_in_backward``
    bounds training too: each block is checkpointed (its intermediates dropped after the forward and rebuilt, one
    block at a time, in backward), at the cost of a second forward; the gradient is then summed block by block,
    equal to the whole product's to float32 rounding (and bitwise when the rows fit one block)."""
    slices = list(row_slices(x.shape[0], chunk_rows(width, block_elements)))
    if len(slices) <= 1:
        return fn(x)
    if recompute_in_backward and torch.is_grad_enabled():
        return torch.cat([checkpoint(fn, x[s], use_reentrant=False) for s in slices])
    first = fn(x[slices[0]])
    if first.requires_grad:
        del first
        return fn(x)
    out = first.new_empty((x.shape[0], *first.shape[1:]))
    out[slices[0]] = first
    del first
    for s in slices[1:]:
        out[s] = fn(x[s])
    return out


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


def top_confidence(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(the top softmax probability [N], its class [N]) of logits [N, C], a block of rows at a time (softmax is
    row-wise: the same values, without an [N, C] copy of the probabilities)."""
    n = logits.shape[0]
    confidence = torch.empty(n, device=logits.device)
    predicted = torch.empty(n, dtype=torch.long, device=logits.device)
    for rows in row_slices(n, chunk_rows(logits.shape[-1])):
        confidence[rows], predicted[rows] = logits[rows].float().softmax(dim=-1).max(dim=-1)
    return confidence, predicted


def calibration_error(confidence: Tensor, correct: Tensor, bins: int = ECE_BINS) -> float:
    """:func:`expected_calibration_error` from each image's top probability and whether its class was right (0/1
    floats): O(N), so evaluation can gather them chunk by chunk."""
    # ceil(c·bins) − 1 puts c in (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur after a softmax.
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    gap = torch.zeros(bins).index_add_(0, which, correct - confidence).abs()  # per bin: |B|·|accuracy − confidence|
    return float(gap.sum() / max(len(correct), 1) * 100.0)


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error in percent: Σ_b |B_b|/n · |accuracy(B_b) − confidence(B_b)|, the confidence
    being the top softmax probability and bin b holding confidences in (b/bins, (b+1)/bins]."""
    confidence, predicted = top_confidence(logits)
    return calibration_error(confidence, (predicted == labels).float(), bins)
