"""Tar shards and Hugging Face datasets a user hands over, read as they meant them or refused with a message naming
the shard, sample, row or split at fault: truncated or damaged tars, compressed shards, a missing label member, labels
out of range or not integers, no class names, a split that does not exist, unlabelled rows, a Hub name without a
local copy (refused at once, nothing downloaded), and corrupt images inside a container, skipped and listed."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prolip.data import BadImageError, DataError, load_image, resolve_data

from .conftest import TINY, cli, fit_cli

pytestmark = pytest.mark.reliability("bad_input")

CLASSES = ("cat", "dog", "fox")


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], names=CLASSES) -> Path:
    """A tar of samples: [(key, {extension: bytes})], with classnames.txt beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if names is not None:
        (path.parent / "classnames.txt").write_text("\n".join(names))
    return path


def good(n: int = 6) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"s{i:03d}", {"png": png(i), "cls": str(i % 3).encode()}) for i in range(n)]


# ---- tar shards ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["mid-member", "at a member boundary", "mid-header"])
def test_a_truncated_shard_is_refused_not_silently_shortened(cut, tmp_path, tally):
    path = shard(tmp_path / "s" / "a.tar", good())
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    third = members[3]
    end = {
        "mid-member": third.offset_data + third.size // 2,
        "at a member boundary": third.offset,
        "mid-header": third.offset + 100,
    }[cut]
    path.write_bytes(data[:end])
    with tally.raises(DataError, match=r"a\.tar.*(truncated|cut short|unexpected end)", input=f"tar truncated {cut}"):
        resolve_data(str(path))


def test_a_damaged_header_in_the_middle_is_refused(tmp_path, tally):
    path = shard(tmp_path / "s" / "a.tar", good())
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        fourth = tar.getmembers()[4]
    data[fourth.offset : fourth.offset + 100] = b"x" * 100  # the name field and beyond: the checksum no longer holds
    path.write_bytes(bytes(data))
    with tally.raises(DataError, match="damaged header", input="tar with a damaged header"):
        resolve_data(str(path))


def test_a_missing_label_member_names_the_sample_and_the_option(tmp_path, tally):
    samples = good()
    del samples[2][1]["cls"]
    samples[2][1]["json"] = b"{}"
    path = shard(tmp_path / "s" / "a.tar", samples)
    with tally.raises(
        DataError,
        match=r"sample s002 has no 'cls' member \(it has: json, png\); pass --label-key",
        input="sample without its label member",
    ):
        resolve_data(str(path))
    r = cli("fit", "--data", path, "--out", tmp_path / "run", *TINY)
    tally.cli_error(r, "sample s002 has no 'cls' member", input="fit on shards with a missing label member")
    with tally.raises(DataError, match="has no 'label' member", input="--label-key naming no member"):
        resolve_data(str(shard(tmp_path / "t" / "b.tar", good())), label_key="label")


@pytest.mark.parametrize(
    "label,match",
    [
        (b"3", r"label 3 is outside 0\.\.2 \(3 classes in"),
        (b"-1", "not an integer class index|outside"),
        (b"1.5", "not an integer class index"),
        (b"cat", "not an integer class index"),
        (b"\xff\xfe", "is not text"),
    ],
)
def test_a_label_that_is_no_class_index_of_the_names_is_refused(label, match, tmp_path, tally):
    samples = good()
    samples[4][1]["cls"] = label
    path = shard(tmp_path / "s" / "a.tar", samples)
    with tally.raises(DataError, match=rf"a\.tar, sample s004.*({match})", input=f"shard label {label!r}"):
        resolve_data(str(path))


def test_shards_without_class_names_or_compressed_or_missing_are_refused(tmp_path, tally):
    bare = shard(tmp_path / "bare" / "a.tar", good(), names=None)
    with tally.raises(DataError, match="no class names: pass --classnames FILE", input="shards without class names"):
        resolve_data(str(bare))
    gz = tmp_path / "z" / "a.tar.gz"
    gz.parent.mkdir()
    gz.write_bytes(b"\x1f\x8b")
    with tally.raises(DataError, match="is compressed.*decompress it", input="a .tar.gz shard"):
        resolve_data(str(gz))
    shard(tmp_path / "p" / "train-0.tar", good())
    with tally.raises(DataError, match=r"train-1\.tar does not exist", input="a pattern naming a missing shard"):
        resolve_data(str(tmp_path / "p" / "train-{0..2}.tar"))
    empty = tmp_path / "e" / "a.tar"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    (empty.parent / "classnames.txt").write_text("\n".join(CLASSES))
    with tally.raises(DataError, match="not a readable tar file", input="an empty file named .tar"):
        resolve_data(str(empty))
    with tally.raises(
        DataError, match="only tar shards and hf: datasets have label keys", input="--label-key on an image folder"
    ):
        resolve_data(str(tmp_path), label_key="cls")


def test_a_corrupt_or_vanished_member_is_a_bad_image_named_by_its_member(tmp_path, tally):
    samples = good()
    samples[1][1]["png"] = b"\x89PNG\r\n\x1a\n garbage"
    samples[3][1]["png"] = b""
    path = shard(tmp_path / "s" / "a.tar", samples)
    items = resolve_data(str(path)).train.items
    for i, reason in ((1, "s001.png"), (3, "empty member")):
        with tally.raises(BadImageError, match=reason, input=f"corrupt member {i}"):
            load_image(items[i].path)
    with tally.raises(BadImageError, match="has no member s999.png", input="a member the shard does not hold"):
        load_image(f"{path}::s999.png")
    clean = shard(tmp_path / "clean" / "a.tar", good())
    r = fit_cli(clean, tmp_path / "run", tmp_path / "c", shots=1, views=1, steps=2)
    assert r.exit_code == 0, r.output
    r = cli("eval", tmp_path / "run", "--data", path, "--on-bad-image", "skip", "--cache-dir", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    skipped = json.loads(r.stdout)["skipped_images"]
    assert sorted(p for p, _ in skipped) == [f"{path}::s001.png", f"{path}::s003.png"]
    tally.handled_ok("corrupt members skipped and listed by shard and member")


# ---- Hugging Face datasets --------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    datasets = pytest.importorskip("datasets")

    def save(labels, *, split_names=("train", "test"), label_feature=None, images=None):
        feature = label_feature or datasets.ClassLabel(names=list(CLASSES))
        rows = {"image": images or [{"bytes": png(i), "path": None} for i in range(len(labels))], "label": labels}
        ds = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "label": feature}))
        out = tmp_path / f"ds{len(list(tmp_path.iterdir()))}"
        datasets.DatasetDict({name: ds for name in split_names}).save_to_disk(str(out))
        return out

    return save


def test_a_split_that_does_not_exist_is_refused_naming_the_splits_there(saved, tmp_path, tally):
    root = saved([0, 1, 2, 0, 1, 2])
    with tally.raises(
        DataError,
        match=r"--split validation: hf:.* has no split 'validation' \(its splits: train, "
        r"test\)",
        input="--split naming no split",
    ):
        resolve_data(f"hf:{root}", split="validation")
    r = cli("fit", "--data", f"hf:{root}", "--split", "nope", "--out", tmp_path / "run", *TINY)
    tally.cli_error(r, "has no split 'nope'", input="fit --split nope")
    odd = saved([0, 1, 2], split_names=("training", "holdout"))
    with tally.raises(
        DataError,
        match=r"none of its splits \(training, holdout\) is named train; pass --split",
        input="splits without a train split",
    ):
        resolve_data(f"hf:{odd}")
    assert len(resolve_data(f"hf:{odd}", split="training").train) == 3
    with tally.raises(DataError, match="only a Hugging Face dataset", input="--split on a tar shard"):
        resolve_data(str(shard(tmp_path / "s" / "a.tar", good())), split="train")


def test_unlabelled_and_out_of_range_rows_are_refused_by_row(saved, tally):
    with tally.raises(DataError, match=r"row 2 has label -1, datasets' 'no label'", input="an unlabelled row (-1)"):
        resolve_data(f"hf:{saved([0, 1, -1, 2])}")
    datasets = pytest.importorskip("datasets")
    plain = saved([0, 1, 7], label_feature=datasets.Value("int64"))
    with tally.raises(DataError, match="no ClassLabel column", input="an integer label column, no --label-key"):
        resolve_data(f"hf:{plain}")
    with tally.raises(
        DataError,
        match="is not a ClassLabel, so it names no classes; pass --classnames",
        input="an integer label column without names",
    ):
        resolve_data(f"hf:{plain}", label_key="label")
    names = plain / "names.txt"
    names.write_text("\n".join(CLASSES))
    with tally.raises(DataError, match=r"row 2: label 7 is outside 0\.\.2", input="an integer label out of range"):
        resolve_data(f"hf:{plain}", label_key="label", classnames_file=names)


def test_no_classlabel_column_and_a_wrong_label_key(saved, tally, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png(0), "path": None}], "caption": ["a cat"]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    ds.to_parquet(str(tmp_path / "captions.parquet"))
    with tally.raises(DataError, match=r"no ClassLabel column \(columns: image, caption\)", input="no label column"):
        resolve_data(f"hf:{tmp_path / 'captions.parquet'}")
    with tally.raises(DataError, match="--label-key species: no such column", input="--label-key naming no column"):
        resolve_data(f"hf:{saved([0, 1, 2])}", label_key="species")


def test_a_hub_name_without_a_local_copy_fails_fast_and_downloads_nothing(tmp_path, monkeypatch, tally):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even online, a dataset is never fetched
    started = time.perf_counter()
    r = cli("fit", "--data", "hf:someone/imagenet-1k", "--out", tmp_path / "run", *TINY)
    tally.cli_error(
        r,
        "cannot get dataset someone/imagenet-1k",
        "never downloads data",
        "--data hf:/path/to/dir",
        input="a Hub dataset name with no local copy",
    )
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.parquet"))


def test_damaged_dataset_files_and_corrupt_row_images(saved, tmp_path, tally):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with tally.raises(DataError, match="broken.parquet", input="a damaged parquet file"):
        resolve_data(f"hf:{broken}")
    root = saved(
        [0, 1, 2, 0],
        images=[
            {"bytes": png(0), "path": None},
            {"bytes": b"not an image", "path": None},
            {"bytes": png(2), "path": None},
            {"bytes": png(3), "path": None},
        ],
        split_names=("train",),
    )
    items = resolve_data(f"hf:{root}").train.items
    with tally.raises(BadImageError, match=r"\.arrow::1: not an image", input="a row whose image is garbage"):
        load_image(items[1].path)
    with tally.raises(BadImageError, match="has 4 rows", input="a row past the end"):
        load_image(f"{str(items[0].path)[:-1]}99")
    with tally.raises(DataError, match="is not a .parquet or .arrow file", input="hf: naming another file"):
        resolve_data(f"hf:{tmp_path / 'broken.txt'}" if (tmp_path / "broken.txt").write_text("x") else "")
