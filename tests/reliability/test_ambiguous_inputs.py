"""Inputs where prolip would have to guess are refused, with the choice spelled out and the option that makes it.

A Hugging Face dataset with two ClassLabel columns (fine and coarse labels, say) is one: read with either, the same
images train a different classifier, so neither is taken without a word, not even the one named ``label``.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prolip.data import DataError, resolve_data

from .conftest import TINY, cli

pytestmark = pytest.mark.reliability("ambiguity")

FINE, COARSE = ("cat", "dog", "fox", "owl"), ("mammal", "bird")


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def two_label_columns(tmp_path_factory):
    """A DatasetDict saved to disk whose rows carry two ClassLabel columns, under the names given."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("ambiguous")

    def save(fine: str, coarse: str):
        fine_labels = [i % 4 for i in range(8)]
        rows = {
            "image": [{"bytes": png(i), "path": None} for i in range(8)],
            fine: fine_labels,
            coarse: [0 if y < 3 else 1 for y in fine_labels],
        }
        features = datasets.Features(
            {
                "image": datasets.Image(),
                fine: datasets.ClassLabel(names=list(FINE)),
                coarse: datasets.ClassLabel(names=list(COARSE)),
            }
        )
        out = root / f"{fine}-{coarse}"
        ds = datasets.Dataset.from_dict(rows, features=features)
        datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(out))
        return out

    return save


NAMINGS = [("label", "coarse_label"), ("fine_label", "coarse_label"), ("coarse_label", "label")]


@pytest.mark.parametrize(("fine", "coarse"), NAMINGS, ids=["-".join(n) for n in NAMINGS])
def test_two_classlabel_columns_are_refused_naming_both_and_label_key(two_label_columns, fine, coarse, tally):
    root = two_label_columns(fine, coarse)
    with tally.raises(
        DataError,
        match=rf"2 ClassLabel columns \({fine}, {coarse}\).*--label-key {fine} or --label-key {coarse}",
        input=f"two ClassLabel columns: {fine}, {coarse}",
    ) as info:
        resolve_data(f"hf:{root}")
    assert info.value.option == "--label-key"
    # Named, each column is read as asked, with its own class names.
    assert resolve_data(f"hf:{root}", label_key=fine).classnames == list(FINE)
    assert resolve_data(f"hf:{root}", label_key=coarse).classnames == list(COARSE)
    tally.handled_ok(f"--label-key picks {fine} or {coarse}")


def test_the_cli_refuses_in_one_line_before_any_work(two_label_columns, tmp_path, tally):
    root = two_label_columns("label", "coarse_label")
    r = cli("fit", "--data", f"hf:{root}", "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache", *TINY)
    output = tally.cli_error(
        r,
        re.escape("2 ClassLabel columns (label, coarse_label)"),
        re.escape("--label-key label or --label-key coarse_label"),
        input="fit on a dataset with two ClassLabel columns",
    )
    assert len([line for line in output.splitlines() if line.startswith("Error:")]) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# ---- two images per sample: a Hugging Face dataset with two image columns, a tar sample with two image members -----


@pytest.fixture(scope="module")
def two_image_columns(tmp_path_factory):
    """A dataset whose rows carry two Image columns (a photo and a mask, say) under the names given."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("two_images")

    def save(first: str, second: str):
        rows = {
            first: [{"bytes": png(i), "path": None} for i in range(8)],
            second: [{"bytes": png(100 + i), "path": None} for i in range(8)],
            "label": [i % 4 for i in range(8)],
        }
        features = datasets.Features(
            {first: datasets.Image(), second: datasets.Image(), "label": datasets.ClassLabel(names=list(FINE))}
        )
        out = root / f"{first}-{second}"
        ds = datasets.Dataset.from_dict(rows, features=features)
        datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(out))
        return out

    return save


def two_image_shards(root: Path, first: str, second: str) -> Path:
    """One shard whose samples each hold a .<first> and a .<second> image and a class index."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "train-000000.tar", "w") as tar:
        for j in range(8):
            for name, data in (
                (f"s{j}.{first}", png(j)),
                (f"s{j}.{second}", png(100 + j)),
                (f"s{j}.cls", b"%d" % (j % 2)),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "classnames.txt").write_text("cat\ndog\n")
    return root


IMAGE_NAMINGS = [("image", "mask"), ("photo", "image"), ("rgb", "depth")]


@pytest.mark.parametrize(("first", "second"), IMAGE_NAMINGS, ids=["-".join(n) for n in IMAGE_NAMINGS])
def test_two_image_columns_are_refused_naming_both_and_image_key(two_image_columns, first, second, tally):
    from prolip.data.images import member_bytes, stored_member

    root = two_image_columns(first, second)
    with tally.raises(
        DataError,
        match=rf"2 image columns \({first}, {second}\).*--image-key {first} or --image-key {second}",
        input=f"two image columns: {first}, {second}",
    ) as info:
        resolve_data(f"hf:{root}")
    assert info.value.option == "--image-key"
    # Named, each column is the one read: the rows' bytes are that column's.
    for column, offset in ((first, 0), (second, 100)):
        train = resolve_data(f"hf:{root}", image_key=column).train
        assert [member_bytes(stored_member(it.path)) for it in train.items[:3]] == [png(offset + i) for i in range(3)]
    tally.handled_ok(f"--image-key picks {first} or {second}")


@pytest.mark.parametrize(("first", "second"), [("jpg", "png"), ("png", "webp")])
def test_a_tar_sample_with_two_images_is_refused_naming_both_and_image_key(tmp_path, first, second, tally):
    from prolip.data.images import member_bytes, stored_member

    shards = two_image_shards(tmp_path / "shards", first, second)
    with tally.raises(
        DataError, match=r"sample s0 holds 2 images .*--image-key", input=f"tar sample with .{first} and .{second}"
    ) as info:
        resolve_data(str(shards))
    assert info.value.option == "--image-key"
    for ext, offset in ((first, 0), (second, 100)):
        train = resolve_data(str(shards), image_key=ext).train
        assert [member_bytes(stored_member(it.path)) for it in train.items[:2]] == [png(offset), png(offset + 1)]
    with tally.raises(DataError, match="no 'gif' member", input="--image-key naming no member"):
        resolve_data(str(shards), image_key="gif")
    tally.handled_ok(f"--image-key picks .{first} or .{second}")


def test_image_key_where_there_is_nothing_to_choose_is_refused(tmp_path, tally):
    folder = tmp_path / "folder" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(png(0))
    with tally.raises(
        DataError, match="only tar shards and hf: datasets have image keys", input="--image-key on a folder"
    ):
        resolve_data(str(tmp_path / "folder"), image_key="png")


def test_the_cli_refuses_two_image_columns_in_one_line_before_any_work(two_image_columns, tmp_path, tally):
    root = two_image_columns("image", "mask")
    r = cli("fit", "--data", f"hf:{root}", "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache", *TINY)
    output = tally.cli_error(
        r, re.escape("--image-key image or --image-key mask"), input="fit on a dataset with two image columns"
    )
    assert len([line for line in output.splitlines() if line.startswith("Error:")]) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
