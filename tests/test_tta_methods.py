"""ZERO and TDA pinned to their rules on hand-checkable inputs, and their rows in the bench's tta protocol: ZERO is
the confident views' argmax vote; TDA's caches hold what its update rule says, its logits are the cache formula,
and its stream orders are seeded, recorded and summarised (mean and worst)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prolip.functional import entropy
from prolip.tta.tda import (
    TDAInputs,
    TDASettings,
    order_digest,
    stream_order,
    tda_inputs,
    tda_settings,
    tda_stream,
)
from prolip.tta.zero import zero_votes

# ----------------------------------------------------------------------------------------------- ZERO


def test_zero_is_the_argmax_vote_of_the_confident_views():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 64, 7, generator=g) * 4
    votes = zero_votes(logits, gamma=0.3)
    for image, v in zip(logits, votes, strict=True):
        kept = image[entropy(image).argsort()[:19]]  # int(64 · 0.3) = 19 views
        counts = torch.bincount(kept.argmax(-1), minlength=7).float()
        assert v.sum() == 20  # 19 votes, and one more for the winner
        assert int(v.argmax()) in (counts == counts.max()).nonzero().flatten().tolist()
        if (counts == counts.max()).sum() == 1:
            torch.testing.assert_close(v, counts + F.one_hot(counts.argmax(), 7))
            # The zero temperature of ttas/zero.py:70-73: softmax(l / eps) of each kept view is its one-hot argmax.
            eps = torch.finfo(torch.float64).eps
            torch.testing.assert_close((kept.double() / eps).softmax(-1).sum(0).float(), counts)


def test_zero_breaks_a_tie_with_the_next_most_confident_view():
    # 10 views, gamma 0.3: the 3 most confident vote for classes 0, 1, 2 (a three-way tie); of the others, the most
    # confident votes for class 3 (not tied), the next one for class 1: class 1 wins.
    sharp = lambda c, s: F.one_hot(torch.tensor(c), 4).float() * s
    views = [sharp(0, 30), sharp(1, 29), sharp(2, 28), sharp(3, 9), sharp(1, 8)] + [torch.zeros(4)] * 5
    votes = zero_votes(torch.stack(views)[None], gamma=0.3)[0]
    assert votes.tolist() == [1.0, 2.0, 1.0, 0.0]


def test_zero_tie_with_no_tied_vote_among_the_rest_takes_the_largest_logit():
    views = torch.tensor([[20.0, 0, 0], [0, 20.0, 0], [0, 0, 0.0], [0, 0.5, 0.1]])  # keep 2: classes 0 and 1 tie
    votes = zero_votes(views[None], gamma=0.5)[0]
    assert int(votes.argmax()) == 1  # the next view votes 1 directly
    views = torch.tensor([[20.0, 0, 0], [0, 20.0, 0], [0.2, 0.1, 3.0], [0, 0, 2.0]])
    assert int(zero_votes(views[None], gamma=0.5)[0].argmax()) == 0  # no tied vote: view 3's logits, 0 > 1


# ----------------------------------------------------------------------------------------------- TDA


def _inputs(predictions, entropies, classes=3, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(predictions)
    embeddings = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    logits = torch.randn(n, classes, generator=g)
    probabilities = torch.rand(n, classes, generator=g).softmax(-1)
    return TDAInputs(embeddings, logits, torch.tensor(entropies), probabilities, torch.tensor(predictions))


def test_tda_caches_keep_the_lowest_entropy_images_of_each_predicted_class():
    predictions = [0, 0, 1, 0, 0, 2, 1, 0]
    # normalised entropy = entropy / log2(3); the negative cache takes (0.2, 0.5) only
    entropies = [0.9, 0.4, 0.5, 0.2, 0.6, 0.3, 0.45, 0.35]
    inputs, settings = _inputs(predictions, entropies), TDASettings()
    _, positive, negative = tda_stream(inputs, torch.arange(8), settings)
    assert {c: [i for _, i in items] for c, items in positive.items.items()} == {0: [3, 7, 1], 1: [6, 2], 2: [5]}
    window = [i for i, e in enumerate(entropies) if 0.2 < e / math.log2(3) < 0.5]
    assert window == [1, 2, 4, 6, 7]
    assert {c: [i for _, i in items] for c, items in negative.items.items()} == {0: [7, 1], 1: [6, 2]}


def test_tda_scores_each_image_after_its_own_cache_update_with_the_cache_formula():
    predictions, entropies = [0, 1, 1, 0, 2, 1], [0.3, 0.8, 0.4, 0.5, 0.6, 0.7]
    inputs, settings = _inputs(predictions, entropies, seed=3), TDASettings(positive_alpha=2.0, positive_beta=5.0)
    order = torch.tensor([4, 1, 0, 5, 3, 2])
    logits, positive, negative = tda_stream(inputs, order, settings)
    last = 2  # the last image of the stream is scored with the final caches
    f = inputs.embeddings[last]
    expected = inputs.logits[last].clone()
    for c, items in positive.items.items():
        for _, i in items:
            expected[c] += 2.0 * math.exp(-5.0 * (1 - float(f @ inputs.embeddings[i])))
    mask = (inputs.probabilities > 0.03) & (inputs.probabilities < 1.0)
    for items in negative.items.values():
        for _, i in items:
            expected -= 0.117 * math.exp(-1.0 * (1 - float(f @ inputs.embeddings[i]))) * mask[i].float()
    torch.testing.assert_close(logits[last], expected)
    first = 4  # the first image sees caches of itself alone (its normalised entropy 0.6 / log2 3 is in the window)
    alone = inputs.logits[first] + F.one_hot(torch.tensor(2), 3) * 2.0 - 0.117 * mask[first].float()
    torch.testing.assert_close(logits[first], alone)


def test_tda_multi_view_inputs_average_the_confident_views():
    g = torch.Generator().manual_seed(1)
    embeddings = F.normalize(torch.randn(2, 20, 8, generator=g), dim=-1)
    classifier = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    settings = TDASettings(views=20, confident_ratio=0.1)
    got = tda_inputs(embeddings, 100.0, classifier, settings)
    for b in range(2):
        logits = 100.0 * embeddings[b] @ classifier.T
        kept = entropy(logits).argsort()[:2]
        torch.testing.assert_close(got.embeddings[b], embeddings[b, kept].mean(0))
        torch.testing.assert_close(got.logits[b], logits[kept].mean(0))
        p = logits[kept].softmax(-1).mean(0)
        torch.testing.assert_close(got.entropies[b], -(p * p.log()).sum())
    single = tda_inputs(embeddings, 100.0, classifier, TDASettings(views=1))
    torch.testing.assert_close(single.logits, 100.0 * embeddings[:, 0] @ classifier.T)


def test_tda_settings_are_its_configs_and_orders_are_seeded():
    dtd, source = tda_settings("DescribableTextures")
    assert (dtd.positive_alpha, dtd.positive_beta, dtd.views) == (2.0, 3.0, 1) and "DescribableTextures" in source
    sketch, _ = tda_settings("ImageNetSketch")
    assert (sketch.positive_alpha, sketch.positive_beta, sketch.views) == (2.363, 7.45, 64)
    folder, source = tda_settings("my_folder")
    assert (folder.positive_alpha, folder.positive_beta) == (2.0, 5.0) and "imagenet.yaml" in source
    assert torch.equal(stream_order(50, 3), stream_order(50, 3)) and not torch.equal(
        stream_order(50, 3), stream_order(50, 4)
    )
    assert order_digest(stream_order(50, 3)) == order_digest(stream_order(50, 3))


# ----------------------------------------------------------------------------------------------- in the bench


def test_tta_protocol_runs_zero_and_tda_with_recorded_stream_orders(tmp_path, tiny_vit, dtd10_experiment):
    from prolip.bench.experiment import parse_experiment
    from prolip.bench.protocols import run_experiment
    from prolip.bench.records import read_records

    raw = dtd10_experiment(
        protocol="tta",
        tta={"views": 4, "max_images": 8, "zeroshot": True, "zero": True, "tda": True, "tda_orders": [1, 2, 5]},
    )
    records = read_records(run_experiment(parse_experiment(raw, "t.yaml"), echo=lambda line: None, backbone=tiny_vit))
    by_label = {r["label"]: r for r in records}
    assert set(by_label) == {"tta+zeroshot", "zeroshot", "zero", "tda"}
    assert by_label["zeroshot"]["accuracy"] == by_label["tta+zeroshot"]["start_accuracy"]
    tda = by_label["tda"]
    orders = tda["stream_orders"]
    assert [o["seed"] for o in orders] == [1, 2, 5] and all(
        o["digest"] == order_digest(stream_order(8, o["seed"])) for o in orders
    )
    assert tda["accuracy"] == pytest.approx(sum(o["accuracy"] for o in orders) / 3)
    assert tda["accuracy_worst"] == min(o["accuracy"] for o in orders)
    assert tda["selected"]["positive_alpha"] == 2.0 and tda["forward_passes"] == 8  # DTD: one view per image
    assert by_label["zero"]["forward_passes"] == 32 and by_label["zero"]["setting"]["tta"]["zero_gamma"] == 0.3
    assert all(r["trainable_parameters"] == 0 for r in (tda, by_label["zero"]))

    from prolip.bench.report import write_report

    md = write_report(records, tmp_path / "report")["markdown"].read_text()
    header = "| accuracy | ECE | seconds | s / image | forward passes | peak memory | trainable parameters |"
    assert f"| method | shots {header}" in md  # calibration and each image's cost beside accuracy
    assert f"(worst order {tda['accuracy_worst']:.2f})" in md
    assert "stream orders: seeds 1, 2, 5" in md and "Protocol card" in md


def test_records_written_before_the_new_rows_keep_their_cell_ids():
    from prolip.bench.protocols.tta import TTA, TestTimeSpec

    old_keys = {"views", "ratio", "steps", "lr", "seed", "max_images", "tpt", "ensemble", "train_on"}
    assert set(TTA().setting()) == old_keys
    both = TTA(methods=[TestTimeSpec("zero"), TestTimeSpec("tda")])
    assert {"zero", "zero_gamma", "tda", "tda_orders"} <= set(both.setting())
