"""Data a user hands over, read as they meant it or refused with a message naming the file and row:
BOM-prefixed CSVs, one image under two classes, duplicate or non-string class names, class-folder symlinks back
to the root, --classnames on every kind of source, and prompt templates with anything but one ``{}``.
"""

import csv
import io
import json
import os
import re
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prolip.data import DataError, read_image_folder, read_image_list, read_templates, resolve_data
from prolip.data.benchmarks import load_benchmark_folder

from .conftest import fit_cli, make_folder

pytestmark = pytest.mark.reliability("bad_input")

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def listed(root: Path, names=("a.png", "b.png", "c.png")) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / "img" / n).write_bytes(b"")
    return root


# ---- CSV with a byte-order mark ------------------------------------------------------------------------------------


@PROPS
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(["a.png", "b.png", "c.png"]), st.sampled_from(["cat", "dog", "émeu"])),
        min_size=1,
        max_size=6,
        unique_by=lambda r: r[0],
    ),
    header=st.sampled_from([["path", "classname"], ["classname", "path"]]),
)
def test_a_csv_with_a_byte_order_mark_reads_like_one_without(rows, header, tally):
    with tempfile.TemporaryDirectory() as d:
        root = listed(Path(d))
        text = io.StringIO()
        w = csv.writer(text)
        w.writerow(header)
        w.writerows([[f"img/{p}" if h == "path" else c for h in header] for p, c in rows])
        (root / "plain.csv").write_text(text.getvalue(), encoding="utf-8")
        (root / "bom.csv").write_text(text.getvalue(), encoding="utf-8-sig")  # Excel's "CSV UTF-8"
        tally.input("CSV with a UTF-8 byte-order mark")
        plain, bom = read_image_list(root / "plain.csv"), read_image_list(root / "bom.csv")
        assert (bom.items, bom.classnames) == (plain.items, plain.classnames)
        tally.handled_ok("read as without the mark")


def test_class_names_and_templates_files_with_a_byte_order_mark(tmp_path, tally):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=1)
    (tmp_path / "names.txt").write_text("Apple\nBanana\n", encoding="utf-8-sig")
    (tmp_path / "t.txt").write_text("a photo of a {}.\n", encoding="utf-8-sig")
    images = read_image_folder(root, tmp_path / "names.txt", tmp_path / "t.txt")
    assert images.classnames == ["Apple", "Banana"] and images.templates == ["a photo of a {}."]
    tally.input("names file with a BOM", "templates file with a BOM")
    tally.handled_ok("read as without the mark")


# ---- one image, two classes ----------------------------------------------------------------------------------------


def _alias(root: Path, how: str) -> str:
    """Another name for img/a.png."""
    if how == "same path":
        return "img/a.png"
    if how == "dot-dot path":
        return "img/../img/a.png"
    if how == "symlink":
        (root / "img" / "link.png").symlink_to(root / "img" / "a.png")
        return "img/link.png"
    os.link(root / "img" / "a.png", root / "img" / "hard.png")
    return "img/hard.png"


@pytest.mark.parametrize("fmt", ["csv", "json rows", "json objects"])
@pytest.mark.parametrize("how", ["same path", "dot-dot path", "symlink", "hardlink"])
def test_a_list_naming_one_image_under_two_classes_is_refused(tmp_path, fmt, how, tally):
    root = listed(tmp_path)
    rows = [("img/a.png", 0, "cat"), ("img/b.png", 1, "dog"), (_alias(root, how), 1, "dog")]
    if fmt == "csv":
        path = root / "list.csv"
        path.write_text("path,label,classname\n" + "".join(f"{p},{y},{c}\n" for p, y, c in rows))
    else:
        path = root / "list.json"
        doc = [list(r) for r in rows] if fmt == "json rows" else [{"path": p, "label": y} for p, y, _ in rows]
        path.write_text(json.dumps(doc))
    with tally.raises(
        DataError,
        match=r"list\.(csv|json): rows 1 and 3 put the same image .*a\.png.* in two classes",
        input=f"{fmt}: one image under two classes ({how})",
    ):
        read_image_list(path)


def test_a_list_naming_one_image_twice_in_one_class_is_read(tmp_path, tally):
    root = listed(tmp_path)
    (root / "l.csv").write_text("path,classname\nimg/a.png,cat\nimg/../img/a.png,cat\nimg/b.png,dog\n")
    assert [it.label for it in read_image_list(root / "l.csv").items] == [0, 0, 1]
    tally.input("one image twice in its own class")
    tally.handled_ok("read: no contradiction")


def test_a_split_file_naming_one_image_under_two_classes_is_refused(tmp_path, tally):
    ds = tmp_path / "dtd"
    (ds / "images").mkdir(parents=True)
    split = {
        "train": [["x/1.jpg", 0, "banded"], ["y/2.jpg", 1, "dotted"]],
        "val": [],
        "test": [["x/1.jpg", 1, "dotted"]],
    }
    (ds / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    with tally.raises(
        DataError,
        match=r"train entry 0 and test entry 0 put the same image .*1\.jpg in two classes "
        r"\('banded' and 'dotted'\)",
    ):
        load_benchmark_folder(ds)


# ---- class names -------------------------------------------------------------------------------------------------

names_list = st.lists(st.sampled_from(["cat", "dog", "fox", "Cat", "cat ", "北京"]), min_size=3, max_size=3)


@PROPS
@given(names=names_list, form=st.sampled_from(["txt", "json list", "json dict"]))
def test_class_names_files_refuse_duplicates(names, form, tally):
    with tempfile.TemporaryDirectory() as d:
        root = make_folder(Path(d) / "data", classes=("a", "b", "c"), per_class=1)
        f = Path(d) / ("names.txt" if form == "txt" else "names.json")
        if form == "txt":
            f.write_text("\n".join(names) + "\n")
        else:
            f.write_text(json.dumps(names if form == "json list" else dict(zip("abc", names, strict=True))))
        shown = [n.strip() for n in names] if form == "txt" else names  # text lines are stripped
        tally.input(f"{form} names {names}")
        if len(set(shown)) == len(shown):
            assert read_image_folder(root, f).classnames == shown
            tally.handled_ok("distinct names")
            return
        dup = next(n for i, n in enumerate(shown) if n in shown[:i])
        with pytest.raises(DataError) as e:
            read_image_folder(root, f)
        tally.clear_error(e.value, f.name, f"class name {dup!r} is given twice")


@pytest.mark.parametrize(
    "content,error",
    [
        ([1, "b", "c"], r"class name 0 is 1, not a string"),
        (["a", None, "c"], r"class name 1 is None, not a string"),
        (["a", ["b"], "c"], r"class name 1 is \['b'\], not a string"),
        ({"a": "A", "b": 2, "c": "C"}, r"class name 1 is 2, not a string"),
        (["a", " ", "c"], r"class name 1 is blank"),
    ],
)
def test_non_string_class_names_in_a_json_names_file_are_refused(tmp_path, content, error, tally):
    root = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=1)
    (tmp_path / "names.json").write_text(json.dumps(content))
    with tally.raises(DataError, match=r"names\.json: " + error):
        read_image_folder(root, tmp_path / "names.json")


@pytest.mark.parametrize("bad", [3, None, ["banded"], {"n": "banded"}, ""])
def test_non_string_class_names_in_a_split_file_are_refused(tmp_path, bad, tally):
    ds = tmp_path / "dtd"
    (ds / "images").mkdir(parents=True)
    split = {"train": [["x/1.jpg", 0, "banded"], ["y/2.jpg", 1, bad]], "val": [], "test": []}
    (ds / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    with tally.raises(DataError, match=rf"train entry 1: class name {re.escape(repr(bad))} is not a non-blank string"):
        load_benchmark_folder(ds)


def test_a_list_giving_two_labels_one_name_is_refused(tmp_path, tally):
    root = listed(tmp_path)
    (root / "l.csv").write_text("path,label,classname\nimg/a.png,0,cat\nimg/b.png,1,cat\n")
    with tally.raises(DataError, match=r"l\.csv: class name 'cat' is given twice \(classes 0 and 1\)"):
        read_image_list(root / "l.csv")
    (root / "l.json").write_text(json.dumps([{"path": "img/a.png", "classname": 7}]))
    with tally.raises(DataError, match=r"l\.json, row 1: class name 7 is not a string"):
        read_image_list(root / "l.json")


def test_benchmark_files_giving_two_classes_one_name_are_refused(tmp_path, tally):
    ds = tmp_path / "dtd"
    (ds / "images").mkdir(parents=True)
    split = {"train": [["x/1.jpg", 0, "banded"], ["y/2.jpg", 1, "banded"]], "val": [], "test": []}
    (ds / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    with tally.raises(DataError, match=r"split_zhou_DescribableTextures\.json: class name 'banded' is given twice"):
        load_benchmark_folder(ds)
    air = tmp_path / "fgvc_aircraft"
    air.mkdir()
    (air / "variants.txt").write_text("707-320\nA300\n707-320\n")
    with tally.raises(DataError, match=r"variants\.txt: class name '707-320' is given twice \(classes 0 and 2\)"):
        load_benchmark_folder(air)


# ---- class folders that are symlinks -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["root", "parent of root"])
def test_a_class_folder_linking_back_to_the_root_is_not_a_class(tmp_path, target, tally):
    root = make_folder(tmp_path / "data", per_class=2)
    (root / "zz_loop").symlink_to(root if target == "root" else tmp_path, target_is_directory=True)
    images = read_image_folder(root)
    assert images.classnames == ["cat", "dog", "fox"] and len(images) == 6
    assert root / "zz_loop" in images.ignored_files
    tally.input(f"class folder symlinked to the {target}")
    tally.handled_ok("skipped and listed")


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path, tally):
    root = make_folder(tmp_path / "data", per_class=2)
    (root / "kitten").symlink_to(root / "cat", target_is_directory=True)
    with tally.raises(DataError, match=r"class folders .*cat and .*kitten are the same folder"):
        read_image_folder(root)
    (root / "kitten").unlink()
    (root / "cat" / "inner").mkdir()
    (root / "inner_link").symlink_to(root / "cat" / "inner", target_is_directory=True)
    with tally.raises(DataError, match=r"class folder .*inner_link is inside class folder .*cat"):
        read_image_folder(root)


# ---- --classnames on every source ----------------------------------------------------------------------------------


def _sources(tmp: Path) -> dict[str, Path]:
    root = listed(tmp / "list")
    (root / "l.csv").write_text("path,classname\nimg/a.png,cat\nimg/b.png,dog\nimg/c.png,fox\n")
    rows = [["img/a.png", 0, "cat"], ["img/b.png", 1, "dog"], ["img/c.png", 2, "fox"]]
    (root / "l.json").write_text(json.dumps(rows))
    ds = tmp / "dtd"
    (ds / "images").mkdir(parents=True)
    split = {"train": [["a/1.jpg", 0, "cat"], ["b/1.jpg", 1, "dog"], ["c/1.jpg", 2, "fox"]], "val": [], "test": []}
    (ds / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return {
        "folder": make_folder(tmp / "folder", per_class=1),
        "csv list": root / "l.csv",
        "json list": root / "l.json",
        "benchmark folder": ds,
    }


@pytest.mark.parametrize("source", ["folder", "csv list", "json list", "benchmark folder"])
@pytest.mark.parametrize("names", ["Cat\nDog\nFox\n", json.dumps({"cat": "Cat", "dog": "Dog", "fox": "Fox"})])
def test_classnames_file_renames_the_classes_of_every_source(tmp_path, source, names, tally):
    f = tmp_path / ("names.txt" if names.endswith("\n") else "names.json")
    f.write_text(names)
    splits = resolve_data(str(_sources(tmp_path)[source]), classnames_file=f)
    tally.input(f"--classnames {f.suffix} with a {source}")
    assert splits.classnames == ["Cat", "Dog", "Fox"] and splits.train.classnames == ["Cat", "Dog", "Fox"]
    tally.handled_ok("renamed")


def test_fit_uses_the_classnames_file_with_a_list(tmp_path, tally):
    data = make_folder(tmp_path / "data", per_class=2)
    (tmp_path / "l.csv").write_text(
        "path,classname\n" + "".join(f"data/{c}/{i}.jpg,{c}\n" for c in ("cat", "dog", "fox") for i in range(2))
    )
    (tmp_path / "names.txt").write_text("tabby cat\nbeagle\nred fox\n")
    r = fit_cli(
        tmp_path / "l.csv",
        tmp_path / "run",
        tmp_path / "cache",
        "--classnames",
        tmp_path / "names.txt",
        shots=1,
        views=1,
        steps=2,
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "classnames.json").read_text()) == ["tabby cat", "beagle", "red fox"]
    assert data.is_dir()
    tally.input("--classnames with a CSV list")
    tally.handled_ok("names in the run")


# ---- prompt templates ----------------------------------------------------------------------------------------------


def _one_placeholder(t: str) -> bool:
    """Independent oracle: with literal braces ({{ and }}) removed, exactly one {} and no other brace."""
    rest = re.sub(r"\{\{|\}\}", "", t)
    return rest.count("{}") == 1 and rest.replace("{}", "", 1).count("{") == 0 and "}" not in rest.replace("{}", "")


@PROPS
@given(template=st.text(st.sampled_from(list("{}ab 0:!r.x")), min_size=1, max_size=12))
def test_templates_need_exactly_one_placeholder_and_nothing_else(template, tally):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "t.txt"
        f.write_text(f"a photo of a {{}}.\n{template}\n")
        tally.input(f"template {template!r}")
        if not template.strip():
            assert read_templates(f) == ["a photo of a {}."]
            return
        if _one_placeholder(template.strip()):
            got = read_templates(f)
            assert got[1].format("cat").count("cat") >= 1  # it formats, with the name in it
            tally.handled_ok("valid template")
            return
        with pytest.raises(DataError) as e:
            read_templates(f)
        tally.clear_error(e.value, "t.txt, line 2", "template")


@pytest.mark.parametrize(
    "template",
    [
        "a {0} photo",
        "a {name}.",
        "{} and {}",
        "a photo",
        "a {!r} photo",
        "a {:>9} photo",
        "a {:} photo",  # formats like {}, but is not the {} the template promises (found by a random draw)
        "a {} photo }",
        "a { photo {}",
        "{}{0}",
    ],
)
def test_each_kind_of_bad_template_is_named(tmp_path, template, tally):
    (tmp_path / "t.txt").write_text(template + "\n")
    with tally.raises(DataError, match=r"t\.txt, line 1: template .* (must contain exactly one '\{\}'|is not a valid)"):
        read_templates(tmp_path / "t.txt")


def test_literal_braces_are_fine(tmp_path, tally):
    (tmp_path / "t.txt").write_text("a {{sticker}} of a {}.\n")
    assert read_templates(tmp_path / "t.txt")[0].format("cat") == "a {sticker} of a cat."
    tally.input("template with escaped braces")
    tally.handled_ok("read")


def test_the_oracle_agrees_with_str_format_on_valid_templates():
    for t in ["{}", "a {} b", "{{}}{}", "{{{}}}", "}}{}{{"]:
        assert _one_placeholder(t) and t.format("X").count("X") == 1
    for t in ["", "{0}", "{}{}", "{", "}", "{}}", "{x}"]:
        assert not _one_placeholder(t)
    assert set(string.printable) > set("{}ab 0:!r.x")
