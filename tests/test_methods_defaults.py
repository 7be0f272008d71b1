"""Each baseline's defaults as verified against its original code (the source is cited next to each default in
the method's module), and the training mechanics those defaults rely on: Dassl's warm-up + cosine schedule and
its batches per epoch, CLAP's pooled views, LP++'s class-sum init, CoOp's C search, Tip-Adapter's grid."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from prolip.methods import create
from prolip.methods._common import dassl_batches_per_epoch, dassl_lr, embed, train_minibatch
from synthetic import make_problem

VERIFIED = {
    "clip-adapter": dict(
        ratio=0.2, reduction=4, lr=2e-3, epochs=200, batch_size=32, weight_decay=5e-4, momentum=0.9, views=None
    ),
    "taskres": dict(alpha=0.5, lr=2e-3, epochs=None, batch_size=256, weight_decay=5e-4, views=None),
    "zs-lp": dict(lr=0.1, epochs=300, batch_size=256, views=20, momentum=0.9, weight_decay=0.0),
    "clap": dict(lr=0.1, epochs=300, batch_size=256, views=20, momentum=0.9, weight_decay=0.0, adaptive=False),
    "tip-adapter": dict(
        alpha=1.17, beta=1.0, search=True, search_scale=(7.0, 3.0), search_step=(200, 20), augment_views=10
    ),
    "tip-adapter-f": dict(
        alpha=1.17,
        beta=1.0,
        search=True,
        search_scale=(7.0, 3.0),
        search_step=(200, 20),
        augment_views=10,
        lr=1e-3,
        epochs=20,
        batch_size=256,
        views=None,
    ),
    "lp++": dict(epochs=300, alpha_every=10, init_scale=250.0),
    "linear-probe": dict(C=None, search_steps=8, max_iter=1000),
}


@pytest.mark.parametrize("name", sorted(VERIFIED))
def test_config_records_the_verified_defaults(name):
    assert create(name).config()["hyperparameters"] == VERIFIED[name]


def test_dassl_schedule_warms_up_one_epoch_then_restarts_the_cosine():
    # Dassl ConstantWarmupScheduler(CosineAnnealingLR(T_max=epochs)): epoch 0 at 1e-5, epoch 1 at the base lr,
    # epoch e at the cosine's step e - 1, so the last epoch stays above 0.
    assert dassl_lr(0.1, 0, 300) == 1e-5
    assert dassl_lr(0.1, 1, 300) == pytest.approx(0.1)
    assert dassl_lr(0.1, 151, 300) == pytest.approx(0.05)
    assert dassl_lr(0.1, 299, 300) == pytest.approx(0.1 * (1 + math.cos(math.pi * 298 / 300)) / 2)
    assert dassl_lr(0.1, 299, 300) > 0


def test_dassl_loader_drops_the_last_partial_batch_only_when_a_full_one_exists():
    assert dassl_batches_per_epoch(47, 256) == 1  # 1-shot DTD: one batch of 47
    assert dassl_batches_per_epoch(752, 256) == 2  # 16-shot DTD: 2 full batches, 240 samples dropped
    assert dassl_batches_per_epoch(16000, 256) == 62


def _record_batches(epoch_data, **kw):
    sizes = []
    p = torch.zeros(1, requires_grad=True)

    def loss_fn(x, y):
        sizes.append(len(y))
        return (p * x.sum()).sum()

    train_minibatch([p], loss_fn, epoch_data, seed=0, optimizer="sgd", **kw)
    return sizes


def test_trainer_batches_per_epoch():
    x, y = torch.ones(300, 2), torch.zeros(300, dtype=torch.long)
    data = lambda e: (x, y)
    assert _record_batches(data, epochs=2, batch_size=128, lr=0.1, drop_last=True) == [128, 128] * 2
    assert _record_batches(data, epochs=1, batch_size=128, lr=0.1, drop_last=False) == [128, 128, 44]
    # CLAP: a loader's worth of batches (from N support images) drawn from the larger pool of pooled views
    assert _record_batches(data, epochs=1, batch_size=256, lr=0.1, batches_per_epoch=1) == [256]


def test_clap_epoch_draws_from_all_pooled_views():
    p = make_problem(num_classes=4, shots=4, views=20, seed=1)  # N = 16 < 256: one batch, min(256, 20·16) samples
    import prolip.methods.clap as clap_mod

    seen = []
    original = clap_mod.train_minibatch

    def spy(params, loss_fn, epoch_data, **kw):
        x, y = epoch_data(0)
        seen.append((x.shape[0], kw["batches_per_epoch"]))
        return original(params, loss_fn, epoch_data, **kw)

    clap_mod.train_minibatch = spy
    try:
        create("clap", epochs=2).fit(p.task, p.support)
    finally:
        clap_mod.train_minibatch = original
    assert seen == [(20 * 16, 1)]


def test_lp_plus_plus_starts_from_class_sums_not_means():
    p = make_problem(num_classes=4, shots=3, seed=2)
    m = create("lp++", epochs=0).fit(p.task, p.support)
    f = F.normalize(embed(p.task, p.support.views.view(0)), dim=-1)
    sums = torch.stack([f[p.support.labels == c].sum(0) for c in range(4)])
    torch.testing.assert_close(m.weight, sums)


def test_coop_c_search_follows_the_bisection():
    from prolip.methods.linear_probe import coop_c_search

    calls = []

    def score(C):  # unimodal in log10 C with its peak at 0.3
        calls.append(C)
        return -abs(math.log10(C) - 0.3)

    C = coop_c_search(score, steps=8)
    # coarse peak 1 → [0.1, 10]; winners R, L, R, L, L, R, R, L (worked by hand from CoOp's update rule)
    assert math.log10(C) == pytest.approx(0.296875)
    assert len(calls) == 7 + 2 * 8
    # ties on the coarse grid go to the first listed (largest) C, ties in a round to the left end
    assert coop_c_search(lambda C: 1.0, steps=1) == pytest.approx(1e5)


def test_tip_adapter_grid_is_the_originals_search_hp():
    from prolip.methods.tip_adapter import search_grid

    betas = search_grid(7, 200)
    assert len(betas) == 200 and betas[0] == pytest.approx(0.1) and betas[-1] == pytest.approx(0.1 + 199 * 6.9 / 200)
    assert max(search_grid(13, 20)) == pytest.approx(0.1 + 19 * 12.9 / 20)  # configs/dtd.yaml's α grid


def test_taskres_epochs_follow_the_shot_rule():
    from prolip.methods.adapters import taskres_epochs

    assert [taskres_epochs(s) for s in (1, 2, 4, 8, 16)] == [100, 100, 100, 200, 200]  # train_regular.sh
    p = make_problem(num_classes=3, shots=1, seed=0)
    assert create("taskres").fit(p.task, p.support).selected_["epochs"] == 100
    assert create("taskres", epochs=3).fit(p.task, p.support).selected_["epochs"] == 3


@pytest.mark.parametrize("name", ["zs-lp", "clap", "taskres"])
def test_text_heads_start_from_the_unnormalised_mean_text_embedding(name):
    # TaskRes/CLAP _get_base_text_features: mean over templates of the raw text embeddings, not normalised.
    p = make_problem(num_classes=4, shots=2, seed=4)
    p.task = dataclasses.replace(
        p.task, text_mean=p.task.classifier * torch.linspace(5, 15, 4)[:, None]
    )  # per-class norms
    m = create(name, epochs=0).fit(p.task, p.support)
    start = m.prototypes if name != "taskres" else m.base + m.alpha * m.residual
    torch.testing.assert_close(start, p.task.text_mean)
    p.task = dataclasses.replace(p.task, text_mean=None)
    with pytest.raises(ValueError, match="unnormalised mean text embedding"):
        create(name, epochs=0).fit(p.task, p.support)


def test_lp_plus_plus_alpha_starts_from_true_class_scores_only():
    # compute_centroids_alpha: one-hot mask × scores, so class c contributes its samples' score for class c only.
    p = make_problem(num_classes=4, shots=3, seed=2)
    m = create("lp++", epochs=0).fit(p.task, p.support)
    f = F.normalize(embed(p.task, p.support.views.view(0)), dim=-1)
    scores = f @ p.task.classifier.T
    true_class = torch.stack([scores[p.support.labels == c, c].mean() for c in range(4)])
    torch.testing.assert_close(m.alpha, torch.full((4,), 250.0 * true_class.mean().item()))


def test_per_dataset_settings_of_the_originals_apply_under_the_callers():
    from prolip.methods import configure

    assert configure("tip-adapter-f", {}, dataset="EuroSAT").epochs == 100  # configs/eurosat.yaml train_epoch
    dtd = configure("tip-adapter", {}, dataset="DescribableTextures")
    assert (dtd.alpha, dtd.search_scale) == (2.0, (13.0, 13.0))  # configs/dtd.yaml
    assert configure("taskres", {}, dataset="OxfordFlowers").alpha == 1.0  # train_regular.sh
    assert configure("taskres", {}, dataset="ImageNet").lr == 2e-4
    assert configure("taskres", {"alpha": 0.7}, dataset="OxfordFlowers").alpha == 0.7  # the experiment wins
    assert configure("tip-adapter", {}, dataset="my-folder").alpha == 1.17  # unknown data: the class defaults
    assert configure("tip-adapter", {}).get_params() == create("tip-adapter").get_params()


def test_validation_switches_on_what_a_method_selects_and_refuses_methods_that_select_nothing():
    from prolip.methods import HyperparameterError, configure

    assert configure("prolip", {}, validate=True).grid is True
    assert configure("prolip", {"grid": [[1e-3, 0.1]]}, validate=True).grid == [[1e-3, 0.1]]
    with pytest.raises(HyperparameterError, match="zeroshot selects nothing on a validation set"):
        configure("zeroshot", {}, validate=True)
    assert configure("zeroshot", {}, validate=True, refuse_useless_validation=False).get_params() == {}


def test_register_refuses_a_second_class_under_a_taken_name():
    from prolip.methods import method_class, register

    existing = method_class("prolip")
    impostor = type("Impostor", (existing,), {"__module__": "somewhere.else"})
    with pytest.raises(ValueError, match=r"'prolip' is already registered .*another name"):
        register(impostor)
    assert method_class("prolip") is existing
    assert register(existing) is existing  # the same class again (its module reloaded) is not a duplicate


def test_a_task_is_frozen_and_changed_only_by_replacing_it():
    import dataclasses as dc

    p = make_problem(num_classes=3, shots=1, seed=0)
    with pytest.raises(dc.FrozenInstanceError):
        p.task.text_mean = None  # type: ignore[misc]
    assert dc.replace(p.task, text_mean=None).text_mean is None and p.task.text_mean is not None
