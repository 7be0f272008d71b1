"""Every kind of bad input the data layer meets: each gives a clear error naming the culprit, or a correct decode."""

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prolip.data import (
    DataError,
    NotEnoughImagesError,
    load_benchmark,
    read_image_folder,
    read_image_list,
    read_templates,
    resolve_data,
    sample_few_shot,
)
from prolip.data.images import BadImageError, load_image

pytestmark = pytest.mark.reliability("bad_input")


def save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def rgb(w=16, h=16, value=(200, 30, 30)):
    return Image.new("RGB", (w, h), value)


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


# ---- decoding ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,content",
    [
        ("truncated.jpg", encoded("JPEG")[:400]),
        ("truncated.png", encoded("PNG")[:300]),
        ("corrupt.jpg", encoded("JPEG")[:20] + b"\x00" * 500),
        ("corrupt.png", encoded("PNG")[:33] + b"garbage" * 50),
        ("zero.jpg", b""),
        ("text.jpg", b"<html>not an image</html>\n"),
    ],
)
def test_undecodable_files_raise_bad_image_error_naming_the_file(tmp_path, name, content, tally):
    path = tmp_path / name
    path.write_bytes(content)
    with tally.raises(BadImageError, match=name) as e:
        load_image(path)
    assert e.value.path == path
    if name == "zero.jpg":
        assert "0 bytes" in str(e.value)


def test_missing_file(tmp_path, tally):
    with tally.raises(BadImageError, match="nope.jpg: file not found"):
        load_image(tmp_path / "nope.jpg")


def test_cmyk_and_grayscale_decode_to_rgb(tmp_path, tally):
    cmyk = load_image(save(tmp_path / "cmyk.jpg", rgb().convert("CMYK"), quality=95))
    assert cmyk.mode == "RGB" and np.allclose(np.asarray(cmyk)[8, 8], (200, 30, 30), atol=12)
    gray = load_image(save(tmp_path / "gray.png", Image.new("L", (5, 5), 77)))
    assert gray.mode == "RGB" and (np.asarray(gray) == 77).all()
    tally.input("CMYK JPEG", "grayscale PNG")
    tally.handled_ok("decoded or reported correctly")


def test_16_bit_is_rescaled_not_clipped(tmp_path, tally):
    a = np.full((6, 6), 32768, dtype=np.uint16)
    a[0, 0] = 65535
    path = save(tmp_path / "deep.png", Image.fromarray(a))
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (6, 6, 3)
    assert abs(int(out[3, 3, 0]) - 128) <= 1 and (out[0, 0] == 255).all()
    tally.input("16-bit PNG")
    tally.handled_ok("decoded or reported correctly")


def test_transparency_is_composited_on_white(tmp_path, tally):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(load_image(save(tmp_path / "rgba.png", rgba)))
    assert (out[1, 1] == 255).all() and tuple(out[0, 0]) == (0, 0, 255)
    la = np.asarray(load_image(save(tmp_path / "la.png", Image.new("LA", (3, 3), (0, 0)))))
    assert (la == 255).all()
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "palette with transparency" warning either
        out = np.asarray(load_image(save(tmp_path / "pal.png", pal, transparency=0)))
    assert (out[0, 0] == 255).all() and tuple(out[2, 2]) == (10, 200, 10)
    plain_pal = np.asarray(load_image(save(tmp_path / "pal.gif", pal)))
    assert tuple(plain_pal[0, 0]) == (0, 0, 0)
    tally.input("RGBA PNG", "LA PNG", "palette PNG with transparency", "palette GIF")
    tally.handled_ok("decoded or reported correctly")


def test_exif_orientation_is_applied(tmp_path, tally):
    im = Image.new("RGB", (4, 2), (0, 0, 0))
    im.putpixel((0, 0), (255, 255, 255))  # top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90° clockwise
    path = save(tmp_path / "rot.png", im, exif=exif)
    out = load_image(path)
    assert out.size == (2, 4)
    a = np.asarray(out)
    assert a[0, 1].min() > 200 and a[0, 0].max() < 50  # the marker moved to the top-right corner
    tally.input("EXIF-rotated image")
    tally.handled_ok("decoded or reported correctly")


def test_animated_gif_gives_first_frame(tmp_path, tally):
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    out = np.asarray(load_image(path))
    assert out[4, 4, 0] > 200 and out[4, 4, 2] < 50
    tally.input("animated GIF")
    tally.handled_ok("decoded or reported correctly")


@pytest.mark.parametrize("side", [12, 20])  # 144 px: over the limit (PIL only warns); 400 px: over 2x (PIL errors)
def test_decompression_bomb_is_a_bad_image_not_a_warning(tmp_path, monkeypatch, side, tally):
    path = save(tmp_path / "bomb.png", rgb(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tally.raises(BadImageError, match="bomb.png.*MAX_IMAGE_PIXELS"):
            load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert load_image(path).size == (side, side)


# ---- image folders --------------------------------------------------------------------------------------------


def folder(root: Path, classes=("a", "b"), n=2) -> Path:
    for c in classes:
        for i in range(n):
            save(root / c / f"{i}.jpg", rgb(4, 4))
    return root


def test_hidden_and_stray_files_are_ignored_and_reported(tmp_path, tally):
    root = folder(tmp_path / "d")
    (root / "a" / ".hidden.jpg").write_bytes(b"junk")
    (root / "a" / "labels.csv").write_text("x")
    (root / ".cache").mkdir()
    save(root / ".cache" / "x.jpg", rgb(4, 4))
    (root / "b" / ".ipynb_checkpoints").mkdir()
    save(root / "b" / ".ipynb_checkpoints" / "y.jpg", rgb(4, 4))
    (root / "README.md").write_text("top-level stray file")
    images = read_image_folder(root)
    assert images.classnames == ["a", "b"] and len(images) == 4
    assert images.ignored_files == [root / "a" / "labels.csv"]
    tally.input("hidden file", "stray non-image file", "hidden folder", "top-level stray file")
    tally.handled_ok("decoded or reported correctly")


def test_empty_class_folder_is_an_error_naming_it(tmp_path, tally):
    root = folder(tmp_path / "d")
    (root / "c_empty").mkdir()
    (root / "c_empty" / "notes.txt").write_text("no images")
    with tally.raises(DataError, match=r"class folder .*c_empty has no images"):
        read_image_folder(root)


def test_no_class_folders_and_missing_root(tmp_path, tally):
    (tmp_path / "flat").mkdir()
    save(tmp_path / "flat" / "x.jpg", rgb(4, 4))
    with tally.raises(DataError, match="no class folders"):
        read_image_folder(tmp_path / "flat")
    with tally.raises(DataError, match="missing_dir does not exist"):
        read_image_folder(tmp_path / "missing_dir")


def test_symlink_loop_terminates(tmp_path, tally):
    root = folder(tmp_path / "d")
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)
    (root / "b" / "up").symlink_to(root, target_is_directory=True)
    (root / "b" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    images = read_image_folder(root)
    assert [(it.path.parent.name, it.path.name, it.label) for it in images.items] == [
        ("a", "0.jpg", 0),
        ("a", "1.jpg", 0),
        ("b", "0.jpg", 1),
        ("b", "1.jpg", 1),
    ]
    assert images.ignored_files == [root / "b" / "dangling.jpg"]
    tally.input("symlink loop", "symlink to the root", "dangling symlink")
    tally.handled_ok("decoded or reported correctly")


def test_unicode_and_spaces(tmp_path, tally):
    root = folder(tmp_path / "my data", classes=("crème brûlée", "北京 烤鸭"))
    save(root / "crème brûlée" / "photo 1 ü.jpg", rgb(4, 4))
    images = read_image_folder(root)
    assert images.classnames == ["crème brûlée", "北京 烤鸭"] and len(images) == 5
    assert load_image(root / "crème brûlée" / "photo 1 ü.jpg").size == (4, 4)
    (tmp_path / "names.json").write_text(
        json.dumps({"crème brûlée": "creme brulee", "北京 烤鸭": "peking duck"}), encoding="utf-8"
    )
    assert read_image_folder(root, tmp_path / "names.json").classnames == ["creme brulee", "peking duck"]
    tally.input("unicode and spaces in paths")
    tally.handled_ok("decoded or reported correctly")


def test_classnames_file_mismatch(tmp_path, tally):
    root = folder(tmp_path / "d", classes=("a", "b", "c"), n=1)
    (tmp_path / "two.txt").write_text("x\ny\n")
    with tally.raises(DataError, match=r"two.txt lists 2 names but the data has 3 classes"):
        read_image_folder(root, tmp_path / "two.txt")
    (tmp_path / "four.json").write_text(json.dumps(["w", "x", "y", "z"]))
    with tally.raises(DataError, match=r"four.json lists 4 names but the data has 3 classes"):
        read_image_folder(root, tmp_path / "four.json")
    (tmp_path / "map.json").write_text(json.dumps({"a": "A", "b": "B"}))
    with tally.raises(DataError, match=r"map.json has no entry for class\(es\) \['c'\]"):
        read_image_folder(root, tmp_path / "map.json")
    with tally.raises(DataError, match="nofile.txt does not exist"):
        read_image_folder(root, tmp_path / "nofile.txt")


def test_templates_without_placeholder(tmp_path, tally):
    (tmp_path / "t.txt").write_text("a photo of a {}.\n\nart of a thing.\n")
    with tally.raises(DataError, match=r"t.txt, line 2: template 'art of a thing.' must contain exactly one '\{\}'"):
        read_templates(tmp_path / "t.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with tally.raises(DataError, match="empty.txt is empty"):
        read_templates(tmp_path / "empty.txt")


# ---- image lists and split files ------------------------------------------------------------------------------


@pytest.fixture
def list_root(tmp_path):
    for n in ("a.jpg", "b.jpg"):
        save(tmp_path / "img" / n, rgb(4, 4))
    return tmp_path


@pytest.mark.parametrize(
    "name,content,error",
    [
        ("unknown.csv", "path,classname\nimg/a.jpg,cat\nimg/b.jpg,dog\n", r"unknown.csv, row 2: unknown class 'dog'"),
        ("nocols.csv", "file,label\nimg/a.jpg,0\n", r"nocols.csv: needs a header with a 'path' column"),
        ("nolabel.csv", "path,comment\nimg/a.jpg,x\n", r"nolabel.csv: needs a header.*'label' or 'classname'"),
        (
            "badlabel.csv",
            "path,label\nimg/a.jpg,0\nimg/b.jpg,cat\n",
            r"badlabel.csv, row 2: label 'cat' is not an integer",
        ),
        ("blank.csv", "path,label,classname\nimg/a.jpg,,\n", r"blank.csv, row 1: needs a 'label' or a 'classname'"),
        ("dotdot.csv", "path,label\nimg/../../outside.jpg,0\n", r"dotdot.csv, row 1: path .* escapes the dataset root"),
        ("abs.csv", "path,label\n/etc/hostname,0\n", r"abs.csv, row 1: path '/etc/hostname' escapes"),
        (
            "missing.csv",
            "path,label\nimg/a.jpg,0\nimg/zzz.jpg,0\n",
            r"missing.csv, row 2: image .*zzz.jpg does not exist",
        ),
        ("conflict.csv", "path,label,classname\nimg/a.jpg,0,cat\nimg/b.jpg,0,dog\n", r"conflict.csv, row \d: label 0"),
        (
            "unknown.json",
            [{"path": "img/a.jpg", "classname": "cat"}, {"path": "img/b.jpg", "classname": "emu"}],
            r"unknown.json, row 2: unknown class 'emu'",
        ),
        (
            "nocols.json",
            [{"path": "img/a.jpg", "label": 0}, {"file": "img/b.jpg"}],
            r"nocols.json, row 2: missing image path",
        ),
        ("shape.json", [["img/a.jpg", 0, "cat"], "img/b.jpg"], r"shape.json, row 2: expected"),
        ("escape.json", [["../x.jpg", 0, "cat"]], r"escape.json, row 1: path '../x.jpg' escapes"),
        ("split.json", {"train": [], "val": [], "test": []}, r"split.json is a CoOp split file"),
        ("broken.json", "{[", r"broken.json: not valid JSON"),
        ("list.txt", "img/a.jpg 0\n", r"list.txt: unsupported image list format"),
        # Found by the property tests: each used to escape as another exception type, or to exhaust memory.
        ("huge.csv", "path,label\nimg/a.jpg,99999999999999\n", r"huge.csv, row 1: label 99999999999999 is outside 0.."),
        ("negative.csv", "path,label\nimg/a.jpg,-1\n", r"negative.csv, row 1: label -1 is outside 0.."),
        ("latin1.csv", b"path,classname\nimg/a.jpg,caf\xe9\n", r"image list .*latin1.csv is not UTF-8 text"),
        ("nul.csv", "path,label\nimg/a.jpg\0,0\n", r"nul.csv, row 1: path .* is not a usable file name"),
        (
            "longfield.csv",
            "path,label\n" + "x" * 200_000 + ",0\n",
            r"longfield.csv: not a readable CSV file near line 2",
        ),
        ("inf.json", '[["img/a.jpg", Infinity]]', r"inf.json, row 1: label inf is not an integer"),
        ("float.json", [["img/a.jpg", 1.5]], r"float.json, row 1: label 1.5 is not an integer"),
        ("bool.json", [["img/a.jpg", True]], r"bool.json, row 1: label True is not an integer"),
        ("surrogate.json", '[["img/\\ud800.jpg", 0]]', r"surrogate.json, row 1: path .* is not a usable file name"),
        ("deep.json", "[" * 100_000, r"deep.json: not valid JSON \(nested too deeply\)"),
    ],
)
def test_bad_image_lists(list_root, name, content, error, tally):
    path = list_root / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with tally.raises(DataError, match=error):
        read_image_list(path, classnames=["cat"] if name.startswith("unknown") else None)


def test_split_file_paths_escaping_the_image_root(tmp_path, tally):
    (tmp_path / "dtd").mkdir()
    split = {"train": [["banded/x.jpg", 0, "banded"], ["../../../etc/passwd", 0, "banded"]], "val": [], "test": []}
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    with tally.raises(DataError, match=r"split_zhou_DescribableTextures.json: train entry 1: path .* escapes"):
        load_benchmark("dtd", tmp_path)
    split["train"] = [["banded/x.jpg", 1, "banded"]]
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    with tally.raises(DataError, match=r"labels must cover 0..C-1.*\[0\]"):
        load_benchmark("dtd", tmp_path)


@pytest.mark.parametrize(
    "split,error",
    [
        ([], r"expected a JSON object with 'train', 'val' and 'test' lists, got a list"),
        ({"train": 5}, r"'train' must be a list of \[path, label, classname\] entries"),
        ({"train": [["banded/x.jpg", 0]]}, r"train entry 0: expected \[path, label, classname\]"),
        ({"train": [["banded/x.jpg", "zero", "banded"]]}, r"train entry 0: label 'zero' is not an integer"),
        ({"train": [["banded/x.jpg", 10**14, "banded"]]}, r"train entry 0: label 100000000000000 is outside"),
        # One label, two names: reading it would merge two classes without a word.
        (
            {"train": [["banded/x.jpg", 0, "banded"]], "test": [["dotted/y.jpg", 0, "dotted"]]},
            r"test entry 0: label 0 is 'dotted' here but 'banded' elsewhere",
        ),
    ],
)
def test_malformed_split_files(tmp_path, split, error, tally):
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    with tally.raises(DataError, match=r"split_zhou_DescribableTextures.json: " + error):
        load_benchmark("dtd", tmp_path)


def test_malformed_class_name_and_aircraft_files(tmp_path, tally):
    root = folder(tmp_path / "d", classes=("a", "b"), n=1)
    for name, text in (("broken.json", "{["), ("number.json", "5")):
        (tmp_path / name).write_text(text)
        with tally.raises(DataError, match=rf"{name}"):
            read_image_folder(root, tmp_path / name)
    ds = tmp_path / "fgvc_aircraft"
    ds.mkdir()
    (ds / "variants.txt").write_text("707-320\n")
    for part in ("train", "val", "test"):
        (ds / f"images_variant_{part}.txt").write_text("../../../etc/passwd 707-320\n" if part == "val" else "")
    with tally.raises(DataError, match=r"images_variant_val.txt, line 1: path .* escapes the dataset root"):
        load_benchmark("fgvc_aircraft", tmp_path)


def test_resolve_data_bad_specs(tmp_path, tally):
    with tally.raises(DataError, match=r"--data .*nowhere: no such file or folder, and not a benchmark name"):
        resolve_data(str(tmp_path / "nowhere"))
    with tally.raises(DataError, match="pass --data-root"):
        resolve_data("eurosat")


# ---- shot counts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["lpp", "coop"])
def test_shots_out_of_range(convention, tally):
    labels = [0] * 8 + [1] * 2
    with tally.raises(ValueError, match="--shots must be a positive number"):
        sample_few_shot(labels, 0, 0, convention)
    with tally.raises(
        NotEnoughImagesError, match=r"class 'rare' has 2 training images but 3 are needed.*--allow-fewer"
    ):
        sample_few_shot(labels, 3, 0, convention, classnames=["common", "rare"])


# ---- the feature cache --------------------------------------------------------------------------------------------


def test_cache_bad_image_error_and_skip(tmp_path, tiny_vit, tally):
    from prolip.features import FeatureCache

    from .conftest import make_images

    paths = make_images(tmp_path / "img", n=3)
    paths[1].write_bytes(b"garbage")
    with tally.raises(BadImageError, match="img_001", input="garbage bytes in the cache"):
        FeatureCache(tmp_path / "cache", tiny_vit, progress=False).center(paths)
    c = FeatureCache(tmp_path / "cache", tiny_vit, progress=False, on_bad_image="skip")
    z = c.center(paths)
    assert z.features.shape[0] == 2 and z.kept == [0, 2] and z.skipped[0][0] == paths[1]
    v = c.views(paths, 2)
    assert v.kept == [0, 2] and v.num_images == 2 and v.skipped[0][0] == paths[1]
    tally.handled_ok(f"skipped {paths[1]}")
