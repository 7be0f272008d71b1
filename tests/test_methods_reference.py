"""The paper's methods as the reference code (github.com/astra-vision/ProLIP) trains them, each pinned against an
independent few-line loop written here with torch.optim and autograd, the way the reference writes it: full batch,
step t on cached view (t+1) mod V, eps 1e-4, CosineAnnealingLR stepped every step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from prolip.methods import create
from synthetic import make_problem

STEPS = 12


@pytest.fixture(scope="module")
def problem():
    p = make_problem(num_classes=5, shots=3, d_pre=24, d=12, views=5, bias=True, seed=7)  # 5 views: reference_loop
    g = torch.Generator().manual_seed(1)
    P0 = torch.randn(16, 12, generator=g) * 0.1
    text_pre = (p.task.classifier[:, None, :] + 0.3 * torch.randn(5, 3, 12, generator=g)) @ torch.linalg.pinv(P0)
    p.task = dataclasses.replace(p.task, text_proj=P0, text_pre=text_pre)
    return p


def reference_loop(params, loss_at, lr, optimizer=torch.optim.Adam, views=5):
    opt = optimizer(params, lr=lr, eps=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    cnt = 0
    for _ in range(STEPS):
        cnt = 0 if (cnt + 1) % views == 0 else cnt + 1  # the reference's counter: incremented before use
        loss = loss_at(cnt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def logits_of(e, T):
    return 100.0 * F.normalize(e, dim=-1) @ T.T


def test_prolip_follows_the_reference_view_order_and_loss(problem):
    t, s = problem.task, problem.support
    W = torch.nn.Parameter(t.W0.clone())
    reference_loop(
        [W],
        lambda v: (
            F.cross_entropy(logits_of(s.views.view(v) @ W + t.bias, t.classifier), s.labels)
            + (1 / 3) * ((W - t.W0) ** 2).sum()
        ),
        lr=1e-2,
    )
    ours = create("prolip", lr=1e-2, steps=STEPS).fit(t, s).W
    torch.testing.assert_close(ours, W.detach(), rtol=1e-4, atol=1e-6)


def test_prolip_plus_taskres(problem):
    t, s = problem.task, problem.support
    W = torch.nn.Parameter(t.W0.clone())
    R = torch.nn.Parameter(torch.zeros(t.W0.shape[1], t.num_classes))

    def loss(v):
        z = s.views.view(v)
        out = logits_of(z @ W + t.bias, t.classifier) + 0.1 * 100 * F.normalize(z @ t.W0 + t.bias, dim=-1) @ R
        return F.cross_entropy(out, s.labels) + (1 / 3) * ((W - t.W0) ** 2).sum()

    reference_loop([W, R], loss, lr=1e-2)
    m = create("prolip+taskres", lr=1e-2, steps=STEPS).fit(t, s)
    torch.testing.assert_close(m.W, W.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.residual, R.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("affinity", ["current", "pretrained"])
def test_prolip_plus_tip_adapter_f(problem, affinity):
    t, s = problem.task, problem.support
    W = torch.nn.Parameter(t.W0.clone())
    # build_cache_model with augment_epoch 1: normalised features of one augmented pass (view 0 here), re-normalised.
    keys = torch.nn.Parameter(F.normalize(F.normalize(s.views.view(0) @ t.W0 + t.bias, dim=-1), dim=-1))
    values = F.one_hot(s.labels, t.num_classes).float()

    def loss(v):
        z = s.views.view(v)
        frozen = W.detach() if affinity == "current" else t.W0  # the reference's "frozen" W shares W's storage
        a = F.normalize(z @ frozen + t.bias, dim=-1) @ keys.T
        out = logits_of(z @ W + t.bias, t.classifier) + 1.0 * torch.exp(-1.0 * (1 - a)) @ values
        return F.cross_entropy(out, s.labels) + (1 / 3) * ((W - t.W0) ** 2).sum()

    reference_loop([W, keys], loss, lr=1e-2, optimizer=torch.optim.AdamW)  # AdamW's default weight decay 0.01
    m = create("prolip+tip-adapter-f", lr=1e-2, steps=STEPS, affinity_projection=affinity).fit(t, s)
    torch.testing.assert_close(m.W, W.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.keys, keys.detach(), rtol=1e-4, atol=1e-6)


def test_prolip_text_uses_the_mean_of_unnormalised_template_embeddings(problem):
    t, s = problem.task, problem.support
    P = torch.nn.Parameter(t.text_proj.clone())
    weights = lambda P: F.normalize((t.text_pre @ P).mean(dim=1), dim=-1)  # ProLIP_text.py lines 175-177
    reference_loop(
        [P],
        lambda v: (
            F.cross_entropy(logits_of(s.views.view(v) @ t.W0 + t.bias, weights(P)), s.labels)
            + (1 / 3) * ((P - t.text_proj) ** 2).sum()
        ),
        lr=1e-2,
    )
    m = create("prolip-text", lr=1e-2, steps=STEPS).fit(t, s)
    torch.testing.assert_close(m.P, P.detach(), rtol=1e-4, atol=1e-6)
    # the quirk: at step 0 this is not the per-template-normalised ensemble when templates' norms differ
    start = create("prolip-text", steps=0).fit(t, s).class_weights
    ensemble = create("prolip-text", steps=0, normalise_templates=True).fit(t, s).class_weights
    assert not torch.allclose(start, ensemble)


def test_regularised_linear_adapter(problem):
    t, s = problem.task, problem.support
    eye = torch.eye(t.W0.shape[1])
    A = torch.nn.Parameter(eye.clone())
    reference_loop(
        [A],
        lambda v: (
            F.cross_entropy(logits_of((s.views.view(v) @ t.W0 + t.bias) @ A.T, t.classifier), s.labels)
            + (1 / 3) * ((A - eye) ** 2).sum()
        ),
        lr=1e-2,
    )
    m = create("linear-adapter", lr=1e-2, steps=STEPS).fit(t, s)
    torch.testing.assert_close(m.A, A.detach(), rtol=1e-4, atol=1e-6)


def test_clip_adapter_as_the_paper_trains_it(problem):
    t, s = problem.task, problem.support
    torch.manual_seed(3)
    D = t.W0.shape[1]
    mlp = torch.nn.Sequential(
        torch.nn.Linear(D, D // 4, bias=False), torch.nn.ReLU(), torch.nn.Linear(D // 4, D, bias=False), torch.nn.ReLU()
    )

    def loss(v):
        f = s.views.view(v) @ t.W0 + t.bias
        return F.cross_entropy(logits_of(0.3 * f + 0.7 * mlp(f), t.classifier), s.labels)  # α weights zero-shot

    reference_loop(list(mlp.parameters()), loss, lr=1e-2)
    m = create("clip-adapter-prolip", alpha=0.3, lr=1e-2, steps=STEPS).fit(t, s, seed=3)
    for ours, theirs in zip(m.mlp.parameters(), mlp.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-4, atol=1e-6)
    assert torch.equal(
        create("clip-adapter-prolip", alpha=1.0, steps=0).fit(t, s).logits(problem.test.features),
        logits_of(problem.test.features @ t.W0 + t.bias, t.classifier),
    )
