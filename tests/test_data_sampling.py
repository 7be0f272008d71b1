"""Few-shot samplers (CoOp and LP++ conventions) and property tests over samplers, list parsers and folders."""

import csv
import dataclasses
import random
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prolip.data import (
    FewShotSplit,
    NotEnoughImagesError,
    base_new_split,
    read_image_folder,
    read_image_list,
    relabel,
    sample_few_shot,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dassl_few_shot(labels, shots, seed):
    """CoOp's (Dassl's) generate_fewshot_dataset on indices, written out independently: global random state,
    classes in order of first appearance, random.sample per class, a short class keeps all it has."""
    random.seed(seed)
    tracker = {}
    for i, y in enumerate(labels):
        tracker.setdefault(y, []).append(i)
    out = []
    for items in tracker.values():
        out.extend(random.sample(items, shots) if len(items) >= shots else items)
    return out


def test_coop_draws_match_dassl_on_unsorted_classes():
    rng = random.Random(3)
    labels = [rng.randrange(6) for _ in range(300)]  # classes appear in a shuffled order, as in Flowers/Cars splits
    assert labels[0] != 0
    for seed in (1, 2, 3):
        split = sample_few_shot(labels, 4, seed, "coop", val_labels=[0])
        assert split.train_indices == dassl_few_shot(labels, 4, seed)


@pytest.mark.parametrize("convention", ["lpp", "coop"])
def test_deterministic_per_seed_and_different_across_seeds(convention):
    labels = [i % 7 for i in range(140)]
    val = [i % 7 for i in range(70)]
    a = sample_few_shot(labels, 4, 1, convention, val_labels=val)
    assert a == sample_few_shot(labels, 4, 1, convention, val_labels=val)
    b = sample_few_shot(labels, 4, 2, convention, val_labels=val)
    assert a.train_indices != b.train_indices and a.val_indices != b.val_indices


@pytest.mark.parametrize("shots,coop_val", [(1, 1), (2, 2), (4, 4), (8, 4), (16, 4)])
def test_validation_sizes(shots, coop_val):
    labels = [i % 3 for i in range(90)]
    val = [i % 3 for i in range(60)]
    coop = sample_few_shot(labels, shots, 0, "coop", val_labels=val)
    lpp = sample_few_shot(labels, shots, 0, "lpp", val_labels=val)
    assert Counter(val[i] for i in coop.val_indices) == {c: coop_val for c in range(3)}
    assert Counter(val[i] for i in lpp.val_indices) == {c: shots for c in range(3)}
    assert coop.val_from == lpp.val_from == "val"


def test_imagenet_style_support_and_validation_from_train():
    labels = [i % 4 for i in range(200)]
    s = sample_few_shot(labels, 5, 0, "lpp", imagenet_style=True)
    assert s.val_from == "train" and len(s.train_indices) == len(s.val_indices) == 20
    assert not set(s.train_indices) & set(s.val_indices)
    assert Counter(labels[i] for i in s.val_indices) == {c: 5 for c in range(4)}


def test_json_round_trip_and_files(tmp_path):
    s = sample_few_shot([i % 3 for i in range(30)], 2, 5, "coop")
    assert FewShotSplit.from_json(s.to_json()) == s
    s.save(tmp_path / "split.json")
    assert FewShotSplit.load(tmp_path / "split.json") == s


def test_not_enough_images_and_bad_shots():
    labels = [0] * 10 + [1] * 3
    names = ["cat", "dog"]
    for convention in ("lpp", "coop"):
        with pytest.raises(NotEnoughImagesError, match=r"'dog' has 3 .*4 are needed.*--allow-fewer"):
            sample_few_shot(labels, 4, 0, convention, classnames=names)
    for shots in (0, -2):
        with pytest.raises(ValueError, match=f"--shots.*got {shots}"):
            sample_few_shot(labels, shots, 0)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_few_shot(labels, 1, 0, "tip")


def test_base_new_split_and_relabel():
    assert base_new_split(5) == ([0, 1, 2], [3, 4])
    assert base_new_split(4) == ([0, 1], [2, 3])
    kept, new = relabel([4, 0, 3, 1, 4], [3, 4])
    assert kept == [0, 2, 4] and new == [1, 0, 1]


labels_st = st.lists(st.integers(0, 5), min_size=1, max_size=80)


@FAST
@given(
    labels=labels_st,
    shots=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    convention=st.sampled_from(["lpp", "coop"]),
    allow_fewer=st.booleans(),
)
def test_sampler_properties(labels, shots, seed, convention, allow_fewer):
    counts = Counter(labels)
    short = any(n < shots for n in counts.values())
    if short and not allow_fewer:
        with pytest.raises(NotEnoughImagesError):
            sample_few_shot(labels, shots, seed, convention)
        return
    s = sample_few_shot(labels, shots, seed, convention, allow_fewer=allow_fewer)
    assert all(0 <= i < len(labels) for i in s.train_indices + s.val_indices)
    per_class = Counter(labels[i] for i in s.train_indices)
    for c, n in counts.items():
        # LP++ fills a short class with replacement; CoOp keeps all a short class has.
        assert per_class[c] == (shots if convention == "lpp" else min(shots, n))
    if convention == "coop" or not short:
        assert len(set(s.train_indices)) == len(s.train_indices)
    # Validation drawn from train (no val split): never reuses a support image, never repeats.
    assert not set(s.val_indices) & set(s.train_indices)
    assert len(set(s.val_indices)) == len(s.val_indices)
    assert s == sample_few_shot(labels, shots, seed, convention, allow_fewer=allow_fewer)


name_st = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"), min_size=1, max_size=12
).filter(lambda s: not s.startswith(".") and s.strip() == s and s)


@FAST
@given(classes=st.dictionaries(name_st, st.integers(1, 3), min_size=1, max_size=5))
def test_folder_reader_properties(classes):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data set"
        for name, n in classes.items():
            (root / name).mkdir(parents=True)
            for i in range(n):
                (root / name / f"img {i}.jpg").write_bytes(b"")
            (root / name / "notes.txt").write_text("x")
            (root / name / ".DS_Store").write_text("x")
        images = read_image_folder(root)
        assert images.classnames == sorted(classes)
        assert Counter(images.labels) == {images.classnames.index(c): n for c, n in classes.items()}
        assert len(images.ignored_files) == len(classes)
        assert all(it.path.parent.name == images.classnames[it.label] for it in images.items)


@FAST
@given(names=st.lists(name_st.filter(lambda s: "," not in s and '"' not in s), min_size=1, max_size=15))
def test_csv_list_properties(names):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        with (root / "list.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "classname"])
            for i, cname in enumerate(names):
                (root / f"{i}.png").write_bytes(b"")
                w.writerow([f"{i}.png", cname])
        images = read_image_list(root / "list.csv")
        assert images.classnames == sorted(set(names))
        assert [images.classnames[y] for y in images.labels] == names
        assert [it.path.name for it in images.items] == [f"{i}.png" for i in range(len(names))]


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    shots=st.integers(1, 5),
    seed=st.integers(0, 5),
    sampler=st.sampled_from(["lpp", "coop"]),
)
def test_validate_is_refused_exactly_when_a_class_has_no_validation_image(counts, shots, seed, sampler):
    """A class whose every image is support leaves validation without it: the episode says so, up front, rather
    than letting a method select on the other classes (or fail inside scikit-learn on an empty set)."""
    from prolip.data.types import DatasetSplits, ImageItem, LabeledImages
    from prolip.episode import EpisodeError, EpisodeSpec, draw_images

    names = [f"c{i}" for i in range(len(counts))]
    items = [ImageItem(Path(f"/x/{c}/{i}.jpg"), c) for c, n in enumerate(counts) for i in range(n)]
    train = LabeledImages(items, names)
    splits = DatasetSplits("toy", names, ["a {}."], train=train)
    spec = EpisodeSpec(shots=shots, seed=seed, sampler=sampler, validation=True, allow_fewer=True)
    if shots > max(counts):
        with pytest.raises(EpisodeError):
            draw_images(splits, spec)
        return
    support = draw_images(splits, dataclasses.replace(spec, validation=False)).support  # the same draw
    drawn = {it.path for it in support.items}
    starved = [names[c] for c in range(len(counts)) if {it.path for it in items if it.label == c} <= drawn]
    if starved:
        with pytest.raises(NotEnoughImagesError, match=r"--validate needs validation images of every class") as e:
            draw_images(splits, spec)
        assert f"{len(starved)} class(es) have none" in str(e.value)
        assert all(repr(name) in str(e.value) for name in starved[:5])
    else:
        episode = draw_images(splits, spec)
        assert set(episode.validation.labels) == set(range(len(counts)))
        assert not {it.path for it in episode.validation.items} & drawn
