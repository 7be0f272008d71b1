"""ProLIP: the maths (gradient, Adam, cosine), the method's contract, precision modes and the batched grid."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from prolip.constraints import resolve_lambda
from prolip.functional import accuracy, clip_logits
from prolip.methods import create
from prolip.methods.base import Validation
from prolip.methods.prolip import GRID_LAMS, GRID_LRS, prolip_loss_and_grad, select_config, train_projection
from prolip.optim import adam_step, cosine_lr
from synthetic import make_problem


@pytest.fixture(scope="module")
def problem():
    return make_problem(bias=True)


def test_steps_zero_is_exactly_zero_shot(problem):
    m = create("prolip", steps=0).fit(problem.task, problem.support)
    z = problem.test.features
    expected = clip_logits(z, problem.task.W0, problem.task.bias, problem.task.classifier, 100.0)
    assert torch.equal(m.logits(z), expected)
    assert torch.equal(create("zeroshot").fit(problem.task, problem.support).logits(z), expected)


def test_analytic_gradient_matches_autograd(problem):
    t = problem.task  # float64 so the comparison tests the formula, not rounding
    z, y, W0, b, T = (
        problem.support.center.double(),
        problem.support.labels,
        t.W0.double(),
        t.bias.double(),
        t.classifier.double(),
    )
    W = (W0 + 0.01 * torch.randn(3, *t.W0.shape, dtype=torch.float64)).requires_grad_(True)
    lam = torch.tensor([0.0, 0.5, 3.0], dtype=torch.float64)
    logits = 100.0 * F.normalize(z @ W + b, dim=-1) @ T.T
    ce = torch.stack([F.cross_entropy(lg, y) for lg in logits])
    loss_ref = ce + lam * (W - W0).pow(2).sum(dim=(1, 2))
    loss_ref.sum().backward()
    loss, grad = prolip_loss_and_grad(z, W.detach(), b, T, 100.0, y, W0, lam)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, W.grad, rtol=1e-8, atol=1e-10)


def test_regulariser_gradient_is_2_lambda_diff(problem):
    # With logit_scale 0 the CE term is constant, leaving only the pull's gradient.
    t = problem.task
    W = t.W0 + torch.randn(2, *t.W0.shape)
    lam = torch.tensor([0.25, 7.0])
    _, grad = prolip_loss_and_grad(
        problem.support.center, W, t.bias, t.classifier, 0.0, problem.support.labels, t.W0, lam
    )
    torch.testing.assert_close(grad, 2 * lam[:, None, None] * (W - t.W0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_adam_and_cosine_match_torch(dtype):
    g = torch.Generator().manual_seed(1)
    lrs, steps = [1e-2, 1e-4, 3e-3], 12
    W0 = (torch.randn(len(lrs), 6, 5, generator=g) * 0.05).to(dtype)
    grads = [(torch.randn(len(lrs), 6, 5, generator=g) * 0.1).to(dtype) for _ in range(steps)]
    W, m, v = W0.clone(), torch.zeros_like(W0), torch.zeros_like(W0)
    for t in range(steps):
        adam_step(W, grads[t], m, v, t + 1, cosine_lr(torch.tensor(lrs, dtype=torch.float64), t, steps), eps=1e-4)
    for k, lr in enumerate(lrs):
        p = torch.nn.Parameter(W0[k].clone())
        opt = torch.optim.Adam([p], lr=lr, betas=(0.9, 0.999), eps=1e-4, weight_decay=0, foreach=False)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        for t in range(steps):
            p.grad = grads[t][k].clone()
            opt.step()
            sched.step()
        if dtype == torch.float32:
            torch.testing.assert_close(W[k], p.detach(), rtol=1e-6, atol=1e-8)
        else:
            assert torch.equal(W[k], p.detach())


def test_only_w_changes_and_task_untouched(problem):
    before = copy.deepcopy(problem.task)
    m = create("prolip", lr=1e-3, steps=20).fit(problem.task, problem.support)
    for name in ("W0", "bias", "classifier"):
        assert torch.equal(getattr(problem.task, name), getattr(before, name)), name
    assert not torch.equal(m.W, problem.task.W0)
    assert set(m.state_dict()) == {"W", "W0", "bias"}
    assert torch.equal(m.state_dict()["W0"], before.W0)


def test_lambda_follows_shot_count():
    assert resolve_lambda("1/N", 4) == 0.25
    assert resolve_lambda("1/N2", 4) == 1 / 16
    assert resolve_lambda(0.3, 4) == 0.3
    with pytest.raises(ValueError, match="lam"):
        resolve_lambda("one over n", 4)
    for shots in (1, 4):
        p = make_problem(shots=shots, views=2)
        m = create("prolip", steps=1).fit(p.task, p.support)
        assert m.selected_["lam"] == 1 / shots


def test_fp32_beats_zero_shot_and_is_deterministic(problem):
    zs = accuracy(
        create("zeroshot").fit(problem.task, problem.support).logits(problem.test.features), problem.test.labels
    )
    a = create("prolip", lr=1e-3, steps=100).fit(problem.task, problem.support, seed=1)
    b = create("prolip", lr=1e-3, steps=100).fit(problem.task, problem.support, seed=1)
    assert torch.equal(a.W, b.W)
    assert accuracy(a.logits(problem.test.features), problem.test.labels) > zs + 10


def test_reference_precision_freezes_small_updates_fp32_does_not():
    # SPEC §1: at lr 1e-5 Adam's step is under half the float16 spacing of |w| ≈ 0.03, so float16 W stays put.
    p = make_problem(views=8)
    fp32 = create("prolip", lr=1e-5, steps=60).fit(p.task, p.support).W
    ref = create("prolip", lr=1e-5, steps=60, precision="reference").fit(p.task, p.support).W
    unchanged_ref = (ref == p.task.W0.half().float()).float().mean().item()
    unchanged_fp32 = (fp32 == p.task.W0).float().mean().item()
    assert unchanged_ref > 0.2 and unchanged_fp32 < 0.01
    assert (ref - p.task.W0).norm() < (fp32 - p.task.W0).norm()


def test_batched_grid_equals_per_config_training(problem):
    t, s = problem.task, problem.support
    lrs, lams = [1e-2, 1e-4, 1e-3], [0.0, 1.0, 0.1]
    batched = train_projection(t.W0, t.bias, t.classifier, 100.0, s.views, s.labels, lrs, lams, 15)
    for k in range(3):
        single = train_projection(t.W0, t.bias, t.classifier, 100.0, s.views, s.labels, [lrs[k]], [lams[k]], 15)
        torch.testing.assert_close(batched[k], single[0], rtol=1e-4, atol=1e-6)


def test_grid_picks_by_validation_only(problem):
    test_labels_shuffled = problem.test.labels[torch.randperm(len(problem.test.labels))]
    m = create("prolip", grid=True, steps=15).fit(problem.task, problem.support, problem.val)
    assert len(m.selected_["grid"]) == len(GRID_LRS) * len(GRID_LAMS) == 49
    assert m.selected_["how"] == "validation"
    best = max(r["val_accuracy"] for r in m.selected_["grid"])
    assert m.selected_["val_accuracy"] == best
    # The winner's W reproduces the recorded validation accuracy, and retraining it alone gives the same W.
    assert accuracy(m.logits(problem.val.features), problem.val.labels) == pytest.approx(best)
    single = create("prolip", lr=m.selected_["lr"], lam=m.selected_["lam"], steps=15)
    torch.testing.assert_close(single.fit(problem.task, problem.support).W, m.W, rtol=1e-4, atol=1e-6)
    # Selection depends on validation labels, never on test data: a permuted validation set changes it.
    shuffled_val = Validation(problem.val.features, problem.val.labels[torch.randperm(len(problem.val.labels))])
    other = create("prolip", grid=True, steps=15).fit(problem.task, problem.support, shuffled_val)
    assert other.selected_["val_accuracy"] < best
    del test_labels_shuffled  # the method has no way to receive test labels at all: fit() takes none


def test_grid_chunking_gives_same_selection(problem):
    grid = [[1e-2, 0.0], [1e-3, 0.1], [1e-4, 1.0], [1e-5, 10.0]]
    a = create("prolip", grid=grid, steps=10).fit(problem.task, problem.support, problem.val)
    b = create("prolip", grid=grid, steps=10, grid_chunk=1).fit(problem.task, problem.support, problem.val)
    assert a.selected_["lr"] == b.selected_["lr"] and a.selected_["lam"] == b.selected_["lam"]
    torch.testing.assert_close(a.W, b.W, rtol=1e-4, atol=1e-6)


def test_tie_rule_first_maximum_by_default_conservative_as_option():
    # The reference keeps the first maximum in its loop order (strict ">"); "conservative" is our option.
    accs = torch.tensor([50.0, 60.0, 60.0, 60.0])
    lrs, lams = [1e-2, 1e-2, 1e-5, 1e-3], [1.0, 0.0, 1.0, 1.0]
    assert select_config(accs, lrs, lams) == 1
    assert select_config(accs, lrs, lams, "conservative") == 2
    assert create("prolip").tie_rule == "first"


def test_grid_without_validation_is_a_clear_error(problem):
    with pytest.raises(ValueError, match="validation"):
        create("prolip", grid=True).fit(problem.task, problem.support)


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match="precision"):
        create("prolip", precision="bf16")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        create("prolip", learning_rate=1e-3)


def test_state_round_trip(problem):
    m = create("prolip", lr=1e-3, steps=5).fit(problem.task, problem.support)
    reloaded = create("prolip").load_state_dict(problem.task, m.state_dict())
    assert torch.equal(reloaded.logits(problem.test.features), m.logits(problem.test.features))
    with pytest.raises(ValueError, match="shape"):
        create("prolip").load_state_dict(problem.task, {"W": torch.zeros(3, 3)})


def test_swapped_classifier_is_used(problem):
    m = create("prolip", lr=1e-3, steps=5).fit(problem.task, problem.support)
    other = problem.task.classifier.flip(0)
    torch.testing.assert_close(m.logits(problem.test.features, other), m.logits(problem.test.features).flip(-1))


# ---------------------------------------------------------------------------------------------- the hot path (issue 14)


def _packed_reference_loop(t, s, lrs, lams, steps):
    """The training loop as it was before the hot path was rewritten: ``packed_loss_and_grad`` + ``adam_step``."""
    from prolip.methods.prolip import packed_loss_and_grad
    from prolip.optim import view_for_step

    lrs, lams = torch.tensor(lrs, dtype=torch.float64), torch.tensor(lams)
    W = t.W0[:, None, :].expand(-1, len(lrs), -1).contiguous()
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    for step in range(steps):
        z = s.views.view(view_for_step(step, s.views.num_views)).float()
        _, grad = packed_loss_and_grad(z, W, t.bias, t.classifier, 100.0, s.labels, t.W0, lams)
        adam_step(W, grad, m, v, step + 1, cosine_lr(lrs, step, steps), eps=1e-4, group_dim=1)
    return W.transpose(0, 1)


def test_hot_path_equals_the_plain_loop(problem):
    # Batched: the same arithmetic op for op (bitwise here); one configuration alone: torch's fused Adam kernel,
    # a few ulp from the unfused step, so within float32 rounding of the plain loop.
    t, s = problem.task, problem.support
    lrs, lams = [1e-2, 1e-3, 1e-5, 1e-8], [0.0, 0.1, 10.0, 1.0]
    plain = _packed_reference_loop(t, s, lrs, lams, 12)
    batched = train_projection(t.W0, t.bias, t.classifier, 100.0, s.views, s.labels, lrs, lams, 12)
    torch.testing.assert_close(batched, plain, rtol=1e-6, atol=1e-9)
    for k in range(len(lrs)):
        single = train_projection(t.W0, t.bias, t.classifier, 100.0, s.views, s.labels, [lrs[k]], [lams[k]], 12)[0]
        torch.testing.assert_close(single, plain[k], rtol=1e-5, atol=1e-8)


def test_fused_adam_step_is_torch_fused_adam_and_close_to_the_plain_step():
    from prolip.optim import fused_adam_step

    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(64, 32, generator=g) * 0.05
    grads = [torch.randn(64, 32, generator=g) * 0.1 for _ in range(6)]
    fused, plain = (
        [W0.clone(), torch.zeros_like(W0), torch.zeros_like(W0)],
        [W0.clone(), torch.zeros_like(W0), torch.zeros_like(W0)],
    )
    p = torch.nn.Parameter(W0.clone())
    opt = torch.optim.Adam([p], lr=1e-3, eps=1e-4, fused=True)
    for step, grad in enumerate(grads, start=1):
        fused_adam_step(*fused[:1], grad, *fused[1:], step, 1e-3, eps=1e-4)
        adam_step(plain[0], grad, plain[1], plain[2], step, 1e-3, eps=1e-4)
        p.grad = grad.clone()
        opt.step()
    assert torch.equal(fused[0], p.detach())
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=1e-9)


def test_adam_scratch_buffers_change_nothing():
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(5, 3, 4, generator=g)
    lr = torch.tensor([1e-2, 1e-3, 1e-4], dtype=torch.float64)
    runs = []
    for scratch in (None, (torch.empty_like(W0), torch.empty_like(W0))):
        W, m, v = W0.clone(), torch.zeros_like(W0), torch.zeros_like(W0)
        for step in range(1, 4):
            adam_step(W, torch.sin(W * step), m, v, step, lr, eps=1e-4, group_dim=1, scratch=scratch)
        runs.append(W)
    assert torch.equal(*runs)


def test_grid_chunk_size_one_on_cpu_and_bounded_by_gpu_memory():
    from prolip.methods.prolip import grid_chunk_size

    for n, classes in ((40, 10), (752, 47), (16000, 1000)):
        assert grid_chunk_size("cpu", 49, n, 768, 512, classes) == 1
    assert grid_chunk_size("cuda", 49, 40, 768, 512, 10, free_bytes=80 * 2**30) == 49
    few = grid_chunk_size("cuda", 49, 16000, 768, 512, 1000, free_bytes=2 * 2**30)
    assert 1 <= few < 49
    assert grid_chunk_size("cuda", 49, 16000, 768, 512, 1000, free_bytes=1) == 1


def test_grid_is_the_same_whatever_the_chunk(problem):
    # Chunk 1 (the CPU default) trains each configuration alone; chunks of 2 and 4 pack them: same selection and
    # the winner's W within float32 rounding.
    grid = [[1e-2, 0.0], [1e-3, 0.1], [1e-4, 1.0], [1e-5, 10.0]]
    fits = [
        create("prolip", grid=grid, steps=10, grid_chunk=k).fit(problem.task, problem.support, problem.val)
        for k in (None, 1, 2, 4)
    ]
    for other in fits[1:]:
        assert other.selected_["grid"] == fits[0].selected_["grid"]
        torch.testing.assert_close(other.W, fits[0].W, rtol=1e-5, atol=1e-7)
