"""Faults during extraction and saving: kills, concurrent writers, corrupt shards, read-only and full disks.

Nothing computed may be lost and nothing corrupt may ever be read back.
"""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prolip.features import CacheError, FeatureCache

from .conftest import TINY, leftovers, make_images, remount, tmpfs, unit_contents

pytestmark = pytest.mark.reliability("fault")

DRIVER = Path(__file__).with_name("_driver.py")


def cache_of(root, backbone, **kw):
    kw.setdefault("unit_images", 4)
    kw.setdefault("batch_size", 8)
    return FeatureCache(root, backbone, progress=False, **kw)


def drive(spec: dict, timeout=180) -> dict:
    r = subprocess.run(
        [sys.executable, str(DRIVER), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_kill_minus_nine_at_random_points_then_resume_is_bitwise_equal(tmp_path, tally):
    make_images(tmp_path / "img", n=16)
    report = drive(
        {
            "mode": "kill",
            "images": str(tmp_path / "img"),
            "work": str(tmp_path),
            "seed": 7,
            "kills": 9,
            "views": 3,
            "unit_images": 2,
            "batch_size": 4,
        }
    )
    killed = [a for a in report["attempts"] if a["signal"] == signal.SIGKILL]
    tally.fault(*(a["how"] for a in killed))
    at_events = [a for a in killed if a["cache"] == "cache"]
    assert len(at_events) == 6 and len({a["how"] for a in at_events}) >= 5, report["attempts"]  # distinct points
    # Every kill kept every unit finished before it, and no file left on disk fails its checksum.
    assert tally.lost(sum(len(a["lost"]) + len(a["corrupt"]) for a in report["attempts"])) == 0, report
    assert at_events[-1]["units_done"] < 8 and any(a["units_done"] > 0 for a in at_events)  # resume has work
    for name in ("cache", "cache_timed"):  # kills at seeded events, and kills from outside at random moments
        assert report[name]["resume_status"] == 0
        out = json.loads((tmp_path / f"out_{name}.json").read_text())
        # Only unfinished units were recomputed: one forward pass per view of each image not cached yet.
        assert out["forward"] == (16 - report[name]["images_cached_before_resume"]) * 3
        assert torch.equal(torch.load(tmp_path / f"out_{name}.pt"), torch.load(tmp_path / "ref.pt"))
        assert unit_contents(tmp_path / name) == unit_contents(tmp_path / "ref_cache")
        assert leftovers(tmp_path / name) == []


def test_two_processes_share_one_cache(tmp_path, tally):
    make_images(tmp_path / "img", n=12)
    report = drive(
        {
            "mode": "concurrent",
            "images": str(tmp_path / "img"),
            "work": str(tmp_path),
            "views": 3,
            "unit_images": 2,
            "batch_size": 4,
        }
    )
    tally.fault("two concurrent writers")
    assert report["statuses"] == [0, 0]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["forward"] for n in "ab")
    assert torch.equal(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt"))
    assert 12 * 3 <= a + b <= 12 * 3 + 2 * 3  # no double work beyond one unit
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6 and leftovers(tmp_path / "cache") == []


def test_bitflip_and_truncation_are_detected_and_recomputed(tmp_path, tiny_vit, tally):
    paths = make_images(tmp_path / "img", n=4)
    reference = cache_of(tmp_path / "cache", tiny_vit).views(paths, 2).to_tensor()
    (unit,) = list((tmp_path / "cache").rglob("*.safetensors"))
    data = bytearray(unit.read_bytes())
    data[-3] ^= 0xFF
    unit.write_bytes(bytes(data))
    tally.fault("bit flip")
    c = cache_of(tmp_path / "cache", tiny_vit)
    with pytest.warns(UserWarning, match="corrupt"):
        again = c.views(paths, 2).to_tensor()
    assert c.stats.forward_passes == 8 and tally.lost(int(not torch.equal(again, reference))) == 0
    (unit,) = list((tmp_path / "cache").rglob("*.safetensors"))
    unit.write_bytes(unit.read_bytes()[:100])
    tally.fault("truncated shard")
    with pytest.warns(UserWarning, match="corrupt"):
        again = cache_of(tmp_path / "cache", tiny_vit).views(paths, 2).to_tensor()
    assert tally.lost(int(not torch.equal(again, reference))) == 0


def test_read_only_cache_dir_is_a_clear_error(tmp_path, tiny_vit, tally):
    paths = make_images(tmp_path / "img", n=2)
    if os.geteuid() == 0:  # root ignores permission bits: a read-only mount still stops it
        with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
            tally.fault("read-only filesystem")
            unusable = rf"(cannot create feature cache directory {ro}/|{ro}\S* is not writable)"
            with tally.raises(CacheError, match=unusable + ".*use a writable cache directory"):
                cache_of(ro / "cache", tiny_vit).center(paths)
            assert list(ro.iterdir()) == []
        return
    (tmp_path / "cache").mkdir()
    os.chmod(tmp_path / "cache", 0o500)
    try:
        tally.fault("read-only directory")
        with tally.raises(CacheError, match=rf"{tmp_path / 'cache'}.*not writable"):
            cache_of(tmp_path / "cache", tiny_vit).center(paths)
    finally:
        os.chmod(tmp_path / "cache", 0o700)
    assert leftovers(tmp_path / "cache") == []


def test_enospc_on_fsync_leaves_no_partial_entries(tmp_path, tiny_vit, monkeypatch, tally):
    import prolip.features.storage as storage_mod

    paths = make_images(tmp_path / "img", n=2)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage_mod.os, "fsync", full_disk)
    tally.fault("ENOSPC at fsync")
    with tally.raises(CacheError, match=rf"{tmp_path / 'cache'}.* is full"):
        cache_of(tmp_path / "cache", tiny_vit).center(paths)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_full_tmpfs_then_resume_after_the_limit_is_lifted(tmp_path, tiny_vit, tally):
    """A real full disk: a 5-page tmpfs holds a few units (+ a lock and a temporary), then writes fail."""
    paths = make_images(tmp_path / "img", n=16)
    reference = cache_of(tmp_path / "ref", tiny_vit, unit_images=2, batch_size=4).views(paths, 3).to_tensor()
    with tmpfs(tmp_path / "disk", "20k") as disk:
        cache_dir = disk / "cache"
        tally.fault("tmpfs full")
        with tally.raises(CacheError, match=rf"{cache_dir}.* is full .*free space or use another cache directory"):
            cache_of(cache_dir, tiny_vit, unit_images=2, batch_size=4).views(paths, 3)
        assert leftovers(cache_dir) == []
        done = unit_contents(cache_dir)
        assert 0 < len(done) < 8  # some units made it before the disk filled up
        assert all(unit_contents(tmp_path / "ref")[name] == v for name, v in done.items())
        remount(disk, "size=4m")  # the user frees space
        resumed = cache_of(cache_dir, tiny_vit, unit_images=2, batch_size=4)
        features = resumed.views(paths, 3).to_tensor()
        assert resumed.stats.forward_passes == (16 - 2 * len(done)) * 3  # only unfinished units recomputed
        assert tally.lost(sum(unit_contents(cache_dir).get(n) != v for n, v in done.items())) == 0
        assert torch.equal(features, reference)
        assert unit_contents(cache_dir) == unit_contents(tmp_path / "ref") and leftovers(cache_dir) == []


EXTRACT_CLI = [
    sys.executable,
    "-c",
    "from prolip.cli import main; main()",
    "extract",
    "--split",
    "train",
    *TINY,
    "--views",
    "3",
    "--batch-size",
    "4",
]


def _limited(limit: int):
    def preexec():
        # A real per-file size limit (ulimit -f): writes past it fail with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_file_size_limit_is_a_full_disk_then_resume(tmp_path, tally):
    from .conftest import make_folder

    data = make_folder(tmp_path / "data", per_class=3)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    cache_dir = tmp_path / "cache"
    args = [*EXTRACT_CLI, "--data", str(data), "--cache-dir", str(cache_dir)]
    tally.fault("RLIMIT_FSIZE 2 KiB")
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=180, preexec_fn=_limited(2048))
    tally.cli_error(
        r,
        rf"feature cache directory {cache_dir}\S* is full \(File too large\)",
        "another cache directory",
        r"\(--cache-dir\)",
    )
    assert leftovers(cache_dir) == [] and unit_contents(cache_dir) == {}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "27 forward passes" in r.stderr  # 9 images x 3 views, all of them computed once the limit is gone
    ref = subprocess.run(
        [*EXTRACT_CLI, "--data", str(data), "--cache-dir", str(tmp_path / "ref")],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert tally.lost(int(unit_contents(cache_dir) != unit_contents(tmp_path / "ref"))) == 0


def test_uncreatable_cache_dir_is_a_clear_error(tmp_path, tiny_vit, tally):
    paths = make_images(tmp_path / "img", n=2)
    (tmp_path / "blocker").write_text("a file where the cache dir should go")
    tally.fault("cache dir path blocked by a file")
    with tally.raises(CacheError, match="blocker.*use a writable cache directory"):
        FeatureCache(tmp_path / "blocker" / "cache", tiny_vit, progress=False).center(paths)


def test_lock_and_temporary_of_a_killed_writer_block_nothing(tmp_path, tiny_vit, tally):
    """A writer killed (-9) while holding a unit's lock loses the lock with its process; its lock file and
    half-written temporary are left behind, and the next holder computes the unit and cleans both up."""
    paths = make_images(tmp_path / "img", n=4)
    c = cache_of(tmp_path / "cache", tiny_vit)
    ns = c.namespace_dir("center", 0)
    ns.mkdir(parents=True)
    from prolip.features import image_key
    from prolip.features.storage import unit_file

    target = unit_file(ns, sorted(image_key(p) for p in paths), 1)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time
from filelock import FileLock
FileLock({str(target.with_suffix(".lock"))!r}).acquire()
open({str(target.with_name(f".{target.name}.999999.tmp"))!r}, "wb").write(b"half a unit")
print("locked", flush=True)
time.sleep(600)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.kill()  # SIGKILL: no cleanup of any kind
        holder.wait()
        tally.fault("lock held by a killed process", "temporary of a killed process")
        assert leftovers(tmp_path / "cache") != []
        assert c.center(paths).features.shape == (4, tiny_vit.dim_pre) and c.stats.forward_passes == 4
        assert leftovers(tmp_path / "cache") == [] and target.exists()
    finally:
        holder.kill()


def test_a_unit_written_while_waiting_for_its_lock_is_not_recomputed(tmp_path, tiny_vit, tally):
    """Two processes want the same unit: the second waits on the lock and then reuses what the first wrote."""
    from prolip.features import image_key
    from prolip.features.storage import unit_file

    paths = make_images(tmp_path / "img", n=3)
    reference = cache_of(tmp_path / "ref", tiny_vit).center(paths).features
    (unit,) = (tmp_path / "ref").rglob("*.safetensors")
    c = cache_of(tmp_path / "cache", tiny_vit)
    ns = c.namespace_dir("center", 0)
    ns.mkdir(parents=True)
    target = unit_file(ns, sorted(image_key(p) for p in paths), 1)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import shutil, time
from filelock import FileLock
with FileLock({str(target.with_suffix(".lock"))!r}):
    print("locked", flush=True)
    time.sleep(1.0)
    shutil.copyfile({str(unit)!r}, {str(target)!r})
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "locked"
    tally.fault("unit written by another process while waiting")
    got = c.center(paths).features
    assert writer.wait() == 0
    assert c.stats.forward_passes == 0 and tally.lost(int(not torch.equal(got, reference))) == 0


# ---- runs and exports ------------------------------------------------------------------------------------------


def _run():
    from prolip.run import Run

    manifest = {
        "backbone": {"family": "open_clip", "arch": "test-vit-tiny", "weights": "none", "fingerprint": "f"},
        "method": {"method": "prolip", "hyperparameters": {}},
        "fit": {"shots": 1},
        "logit_scale": 100.0,
    }
    return Run(
        manifest=manifest,
        method_state={"W": torch.randn(8, 4)},
        classifier=torch.randn(3, 4),
        classnames=["a", "b", "c"],
        templates=["a photo of a {}."],
    )


def _killed_save(out: Path, run, kill_at: int, force: bool, exchange: bool = True) -> int:
    """Save ``run`` in a forked child that SIGKILLs itself at the kill_at-th file operation.

    ``exchange=False`` takes the path of systems without an atomic swap (two renames).
    """
    import prolip.outputs as outputs_mod
    import prolip.run as run_mod

    pid = os.fork()
    if pid == 0:
        count = [0]

        def hook(fn):
            def wrapped(*a, **k):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*a, **k)

            return wrapped

        run_mod.save_file = hook(run_mod.save_file)
        run_mod._write_json = hook(run_mod._write_json)
        os.replace = hook(os.replace)
        if not exchange:
            outputs_mod._exchange = lambda a, b: False
        try:
            run.save(out, force=force)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def test_fit_killed_while_saving_never_leaves_a_half_written_run(tmp_path, tally):
    from prolip.run import Run

    first, second = _run(), _run()
    kills = 0
    for kill_at in range(1, 8):  # every file operation of a save (6 at most), and one past the end
        out = tmp_path / f"new{kill_at}"
        kills += _killed_save(out, first, kill_at, force=False) == signal.SIGKILL
        # Either no run at all, or a complete one: never a half-written directory under the name.
        assert not out.exists() or torch.equal(Run.load(out).method_state["W"], first.method_state["W"])
        # Over an existing run: the old one or the new one, complete, is always there.
        old = tmp_path / f"old{kill_at}"
        first.save(old)
        kills += _killed_save(old, second, kill_at, force=True) == signal.SIGKILL
        W = Run.load(old).method_state["W"]
        assert torch.equal(W, first.method_state["W"]) or torch.equal(W, second.method_state["W"])
    tally.fault(*["kill -9 while saving a run"] * kills)
    assert kills >= 10
    # A later save of the same name sweeps the temporaries its killed predecessors left behind.
    for kill_at in (1, 3):
        _killed_save(tmp_path / "again", first, kill_at, force=False)
    assert any(p.name.startswith(".again.") for p in tmp_path.iterdir())
    second.save(tmp_path / "again", force=True)
    assert (
        tally.lost(int(not torch.equal(Run.load(tmp_path / "again").method_state["W"], second.method_state["W"]))) == 0
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".again.")] == []


def test_overwrite_killed_between_the_two_renames_points_at_the_old_run(tmp_path, tally):
    """Without an atomic swap, a kill after moving the old run aside leaves it complete, and load says where."""
    from prolip.run import Run, RunError

    first, second = _run(), _run()
    out = tmp_path / "r"
    first.save(out)
    # 5 file writes, then os.replace(out, aside) is operation 6 and os.replace(tmp, out) operation 7.
    assert _killed_save(out, second, 7, force=True, exchange=False) == signal.SIGKILL
    tally.fault("kill -9 between the two renames of an overwrite")
    with tally.raises(
        RunError,
        match=rf"{out} does not exist, but an interrupted overwrite left the previous run "
        rf"at .*\.r\.old-\d+: rename it to {out}",
    ):
        Run.load(out)
    (aside,) = tmp_path.glob(".r.old-*")
    assert tally.lost(int(not torch.equal(Run.load(aside).method_state["W"], first.method_state["W"]))) == 0
    # And uninterrupted, the same path swaps the runs and leaves nothing beside them.
    assert _killed_save(tmp_path / "s", first, 99, force=False, exchange=False) == 0
    assert _killed_save(tmp_path / "s", second, 99, force=True, exchange=False) == 0
    assert torch.equal(Run.load(tmp_path / "s").method_state["W"], second.method_state["W"])
    assert not list(tmp_path.glob(".s.*"))
