"""P0 (task-text coordinates) pinned: its basis is the original's, its update lies in the class-text span, it is
ProLIP when the coordinates are W's own, and it trains as an independent transcription of the original's
autograd loop (torch.optim.Adam, CosineAnnealingLR, view (t + 1) mod V, λ‖A‖²)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prolip.methods import create
from prolip.methods.p0 import candidates, preference, text_basis, train_coordinates
from prolip.methods.prolip import train_projection
from synthetic import make_problem


@pytest.fixture(scope="module")
def problem():
    return make_problem(num_classes=5, shots=4, d_pre=24, d=12, views=3, bias=True, seed=4)


def test_the_basis_spans_the_centred_texts_and_is_signed_as_the_original(problem):
    T = problem.task.classifier
    Q = text_basis(T)
    assert Q.shape == (T.shape[1], T.shape[0] - 1)  # centring removes one dimension
    torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1]), atol=1e-5, rtol=0)
    centred = (T - T.mean(0)).T
    torch.testing.assert_close(Q @ (Q.T @ centred), centred, atol=1e-5, rtol=0)
    largest = Q[Q.abs().argmax(0), torch.arange(Q.shape[1])]
    assert (largest > 0).all()


def test_the_update_lies_in_the_text_span(problem):
    m = create("p0", steps=40, lr=1e-2).fit(problem.task, problem.support)
    delta = m.W - problem.task.W0
    assert delta.abs().max() > 1e-3  # it moved
    outside = delta - (delta @ m.Q) @ m.Q.T
    assert outside.abs().max() < 1e-6
    assert m.trainable_parameters() == problem.task.W0.shape[0] * (problem.task.num_classes - 1)


def test_in_w_own_coordinates_it_is_prolip(problem):
    t, s = problem.task, problem.support
    eye = torch.eye(t.W0.shape[1])
    _, W = train_coordinates(t, s, eye, lr=1e-2, lam=0.25, steps=30)
    ours = train_projection(t.W0, t.bias, t.classifier, t.logit_scale, s.views, s.labels, [1e-2], [0.25], 30)[0]
    torch.testing.assert_close(W, ours, atol=2e-6, rtol=1e-5)


def original_p0(task, support, Q, lr, lam, steps):
    """The original's loop, transcribed: A a zero nn.Parameter, autograd, Adam(eps=1e-4), CosineAnnealingLR."""
    A = torch.nn.Parameter(torch.zeros(task.W0.shape[0], Q.shape[1]))
    optimizer = torch.optim.Adam([A], lr=lr, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for step in range(steps):
        h = support.views.view((step + 1) % support.views.num_views)
        z0 = h @ task.W0 + task.bias
        z = z0 + h @ (A @ Q.T)
        scores = task.logit_scale * (z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ task.classifier.T
        loss = F.cross_entropy(scores, support.labels) + lam * A.square().sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return A.detach()


@pytest.mark.parametrize("lr, lam", [(1e-3, 0.25), (1e-2, 0.0), (1e-2, 10.0)])
def test_it_trains_as_the_original(problem, lr, lam):
    Q = text_basis(problem.task.classifier)
    A, _ = train_coordinates(problem.task, problem.support, Q, lr, lam, 50)
    torch.testing.assert_close(A, original_p0(problem.task, problem.support, Q, lr, lam, 50), atol=1e-5, rtol=1e-4)


def test_the_transcription_tells_a_changed_penalty_apart(problem):
    Q = text_basis(problem.task.classifier)
    A, _ = train_coordinates(problem.task, problem.support, Q, 1e-2, 10.0, 50)
    assert not torch.allclose(A, original_p0(problem.task, problem.support, Q, 1e-2, 1.0, 50), atol=1e-4)


def test_validation_ties_go_to_the_originals_preferred_point():
    shots = 4
    points = candidates(shots)
    assert len(points) == 9 and points[0] == (1e-3, 1 / shots)
    best = max(points, key=lambda p: preference(50.0, *p, shots))
    assert best == (1e-3, 1 / shots)
    without = [p for p in points if p != (1e-3, 1 / shots)]
    assert max(without, key=lambda p: preference(50.0, *p, shots)) == (1e-4, 1 / shots)  # then the smaller lr


def test_the_grid_selects_on_validation_and_reloads(problem):
    m = create("p0", steps=20, grid=True).fit(problem.task, problem.support, problem.val)
    assert m.selected_["how"] == "validation" and len(m.selected_["grid"]) == 9
    again = create("p0", steps=20, grid=True).load_state_dict(problem.task, m.state_dict())
    torch.testing.assert_close(again.logits(problem.test.features), m.logits(problem.test.features))
