"""Bounded memory (issue 24): test × support and kernel computations are built a block of rows at a time, and give
bit-for-bit the numbers of the unchunked computation. Every test runs the code twice, once in the smallest blocks
(``prolip.functional.BLOCK_ELEMENTS`` set tiny: ``MIN_ROWS`` rows each) and once in one block, and compares with
``torch.equal``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import prolip.functional as functional
from prolip.diagnostics import diagnose
from prolip.functional import clip_logits, map_rows, row_slices
from prolip.methods import create
from prolip.methods._common import embed
from synthetic import make_problem

TINY = 8  # elements per block: every chunk has the fewest rows, MIN_ROWS
WHOLE = 1 << 40  # one block


@pytest.fixture(scope="module")
def problem():
    return make_problem(num_classes=6, shots=40, d_pre=24, d=12, views=3, test_per_class=50, bias=True, seed=3)


def twice(monkeypatch, compute):
    """``compute()`` in 2-row blocks, then in one block."""
    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", TINY)
    chunked = compute()
    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", WHOLE)
    return chunked, compute()


def same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, tuple | list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    else:
        assert a == b


def test_row_slices_cover_every_row_once_and_never_leave_a_short_block():
    short = functional.MIN_ROWS
    for n in (0, 1, short - 1, short, short + 1, 2 * short - 1, 2 * short, 2 * short + 1, 5 * short + 3):
        for rows in (1, short, short + 5, 3 * short, 10 * short):
            slices = list(row_slices(n, rows))
            assert [i for s in slices for i in range(n)[s]] == list(range(n))
            assert all(s.stop - s.start >= short for s in slices) or len(slices) == 1


def test_map_rows_is_the_whole_computation_with_and_without_autograd():
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(300, 24, generator=g), torch.randn(50, 24, generator=g)
    fn = lambda rows: torch.exp(rows @ keys.T / 5) @ keys  # noqa: E731
    assert torch.equal(map_rows(fn, x, 50, block_elements=TINY), fn(x))
    w = keys.clone().requires_grad_(True)  # under autograd: computed whole, the same gradient bits
    map_rows(lambda rows: (rows @ w.T / 5).exp(), x, 50, block_elements=TINY).sum().backward()
    grad, w.grad = w.grad, None
    (x @ w.T / 5).exp().sum().backward()
    assert torch.equal(grad, w.grad)


def test_map_rows_recomputing_in_backward_gives_the_gradient_and_holds_one_block():
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(300, 24, generator=g), torch.randn(50, 24, generator=g)
    w = keys.clone().requires_grad_(True)
    held: list[int] = []  # elements of every [rows, 50] affinity built, forward and backward

    def fn(rows):
        a = rows @ w.T / 5
        held.append(a.numel())
        return a.exp() @ keys

    out = map_rows(fn, x, 50, block_elements=TINY, recompute_in_backward=True)
    out.square().sum().backward()
    grad, w.grad = w.grad, None
    blocks = len(list(row_slices(300, functional.MIN_ROWS)))
    assert blocks > 1 and len(held) == 2 * blocks  # each block built in the forward and again in backward
    assert max(held) < 300 * 50
    fn(x).square().sum().backward()
    torch.testing.assert_close(grad, w.grad, rtol=1e-4, atol=1e-5 * float(w.grad.abs().max()))  # summed per block


def reference_ece(logits, labels, bins=functional.ECE_BINS):
    """The unchunked expected_calibration_error this change replaced."""
    probs = logits.float().softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels).float()
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    gap = torch.zeros(bins).index_add_(0, which, correct - confidence).abs()
    return float(gap.sum() / max(len(labels), 1) * 100.0)


def test_ece_and_zero_shot_scores_are_the_unchunked_ones(problem, monkeypatch):
    from prolip.pipeline import zero_shot_scores

    t, test = problem.task, problem.test
    logits = clip_logits(test.features, t.W0, t.bias, t.classifier, t.logit_scale)
    ece = twice(monkeypatch, lambda: functional.expected_calibration_error(logits, test.labels))
    assert ece[0] == ece[1] == reference_ece(logits, test.labels)
    scores = twice(monkeypatch, lambda: zero_shot_scores(t, test.features, test.labels))
    assert scores[0] == scores[1] == (functional.accuracy(logits, test.labels), reference_ece(logits, test.labels))


def test_pipeline_evaluation_is_the_same_in_blocks(problem, monkeypatch):
    from prolip.pipeline import evaluate

    m = create("tip-adapter", search=False).fit(problem.task, problem.support)

    class Evaluation:
        features, labels = problem.test.features, problem.test.labels
        images = SimpleNamespace(classnames=[f"c{i}" for i in range(problem.task.num_classes)])

        def __len__(self):
            return len(self.labels)

    episode = SimpleNamespace(evaluation=Evaluation(), task=problem.task, images=SimpleNamespace(eval_set="test"))
    same(*twice(monkeypatch, lambda: evaluate(m, episode)))


def reference_tip_search(zs, affinity, values, labels, betas, alphas):
    """The unchunked search_alpha_beta this change replaced: the whole [N, M] affinity at once."""
    alpha_t = torch.tensor(alphas)
    best = (-1.0, alphas[0], betas[0])
    for beta in betas:
        cache = torch.exp(-beta * (1 - affinity)) @ values
        accs = ((zs + alpha_t[:, None, None] * cache).argmax(-1) == labels).float().mean(-1) * 100
        i = int(accs.argmax())
        if accs[i] > best[0]:
            best = (accs[i].item(), alphas[i], beta)
    return best[1], best[2], best[0]


def test_tip_adapter_search_is_the_unchunked_search(problem, monkeypatch):
    from prolip.methods.tip_adapter import search_alpha_beta, search_grid

    m = create("tip-adapter", search=False).fit(problem.task, problem.support)
    e = embed(problem.task, problem.val.features)
    f = F.normalize(e, dim=-1)
    zs = functional.cosine_logits(e, problem.task.classifier, problem.task.logit_scale)
    betas, alphas = search_grid(7.0, 30), search_grid(3.0, 10)
    args = (zs, f, m.keys, m.values, problem.val.labels, betas, alphas)
    chunked, whole = twice(monkeypatch, lambda: search_alpha_beta(*args))
    expected = reference_tip_search(zs, f @ m.keys.T, m.values, problem.val.labels, betas, alphas)
    assert chunked == whole == expected


@pytest.mark.parametrize("name", ["tip-adapter", "tip-adapter-f", "prolip+tip-adapter-f"])
def test_tip_adapters_fit_and_score_the_same_in_blocks(problem, monkeypatch, name):
    extra = {
        "tip-adapter": {"search_step": (10, 5)},
        "tip-adapter-f": {"epochs": 3, "search_step": (10, 5)},
        "prolip+tip-adapter-f": {"steps": 3},
    }[name]

    def run():
        m = create(name, **extra).fit(problem.task, problem.support, problem.val, seed=2)
        return m.selected_, m.keys, m.logits(problem.test.features)

    chunked, whole = twice(monkeypatch, run)
    if name != "prolip+tip-adapter-f":
        same(chunked, whole)
        return
    # It trains in blocks too (the support × keys affinity rebuilt in backward): the gradient is summed block by
    # block, so its weights equal the whole computation's to float32 rounding, not bitwise.
    assert chunked[0] == whole[0]
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[2], whole[2], rtol=1e-5, atol=1e-4)


def test_gda_scores_the_same_in_blocks(problem, monkeypatch):
    def run():
        m = create("gda", augment_views=3).fit(problem.task, problem.support, problem.val)
        return m.selected_, m.logits(problem.test.features)

    same(*twice(monkeypatch, run))


def test_proker_fits_searches_and_scores_the_same_in_blocks_and_as_the_dense_solve(problem, monkeypatch):
    grids = {"beta_grid": (0.5, 3.0, 3), "lam_grid": (0.01, 1.0, 3)}

    def run():
        m = create("proker", augment_views=3, **grids).fit(problem.task, problem.support, problem.val)
        return m.selected_, m.dual, m.logits(problem.test.features)

    (selected, dual, logits), whole = twice(monkeypatch, run)
    same((selected, dual, logits), whole)
    # The dense solve of the original, one fresh system per λ (proker.py:44, 56), gives the same coefficients.
    S64 = m_support(problem).double()
    residual = F.one_hot(problem.support.labels.repeat(3), problem.task.num_classes).double()
    residual = residual - S64 @ problem.task.classifier.double().T
    system = torch.exp(-selected["beta"] * (1 - S64 @ S64.T)) / selected["lam"]  # proker.py:9-10, whole
    system.diagonal().add_(1)
    assert torch.equal(torch.cholesky_solve(residual, torch.linalg.cholesky(system)).float(), dual)


def m_support(problem):
    views = [F.normalize(embed(problem.task, problem.support.views.view(t)), dim=-1) for t in range(3)]
    return torch.cat(views)


def test_diagnose_at_a_thousand_classes_in_blocks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(300, 1000, generator=g), torch.randint(0, 1000, (300,), generator=g)
    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", TINY)
    d = diagnose(logits, labels, [f"c{i}" for i in range(1000)])
    assert d["ece"] == reference_ece(logits, labels)
    assert d["accuracy"] == pytest.approx(functional.accuracy(logits, labels))
    assert len(d["confusion_matrix"]) == 1000 and sum(map(sum, d["confusion_matrix"])) == 300
