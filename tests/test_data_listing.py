"""A dataset listing read once (issue 24): the scandir scan equals the scans it replaced, the memo notices every
change, and a corrupt, stale or contended memo is never trusted."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prolip.data import listing, read_image_folder, resolve_data
from prolip.data.folder import is_image_file
from prolip.data.listing import Found, Listing
from prolip.data.types import ImageItem, LabeledImages, ListedItems
from prolip.features.identity import ContentIndex

WNIDS = ["n01440764", "n01443537", "n01484850"]
SETTLE = 0.06  # longer than the test racy window below: folders older than this are trusted


@pytest.fixture(autouse=True)
def small_memos(monkeypatch):
    """Remember even tiny listings, and trust folders 50 ms old (the real window is 2 s, for coarse clocks)."""
    monkeypatch.setattr(listing, "MIN_ENTRIES", 0)
    monkeypatch.setattr(listing, "_RACY_NS", 50_000_000)


@pytest.fixture
def listed(monkeypatch):
    """The folders listed (not taken from a memo) since the test began."""
    calls: list[Path] = []
    real = listing.list_folder

    def spy(path, started_ns):
        calls.append(Path(path))
        return real(path, started_ns)

    monkeypatch.setattr(listing, "list_folder", spy)
    return calls


# ---- the scans this replaced, as they were (the reference the new listing must equal) ----------------------------
def old_coop_scan(folder: Path, classes: list[str]) -> tuple[list[ImageItem], list[Path]]:
    items, ignored = [], []
    for label, sub in enumerate(classes):
        for p in sorted((folder / sub).rglob("*")):
            if p.is_file() and is_image_file(p):
                items.append(ImageItem(p, label))
            elif not p.is_dir() and not p.name.startswith("."):
                ignored.append(p)
    return items, ignored


def old_folder_scan(folder: Path) -> tuple[list[Path], list[Path]]:
    found, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            path = Path(dirpath) / f
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except (OSError, ValueError):
                regular = False
            if is_image_file(path) and regular:
                found.append(path)
            elif not f.startswith("."):
                ignored.append(path)
    return found, ignored


def new_scan(folder: Path, classes: list[str], cache: Path, *, coop: bool) -> tuple[ListedItems, list[Path], int]:
    memo, found = Listing(folder, cache), Found()
    for label, sub in enumerate(classes):
        memo.collect(sub, label, found, enter_hidden=coop, files_first=not coop)
    memo.save()
    return found.items(), found.ignored, memo.listed


# ---- random trees ----------------------------------------------------------------------------------------------
NAMES = ["a", "a-b", "a.b", "B", "é", "a b", "_", ".h", "z9", "a.jpg", "b.PNG", ".c.jpg", "x.txt", "y.jpeg."]
KINDS = ["image", "image", "image", "text", "dir", "hidden dir", "link file", "link dir", "dangling", "fifo"]


def random_tree(rng, folder: Path, depth: int, outside: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in rng.sample(NAMES, rng.randint(0, 7)):
        kind = rng.choice(KINDS if depth < 3 else KINDS[:4])
        path = folder / name
        if kind in ("dir", "hidden dir"):
            random_tree(rng, folder / (("." if kind == "hidden dir" else "") + name.lstrip(".")), depth + 1, outside)
        elif kind == "link file":
            path.symlink_to(outside / "target.jpg")
        elif kind == "link dir":
            path.symlink_to(outside)
        elif kind == "dangling":
            path.symlink_to(outside / "missing.jpg")
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.write_bytes(b"x")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False))
def test_the_listing_equals_the_scans_it_replaced_on_random_trees(tmp_path_factory, rng):
    work = tmp_path_factory.mktemp("tree")
    outside = work / "outside"
    outside.mkdir()
    (outside / "target.jpg").write_bytes(b"x")
    classes = ["c0", "c1", "c2"]
    for c in classes:
        random_tree(rng, work / "data" / c, 0, outside)
    time.sleep(SETTLE)
    data, cache = work / "data", work / "cache"
    want = old_coop_scan(data, classes)
    for remembered in (False, True):
        items, ignored, listed = new_scan(data, classes, cache, coop=True)
        assert (list(items), ignored) == want
        assert (listed == 0) == remembered
    for label, c in enumerate(classes):
        images, skipped = old_folder_scan(data / c)
        memo, found = Listing(data, work / "cache2"), Found()
        assert memo.collect(c, label, found, enter_hidden=False, files_first=True) == len(images)
        assert ([it.path for it in found.items()], found.ignored) == (images, skipped)


# ---- changes the memo must notice ------------------------------------------------------------------------------
def imagenet(root: Path, per_class: int = 3) -> Path:
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} class {w}\n" for w in WNIDS))
    for part in ("train", "val"):
        for w in WNIDS:
            (root / "imagenet" / "images" / part / w).mkdir(parents=True)
            for i in range(per_class):
                (root / "imagenet" / "images" / part / w / f"{w}_{i}.JPEG").write_bytes(f"{w}{i}".encode())
    time.sleep(SETTLE)
    return root


def snapshot(splits) -> list:
    return [
        ([(str(it.path), it.label) for it in part.items], [str(p) for p in part.ignored_files])
        for part in (splits.train, splits.test)
    ]


def check(root: Path, cache: Path, fresh: Path, listed: list[Path]) -> tuple[list, list[Path]]:
    """The listing through the memo in ``cache`` (and the folders it listed again), which must equal one made with
    nothing remembered."""
    listed.clear()
    got = snapshot(resolve_data("imagenet", root=root, cache_dir=cache))
    relisted = list(listed)
    assert got == snapshot(resolve_data("imagenet", root=root, cache_dir=fresh))
    shutil.rmtree(fresh, ignore_errors=True)
    return got, relisted


def test_a_second_run_lists_no_folder_and_every_change_is_noticed(tmp_path, listed):
    root, cache, fresh = imagenet(tmp_path / "data"), tmp_path / "cache", tmp_path / "fresh"
    train = root / "imagenet" / "images" / "train"
    w0, w1, w2 = (train / w for w in WNIDS)
    first, relisted = check(root, cache, fresh, listed)
    assert len(first[0][0]) == 9 and len(first[1][0]) == 9 and len(relisted) == 6  # 3 classes x train, val
    assert check(root, cache, fresh, listed) == (first, [])  # all from the memo: each folder only stat-ed
    changes = [
        (lambda: (w0 / "added.JPEG").write_bytes(b"new"), [w0]),
        (lambda: (w1 / f"{WNIDS[1]}_0.JPEG").unlink(), [w1]),
        (lambda: (w2 / f"{WNIDS[2]}_1.JPEG").rename(w2 / "renamed.JPEG"), [w2]),
        (lambda: (w0 / f"{WNIDS[0]}_2.JPEG").rename(w1 / "moved.JPEG"), [w0, w1]),
        (lambda: (w2 / "sub").mkdir(), [w2, w2 / "sub"]),
        (lambda: (w2 / "sub" / "deep.jpg").write_bytes(b"deep"), [w2 / "sub"]),
        (lambda: (w1 / "notes.txt").write_text("not an image"), [w1]),
        (lambda: shutil.rmtree(w2 / "sub"), [w2]),
    ]
    for change, folders in changes:
        change()
        time.sleep(SETTLE)  # so the changed folders are trusted again, and the next change lists only its own
        assert check(root, cache, fresh, listed)[1] == folders


def test_a_changed_image_keeps_its_listing_and_gets_a_new_identity(tmp_path, listed):
    root, cache = imagenet(tmp_path / "data"), tmp_path / "cache"
    first = resolve_data("imagenet", root=root, cache_dir=cache)
    path = first.train.items[0].path
    index = ContentIndex(tmp_path / "features")
    old_key = index.keys([path])[0]
    time.sleep(SETTLE)
    path.write_bytes(b"other bytes, same name")  # in place: its folder's times do not move
    listed.clear()
    again = resolve_data("imagenet", root=root, cache_dir=cache)
    assert listed == [] and snapshot(again) == snapshot(first)  # the listing holds names, nothing stale
    assert index.keys([again.train.items[0].path])[0] != old_key  # the content hash reads the file's own size/mtime


def test_a_folder_replaced_by_a_copy_with_the_old_mtime_is_listed_again(tmp_path):
    root, cache, fresh = imagenet(tmp_path / "data"), tmp_path / "cache", tmp_path / "fresh"
    check(root, cache, fresh, [])
    folder = root / "imagenet" / "images" / "train" / WNIDS[0]
    st_old = folder.stat()
    time.sleep(SETTLE)
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "other.JPEG").write_bytes(b"o")
    os.utime(folder, ns=(st_old.st_atime_ns, st_old.st_mtime_ns))  # what cp -a or rsync -a leave
    train = check(root, cache, fresh, [])[0][0][0]
    assert [str(folder / "other.JPEG")] == [p for p, _ in train if WNIDS[0] in p]


def test_a_symlink_is_followed_at_every_listing(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    (root / "c").mkdir(parents=True)
    target = tmp_path / "target.jpg"
    target.write_bytes(b"t")
    (root / "c" / "link.jpg").symlink_to(target)
    (root / "c" / "plain.jpg").write_bytes(b"p")
    time.sleep(SETTLE)
    assert len(read_image_folder(root, cache_dir=cache).items) == 2
    target.unlink()  # the folder holding the link does not change
    images = read_image_folder(root, cache_dir=cache)
    assert [it.path.name for it in images.items] == ["plain.jpg"] and images.ignored_files == [root / "c" / "link.jpg"]


def test_a_folder_changed_just_before_the_scan_is_not_trusted(tmp_path, monkeypatch, listed):
    monkeypatch.setattr(listing, "_RACY_NS", 2_000_000_000)  # the real window
    root, cache = tmp_path / "data", tmp_path / "cache"
    (root / "c").mkdir(parents=True)
    (root / "c" / "a.jpg").write_bytes(b"a")
    for _ in range(2):
        listed.clear()
        read_image_folder(root, cache_dir=cache)
        assert listed == [root / "c"]  # listed again: a change in the same clock tick would not show
    assert listing._read_memo(Listing(root, cache).file, str(root.resolve()))["c"].key is None


# ---- the memo itself -------------------------------------------------------------------------------------------
GOOD = {"c": ["KEY", ["a.jpg", "b.jpg"], [], [], [], []]}
BAD_RECORDS = [  # what a listing never writes, each under a valid head and digest
    [],
    {"c": ["KEY", ["../../x.jpg"], [], [], [], []]},
    {"c": ["KEY", ["b.jpg", "a.jpg"], [], [], [], []]},
    {"c": ["KEY", ["a.jpg", 7], [], [], [], []]},
    {"c": ["KEY", ["a.jpg"], [".."], [], [], []]},
    {"c": ["KEY", [], ["a.jpg"], [], [], []]},
    {"c": [[1, 2, True, 4], ["a.jpg"], [], [], [], []]},
    {"c": ["KEY", ["a.jpg"], [], [], []]},
    {"../c": ["KEY", ["a.jpg"], [], [], [], []]},
]


def corrupt_memos(root: str, key: list[int]) -> list[str]:
    def memo(records) -> str:
        return listing.memo_text(root, json.loads(json.dumps(records).replace('"KEY"', json.dumps(key))))

    good = memo(GOOD)
    head, body = good.split("\n")
    return [
        "not json {",
        good.replace("\n", " "),  # no body
        head + "\n" + body.replace("a.jpg", "a.jpf"),  # a changed byte: the digest fails
        good.replace(json.dumps(root), json.dumps("/elsewhere")),
        good.replace('".jpg", ', ""),  # images told apart by other extensions
        good.replace("prolip-listing/1", "prolip-listing/0"),
        *(memo(records) for records in BAD_RECORDS),
    ]


@pytest.mark.parametrize("case", range(6 + len(BAD_RECORDS)))
def test_a_corrupt_memo_is_ignored_and_rewritten(tmp_path, case, listed):
    root, cache = tmp_path / "data", tmp_path / "cache"
    (root / "c").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (root / "c" / name).write_bytes(b"x")
    time.sleep(SETTLE)
    want = read_image_folder(root, cache_dir=tmp_path / "fresh").items
    memo = Listing(root, cache).file
    memo.parent.mkdir(parents=True)
    key = list(listing._key(os.stat(root / "c")))  # a key that matches: only the rest of the memo is wrong
    memo.write_text(corrupt_memos(str(root.resolve()), key)[case])
    assert listing._read_memo(memo, str(root.resolve())) == {}
    listed.clear()
    assert read_image_folder(root, cache_dir=cache).items == want
    assert listed == [root / "c"]
    assert listing._read_memo(memo, str(root.resolve()))["c"].images == ["a.jpg", "b.jpg"]  # rewritten, valid
    memo.write_text(listing.memo_text(str(root.resolve()), json.loads(json.dumps(GOOD).replace('"KEY"', str(key)))))
    assert listing._read_memo(memo, str(root.resolve()))["c"].images == ["a.jpg", "b.jpg"]  # the cases can pass


def test_an_unwritable_memo_costs_only_a_scan(tmp_path):
    root = tmp_path / "data"
    (root / "c").mkdir(parents=True)
    (root / "c" / "a.jpg").write_bytes(b"x")
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    assert [it.path.name for it in read_image_folder(root, cache_dir=tmp_path / "cache").items] == ["a.jpg"]


def test_the_default_memo_lives_in_prolips_cache_and_small_listings_leave_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PROLIP_CACHE_DIR", str(tmp_path / "cache"))
    root = imagenet(tmp_path / "data")
    resolve_data("imagenet", root=root)
    assert len(list((tmp_path / "cache" / listing.LISTING_DIR).glob("*.json"))) == 2  # train, val
    monkeypatch.setattr(listing, "MIN_ENTRIES", 10)  # 9 files per split
    shutil.rmtree(tmp_path / "cache")
    resolve_data("imagenet", root=root)
    assert not (tmp_path / "cache").exists()


TWO_PROCESSES = """
import sys, json
from pathlib import Path
from prolip.data import listing
from prolip.data.listing import Found, Listing, _read_memo
listing.MIN_ENTRIES, listing._RACY_NS = 0, 50_000_000
root, cache, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
torn, file = 0, Listing(root, cache).file
for i in range(rounds):
    existed = file.exists()  # before reading: a memo is replaced, never removed
    memo, found = Listing(root, cache), Found()
    if existed and not memo._known:
        torn += 1  # a memo that does not parse: one writer's half-written file
    memo._known = {}  # so every round writes the memo again
    for label, c in enumerate(sorted(p.name for p in root.iterdir())):
        memo.collect(c, label, found, enter_hidden=True, files_first=False)
    memo.save()
    items = [(str(it.path), it.label) for it in found.items()]
print(json.dumps({"torn": torn, "items": items}))
"""


def test_two_processes_share_one_memo(tmp_path):
    root = tmp_path / "data"
    for c in ("c0", "c1"):
        (root / c).mkdir(parents=True)
        for i in range(40):
            (root / c / f"{i}.jpg").write_bytes(b"x")
    time.sleep(SETTLE)
    cmd = [sys.executable, "-c", TWO_PROCESSES, str(root), str(tmp_path / "cache"), "150"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    items, _, _ = new_scan(root, ["c0", "c1"], tmp_path / "fresh", coop=True)
    assert [o["torn"] for o in outs] == [0, 0]
    assert [o["items"] for o in outs] == [[[str(it.path), it.label] for it in items]] * 2
    assert not [p for p in (tmp_path / "cache" / listing.LISTING_DIR).iterdir() if p.suffix != ".json"]


def test_listed_items_read_like_a_list(tmp_path):
    items = ListedItems([tmp_path / "a", tmp_path / "b"], [0, 0, 1], ["x.jpg", "y.jpg", "z.jpg"], [0, 0, 1])
    as_list = [ImageItem(tmp_path / "a" / "x.jpg", 0), ImageItem(tmp_path / "a" / "y.jpg", 0)]
    as_list.append(ImageItem(tmp_path / "b" / "z.jpg", 1))
    assert items == as_list and list(items) == as_list and len(items) == 3
    assert items[-1] == as_list[-1] and items[1:] == as_list[1:] and items + [] == as_list
    assert items != as_list[:2] and items != "abc"
    images = LabeledImages(items, ["p", "q"])
    assert images.labels == [0, 0, 1] and images.subset([2]).items == [as_list[2]]
    with pytest.raises(ValueError, match="2 names"):
        ListedItems([tmp_path], [0], ["x.jpg", "y.jpg"], [0])


@pytest.mark.parametrize("entry", ["cli", "api"])
def test_the_memo_goes_to_the_cache_dir_the_command_was_given(tmp_path, monkeypatch, entry):
    from prolip.api import _splits
    from prolip.cli.options import resolve

    monkeypatch.setenv("PROLIP_CACHE_DIR", str(tmp_path / "default"))
    monkeypatch.setattr(listing, "MIN_ENTRIES", 1)
    root = imagenet(tmp_path / "data")
    given = tmp_path / "given"
    if entry == "cli":
        resolve("imagenet", root, None, None, cache_dir=given)
    else:
        _splits("imagenet", root, given)
    assert list((given / listing.LISTING_DIR).glob("*.json"))
    assert not (tmp_path / "default").exists()
