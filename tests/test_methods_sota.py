"""GDA and ProKeR pinned to their formulations on small synthetic problems: each fitted method equals a closed form
computed here independently (numpy / a direct solve), selects on validation as its original's loop does, and falls
back to its validation-free rule without one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prolip.functional import accuracy
from prolip.methods import configure, create
from prolip.methods.base import FitError
from synthetic import make_problem


@pytest.fixture(scope="module")
def problem():
    return make_problem(num_classes=5, shots=4, d_pre=24, d=12, views=6, test_per_class=20, bias=True, seed=7)


def normalised_embeddings(task, z: torch.Tensor) -> np.ndarray:
    e = (z.double() @ task.W0.double() + task.bias.double()).numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    "name, verified",
    [
        ("gda", dict(alpha=0.1, search=True, augment_views=10)),  # main_few_shots.py:69-70, configs augment_epoch
        (
            "proker",
            dict(
                beta=None, lam=None, search=True, beta_grid=(0.5, 3.0, 20), lam_grid=(0.001, 1.0, 10), augment_views=10
            ),
        ),  # configs/RN50/configs_proker/caltech101.yaml, main.py --augment-epoch
    ],
)
def test_defaults_are_the_verified_ones(name, verified):
    assert create(name).get_params() == verified


# ----------------------------------------------------------------------------------------------- GDA


def gda_by_hand(problem, views: int) -> tuple[np.ndarray, np.ndarray]:
    """main_few_shots.py:52-64 written out with numpy: means, covariance, the KS shrinkage, a uniform prior."""
    task, support = problem.task, problem.support
    f = np.concatenate([normalised_embeddings(task, support.views.view(t)) for t in range(views)])
    y = np.tile(support.labels.numpy(), views)
    C, D = task.num_classes, f.shape[1]
    mus = np.stack([f[y == c].mean(0) for c in range(C)])
    centered = np.concatenate([f[y == c] - mus[c] for c in range(C)])
    cov = np.cov(centered.T)
    precision = D * np.linalg.inv((len(centered) - 1) * cov + np.trace(cov) * np.eye(D))
    W = mus @ precision
    b = np.log(1 / C) - 0.5 * np.einsum("cd,de,ce->c", mus, precision, mus)
    return W, b


def test_gda_equals_its_closed_form(problem):
    m = create("gda", augment_views=4).fit(problem.task, problem.support)
    W, b = gda_by_hand(problem, views=4)
    f = normalised_embeddings(problem.task, problem.test.features)
    zero_shot = problem.task.logit_scale * f @ problem.task.classifier.double().numpy().T
    expected = zero_shot + 0.1 * (f @ W.T + b)  # no validation: α = 0.1, the original's starting value
    np.testing.assert_allclose(m.logits(problem.test.features).double().numpy(), expected, rtol=1e-4, atol=1e-3)
    assert m.selected_ == {"alpha": 0.1, "how": "rule", "views": 4}


def test_gda_selects_alpha_like_its_loop(problem):
    m = create("gda", augment_views=4).fit(problem.task, problem.support, problem.val)
    W, b = gda_by_hand(problem, views=4)
    f = normalised_embeddings(problem.task, problem.val.features)
    zero_shot = problem.task.logit_scale * f @ problem.task.classifier.double().numpy().T
    best_alpha, best_acc = 0.1, 0.0
    for alpha in (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0):
        acc = (np.argmax(zero_shot + alpha * (f @ W.T + b), 1) == problem.val.labels.numpy()).mean() * 100
        if acc > best_acc:
            best_alpha, best_acc = alpha, acc
    assert m.selected_["how"] == "validation" and m.selected_["alpha"] == best_alpha
    assert m.selected_["val_accuracy"] == pytest.approx(best_acc)
    assert accuracy(m.logits(problem.val.features), problem.val.labels) == pytest.approx(best_acc)


# ----------------------------------------------------------------------------------------------- ProKeR


def test_proker_solution_satisfies_its_normal_equations(problem):
    m = create("proker", beta=2.0, lam=0.3, augment_views=3).fit(problem.task, problem.support)
    S, alpha = m.support_embeddings.double(), m.dual.double()
    assert S.shape[0] == 3 * len(problem.support.labels) and m.selected_["how"] == "given"
    K = torch.exp(-2.0 * (1 - S @ S.T))
    Y = F.one_hot(problem.support.labels.repeat(3), problem.task.num_classes).double()
    R = Y - S @ problem.task.classifier.double().T
    torch.testing.assert_close(K / 0.3 @ alpha + alpha, R, atol=1e-4, rtol=1e-4)  # (K/λ + I) α = Y − F_S Tᵀ
    torch.testing.assert_close(
        alpha, torch.linalg.solve(K / 0.3 + torch.eye(len(K), dtype=K.dtype), R), atol=1e-4, rtol=1e-4
    )
    f = torch.from_numpy(normalised_embeddings(problem.task, problem.test.features))
    expected = f @ problem.task.classifier.double().T + torch.exp(-2.0 * (1 - f @ S.T)) @ alpha
    torch.testing.assert_close(m.logits(problem.test.features).double(), expected, atol=1e-4, rtol=1e-4)


def test_proker_vanishing_lambda_is_zero_shot_cosine(problem):
    m = create("proker", beta=1.0, lam=1e-9, augment_views=2).fit(problem.task, problem.support)
    f = torch.from_numpy(normalised_embeddings(problem.task, problem.test.features)).float()
    torch.testing.assert_close(m.logits(problem.test.features), f @ problem.task.classifier.T, atol=1e-5, rtol=0)


def test_proker_search_is_the_originals_loop(problem):
    grid = dict(beta_grid=(0.5, 4.0, 3), lam_grid=(0.01, 1.0, 4))
    m = create("proker", augment_views=2, **grid).fit(problem.task, problem.support, problem.val)
    S = torch.cat(
        [torch.from_numpy(normalised_embeddings(problem.task, problem.support.views.view(t))) for t in range(2)]
    )
    Y = F.one_hot(problem.support.labels.repeat(2), problem.task.num_classes).double()
    R = Y - S @ problem.task.classifier.double().T
    f = torch.from_numpy(normalised_embeddings(problem.task, problem.val.features))
    best = (0.0, None, None)
    for beta in torch.linspace(0.5, 4.0, 3, dtype=torch.float64).tolist():
        K = torch.exp(-beta * (1 - S @ S.T))
        for lam in torch.linspace(0.01, 1.0, 4, dtype=torch.float64).tolist():
            alpha = torch.linalg.solve(K / lam + torch.eye(len(K), dtype=K.dtype), R)
            logits = f @ problem.task.classifier.double().T + torch.exp(-beta * (1 - f @ S.T)) @ alpha
            acc = (logits.argmax(-1) == problem.val.labels).double().mean().item() * 100
            if acc > best[0]:
                best = (acc, beta, lam)
    assert (m.selected_["beta"], m.selected_["lam"]) == pytest.approx(best[1:])
    assert m.selected_["how"] == "validation" and m.selected_["val_accuracy"] == pytest.approx(best[0])


def test_proker_without_validation_uses_the_transferred_values_and_says_where_they_come_from(problem):
    m = create("proker", augment_views=2).fit(problem.task, problem.support)
    assert (m.selected_["beta"], m.selected_["lam"]) == (1.5, 0.05)  # hyperparameters.json "4": 4 shots
    assert m.selected_["how"] == "rule" and "ImageNet" in m.selected_["source"]


def test_proker_imagenet_uses_one_center_crop_per_image(problem):
    m = configure("proker", {}, dataset="ImageNet")
    assert m.augment_views == 1 and m.beta_grid == (1.5, 3.0, 10)
    m.fit(problem.task, problem.support)
    expected = F.normalize(problem.support.center_features() @ problem.task.W0 + problem.task.bias, dim=-1)
    torch.testing.assert_close(m.support_embeddings, expected)


def test_proker_refuses_a_kernel_system_the_machine_cannot_hold(problem, monkeypatch):
    import prolip.methods.proker as proker

    monkeypatch.setattr(proker, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(FitError, match="augment_views"):
        create("proker", augment_views=2).fit(problem.task, problem.support)


def test_proker_scores_in_row_chunks(problem, monkeypatch):
    import prolip.methods.proker as proker

    m = create("proker", beta=2.0, lam=0.3, augment_views=2).fit(problem.task, problem.support)
    whole = m.logits(problem.test.features)
    monkeypatch.setattr(proker, "ROW_CHUNK", 7)
    torch.testing.assert_close(m.logits(problem.test.features), whole)
    assert math.isfinite(whole.sum().item())


# ----------------------------------------------------------------------------------------------- in the bench


def test_bench_records_cost_and_the_report_shows_it_with_the_protocol_card(tmp_path, tiny_vit, dtd10_experiment):
    from prolip.bench.experiment import parse_experiment
    from prolip.bench.protocols import run_experiment
    from prolip.bench.records import read_records
    from prolip.bench.report import write_report

    raw = dtd10_experiment(
        views=3,
        protocol="fewshot-val",
        methods=[
            "zeroshot",
            "gda",
            {"name": "proker", "beta_grid": [0.5, 3.0, 3], "lam_grid": [0.01, 1.0, 3]},
            {"name": "prolip", "grid": False, "steps": 3, "label": "prolip, validation-free"},
        ],
    )
    records = {
        r["label"]: r
        for r in read_records(
            run_experiment(parse_experiment(raw, "t.yaml"), echo=lambda line: None, backbone=tiny_vit)
        )
    }
    gda, proker = records["gda"], records["proker"]
    # 10 classes × 1 shot: 3 views read, plus the 10 validation images
    assert gda["forward_passes"] == 3 * 10 + 10 and gda["trainable_parameters"] == 10 * 32 + 10
    assert proker["trainable_parameters"] == 3 * 10 * 10 and records["zeroshot"]["forward_passes"] == 0
    assert all(r["peak_memory_mb"] is not None and r["seconds"] >= 0 for r in records.values())
    assert records["prolip, validation-free"]["selected"]["how"] == "rule" and gda["selected"]["how"] == "validation"
    md = write_report(list(records.values()), tmp_path / "report")["markdown"].read_text()
    assert "| method | shots | accuracy | ECE | seconds | forward passes | peak memory | trainable parameters |" in md
    assert "- *gda*: can select α" in md and "selected on the N-shot validation set" in md
    assert "- *prolip, validation-free*: can select lr and λ" in md and "a validation set was there, unused" in md
