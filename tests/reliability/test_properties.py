"""Property-based tests (hypothesis) over the dataset readers, list and split-file parsers, and the few-shot sampler.

Readers: any generated class-folder tree reads back exactly its visible classes and image files. Parsers: on any
input, structured or arbitrary, they either return a consistent dataset or raise DataError naming the file, never
another exception. Sampler: exactly K distinct support images per class, all from that class; validation as
documented; the same draw for the same seed, and for any renaming of the labels (classes are visited in order
of first appearance).
"""

import csv
import io
import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prolip.data import (
    DataError,
    FewShotSplit,
    NotEnoughImagesError,
    read_image_folder,
    read_image_list,
    sample_few_shot,
)
from prolip.data.benchmarks import load_benchmark_folder
from prolip.data.folder import read_classnames
from prolip.data.images import IMAGE_EXTENSIONS

pytestmark = pytest.mark.reliability("bad_input")

# The tally fixture is shared by a test's examples on purpose: it accumulates every input tried.
PROPS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


# ---- image folders -----------------------------------------------------------------------------------------------

# Any name a Linux filesystem accepts: unicode, spaces (leading/trailing too), shell metacharacters; no '/' or NUL.
fs_name = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=16
).filter(lambda s: s not in (".", "..") and len(s.encode()) <= 200)
extensions = st.sampled_from([".jpg", ".JPG", ".png", ".jpeg", ".Tiff", ".webp", ".txt", ".csv", ".jpg.bak", ""])
# A file inside a class folder: (sub-folder or "", stem, extension); hidden stems and sub-folders are generated too.
SUBDIRS = ["", "sub", "sub/deeper", ".hidden_dir", "ünï cödé"]
class_file = st.tuples(
    st.sampled_from(SUBDIRS), fs_name.filter(lambda s: s not in ("sub", "deeper", *SUBDIRS)), extensions
)


@PROPS
@given(tree=st.dictionaries(fs_name, st.lists(class_file, max_size=5), min_size=1, max_size=5))
def test_any_class_folder_tree_reads_back_its_classes_and_files(tree, tally):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data set"
        images, ignored = {}, set()
        for cls, files in tree.items():
            (root / cls).mkdir(parents=True)
            for sub, stem, ext in files:
                path = root / cls / sub / f"{stem}{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
                hidden = path.name.startswith(".") or any(part.startswith(".") for part in Path(sub).parts)
                if hidden or cls.startswith("."):
                    continue
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    images.setdefault(cls, set()).add(path)
                else:
                    ignored.add(path)
        visible = sorted(c for c in tree if not c.startswith("."))
        tally.input(f"folder tree of {len(tree)} classes")
        empty = [c for c in visible if c not in images]
        if not visible or empty:
            with pytest.raises(DataError) as e:
                read_image_folder(root)
            tally.clear_error(e.value, str(root / empty[0]) if empty else "no class folders")
            return
        data = read_image_folder(root)
        assert data.classnames == visible
        assert {(data.classnames[it.label], it.path) for it in data.items} == {
            (c, p) for c, paths in images.items() for p in paths
        }
        assert len(data.items) == sum(map(len, images.values()))  # no file read twice
        assert set(data.ignored_files) == ignored
        assert read_image_folder(root).items == data.items  # the same order every time
        tally.handled_ok("round trip")


# ---- image lists and split files ---------------------------------------------------------------------------------
# Each input is a valid list (rows of existing images, each with its class) into which a few bad rows may be mixed,
# possibly followed by arbitrary text or bytes: valid lists must parse to exactly their rows, and anything else
# must either parse consistently or be a DataError naming the file.

IMAGES = ["a.png", "b.png", "sub/c.png", "ü n.png", "sub/../a.png"]
NAMES = ["cat", "dog", "crème brûlée"]
good_row = st.tuples(st.sampled_from(IMAGES), st.integers(0, len(NAMES) - 1))  # (path, class index)
# Values that reach every error branch: bad paths, labels and class names.
bad_paths = st.sampled_from(["missing.png", "../up.png", "/etc/hostname", "", " ", "a\0.png", "sub/", "sub"])
bad_labels = st.one_of(
    st.integers(-3, 5),
    st.sampled_from(
        [
            "-1",
            "1.5",
            "x",
            "",
            "٣",
            "²",
            "1e3",
            "99999999999999",
            1.7,
            float("inf"),
            float("nan"),
            True,
            None,
            [1],
            {"a": 1},
            10**30,
        ]
    ),
)
bad_names = st.one_of(st.sampled_from(["", "0", "bird", *NAMES]), st.none(), st.integers(0, 2))
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
bad_row = st.one_of(
    st.lists(st.one_of(bad_paths, bad_labels, bad_names, st.sampled_from(IMAGES)), max_size=4),
    st.fixed_dictionaries(
        {"path": bad_paths | st.sampled_from(IMAGES)}, optional={"label": bad_labels, "classname": bad_names}
    ),
    json_values,
)
# How an input departs from a valid one; "clean" twice, so valid inputs are a good share of the examples.
modes = st.sampled_from(["clean", "clean", "bad rows", "junk after", "any JSON"])
good_rows = st.lists(good_row, min_size=1, max_size=8)
bad_rows = st.lists(st.tuples(st.integers(0, 8), bad_row), min_size=1, max_size=2)  # (insert at, row)
junk = st.one_of(st.text(min_size=1, max_size=30), st.binary(min_size=1, max_size=30))


def _dataset(d: str) -> Path:
    root = Path(d)
    (root / "sub").mkdir()
    for name in ("a.png", "b.png", "sub/c.png", "ü n.png"):
        (root / name).write_bytes(b"")
    return root


def _mix(good: list, bad: list) -> list:
    rows = list(good)
    for at, r in bad:
        rows.insert(min(at, len(rows)), r)
    return rows


def _write(f: Path, text: str, junk) -> None:
    f.write_bytes(text.encode() + (b"" if junk is None else junk if isinstance(junk, bytes) else junk.encode()))


def _apply(mode: str, good: list, bad: list, junk, any_json):
    """The rows to write, the junk to append, and the JSON document to write instead (or None), for ``mode``."""
    return (
        _mix(good, bad) if mode == "bad rows" else good,
        junk if mode == "junk after" else None,
        any_json if mode == "any JSON" else None,
    )


def _in_two_classes(rows) -> bool:
    """Whether some image (after resolving ``..``) is listed under two classes: a list the readers refuse."""
    import os

    seen = {}
    return any(seen.setdefault(os.path.normpath(p), c) != c for p, c in rows)


def _parse_or_data_error(fn, path: Path, tally):
    """fn() either succeeds or raises DataError naming ``path``; any other exception fails the test."""
    tally.input(path.name)
    try:
        return fn()
    except DataError as e:
        tally.clear_error(e, path.name)
        return None


def _check_parsed(images, root: Path, good: list, columns: set, clean: bool) -> None:
    """A parsed list is consistent; a clean one (no bad row, no junk) holds exactly its rows, each in its class."""
    assert images.items, "an empty list must be an error"
    for it in images.items:
        assert it.path.is_file() and it.path.resolve().is_relative_to(root.resolve())
        assert 0 <= it.label < len(images.classnames)
    if clean:
        assert [it.path for it in images.items] == [(root / p).resolve() for p, _ in good]
        for (_, c), it in zip(good, images.items, strict=True):
            if "classname" in columns:
                assert images.classnames[it.label] == NAMES[c]
            if "label" in columns:
                assert it.label == c


@PROPS
@given(
    header=st.sampled_from(
        [
            ["path", "label"],
            ["path", "classname"],
            ["path", "label", "classname"],
            ["classname", "other", "path"],
            ["path"],
            ["file", "label"],
            [],
        ]
    ),
    mode=modes,
    good=good_rows,
    bad=bad_rows,
    junk=junk,
)
def test_csv_lists_parse_or_raise_data_error(header, mode, good, bad, junk, tally):
    mode = "bad rows" if mode == "any JSON" else mode
    cell = {"path": lambda p, c: p, "label": lambda p, c: str(c), "classname": lambda p, c: NAMES[c]}
    rendered = [[cell.get(h, lambda p, c: "x")(p, c) for h in header] for p, c in good]
    rows, junk, _ = _apply(mode, rendered, bad, junk, None)
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(header)
    for r in rows:
        w.writerow(r if isinstance(r, list) else [r])
    with tempfile.TemporaryDirectory() as d:
        root = _dataset(d)
        f = root / "list.csv"
        _write(f, out.getvalue(), junk)
        images = _parse_or_data_error(lambda: read_image_list(f), f, tally)
        clean = (
            mode == "clean"
            and "path" in header
            and bool({"label", "classname"} & set(header))
            and not _in_two_classes(good)
        )
        assert images is not None or not clean, "a valid list was refused"
        if images is not None:
            _check_parsed(images, root, good, set(header), clean)
            tally.handled_ok("parsed")


@PROPS
@given(
    form=st.sampled_from(
        ["[path, label, classname]", "[path, label]", "{path, label}", "{path, classname}", "{path, label, classname}"]
    ),
    mode=modes,
    good=good_rows,
    bad=bad_rows,
    junk=junk,
    any_json=json_values,
)
def test_json_lists_and_class_name_files_parse_or_raise_data_error(form, mode, good, bad, junk, any_json, tally):
    columns = {c for c in ("label", "classname") if c in form}
    render = {
        "[path, label, classname]": lambda p, c: [p, c, NAMES[c]],
        "[path, label]": lambda p, c: [p, c],
        "{path, label}": lambda p, c: {"path": p, "label": c},
        "{path, classname}": lambda p, c: {"path": p, "classname": NAMES[c]},
        "{path, label, classname}": lambda p, c: {"path": p, "label": c, "classname": NAMES[c]},
    }[form]
    rows, junk, top = _apply(mode, [render(p, c) for p, c in good], bad, junk, any_json)
    doc = rows if top is None else top
    with tempfile.TemporaryDirectory() as d:
        root = _dataset(d)
        f = root / "list.json"
        _write(f, json.dumps(doc), junk)  # NaN/Infinity included: Python's json reads them back
        images = _parse_or_data_error(lambda: read_image_list(f), f, tally)
        clean = mode == "clean" and not _in_two_classes(good)
        assert images is not None or not clean, "a valid list was refused"
        if images is not None:
            _check_parsed(images, root, good, columns, clean)
            tally.handled_ok("parsed")
        # The same file as a class-names file for two class folders: two names, or a DataError naming it.
        names = _parse_or_data_error(lambda: read_classnames(f, ["x", "y"]), f, tally)
        assert names is None or (len(names) == 2 and all(isinstance(n, str) for n in names))


DTD = ["banded", "dotted", "lined", "zigzagged"]
good_entry = st.tuples(st.sampled_from(["a/1.jpg", "b/2.jpg", "c d/ü.jpg", "a/../b/3.jpg"]), st.integers(0, 3))
bad_entry = st.one_of(
    st.tuples(
        st.sampled_from(["../x.jpg", "/etc/passwd", "a\0", "", "a/1.jpg"]),
        st.integers(0, 3) | bad_labels,
        st.sampled_from([*DTD, "other", 3]),
    ).map(list),
    bad_row,
)
good_entries = st.lists(good_entry, max_size=6)


@PROPS
@given(
    mode=modes,
    train=good_entries,
    val=good_entries,
    test=good_entries,
    bad_part=st.sampled_from(["train", "val", "test"]),
    bad=st.lists(st.tuples(st.integers(0, 6), bad_entry), min_size=1, max_size=2),
    junk=junk,
    any_json=json_values,
)
def test_split_files_parse_or_raise_data_error(mode, train, val, test, bad_part, bad, junk, any_json, tally):
    parts = {"train": train, "val": val, "test": test}
    split = {name: [[p, c, DTD[c]] for p, c in good] for name, good in parts.items()}
    split[bad_part], junk, top = _apply(mode, split[bad_part], bad, junk, any_json)
    with tempfile.TemporaryDirectory() as d:
        ds = Path(d) / "dtd"
        (ds / "images").mkdir(parents=True)
        f = ds / "split_zhou_DescribableTextures.json"
        _write(f, json.dumps(split if top is None else top), junk)
        splits = _parse_or_data_error(lambda: load_benchmark_folder(ds), f, tally)
        used = {c for good in parts.values() for _, c in good}
        clean = mode == "clean"
        # A clean split file is refused only when its labels leave a gap (a class with no image at all), or when it
        # puts one image in two classes.
        valid = used == set(range(len(used))) and bool(used) and not _in_two_classes(sum(parts.values(), []))
        assert not clean or (splits is not None) == valid
        if splits is None:
            return
        C = len(splits.classnames)
        for name in parts if top is None else ():
            got = getattr(splits, name)
            assert (got is None) == (not split[name])
            for (rel, _, cname), it in zip(split[name], got.items if got else [], strict=True):
                assert 0 <= it.label < C and splits.classnames[it.label] == cname  # the class named, no other
                assert it.path == (ds / "images" / rel).resolve()
        tally.handled_ok("parsed")


# ---- the few-shot sampler ----------------------------------------------------------------------------------------


def _groups(labels):
    out = {}
    for i, y in enumerate(labels):
        out.setdefault(y, []).append(i)
    return out


@st.composite
def label_lists(draw, max_per_class=14):
    """Labels of up to 6 classes in shuffled order, each class with 1..max_per_class images."""
    counts = draw(st.lists(st.integers(1, max_per_class), min_size=1, max_size=6))
    return draw(st.permutations([c for c, n in enumerate(counts) for _ in range(n)]))


sampler_args = dict(
    labels=label_lists(),
    shots=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    convention=st.sampled_from(["lpp", "coop"]),
    val_labels=st.one_of(st.none(), label_lists(6)),
    imagenet_style=st.booleans(),
)


@pytest.mark.reliability("determinism")
@PROPS
@given(**sampler_args, perm=st.permutations(range(6)))
def test_sampler_draws_k_distinct_per_class_deterministically(
    labels, shots, seed, convention, val_labels, imagenet_style, perm, tally
):
    imagenet_style = imagenet_style and convention == "lpp"
    kw = dict(val_labels=None if imagenet_style else val_labels, imagenet_style=imagenet_style)
    groups = _groups(labels)
    need = 2 * shots if imagenet_style else shots
    tally.input(f"{len(labels)} labels, {shots} shots, {convention}")
    if any(len(idx) < need for idx in groups.values()):
        short = next(c for c, idx in groups.items() if len(idx) < need)
        with pytest.raises(NotEnoughImagesError) as e:
            sample_few_shot(labels, shots, seed, convention, classnames=[f"class{c}" for c in range(6)], **kw)
        tally.clear_error(e.value, f"'class{short}' has {len(groups[short])} training images", "--allow-fewer")
        return
    s = sample_few_shot(labels, shots, seed, convention, **kw)
    # Support: exactly K distinct images per class, each from that class.
    assert Counter(labels[i] for i in s.train_indices) == {c: shots for c in groups}
    assert len(set(s.train_indices)) == len(s.train_indices)
    # Validation, as the module documents.
    if kw["val_labels"] is not None:
        assert s.val_from == "val"
        k = shots if convention == "lpp" else min(shots, 4)
        for c, idx in _groups(kw["val_labels"]).items():
            drawn = [i for i in s.val_indices if kw["val_labels"][i] == c]
            assert set(drawn) <= set(idx)
            assert len(drawn) == k if convention == "lpp" else len(drawn) == min(k, len(idx))
            if len(idx) >= k:
                assert len(set(drawn)) == len(drawn)
        assert all(0 <= i < len(kw["val_labels"]) for i in s.val_indices)
    else:  # from the training images the support did not use: disjoint from it, distinct, from the same class
        assert s.val_from == "train" and not set(s.val_indices) & set(s.train_indices)
        assert len(set(s.val_indices)) == len(s.val_indices)
        k = shots if convention == "lpp" else min(shots, 4)
        for c, idx in groups.items():
            drawn = [i for i in s.val_indices if labels[i] == c]
            assert len(drawn) == min(k, len(idx) - shots)
    # Deterministic per seed, exchangeable as JSON, and blind to what the labels are called.
    assert s == sample_few_shot(labels, shots, seed, convention, **kw)
    assert FewShotSplit.from_json(s.to_json()) == s
    renamed = sample_few_shot(
        [perm[y] for y in labels],
        shots,
        seed,
        convention,
        val_labels=None if kw["val_labels"] is None else [perm[y] for y in kw["val_labels"]],
        imagenet_style=imagenet_style,
    )
    assert (renamed.train_indices, renamed.val_indices) == (s.train_indices, s.val_indices)
    tally.handled_ok("sampled")


@PROPS
@given(labels=label_lists(8), shots=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_allow_fewer_never_changes_the_class_set(labels, shots, seed, tally):
    groups = _groups(labels)
    tally.input(f"{len(labels)} labels, {shots} shots, --allow-fewer")
    lpp = sample_few_shot(labels, shots, seed, "lpp", allow_fewer=True)
    coop = sample_few_shot(labels, shots, seed, "coop", allow_fewer=True)
    # Every class keeps support images: LP++ fills a short class by drawing with replacement, CoOp keeps all it has.
    assert Counter(labels[i] for i in lpp.train_indices) == {c: shots for c in groups}
    assert Counter(labels[i] for i in coop.train_indices) == {c: min(shots, len(idx)) for c, idx in groups.items()}
    assert len(set(coop.train_indices)) == len(coop.train_indices)
    tally.handled_ok("sampled with --allow-fewer")
