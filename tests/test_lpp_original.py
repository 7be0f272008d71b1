"""LP++ against an independent transcription of its original formulation (FereshteShakeri/FewShot-CLIP-Strong-
Baseline, methods/linear_probe_p2.py and methods/utils.py), written from the paper's code structure, not from
prolip's: an nn.Linear classifier, a [1, C] alpha row broadcast through ``ones @ alpha``, scipy's eigh for the step
size, the one-hot-mask centroids, and epoch selection on the validation set with ``>=``.

Pinned differences, each documented in ``prolip.methods.lp_plus_plus``: the bias starts from a per-fit seeded draw
(the original's comes from nn.Linear's default init on the global RNG), and everything runs in float32 (the
original runs in the CLIP model's dtype, float16 on a GPU). With the bias set alike, the weights, α, step sizes,
selected epoch and predictions are the same.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.linalg import eigh

from prolip.methods import create
from prolip.methods._common import embed
from synthetic import make_problem


def original_lpp(features, labels, val_features, val_labels, text_weights, shots, epochs, bias):
    """The original's forward(): features [N, D] and text_weights [D, C] normalised; returns what it keeps."""
    num_classes = text_weights.shape[1]
    one_hot = F.one_hot(labels, num_classes).float()  # get_one_hot
    classifier = nn.Linear(features.shape[1], num_classes, bias=True)
    classifier.weight.data = one_hot.T @ features  # compute_centroids: the division is commented out
    classifier.bias.data = bias.clone()
    lr_w = 4 * features.shape[0] / max(eigh((features.T @ features).numpy())[0])  # calculate_lr_w
    scores = features @ text_weights
    alpha_tilde = (one_hot * scores / one_hot.sum(0, keepdim=True)).sum(0) * shots  # compute_centroids_alpha
    alpha = (250 / shots * alpha_tilde.double()).mean()  # calculate_init_alpha
    alpha_vec = (alpha * torch.ones(1, num_classes)).float().requires_grad_(True)
    lr_alpha = features.shape[0] / (max(scores.pow(2).sum(0)) * 4)  # calculate_lr_alpha
    optimizer = torch.optim.SGD(classifier.parameters(), float(lr_w), momentum=0.9)
    best_acc, kept = 0.0, None
    for epoch in range(epochs):
        logits = classifier(features) + torch.ones(features.shape[0], 1) @ alpha_vec * scores
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            alpha_vec.data -= lr_alpha * alpha_vec.grad.data
        with torch.no_grad():
            val_logits = classifier(val_features) + torch.ones(len(val_features), 1) @ alpha_vec * (
                val_features @ text_weights
            )
        acc_val = np.mean(val_logits.argmax(1).numpy() == val_labels.numpy()) * 100.0
        if acc_val >= best_acc:
            best_acc = acc_val
            kept = (classifier.weight.detach().clone(), classifier.bias.detach().clone(), alpha_vec.detach()[0].clone())
            kept = (*kept, epoch)
    return {"lr_w": float(lr_w), "lr_alpha": float(lr_alpha), "kept": kept, "best_acc": best_acc}


def _seeded_bias(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """prolip's bias draw (nn.Linear's default range, from the fit's seed)."""
    return (torch.rand(num_classes, generator=torch.Generator().manual_seed(seed)) * 2 - 1) / dim**0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shots", [1, 4, 16])
def test_lp_plus_plus_is_the_original_formulation(shots, seed):
    p = make_problem(num_classes=6, shots=shots, d_pre=48, d=24, views=2, bias=True, seed=seed)
    task = p.task
    f = F.normalize(embed(task, p.support.views.view(0)), dim=-1)  # one augmented pass, as the original's loader
    f_val = F.normalize(embed(task, p.val.features), dim=-1)
    epochs = 60
    ours = create("lp++", epochs=epochs).fit(task, p.support, p.val, seed=seed)
    bias = _seeded_bias(task.num_classes, f.shape[1], seed)
    theirs = original_lpp(f, p.support.labels, f_val, p.val.labels, task.classifier.T, shots, epochs, bias)
    weight, bias_kept, alpha, epoch = theirs["kept"]
    assert ours.selected_["epoch"] == epoch
    assert ours.selected_["val_accuracy"] == pytest.approx(theirs["best_acc"])
    assert ours.selected_["lr_w"] == pytest.approx(theirs["lr_w"], rel=1e-5)
    assert ours.selected_["lr_alpha"] == pytest.approx(theirs["lr_alpha"], rel=1e-5)
    torch.testing.assert_close(ours.weight, weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias, bias_kept, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.alpha, alpha, rtol=1e-4, atol=1e-4)
    z = F.normalize(embed(task, p.test.features), dim=-1)
    theirs_logits = z @ weight.T + bias_kept + alpha * (z @ task.classifier.T)
    assert torch.equal(ours.logits(p.test.features).argmax(1), theirs_logits.argmax(1))


def test_the_transcription_sees_a_changed_step_rule():
    """The comparison can fail: LP++ with another α step (every 5 epochs instead of 10) is told apart."""
    p = make_problem(num_classes=6, shots=4, d_pre=48, d=24, views=2, bias=True, seed=0)
    f = F.normalize(embed(p.task, p.support.views.view(0)), dim=-1)
    f_val = F.normalize(embed(p.task, p.val.features), dim=-1)
    ours = create("lp++", epochs=60, alpha_every=5).fit(p.task, p.support, p.val, seed=0)
    bias = _seeded_bias(p.task.num_classes, f.shape[1], 0)
    theirs = original_lpp(f, p.support.labels, f_val, p.val.labels, p.task.classifier.T, 4, 60, bias)
    assert ours.selected_["epoch"] >= 5  # past the first α step, where the two schedules part
    assert not torch.allclose(ours.alpha, theirs["kept"][2], atol=1e-3)
