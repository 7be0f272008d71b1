"""Bad inputs through the `prolip` command: a clear error, or with --on-bad-image skip a counted, listed skip.

Never a silent change of the class set.
"""

import json

import pytest

from .conftest import cli, fit_cli, make_folder

pytestmark = pytest.mark.reliability("bad_input")


def fit(data, tmp_path, *extra):
    return fit_cli(data, tmp_path / "run", tmp_path / "cache", *extra, shots=3, views=2, steps=5)


@pytest.fixture
def messy(tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "dog" / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")  # a truncated JPEG
    (data / "cat" / "notes.txt").write_text("labelling notes")
    (data / "cat" / ".DS_Store").write_bytes(b"\0")
    return data


def test_fit_skip_counts_and_lists_bad_images_and_stray_files(messy, tmp_path, tally):
    tally.input("truncated JPEG (skip)", "stray text file", "hidden file")
    r = fit(messy, tmp_path, "--on-bad-image", "skip", "--json")
    assert r.exit_code == 0, r.output
    bad, stray = str(messy / "dog" / "2.jpg"), str(messy / "cat" / "notes.txt")
    assert "skipped 1 unreadable image(s) (--on-bad-image skip)" in r.stderr and bad in r.stderr
    assert "ignored 1 non-image file(s)" in r.stderr and stray in r.stderr and ".DS_Store" not in r.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [p for p, _ in manifest["skipped_images"]] == [bad] and manifest["skipped_count"] == 1
    assert manifest["ignored_files"] == [stray] and manifest["ignored_count"] == 1
    assert json.loads((tmp_path / "run" / "classnames.json").read_text()) == ["cat", "dog", "fox"]
    metrics = json.loads(r.stdout)
    assert metrics["eval_images"] + 3 * 3 == 15 - 1  # the bad image is out of either support or evaluation
    tally.handled_ok(f"skipped and listed {bad}")


def test_fit_without_skip_names_the_bad_image(messy, tmp_path, tally):
    r = fit(messy, tmp_path)
    tally.cli_error(r, r"cannot read image .*dog/2\.jpg", input="truncated JPEG (error)")
    assert not (tmp_path / "run").exists()


def test_skipping_every_support_image_of_a_class_is_refused(tmp_path, tally):
    data = make_folder(tmp_path / "data")
    for i in range(5):
        (data / "fox" / f"{i}.jpg").write_bytes(b"not a jpeg")
    r = fit(data, tmp_path, "--on-bad-image", "skip")
    tally.cli_error(r, r"class\(es\) \['fox'\] is unreadable", "silently drop the class", input="unreadable class")
    assert not (tmp_path / "run").exists()


def test_eval_skip_is_counted_and_listed(tmp_path, tally):
    data = make_folder(tmp_path / "data")
    assert fit(data, tmp_path).exit_code == 0
    # eval leaves out the run's own support and validation images: spoil one it does evaluate.
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    used = {p for key in ("support", "validation") for p, _ in manifest["data"].get(key, [])}
    bad = next(p for p in sorted((data / "fox").iterdir()) if str(p) not in used)
    r = cli("eval", tmp_path / "run", "--data", data, "--cache-dir", tmp_path / "cache", "--json")
    assert r.exit_code == 0, r.output
    evaluated = json.loads(r.stdout)["eval_images"]
    bad.write_bytes(b"")
    (data / "fox" / "readme.md").write_text("x")
    tally.input("zero-byte image at eval", "stray file at eval")
    r = cli("eval", tmp_path / "run", "--data", data, "--cache-dir", tmp_path / "cache")
    tally.cli_error(r, rf"fox/{bad.name}: empty file \(0 bytes\)")
    r = cli(
        "eval", tmp_path / "run", "--data", data, "--cache-dir", tmp_path / "cache", "--on-bad-image", "skip", "--json"
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["eval_images"] == evaluated - 1 and out["skipped_count"] == 1 and out["ignored_count"] == 1
    assert out["skipped_images"][0][0] == str(bad) and str(bad) in r.stderr
    assert "readme.md" in r.stderr
    tally.handled_ok("eval skip listed")


def test_eval_on_data_with_other_classes_is_refused(tmp_path, tally):
    data = make_folder(tmp_path / "data")
    assert fit(data, tmp_path).exit_code == 0
    other = make_folder(tmp_path / "other", classes=("cat", "dog", "wolf"))
    r = cli("eval", tmp_path / "run", "--data", other, "--cache-dir", tmp_path / "cache")
    tally.cli_error(r, "classes differ from the run's", input="eval data with another class set")


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--shots", 0], r"--shots.*(positive|range x>=1)"),
        (["--shots", 99], r"--allow-fewer"),
        (["--views", -1], r"--views"),
        (["--lam", "lots"], r"(--lam|lam must be a number)"),
        (["--method", "nope"], r"nope"),
        (["--classnames", "MISSING"], r"MISSING does not exist"),
    ],
)
def test_bad_options_name_the_option(tmp_path, tally, args, expected):
    data = make_folder(tmp_path / "data", per_class=4)
    r = fit(data, tmp_path, *[str(tmp_path / a) if a == "MISSING" else a for a in args])
    tally.cli_error(r, expected, input=" ".join(map(str, args)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "body,expected",
    [
        ("datasets: [dtd]\nmethods: [prolip]\nshot: [1]\n", r"unknown key.*'shot'"),
        ("datasets: [dtd]\nmethods: [prolip]\nviews: many\n", r"'views' must be an integer"),
        ("datasets: [dtd]\nmethods: [prolip]\nseeds: [one]\n", r"'seeds'"),
        ("datasets: dtd\nmethods: [prolip]\n", r"'datasets' must be a list"),
        ("- just\n- a list\n", r"mapping|dict|keys"),
        ("datasets: [dtd\n", r"YAML|yaml"),
    ],
)
def test_bad_experiment_files_name_the_key(tmp_path, tally, body, expected):
    exp = tmp_path / "exp.yaml"
    exp.write_text(body)
    r = cli("bench", exp, "--out", tmp_path / "results")
    tally.cli_error(r, expected, input=f"experiment file {body.splitlines()[-1]!r}")
