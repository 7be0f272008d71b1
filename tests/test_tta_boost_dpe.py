"""BoostAdapter and DPE (prolip.tta.boostadapter, prolip.tta.dpe), each pinned on a problem small enough to check by
hand: BoostAdapter without boosting views is TDA, logit for logit, and one boosting view adds exactly its cache
term; DPE's text and visual prototypes and logits after a hand-made 3-image stream equal those of a transcription of
the original's per-image loop (torch.optim.AdamW on zero residuals, the cache dict, the cumulative text average);
both run through `prolip bench` on the tiny model with recorded stream orders and appear in `prolip report`."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from prolip.bench.records import read_records
from prolip.cli import main
from prolip.tta import method_class, order_digest, stream_order, tda_inputs, tda_stream
from prolip.tta.boostadapter import BoostSettings, FIFOCache, boost_settings, boost_stream, boost_views
from prolip.tta.dpe import DPESettings, dpe_settings, dpe_stream
from prolip.tta.tda import TDACache, TDASettings


def _problem(n: int, views: int, dim: int = 8, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(n, views, dim, generator=g), dim=-1)
    return embeddings, F.normalize(torch.randn(classes, dim, generator=g), dim=-1)


# --------------------------------------------------------------------------------------------------- BoostAdapter


@pytest.mark.parametrize("tda_views", [1, 8])
def test_boostadapter_without_boosting_views_is_tda_logit_for_logit(tda_views):
    embeddings, classifier = _problem(60, 8)  # int(8 · 0.1) = 0: no boosting view, as in the original below 10
    tda = TDASettings(views=tda_views, negative_capacity=1)  # a small negative cache, so its rule matters
    inputs = tda_inputs(embeddings, 30.0, classifier, tda)
    boost = boost_views(embeddings, 30.0, classifier)
    assert boost.entropies.shape == (60, 0)
    for seed in (1, 2, 3):
        order = stream_order(60, seed)
        expected = tda_stream(inputs, order, tda)[0]
        settings = BoostSettings(tda=tda, delta=3, negative_fifo=False)
        assert torch.equal(boost_stream(inputs, boost, order, settings), expected)
    if tda_views > 1:
        return  # averaged views are confident: too few images enter the negative cache to tell its rules apart
    # The original's negative cache is first in, first out: same positive side, another negative one.
    fifo = boost_stream(inputs, boost, stream_order(60, 1), BoostSettings(tda=tda))
    assert not torch.equal(fifo, tda_stream(inputs, stream_order(60, 1), tda)[0])


def test_negative_cache_is_first_in_first_out_where_tda_keeps_the_lowest_entropy():
    fifo, tda = FIFOCache(2), TDACache(2)
    for index, item_entropy in enumerate([0.1, 0.3, 0.2]):
        fifo.offer(0, item_entropy, index)
        tda.offer(0, item_entropy, index)
    assert fifo.indices() == [1, 2] and tda.indices() == [0, 2]


def test_one_boosting_view_adds_its_own_cache_term():
    embeddings, classifier = _problem(1, 10, seed=3)  # int(10 · 0.1) = 1 boosting view
    tda = TDASettings(positive_alpha=2.0, positive_beta=3.0)
    inputs = tda_inputs(embeddings, 30.0, classifier, tda)
    boost = boost_views(embeddings, 30.0, classifier)
    logits = 30.0 * embeddings[0] @ classifier.T
    best = int(torch.argsort(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), stable=True)[0])
    assert int(boost.predictions[0, 0]) == int(logits[best].argmax())
    f, b = embeddings[0, 0], embeddings[0, best]
    expected = logits[0].clone()
    expected[int(logits[0].argmax())] += 2.0 * math.exp(-3.0 * (1 - float(f @ f)))  # the image itself
    expected[int(logits[best].argmax())] += 2.0 * math.exp(-3.0 * (1 - float(f @ b)))  # its boosting view
    entropy0 = float(-(logits[0].softmax(-1) * logits[0].log_softmax(-1)).sum()) / math.log2(5)
    if 0.2 < entropy0 < 0.5:  # then the image is in its own negative cache too
        mask = ((logits[0].softmax(-1) > 0.03) & (logits[0].softmax(-1) < 1)).float()
        expected -= 0.117 * math.exp(-1.0 * (1 - float(f @ f))) * mask
    settings = BoostSettings(tda=tda, delta=1)
    assert torch.allclose(boost_stream(inputs, boost, torch.arange(1), settings)[0], expected, atol=1e-5)


def test_boostadapter_settings_are_its_configs():
    dtd, source = boost_settings("DescribableTextures")
    assert (dtd.tda.positive_alpha, dtd.tda.positive_beta, dtd.delta, dtd.tda.views, dtd.views) == (2.0, 3.0, 0, 1, 64)
    assert source == "BoostAdapter configs for DescribableTextures"
    sketch, _ = boost_settings("ImageNetSketch")
    assert (sketch.delta, sketch.tda.views) == (1, 64)
    imagenet, _ = boost_settings("ImageNet")
    assert imagenet.views == 1 and method_class("boostadapter")().views_read(64, "ImageNet") == 1
    folder, source = boost_settings("my_folder")
    assert folder.delta == 3 and "scripts/run.sh" in source


# ------------------------------------------------------------------------------------------------------------ DPE


def _update_cache(cache: dict, pred: int, item: list, capacity: int) -> None:
    """main_dpe.py update_cache, transcribed."""
    if pred in cache:
        if len(cache[pred]) < capacity:
            cache[pred].append(item)
        elif item[1] < cache[pred][-1][1]:
            cache[pred][-1] = item
        cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
    else:
        cache[pred] = [item]


def _original_dpe(images: torch.Tensor, clip_weights: torch.Tensor, s: DPESettings, scale: float):
    """main_dpe.py run_test_dpe's loop on one-view images [N, D] with clip_weights [D, C] (its layout), in float32:
    returns final logits [N, C], the global text prototypes [D, C] and the cache."""
    C = clip_weights.shape[1]
    pos_cache: dict = {}
    clip_weights_global, num_avg, out = clip_weights.clone(), 0, []
    for f in images:
        f = f[None]
        local = clip_weights_global.clone()
        text_res = torch.zeros_like(local, requires_grad=True)
        clip_logits = scale * f @ F.normalize(local + text_res, dim=0)
        ent = -(clip_logits.softmax(1) * clip_logits.log_softmax(1)).sum(1)
        _update_cache(pos_cache, int(clip_logits.argmax()), [f, float(ent.detach()) / math.log2(C)], s.capacity)
        all_classes = sorted(pos_cache)
        keys = torch.cat([sum(it[0] / len(pos_cache[c]) for it in pos_cache[c]) for c in all_classes]).T
        values = F.one_hot(torch.tensor(all_classes), C).float()
        cache_res = torch.zeros_like(keys, requires_grad=True)
        new_keys = F.normalize(keys + cache_res, dim=0)
        final = clip_logits + s.alpha * (-(s.beta - s.beta * (f @ new_keys))).exp() @ values
        loss = -(final.log_softmax(-1).exp() * final.log_softmax(-1)).sum()
        new_w = F.normalize(local + text_res, dim=0)
        sim = F.normalize(new_keys.T, dim=-1) @ F.normalize(new_w[:, all_classes].T, dim=-1).T / 0.01
        loss = loss + s.align * F.cross_entropy(sim, torch.arange(len(all_classes)))
        optimizer = torch.optim.AdamW(
            [
                {"params": [text_res], "lr": s.lr_text, "eps": 1e-3, "weight_decay": 1e-1},
                {"params": [cache_res], "lr": s.lr_image, "eps": 1e-3, "weight_decay": 1e-1},
            ]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            new_w = F.normalize(local + text_res, dim=0)
            final = (
                scale * f @ new_w
                + s.alpha * (-(s.beta - s.beta * (f @ F.normalize(keys + cache_res, dim=0)))).exp() @ values
            )
            out.append(final[0])
            ent = -(final.softmax(1) * final.log_softmax(1)).sum()
            if float(ent) / math.log2(C) < 0.1:
                num_avg += 1
                clip_weights_global = clip_weights_global * (num_avg / (num_avg + 1)) + new_w * (1 / (num_avg + 1))
    return torch.stack(out), clip_weights_global, pos_cache


def test_dpe_prototypes_after_a_hand_made_stream_equal_the_original_rules():
    # Three classes along the axes; two confident images of class 0 (the text evolves), one tied between 1 and 2
    # (it does not); the third image lands in class 0's cache beside the first.
    classifier = torch.eye(3, 4)
    images = F.normalize(torch.tensor([[1.0, 0.1, 0.0, 0.2], [0.1, 0.5, 0.5, 0.0], [0.9, 0.0, 0.2, 0.1]]), dim=-1)
    settings = DPESettings(alpha=1.0, beta=3.0, lr_text=0.05, lr_image=0.05, align=0.5)
    logits, state = dpe_stream(images[:, None], classifier, 20.0, torch.arange(3), settings)
    expected_logits, text, cache = _original_dpe(images, classifier.T, settings, 20.0)
    assert state.updates == 2 and state.updated_at == [0, 2]
    assert torch.allclose(state.text, text.T, atol=1e-6)
    assert not torch.allclose(state.text, classifier)  # the learning rates are large enough to move it
    classes, prototypes = state.visual_prototypes()
    # The ambiguous image goes to class 2: the text evolved after the first image tips the tie.
    assert classes.tolist() == sorted(cache) == [0, 2]
    expected = torch.cat([sum(it[0] / len(cache[c]) for it in cache[c]) for c in sorted(cache)])
    assert torch.allclose(prototypes, expected, atol=1e-6)
    assert torch.allclose(prototypes[0], (images[0] + images[2]) / 2, atol=1e-6)
    assert torch.allclose(logits, expected_logits, atol=1e-4)


def test_dpe_settings_are_its_configs():
    dtd, source = dpe_settings("DescribableTextures")
    assert (dtd.alpha, dtd.beta, dtd.lr_text, dtd.align, dtd.views) == (6.0, 3.0, 6e-4, 0.2, 1)
    a, _ = dpe_settings("ImageNetA")
    assert (a.views, a.reselect, a.align) == (64, True, 2.5)
    folder, source = dpe_settings("my_folder")
    assert folder == DPESettings() and "imagenet.yaml" in source


def test_dpe_on_many_views_reads_the_confident_views():
    embeddings, classifier = _problem(20, 12)
    logits, state = dpe_stream(embeddings, classifier, 30.0, stream_order(20, 1), DPESettings(views=12))
    assert logits.shape == (20, 5) and torch.isfinite(logits).all()
    assert sum(len(items) for items in state.cache.items.values()) <= 3 * 5


# ----------------------------------------------------------------------------------------------- bench and report


def test_boostadapter_and_dpe_run_through_bench_and_report(tmp_path):
    from prolip.tiny import DIGIT_TEMPLATES, SHIPPED_WEIGHTS, TINY_MODEL, write_digit_folder

    raw = {
        "model": TINY_MODEL,
        "pretrained": str(SHIPPED_WEIGHTS),
        "datasets": [str(write_digit_folder(tmp_path / "noisy", "noisy"))],
        "templates": DIGIT_TEMPLATES[:1],
        "methods": ["zeroshot"],
        "protocol": "tta",
        "cache_dir": str(tmp_path / "cache"),
        "out": str(tmp_path / "res"),
        "tta": {"views": 12, "max_images": 30, "methods": ["tda", "boostadapter", {"dpe": {"orders": [1, 4]}}]},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, ["bench", str(path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    by_label = {rec["label"]: rec for rec in read_records(tmp_path / "res")}
    assert {"tda", "boostadapter", "dpe"} <= set(by_label)
    for label, seeds in (("boostadapter", [1, 2, 3]), ("dpe", [1, 4])):
        rec = by_label[label]
        orders = rec["stream_orders"]
        assert [o["seed"] for o in orders] == seeds
        assert all(o["digest"] == order_digest(stream_order(30, o["seed"])) for o in orders)
        assert rec["accuracy"] == pytest.approx(sum(o["accuracy"] for o in orders) / len(orders))
        assert rec["accuracy_worst"] == min(o["accuracy"] for o in orders)
        assert rec["trainable_parameters"] == 0 and rec["method"] == "zeroshot"
    assert by_label["boostadapter"]["forward_passes"] == 30 * 12  # every view: view 0 and the boosting candidates
    assert by_label["dpe"]["forward_passes"] == 30  # a folder takes the one-view rule of the ten datasets
    assert by_label["boostadapter"]["selected"]["delta"] == 3
    assert all("text_updates" in o for o in by_label["dpe"]["stream_orders"])

    r = CliRunner().invoke(main, ["report", str(tmp_path / "res")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for label in ("boostadapter", "dpe"):
        assert f"| {label} |" in r.output and f"{by_label[label]['accuracy']:.2f}" in r.output


def test_a_seeded_stream_records_its_calibration_as_the_mean_over_orders():
    """TDA, BoostAdapter and DPE (SeededStream) record ECE per order and its mean, beside their accuracy."""
    from prolip.functional import expected_calibration_error
    from prolip.tta.tda import SeededStream

    g = torch.Generator().manual_seed(0)
    base, labels = torch.randn(40, 4, generator=g) * 3, torch.randint(0, 4, (40,), generator=g)

    class Shifting(SeededStream):  # each order's logits: the base ones, sharpened by the order's first index
        name, settings, source = "shifting-test-stream", type("S", (), {"as_record": lambda self: {}})(), "test"

        def observe(self, z):
            raise AssertionError("not observed here")

        def gathered(self):
            return base

        def run(self, gathered, order):
            return gathered * (1 + int(order[0]) / 10), {}

    fields = Shifting(orders=(1, 2)).finish(labels)
    by_hand = [expected_calibration_error(base * (1 + int(stream_order(40, s)[0]) / 10), labels) for s in (1, 2)]
    assert [o["ece"] for o in fields["stream_orders"]] == by_hand
    assert fields["ece"] == sum(by_hand) / 2 and "ece" in Shifting.record_fields
