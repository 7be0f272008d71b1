"""Core data paths of the product: image folders, image lists, the samplers, dtd10 as CoOp layout."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prolip.data import (
    DataError,
    FewShotSplit,
    NotEnoughImagesError,
    read_image_folder,
    read_image_list,
    resolve_data,
    sample_few_shot,
)


def jpg(path: Path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_ignores_hidden_and_stray_files(tmp_path):
    for c in ("b_cls", "a_cls"):
        for i in range(3):
            jpg(tmp_path / c / f"{i}.jpg")
    (tmp_path / "a_cls" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "a_cls" / "notes.txt").write_text("x")
    (tmp_path / ".git").mkdir()
    images = read_image_folder(tmp_path)
    assert images.classnames == ["a_cls", "b_cls"] and len(images) == 6
    assert images.labels == [0, 0, 0, 1, 1, 1]


def test_classnames_and_templates_files(tmp_path):
    for c in ("x", "y"):
        jpg(tmp_path / "d" / c / "0.jpg")
    (tmp_path / "names.txt").write_text("ex\nwhy\n")
    (tmp_path / "t.txt").write_text("a {} here.\n")
    images = read_image_folder(tmp_path / "d", tmp_path / "names.txt", tmp_path / "t.txt")
    assert images.classnames == ["ex", "why"] and images.templates == ["a {} here."]
    (tmp_path / "bad_names.txt").write_text("only-one\n")
    with pytest.raises(DataError, match="bad_names.txt.*1 names.*2 classes"):
        read_image_folder(tmp_path / "d", tmp_path / "bad_names.txt")
    (tmp_path / "bad_t.txt").write_text("no placeholder\n")
    with pytest.raises(DataError, match="bad_t.txt, line 1"):
        read_image_folder(tmp_path / "d", templates_file=tmp_path / "bad_t.txt")


def test_image_list_csv_and_json(tmp_path):
    jpg(tmp_path / "i" / "a.jpg")
    jpg(tmp_path / "i" / "b.jpg")
    (tmp_path / "l.csv").write_text("path,classname\ni/a.jpg,cat\ni/b.jpg,dog\n")
    images = read_image_list(tmp_path / "l.csv")
    assert images.classnames == ["cat", "dog"] and images.labels == [0, 1]
    (tmp_path / "l.json").write_text(json.dumps([["i/a.jpg", 1, "dog"], ["i/b.jpg", 0, "cat"]]))
    assert read_image_list(tmp_path / "l.json").classnames == ["cat", "dog"]
    (tmp_path / "bad.csv").write_text("file,label\ni/a.jpg,0\n")
    with pytest.raises(DataError, match="bad.csv.*'path'"):
        read_image_list(tmp_path / "bad.csv")
    (tmp_path / "esc.csv").write_text("path,label\n../../etc/passwd,0\n")
    with pytest.raises(DataError, match="esc.csv, row 1.*escapes"):
        read_image_list(tmp_path / "esc.csv")
    (tmp_path / "unk.csv").write_text("path,classname\ni/a.jpg,cat\n")
    with pytest.raises(DataError, match="unknown class 'cat'"):
        read_image_list(tmp_path / "unk.csv", classnames=["dog"])


@pytest.mark.parametrize("convention", ["lpp", "coop"])
def test_sampler_is_deterministic_per_seed(convention):
    labels = [i % 5 for i in range(100)]
    a = sample_few_shot(labels, 4, 1, convention)
    assert a == sample_few_shot(labels, 4, 1, convention)
    assert a.train_indices != sample_few_shot(labels, 4, 2, convention).train_indices
    assert sorted(labels[i] for i in a.train_indices) == sorted(list(range(5)) * 4)
    assert len(set(a.train_indices)) == 20
    assert FewShotSplit.from_json(a.to_json()) == a


def test_validation_sizes_per_convention():
    labels = [i % 3 for i in range(60)]
    val = [i % 3 for i in range(30)]
    assert len(sample_few_shot(labels, 8, 1, "coop", val_labels=val).val_indices) == 3 * 4  # min(K, 4)
    assert len(sample_few_shot(labels, 8, 1, "lpp", val_labels=val).val_indices) == 3 * 8  # K


def test_not_enough_images_and_bad_shots():
    labels = [0] * 10 + [1] * 2
    with pytest.raises(NotEnoughImagesError, match="class 1 has 2.*--allow-fewer"):
        sample_few_shot(labels, 4, 1)
    assert len(sample_few_shot(labels, 4, 1, allow_fewer=True).train_indices) == 8  # with replacement (LP++)
    assert len(sample_few_shot(labels, 4, 1, "coop", allow_fewer=True).train_indices) == 6  # keeps what it has
    with pytest.raises(ValueError, match="--shots"):
        sample_few_shot(labels, 0, 1)


def test_missing_data_and_benchmark_without_root(tmp_path):
    with pytest.raises(DataError, match="nope"):
        resolve_data(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="--data-root"):
        resolve_data("dtd")
    with pytest.raises(DataError, match="split_zhou_DescribableTextures.json is missing.*DATASETS.md"):
        (tmp_path / "dtd").mkdir()
        resolve_data("dtd", root=tmp_path)


def test_dtd10_coop_layout(shared_data):
    splits = resolve_data("dtd", root=shared_data / "dtd10")
    assert (len(splits.train), len(splits.val), len(splits.test), len(splits.classnames)) == (600, 240, 360, 10)
    assert splits.classnames[0] == "banded" and splits.templates == ["{} texture."]
    assert all(it.path.is_file() for it in splits.train.items[:20])


def test_paths_read_names_what_resolve_data_reads(tmp_path):
    from prolip.data import paths_read

    (tmp_path / "folder").mkdir()
    (tmp_path / "l.csv").write_text("path,label\n")
    names, templates = tmp_path / "n.txt", tmp_path / "t.txt"
    assert paths_read(str(tmp_path / "folder"), classnames_file=names) == [tmp_path / "folder", names]
    assert paths_read(str(tmp_path / "l.csv"), templates_file=templates) == [tmp_path / "l.csv", templates]
    # A benchmark stands for its own folder under the root, not the whole root: outputs may live beside it.
    assert paths_read("dtd", root=tmp_path) == [tmp_path / "dtd"]
    assert paths_read("imagenet-sketch", root=tmp_path) == [tmp_path / "imagenet-sketch", tmp_path / "imagenet"]
    assert paths_read("not-a-benchmark") == []
