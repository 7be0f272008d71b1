"""WebDataset tar shards and Hugging Face datasets on disk: read as the same LabeledImages the folder reader makes,
cached exactly as the same image files read from a folder (same features, own keys), and through the CLI end to end
(fit, eval, predict) with a tiny random model. Generated data only."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from prolip.data import DataError, paths_read, read_image_folder, resolve_data
from prolip.data.images import load_image
from prolip.data.types import Member, member_of
from prolip.data.webdataset import expand_braces, sample_parts
from prolip.features import FeatureCache, image_key
from prolip.features.extraction import Extractor, augmented_views

CLASSES = ("cat", "dog", "fox")
TINY = ["--model", "test-vit-tiny", "--pretrained", "none"]


def cli(*args):
    from prolip.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def encoded(label: int, i: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(100 * label + i)
    pixels = (np.zeros((24 + i, 30, 3)) + 70 * label + rng.integers(0, 60, (24 + i, 30, 3))).clip(0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, fmt)
    return out.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, samples: list[tuple[bytes, int]], per_shard: int, names=True) -> list[Path]:
    """train-000000.tar, ... with <key>.png + <key>.cls + <key>.json per sample (stdlib tarfile)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(samples), per_shard):
        path = folder / f"train-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for j, (data, label) in enumerate(samples[s : s + per_shard], start=s):
                add_member(tar, f"sample{j:04d}.png", data)
                add_member(tar, f"sample{j:04d}.cls", str(label).encode())
                add_member(tar, f"sample{j:04d}.json", json.dumps({"i": j}).encode())
        shards.append(path)
    if names:
        (folder / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    return shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same 12 images as a folder (<class>/<i>.png), as 3 tar shards and as a save_to_disk DatasetDict."""
    root = tmp_path_factory.mktemp("sources")
    samples = [(encoded(label, i), label) for i in range(4) for label in range(3)]
    folder = root / "folder"
    files = []
    for j, (blob, label) in enumerate(samples):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        files.append(folder / CLASSES[label] / f"{j:02d}.png")
        files[-1].write_bytes(blob)
    shards = write_shards(root / "shards", samples, per_shard=4)
    return {"root": root, "samples": samples, "folder": folder, "files": files, "shards": shards}


@pytest.fixture(scope="module")
def hf_dataset(data):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    rows = {"image": [{"bytes": b, "path": None} for b, _ in data["samples"]], "label": [y for _, y in data["samples"]]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    out = data["root"] / "hf"
    datasets.DatasetDict(train=ds.select(range(9)), test=ds.select(range(9, 12))).save_to_disk(str(out / "dict"))
    ds.to_parquet(str(out / "all.parquet"))
    return {"dict": out / "dict", "parquet": out / "all.parquet", "dataset": ds}


@pytest.fixture(scope="module")
def tiny():
    from prolip.backbones import load_backbone

    return load_backbone("test-vit-tiny", "none")


# ---- shard patterns and members ----------------------------------------------------------------------------------


def test_brace_patterns_expand_as_webdataset_and_the_shell_do():
    assert expand_braces("s/train-{000000..000002}.tar") == [f"s/train-00000{i}.tar" for i in range(3)]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("x-{8..10}.tar") == ["x-8.tar", "x-9.tar", "x-10.tar"]
    assert expand_braces("{plain}.tar") == ["{plain}.tar"]
    with pytest.raises(DataError, match="more than"):
        expand_braces("x-{0..99999999}.tar")


def test_member_paths_round_trip_and_keep_folder_paths_plain(tmp_path):
    m = Member(Path("s/train-000000.tar"), "dir/sample01.jpg")
    assert member_of(m.path) == m and member_of(str(m.path)) == m
    assert member_of(Path("data/cat/1.jpg")) is None
    assert member_of("a::b/c.tar::x.jpg") == Member(Path("a::b/c.tar"), "x.jpg")
    assert sample_parts("a/b.seg.png") == ("a/b", "seg.png")
    # A real file whose name looks like a member is read, and keyed, as the file it is.
    odd = tmp_path / "x.tar::y.png"
    odd.write_bytes(encoded(0, 0))
    import hashlib

    expected = hashlib.blake2b(odd.read_bytes(), digest_size=16).hexdigest()
    assert image_key(odd) == expected and load_image(odd).size == (30, 24)


# ---- shards read like a folder -------------------------------------------------------------------------------------


def test_shards_read_as_the_folder_reads_the_same_images(data):
    spec = str(data["root"] / "shards" / "train-{000000..000002}.tar")
    splits = resolve_data(spec)
    folder = read_image_folder(data["folder"])
    assert splits.classnames == list(CLASSES) == folder.classnames and splits.test is None
    assert [it.label for it in splits.train.items] == [y for _, y in data["samples"]]
    assert [member_of(it.path).name for it in splits.train.items[:2]] == ["sample0000.png", "sample0001.png"]
    assert len(splits.train.ignored_files) == 0  # the json members belong to samples that have an image
    assert all(
        load_image(it.path).tobytes() == load_image(f).tobytes()
        for it, f in zip(splits.train.items, data["files"], strict=True)
    )
    assert set(paths_read(spec)) >= set(data["shards"]) | {data["root"] / "shards" / "classnames.txt"}


def test_a_folder_of_shards_in_split_folders_is_clip_benchmarks_layout(data, tmp_path):
    root = tmp_path / "wds"
    write_shards(root / "train", data["samples"][:9], per_shard=5, names=False)
    write_shards(root / "test", data["samples"][9:], per_shard=5, names=False)
    (root / "classnames.txt").write_text("\n".join(CLASSES))
    (root / "zeroshot_classification_templates.txt").write_text("a blurry photo of a {}.\n")
    splits = resolve_data(str(root))
    assert (len(splits.train), len(splits.test)) == (9, 3)
    assert splits.templates == ["a blurry photo of a {}."]
    renamed = resolve_data(str(root), classnames_file=_names(tmp_path, ["Cat", "Dog", "Fox"]))
    assert renamed.classnames == ["Cat", "Dog", "Fox"] and renamed.train.class_ids == list(CLASSES)


def test_an_image_folder_holding_an_archive_stays_an_image_folder(data, tmp_path):
    import shutil

    folder = shutil.copytree(data["folder"], tmp_path / "folder")
    shutil.copy(data["shards"][0], folder / "backup.tar")
    (folder / "train").mkdir()  # a class named "train", with its images and an archive
    (folder / "train" / "0.png").write_bytes(data["samples"][0][0])
    shutil.copy(data["shards"][1], folder / "train" / "old.tar")
    splits = resolve_data(str(folder))
    assert splits.classnames == [*CLASSES, "train"] and all(member_of(it.path) is None for it in splits.train.items)


def _names(tmp_path: Path, names) -> Path:
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names))
    return path


def test_shards_written_by_webdataset_itself_read_the_same(data, tmp_path):
    wds = pytest.importorskip("webdataset")
    path = tmp_path / "w-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for j, (blob, label) in enumerate(data["samples"]):
            sink.write({"__key__": f"k{j:03d}", "png": blob, "cls": label})
    splits = resolve_data(str(path), classnames_file=_names(tmp_path, CLASSES))
    assert [it.label for it in splits.train.items] == [y for _, y in data["samples"]]
    assert load_image(splits.train.items[5].path).tobytes() == load_image(data["files"][5]).tobytes()


def test_another_label_key(data, tmp_path):
    path = tmp_path / "k.tar"
    with tarfile.open(path, "w") as tar:
        for j, (blob, label) in enumerate(data["samples"][:3]):
            add_member(tar, f"s{j}.jpg", blob)
            add_member(tar, f"s{j}.label", f"{label}\n".encode())
    splits = resolve_data(str(path), classnames_file=_names(tmp_path, CLASSES), label_key="label")
    assert [it.label for it in splits.train.items] == [0, 1, 2]


# ---- the cache: the same features as the folder's files ----------------------------------------------------------


def test_cached_features_equal_the_folders(data, hf_dataset, tiny, tmp_path):
    cache = FeatureCache(tmp_path / "cache", tiny, progress=False)
    folder = cache.center(data["files"])
    members = resolve_data(str(data["root"] / "shards" / "train-{000000..000002}.tar")).train
    rows = resolve_data(f"hf:{hf_dataset['parquet']}").train
    for images in (members, rows):
        paths = [it.path for it in images.items]
        assert torch.equal(cache.center(paths).features, folder.features)
        # Augmented views are seeded by the image's key: the folder's files, given the members' keys, give the
        # members' cached views bit for bit.
        views = cache.views(paths, 2).to_tensor()
        same = Extractor(tiny).encode(
            [(f, image_key(p)) for f, p in zip(data["files"], paths, strict=True)],
            2,
            augmented_views(tiny.preprocessing, 0),
        )
        assert torch.equal(views, same.features.transpose(0, 1).to(torch.float16))
    # Identity is content: a member holding a file's bytes is that image, in the cache and in its views.
    assert [image_key(it.path) for it in members.items] == [image_key(f) for f in data["files"]]
    assert len({image_key(f) for f in data["files"]}) == 12


def test_ranks_split_the_shards_images_and_together_fill_one_cache(data, tiny, tmp_path):
    paths = [it.path for it in resolve_data(str(data["root"] / "shards" / "train-{000000..000002}.tar")).train.items]
    single = FeatureCache(tmp_path / "one", tiny, progress=False, unit_images=4)
    single.fill(paths, 2)
    split = [FeatureCache(tmp_path / "two", tiny, progress=False, unit_images=4) for _ in range(2)]
    for rank, cache in enumerate(split):
        cache.fill(paths, 2, rank=rank, world=2)
    extracted = [c.stats.images_extracted for c in split]
    assert sum(extracted) == 12 and min(extracted) > 0  # each rank read only its share of the members
    assert torch.equal(split[0].views(paths, 2).to_tensor(), single.views(paths, 2).to_tensor())


# ---- Hugging Face datasets ------------------------------------------------------------------------------------------


def test_a_saved_dataset_dict_gives_train_and_test_with_classlabel_names(data, hf_dataset):
    splits = resolve_data(f"hf:{hf_dataset['dict']}")
    assert splits.classnames == list(CLASSES) and (len(splits.train), len(splits.test)) == (9, 3)
    assert [it.label for it in splits.train.items + splits.test.items] == [y for _, y in data["samples"]]
    first = member_of(splits.test.items[0].path)
    assert first.container.suffix == ".arrow" and first.name == "0"
    assert load_image(splits.test.items[0].path).tobytes() == load_image(data["files"][9]).tobytes()
    trained_on_test = resolve_data(f"hf:{hf_dataset['dict']}", split="test")
    assert len(trained_on_test.train) == 3 and trained_on_test.test is None


def test_parquet_and_arrow_files_and_the_hubs_folder_layout(data, hf_dataset, tmp_path):
    ds = hf_dataset["dataset"]
    hub = tmp_path / "snapshot" / "data"
    hub.mkdir(parents=True)
    ds.select(range(6)).to_parquet(str(hub / "train-00000-of-00002.parquet"))
    ds.select(range(6, 9)).to_parquet(str(hub / "train-00001-of-00002.parquet"))
    ds.select(range(9, 12)).to_parquet(str(hub / "test-00000-of-00001.parquet"))
    splits = resolve_data(f"hf:{tmp_path / 'snapshot'}")
    assert (len(splits.train), len(splits.test)) == (9, 3)
    assert load_image(splits.train.items[7].path).tobytes() == load_image(data["files"][7]).tobytes()
    arrow = next(hf_dataset["dict"].glob("train/*.arrow"))
    assert len(resolve_data(f"hf:{arrow}").train) == 9
    assert len(resolve_data(f"hf:{hf_dataset['parquet']}").train) == 12


def test_a_hub_name_reads_its_local_copy_and_never_downloads(hf_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "datasets--someone--pets"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "data").mkdir(parents=True)
    hf_dataset["dataset"].to_parquet(str(repo / "snapshots" / "abc123" / "data" / "train-00000-of-00001.parquet"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert len(resolve_data("hf:someone/pets").train) == 12
    started = time.perf_counter()
    with pytest.raises(DataError, match="never downloads"):
        resolve_data("hf:someone/not-here")
    assert time.perf_counter() - started < 5


# ---- end to end through the CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["shards", "hf"])
def test_fit_eval_predict_end_to_end(source, data, hf_dataset, tmp_path):
    spec = (
        str(data["root"] / "shards" / "train-{000000..000002}.tar")
        if source == "shards"
        else f"hf:{hf_dataset['dict']}"
    )
    cache, run = tmp_path / "cache", tmp_path / "run"
    r = cli(
        "fit",
        "--data",
        spec,
        "--shots",
        2,
        "--views",
        2,
        "--steps",
        20,
        "--cache-dir",
        cache,
        "--out",
        run,
        "--json",
        *TINY,
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(member_of(p) is not None for p, _ in manifest["data"]["support"])
    assert "## Reproduce" in (run / "README.md").read_text()
    r = cli("eval", run, "--data", spec, "--cache-dir", cache, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert len(report["per_class"]) == 3 and len(report["confusion_matrix"]) == 3
    assert sum(map(sum, report["confusion_matrix"])) == report["eval_images"]
    image = manifest["data"]["support"][0][0]
    r = cli("predict", run, image, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    predictions = json.loads(r.stdout)
    assert predictions[0]["image"] == image and predictions[0]["predictions"][0]["class"] in CLASSES


def test_a_corrupt_member_is_skipped_and_listed_like_a_corrupt_file(data, tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for j, (blob, label) in enumerate(data["samples"][:6]):
            add_member(tar, f"s{j}.png", blob if j != 2 else b"not an image at all")
            add_member(tar, f"s{j}.cls", str(label).encode())
    r = cli(
        "fit",
        "--data",
        path,
        "--classnames",
        _names(tmp_path, CLASSES),
        "--shots",
        1,
        "--views",
        1,
        "--steps",
        5,
        "--on-bad-image",
        "skip",
        "--cache-dir",
        tmp_path / "c",
        "--out",
        tmp_path / "run",
        *TINY,
    )
    assert r.exit_code == 0, r.output
    skipped = json.loads((tmp_path / "run" / "manifest.json").read_text())["skipped_images"]
    assert [p for p, _ in skipped] == [f"{path}::s2.png"]


def test_outputs_never_replace_a_shard_nor_go_inside_a_folder_of_shards(data, tmp_path):
    shard = data["shards"][0]
    before = shard.read_bytes()
    r = cli(
        "fit", "--data", str(data["root"] / "shards" / "train-{000000..000001}.tar"), "--out", shard, "--force", *TINY
    )
    assert r.exit_code != 0 and "is the data being read" in r.output and shard.read_bytes() == before
    r = cli("fit", "--data", data["root"] / "shards", "--out", data["root"] / "shards" / "run", *TINY)
    assert r.exit_code != 0 and "inside the data being read" in r.output
    assert not (data["root"] / "shards" / "run").exists()
