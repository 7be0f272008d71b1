"""Where results are written: prolip never deletes or overwrites what it did not write, never writes over, into or
around the data it reads, checks --out before any work, lets one process at a time write an output, and gives
run and export files the permissions of the user's umask.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prolip.run import Run

from .conftest import cli, digest, fake_run, fit_cli, make_folder

pytestmark = pytest.mark.reliability("output")


def fit(data, out, cache, *extra):
    return fit_cli(data, out, cache, *extra, shots=1, views=1, steps=2)


# ---- fit --out [--force]: what may be replaced -------------------------------------------------------------------


def _targets(tmp: Path, data: Path) -> dict[str, tuple[Path, str]]:
    """name -> (--out, what the refusal must say): outputs prolip must refuse, even with --force."""
    runs = tmp / "runs"
    fake_run(runs / "old_run")
    (runs / "notes.txt").write_text("my notes")
    user = tmp / "user"
    user.mkdir()
    (user / "photo.jpg").write_bytes(b"not really a photo")
    tampered_run = tmp / "run_plus"
    fake_run(tampered_run)
    (tampered_run / "notes.txt").write_text("added by hand")
    (tmp / "a_file").write_text("a file")
    (tmp / "link_to_run").symlink_to(runs / "old_run", target_is_directory=True)
    return {
        "the data folder": (data, "is the data being read"),
        "a folder holding the data": (data.parent, "contains the data being read"),
        "a new folder inside the data": (data / "run", "inside the data being read"),
        "a folder of runs and a user's file": (runs, "not empty and not written by prolip"),
        "a user's folder": (user, "not empty and not written by prolip"),
        "a run a user added a file to": (tampered_run, "not empty and not written by prolip"),
        "an existing file": (tmp / "a_file", "it exists and is a file"),
        "a path under a file": (tmp / "a_file" / "run", "is a file, not a folder"),
        "a symlink to a run": (tmp / "link_to_run", "it exists and is a symbolic link"),
    }


TARGET_NAMES = [
    "the data folder",
    "a folder holding the data",
    "a new folder inside the data",
    "a folder of runs and a user's file",
    "a user's folder",
    "a run a user added a file to",
    "an existing file",
    "a path under a file",
    "a symlink to a run",
]


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_fit_force_never_replaces_what_prolip_did_not_write(tmp_path, target, tally):
    root = tmp_path / "work"
    data = make_folder(root / "data", per_class=3)
    out, why = _targets(root, data)[target]
    before = digest(root)
    r = fit(data, out, tmp_path / "cache", "--force")
    tally.cli_error(r, re.escape(str(out)), re.escape(why), input=f"fit --force --out {target}")
    assert tally.lost(int(digest(root) != before)) == 0  # not a byte changed, added or deleted
    assert not (tmp_path / "cache").exists()  # refused before any extraction


def test_fit_force_replaces_an_earlier_run_or_an_empty_folder(tmp_path, tally):
    data = make_folder(tmp_path / "data", per_class=3)
    (tmp_path / "empty").mkdir()
    fake_run(tmp_path / "run")
    for out in (tmp_path / "empty", tmp_path / "run"):
        r = fit(data, out, tmp_path / "cache")
        tally.cli_error(r, re.escape(f"{out} already exists; pass --force"), input=f"fit over {out.name}")
        r = fit(data, out, tmp_path / "cache", "--force")
        assert r.exit_code == 0, r.output
        assert Run.load(out).classnames == ["cat", "dog", "fox"]
    tally.handled_ok("earlier run and empty folder replaced with --force")


# ---- the same rule in the library writers --------------------------------------------------------------------------


def test_run_save_with_force_refuses_foreign_folders_and_the_data(tmp_path, tally):
    from prolip.outputs import OutputError

    data = make_folder(tmp_path / "data", per_class=1)
    for name, (out, why) in _targets(tmp_path, data).items():
        before = digest(tmp_path)
        with tally.raises(OutputError, match=re.escape(why), input=f"Run.save(force=True) over {name}"):
            fake_run().save(out, force=True, data_paths=[data])
        assert tally.lost(int(digest(tmp_path) != before)) == 0


def test_exports_with_force_refuse_files_and_folders_prolip_did_not_write(tmp_path, tiny_vit, tiny_hf, tally):
    from prolip.export import export_hf, export_open_clip, save_classifier_head
    from prolip.outputs import OutputError

    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    (tmp_path / "weights.safetensors").write_bytes(b"someone else's checkpoint")
    W = tiny_vit.projection().weight
    attempts = {
        "export_hf over a user's folder": lambda: export_hf(tiny_hf, tiny_hf.projection().weight, user, force=True),
        "export_open_clip over a foreign file": lambda: export_open_clip(
            tiny_vit, W, tmp_path / "weights.safetensors", force=True
        ),
        "classifier head into a user's folder": lambda: save_classifier_head(
            torch.ones(2, 3), ["a", "b"], ["{}"], user, force=True
        ),
    }
    for name, attempt in attempts.items():
        before = digest(tmp_path)
        with tally.raises(
            OutputError, match=r"(not empty and not written by prolip|prolip did not write it)", input=name
        ):
            attempt()
        assert tally.lost(int(digest(tmp_path) != before)) == 0
    # What prolip wrote, it may replace with force.
    export_hf(tiny_hf, tiny_hf.projection().weight, tmp_path / "hf")
    save_classifier_head(torch.ones(2, 3), ["a", "b"], ["{}"], tmp_path / "hf")
    export_hf(tiny_hf, tiny_hf.projection().weight, tmp_path / "hf", force=True)
    export_open_clip(tiny_vit, W, tmp_path / "m.safetensors")
    export_open_clip(tiny_vit, W, tmp_path / "m.safetensors", force=True)
    tally.handled_ok("exports replaced with force")


# Entries a directory may hold before a forced save: run files, the files of a user, folders.
ENTRIES = [
    "manifest.json",
    "method.safetensors",
    "classifier.safetensors",
    "classnames.json",
    "templates.json",
    "extra.json",
    "notes.txt",
    "photo.jpg",
    "sub/",
    "sub/x.jpg",
    ".hidden",
    "records.jsonl",
    "classifier_head.json",
]
MANIFESTS = [{"format": "prolip-run/1"}, {"format": "other/1"}, "not json", ["format", "prolip-run/1"]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.sets(st.sampled_from(ENTRIES), max_size=6), manifest=st.sampled_from(MANIFESTS))
def test_a_forced_save_replaces_only_empty_folders_and_runs(entries, manifest, tally):
    """Any folder: a forced save either refuses and changes nothing, or the folder held nothing but a run."""
    from prolip.outputs import OutputError

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        out.mkdir()
        for name in entries:
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith("/"):
                path.mkdir(exist_ok=True)
            elif name == "manifest.json":
                path.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
            else:
                path.write_text(name)
        (Path(d) / "beside.txt").write_text("a sibling")
        before = digest(Path(d))
        tally.input(f"forced save over {sorted(entries)}")
        top = {e.split("/")[0] for e in entries}
        a_run = (
            "manifest.json" in top
            and manifest == MANIFESTS[0]
            and all(e.endswith((".json", ".safetensors")) for e in top)
        )
        try:
            fake_run().save(out, force=True)
        except OutputError as e:
            assert entries and not a_run, f"refused {sorted(entries)}: {e}"
            tally.clear_error(e, str(out))
            assert tally.lost(int(digest(Path(d)) != before)) == 0
            return
        assert not entries or a_run, f"replaced {sorted(entries)}"
        assert (Path(d) / "beside.txt").read_text() == "a sibling"
        tally.handled_ok("replaced a run or an empty folder")


# ---- pre-flight: before any work -----------------------------------------------------------------------------------


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, tally):
    from .conftest import tmpfs

    data = make_folder(tmp_path / "data", per_class=2)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        r = fit(data, ro / "run", tmp_path / "cache")
        tally.cli_error(r, re.escape(str(ro / "run")), "no permission to write", input="--out on a read-only disk")
    assert not (tmp_path / "cache").exists()


def test_bench_and_report_refuse_a_results_folder_that_is_not_theirs(tmp_path, tally):
    data = make_folder(tmp_path / "data", per_class=2)
    user = tmp_path / "user"
    user.mkdir()
    (user / "results.txt").write_text("my results")
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"datasets: [{data}]\nmethods: [zeroshot]\nmodel: test-vit-tiny\npretrained: none\nshots: [1]\n"
        f"seeds: [1]\nviews: 1\ncache_dir: {tmp_path / 'cache'}\n"
    )
    records = tmp_path / "res"
    records.mkdir()
    (records / "records.jsonl").write_text(
        json.dumps(
            {
                "cell": "c1",
                "protocol": "fewshot",
                "dataset": "d",
                "label": "zeroshot",
                "method": "zeroshot",
                "shots": 1,
                "seed": 1,
                "accuracy": 50.0,
            }
        )
        + "\n"
    )
    before = digest(tmp_path)
    for args, why in (
        (["bench", exp, "--out", user], "not empty and not written by prolip"),
        (["bench", exp, "--out", data / "results"], "inside the data being read"),
        (["report", records, "--out", user], "not empty and not written by prolip"),
        (["report", records, "--out", exp], "it exists and is a file"),
    ):
        r = cli(*args)
        tally.cli_error(r, re.escape(why), input=" ".join(map(str, args[:1] + args[2:])))
    assert tally.lost(int(digest(tmp_path) != before)) == 0
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs_run")
    data = make_folder(root / "data", per_class=3)
    r = fit(data, root / "run", root / "cache")
    assert r.exit_code == 0, r.output
    return root / "run"


def test_export_refuses_the_run_it_reads_and_folders_inside_it(fitted, tally):
    before = digest(fitted)
    for out, why in ((fitted, "is the data being read"), (fitted / "exported", "inside the data being read")):
        r = cli("export", fitted, "--out", out, "--force")
        tally.cli_error(r, re.escape(why), input=f"export --out {out.name}")
    assert tally.lost(int(digest(fitted) != before)) == 0
    Run.load(fitted)


# ---- one writer per output -----------------------------------------------------------------------------------------

HOLD = (
    "import sys, time\nfrom prolip.outputs import output_lock\nwith output_lock(sys.argv[1]):\n"
    "    print('held', flush=True)\n    time.sleep(120)\n"
)


def test_a_second_writer_is_refused_at_the_start_and_a_killed_one_blocks_nobody(tmp_path, tally):
    data = make_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        tally.fault("another process writing the same --out")
        r = fit(data, out, tmp_path / "cache")
        tally.cli_error(r, re.escape(f"another prolip process is writing {out}"), input="a second fit on one --out")
        assert not (tmp_path / "cache").exists() and not out.exists()
        with tally.raises(Exception, match="another prolip process is writing"):
            fake_run().save(out)
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
    tally.fault("kill -9 of the writer holding the lock")
    r = fit(data, out, tmp_path / "cache")
    assert r.exit_code == 0, r.output
    assert tally.lost(int(Run.load(out).classnames != ["cat", "dog", "fox"])) == 0


def test_the_lock_is_reentrant_within_a_thread_and_leaves_nothing_beside_the_output(tmp_path, tally):
    from prolip.outputs import output_lock

    out = tmp_path / "run"
    with output_lock(out):
        with output_lock(tmp_path / "." / "run"):  # the CLI's pre-flight holds it while Run.save takes it again
            fake_run(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    tally.handled_ok("re-entrant lock, no lock file beside the output")


# ---- permissions ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_runs_and_exports_get_the_permissions_of_the_umask(tmp_path, umask, tiny_vit, tiny_hf, tally):
    from prolip.export import export_hf, export_open_clip, save_classifier_head

    previous = os.umask(umask)
    try:
        fake_run(tmp_path / "run")
        fake_run().save(tmp_path / "run", force=True)
        export_open_clip(tiny_vit, tiny_vit.projection().weight, tmp_path / "export" / "open_clip.safetensors")
        save_classifier_head(torch.ones(2, 3), ["a", "b"], ["{}"], tmp_path / "export")
        export_hf(tiny_hf, tiny_hf.projection().weight, tmp_path / "hf")
    finally:
        os.umask(previous)
    written = [p for name in ("run", "export", "hf") for p in [tmp_path / name, *(tmp_path / name).rglob("*")]]
    wrong = {
        str(p): oct(p.stat().st_mode & 0o777)
        for p in written
        if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask
    }
    tally.input(f"umask {oct(umask)}")
    assert wrong == {}
    tally.handled_ok(f"{len(written)} paths with the umask's permissions")
